"""Streaming detokenization: whole characters only, and the pieces join to the full decode."""

import random

import pytest

from mlx_gpt.detokenizer import REPLACEMENT, StreamingDetokenizer
from mlx_gpt.tokenizer import ByteTokenizer

TEXTS = ["héllo wörld", "€100 and ¥200", "日本語のテキスト", "emoji 🙂🚀 mixed with ascii", "Ünïcödé\nnew line ✓",
         "a🙂", "🙂"]

# GPT-2's pre-tokenization pattern (from its encoder.py)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenGPT2:
    """GPT-2's byte-level BPE through tiktoken, built from GPT-2's own files, as a Tokenizer."""

    kind = "gpt2"
    eot_id = 50256
    vocab_size = 50257

    def __init__(self, directory):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        ranks = data_gym_to_mergeable_bpe_ranks(str(directory / "vocab.bpe"), str(directory / "encoder.json"))
        self._enc = tiktoken.Encoding("gpt2-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={"<|endoftext|>": self.eot_id})

    def encode(self, text):
        return self._enc.encode_ordinary(text)

    def decode(self, ids):
        return self._enc.decode(list(ids), errors="replace")


@pytest.fixture(scope="module", params=["byte", "sentencepiece", "gpt2-tiktoken", "gpt2"])
def tokenizer(request, sp_tokenizer):
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "sentencepiece":
        return sp_tokenizer
    gpt2_dir = request.getfixturevalue("data_files") / "gpt2"
    if request.param == "gpt2-tiktoken":
        return TiktokenGPT2(gpt2_dir)
    gpt2 = pytest.importorskip("mlx_gpt.gpt2_tokenizer")
    return gpt2.GPT2Tokenizer.from_directory(gpt2_dir)


def stream_pieces(tokenizer, ids, context=()):
    detok = StreamingDetokenizer(tokenizer, context)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_shows_whole_characters_and_equals_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > 1
    pieces, tail = stream_pieces(tokenizer, ids)
    assert not any(REPLACEMENT in p for p in pieces)
    assert tail == ""
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stream_after_a_prompt_context(tokenizer):
    prompt, text = tokenizer.encode("Prompt: é"), " très 日本 🙂!"
    ids = tokenizer.encode(text)
    pieces, tail = stream_pieces(tokenizer, ids, context=prompt)
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(pieces) + tail == tokenizer.decode(ids) == text


def test_text_appears_as_soon_as_a_character_is_complete():
    tok = ByteTokenizer()
    ids = list("a€b".encode())  # 1 + 3 + 1 bytes
    pieces, _ = stream_pieces(tok, ids)
    assert pieces == ["a", "", "", "€", "b"]


def test_random_ids_join_to_the_decode(tokenizer):
    """Arbitrary ids (cut and invalid UTF-8 included): what streams out is exactly the decode."""
    rng = random.Random(0)
    vocab = [i for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id]
    for trial in range(20):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        context = [rng.choice(vocab)] if trial % 2 else []
        pieces, tail = stream_pieces(tokenizer, ids, context)
        assert "".join(pieces) + tail == tokenizer.decode(ids)


def test_random_bytes_with_cut_characters():
    tok = ByteTokenizer()
    rng = random.Random(1)
    for _ in range(200):
        ids = list(bytes(rng.choice([0x41, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF, 0x9F]) for _ in range(12)))
        pieces, tail = stream_pieces(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)
