"""Bulk GPT-2 encoding (prepare's workers) gives tiktoken's ids on any text, pieces remembered or not."""

import mlx_gpt.gpt2_bulk as bulk
from mlx_gpt.gpt2_bulk import BulkEncoder
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
from test_gpt2_tokenizer import TEXTS, _random_texts, tiktoken_gpt2

# characters Python's re classes differently from GPT-2's \p{L} / \p{N} / \s, and a few that it does not
ODD = ["½ cup", "x² + y²", "Chapter Ⅻ", "a\x1cb\x1f c", "١٢٣ ٤", "snake_case __init__ _x", "naïve café", "e\u0301 ok"]


def test_ids_equal_tiktoken_on_varied_text(data_files, monkeypatch):
    enc = tiktoken_gpt2(data_files / "gpt2")
    encoder = BulkEncoder(GPT2Tokenizer.from_path(data_files / "gpt2"))
    texts = TEXTS + ODD + _random_texts(300, seed=7) + [(data_files / "the-verdict.txt").read_text()]
    for rounds in range(2):  # the second time every piece is remembered
        for text in texts:
            assert encoder.encode(text) == enc.encode_ordinary(text), repr(text[:60])
    monkeypatch.setattr(bulk, "MAX_REMEMBERED", 50)  # forgetting keeps memory bounded, never the ids
    small = BulkEncoder(encoder.tokenizer)
    for text in texts[:40]:
        assert small.encode(text) == enc.encode_ordinary(text) and len(small.known) <= 50 + len(text)
