from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt import checkpoint
from mlx_gpt.errors import UserError
from mlx_gpt.generate import generate
from mlx_gpt.models.ngram import NGramConfig, fit
from mlx_gpt.tokenizer import ByteTokenizer

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n") * 3
V = 256
MODELS = [("add-k", 1), ("add-k", 2), ("add-k", 3), ("add-k", 5), ("kneser-ney", 1), ("kneser-ney", 2),
          ("kneser-ney", 3), ("kneser-ney", 5)]


def tokens_of(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int64)


def probs(model, ids) -> np.ndarray:
    """Next-token distributions (T, V) after each prefix of ids (bytes or token ids)."""
    ids = list(ids)
    return np.exp(np.array(model(mx.array(np.asarray(ids, np.int32)[None]))[0], dtype=np.float64))


def reference_kneser_ney(tokens: list[int], n: int):
    """Interpolated Kneser-Ney written straight from its definition, with dicts."""
    counts = {m: Counter(tuple(tokens[i:i + m]) for i in range(len(tokens) - m + 1)) for m in range(1, n + 1)}
    cont = {m: Counter(g[1:] for g in counts[m + 1]) for m in range(1, n)}

    def a(m, g):
        return counts[m][g] if m == n else cont[m][g]

    D = {}
    for m in range(1, n + 1):
        values = list((counts[m] if m == n else cont[m]).values())
        n1, n2 = values.count(1), values.count(2)
        D[m] = n1 / (n1 + 2 * n2) if n1 else 0.5

    def p(h: tuple, w: int) -> float:
        m = len(h) + 1
        if m == 1:
            total = sum(a(1, (x,)) for x in range(V))
            seen = sum(a(1, (x,)) > 0 for x in range(V))
            return (max(a(1, (w,)) - D[1], 0) + D[1] * seen / V) / total
        lower = p(h[1:], w)
        total = sum(a(m, h + (x,)) for x in range(V))
        if total == 0:
            return lower
        seen = sum(a(m, h + (x,)) > 0 for x in range(V))
        return (max(a(m, h + (w,)) - D[m], 0) + D[m] * seen * lower) / total

    return p


@pytest.mark.parametrize("smoothing,n", MODELS)
def test_distributions_sum_to_one_for_seen_and_unseen_contexts(smoothing, n):
    model = fit(tokens_of(TEXT), NGramConfig(order=n, smoothing=smoothing, k=0.05))
    seen = tokens_of("it was the age of")
    unseen = tokens_of("\x00\x01QZXJ~~ zq")  # bytes and n-grams the text never holds
    for ids in (seen, unseen, np.concatenate([seen, unseen])):
        p = probs(model, ids)
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=2e-5)
        assert (p > 0).all()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_kneser_ney_equals_its_definition(n):
    text = TEXT[:400]
    model = fit(tokens_of(text), NGramConfig(order=n, smoothing="kneser-ney"))
    reference = reference_kneser_ney(list(text.encode()), n)
    query = list(b"the epoch of Qz") + list(text.encode()[50:60])
    p = probs(model, query)
    for t in range(0, len(query), 3):  # contexts cut short at the start back off, as in the definition
        h = tuple(query[max(0, t - n + 2):t + 1]) if n > 1 else ()
        expected = [reference(h, w) for w in range(V)]
        np.testing.assert_allclose(p[t], expected, rtol=2e-5, atol=1e-8)


def test_add_k_is_counts_plus_k_over_context_total_plus_kv():
    text = "abracadabra"
    k = 0.5
    model = fit(tokens_of(text), NGramConfig(order=2, smoothing="add-k", k=k))
    p = probs(model, b"ab")
    follows_a = Counter(text[i + 1] for i in range(len(text) - 1) if text[i] == "a")  # b:2, c:1, d:1
    for ch in "abcdz":
        assert p[0, ord(ch)] == pytest.approx((follows_a[ch] + k) / (4 + k * V), rel=1e-5)
    # the first token has no history: the unigram of that order-1 context
    uni = fit(tokens_of(text), NGramConfig(order=1, k=k))
    assert probs(uni, b"a")[0, ord("a")] == pytest.approx((5 + k) / (11 + k * V), rel=1e-5)
    # an unseen context under add-k is uniform: it cannot back off
    np.testing.assert_allclose(probs(model, b"z")[0], 1 / V, rtol=1e-5)


