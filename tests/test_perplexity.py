import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.perplexity import Score, score, total_nll, utf8_bytes
from mlx_gpt.tokenizer import ByteTokenizer, SentencePieceTokenizer


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("n", [2, 17, 33, 50])  # shorter than, equal to a multiple of, and beyond a window
def test_every_token_after_the_first_is_predicted_once_within_its_window(n):
    model = build(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0)
    tokens = np.random.default_rng(0).integers(0, 32, size=n)
    nats, count = total_nll(model, tokens, batch_size=3)
    expected = 0.0
    for s in range(0, n - 1, 8):  # windows of 8 predictions, each read from a fresh start
        x, y = tokens[s:s + 8], tokens[s + 1:s + 9]
        lp = log_softmax(np.array(model(mx.array(x[None, : len(y)])))[0].astype(np.float64))
        expected -= lp[np.arange(len(y)), y].sum()
    assert count == n - 1
    assert nats == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_divide_nats_by_ln2_and_utf8_bytes():
    s = Score(nats=1000 * math.log(2), tokens=500, bytes=2000)
    assert s.bits_per_byte == pytest.approx(0.5) and s.loss == pytest.approx(2 * math.log(2))
    assert s.perplexity == pytest.approx(4.0)


def test_utf8_bytes_are_counted_the_same_for_every_tokenizer(data_files):
    text = (data_files / "the-verdict.txt").read_text()[:3000] + " naïve café — ünïcödé ✓\n"
    sp = SentencePieceTokenizer.train(text.splitlines(keepends=True), 400)
    for tok in (ByteTokenizer(), sp):
        ids = np.array(tok.encode(text))
        assert utf8_bytes(tok, ids) == len(text.encode("utf-8"))


def test_end_of_text_counts_no_bytes(data_files):
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_directory(data_files / "gpt2")
    ids = np.array(tok.encode("one document") + [tok.eot_id] + tok.encode(" and another"))
    assert utf8_bytes(tok, ids) == len("one document and another")


def test_score_puts_a_uniform_model_at_log_v():
    model = build(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0)
    model.update(tree_map(mx.zeros_like, model.parameters()))  # every logit 0
    tokens = np.frombuffer(b"uniform models know nothing", np.uint8)
    s = score(model, tokens, ByteTokenizer())
    assert s.loss == pytest.approx(math.log(256), rel=1e-6)
    assert s.bits_per_byte == pytest.approx(8.0, rel=1e-6)