def test_backoff_gives_unseen_ngrams_nonzero_probability():
    model = fit(tokens_of(TEXT), NGramConfig(order=3, smoothing="kneser-ney"))
    bigram = fit(tokens_of(TEXT), NGramConfig(order=2, smoothing="kneser-ney"))
    p = probs(model, b"the")[-1]  # context "he"
    assert p[ord(" ")] > 0.5  # "he " is what the text says
    assert 0 < p[ord("z")] < 1e-3  # "hez" never occurs: backed-off mass, not zero
    # an unseen context falls back on the lower order's continuation estimate
    q = probs(model, b"qh")[-1]
    assert np.argmax(q) == np.argmax(probs(bigram, b"h")[-1])
    assert (q > 0).all()


@pytest.mark.parametrize("smoothing,n", [("add-k", 2), ("add-k", 3), ("kneser-ney", 3), ("kneser-ney", 5)])
def test_perplexity_on_its_training_text_is_lower_than_on_shuffled_text(smoothing, n, shakespeare):
    text = shakespeare.read_text()[:20000]
    tokens = tokens_of(text)
    model = fit(tokens, NGramConfig(order=n, smoothing=smoothing, k=0.01))
    shuffled = np.random.default_rng(0).permutation(tokens)
    assert _perplexity(model, tokens) < 0.5 * _perplexity(model, shuffled)


def test_unigram_perplexity_ignores_word_order(shakespeare):
    tokens = tokens_of(shakespeare.read_text()[:20000])
    model = fit(tokens, NGramConfig(order=1, k=0.01))
    # the first token is never predicted: shuffle the ones that are
    shuffled = np.concatenate([tokens[:1], np.random.default_rng(0).permutation(tokens[1:])])
    assert _perplexity(model, tokens) == pytest.approx(_perplexity(model, shuffled), rel=1e-5)


def _perplexity(model, tokens: np.ndarray) -> float:
    from mlx_gpt.perplexity import total_nll

    nats, n = total_nll(model, tokens)
    return float(np.exp(nats / n))


@pytest.mark.parametrize("smoothing,n", [("add-k", 1), ("add-k", 3), ("kneser-ney", 4)])
def test_cached_steps_equal_one_full_pass(smoothing, n):
    model = fit(tokens_of(TEXT), NGramConfig(order=n, smoothing=smoothing, k=0.1))
    ids = tokens_of("it was the epoch of wisdom")
    full = np.array(model(mx.array(ids[None])))
    cache = model.make_cache()
    parts = [model(mx.array(ids[None, :5]), cache)] + [model(mx.array(ids[None, t:t + 1]), cache)
                                                        for t in range(5, len(ids))]
    np.testing.assert_allclose(np.concatenate([np.array(p) for p in parts], axis=1), full, atol=1e-5)
    assert cache[0].offset == len(ids)


def test_greedy_sampling_follows_the_counts():
    model = fit(tokens_of("abcd" * 50), NGramConfig(order=2, smoothing="kneser-ney"))
    assert generate(model, ByteTokenizer(), "ab", 9, temperature=0) == "cdabcdabc"
    model = fit(tokens_of(TEXT), NGramConfig(order=5, smoothing="kneser-ney"))
    assert generate(model, ByteTokenizer(), "it was the ep", 6, temperature=0) == "och of"


def test_saved_and_loaded_like_any_checkpoint(tmp_path):
    model = fit(tokens_of(TEXT), NGramConfig(order=4, smoothing="kneser-ney"))
    checkpoint.save(tmp_path / "kn", model, ByteTokenizer())
    config = checkpoint.read_config(tmp_path / "kn")
    assert config["model_type"] == "ngram" and config["model"]["sizes"] == list(model.config.sizes)
    loaded, tokenizer = checkpoint.load(tmp_path / "kn")
    assert loaded.config == model.config and tokenizer.kind == "byte"
    ids = mx.array([list(b"it was the")])
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(model(ids)))


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="n must be at least 1"):
        NGramConfig(order=0)
    with pytest.raises(UserError, match="k > 0"):
        NGramConfig(order=2, k=0)
    with pytest.raises(UserError, match="at least 5 tokens"):
        fit(tokens_of("abc"), NGramConfig(order=5))
    with pytest.raises(UserError, match="token ids"):
        fit(np.array([1, 2, 300]), NGramConfig(order=2))
