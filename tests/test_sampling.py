"""Logit processors on hand-made distributions: each keeps exactly the tokens it should."""

import math

import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.sampling import (SamplingConfig, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                              mark_seen, process_logits, sample)

# one row, probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04, in shuffled positions
PROBS = np.array([0.10, 0.40, 0.04, 0.25, 0.06, 0.15])
RANKED = [1, 3, 5, 0, 4, 2]  # positions from most to least likely


def logits_of(probs=PROBS) -> mx.array:
    return mx.array(np.log(probs)[None, :], mx.float32)


def kept(logits: mx.array) -> set[int]:
    row = np.array(logits)[0]
    return {int(i) for i in np.flatnonzero(np.isfinite(row))}


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_the_k_most_likely(k):
    out = apply_top_k(logits_of(), k)
    assert kept(out) == set(RANKED[:k])
    np.testing.assert_array_equal(np.array(out)[0, RANKED[:k]], np.array(logits_of())[0, RANKED[:k]])


def test_top_k_zero_or_vocab_keeps_all():
    for k in (0, 6, 100):
        assert kept(apply_top_k(logits_of(), k)) == set(range(6))


@pytest.mark.parametrize("p, n_kept", [
    (0.30, 1),   # 0.40 alone reaches 0.30
    (0.50, 2),   # 0.40 < 0.50, 0.65 reaches it
    (0.70, 3),   # 0.65 < 0.70 <= 0.80
    (0.85, 4),   # 0.80 < 0.85 <= 0.90
    (0.95, 5),
    (0.999, 6),
    (1.0, 6),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, n_kept):
    assert kept(apply_top_p(logits_of(), p)) == set(RANKED[:n_kept])


def test_top_p_rows_are_independent():
    a = np.log(PROBS)
    b = np.log(np.array([0.05, 0.05, 0.05, 0.05, 0.05, 0.75]))
    out = np.array(apply_top_p(mx.array(np.stack([a, b]), mx.float32), 0.5))
    assert set(np.flatnonzero(np.isfinite(out[0]))) == {1, 3}
    assert set(np.flatnonzero(np.isfinite(out[1]))) == {5}


@pytest.mark.parametrize("min_p, n_kept", [
    (0.0, 6),
    (0.09, 6),   # floor 0.036
    (0.11, 5),   # floor 0.044 drops 0.04
    (0.2, 4),    # floor 0.08: 0.40, 0.25, 0.15, 0.10
    (0.5, 2),    # floor 0.20
    (0.7, 1),    # floor 0.28
    (1.0, 1),
])
def test_min_p_keeps_tokens_at_least_min_p_of_the_top(min_p, n_kept):
    assert kept(apply_min_p(logits_of(), min_p)) == set(RANKED[:n_kept])


def test_repetition_penalty_changes_exactly_the_seen_logits():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 0.0, 4.0]])
    seen = mark_seen(mx.zeros((1, 6), mx.bool_), mx.array([[0, 1, 4]]))
    out = np.array(apply_repetition_penalty(logits, seen, 2.0))[0]
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, -3.0, 0.0, 4.0])
    # a penalty below 1 rewards the same tokens instead
    out = np.array(apply_repetition_penalty(logits, seen, 0.5))[0]
    np.testing.assert_allclose(out, [4.0, -0.5, 0.5, -3.0, 0.0, 4.0])


def test_mark_seen_per_row():
    seen = mark_seen(mx.zeros((2, 5), mx.bool_), mx.array([[0, 0, 3], [4, 1, 1]]))
    np.testing.assert_array_equal(np.array(seen), [[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]])


def test_process_applies_temperature_before_truncation():
    cfg = SamplingConfig(temperature=2.0, min_p=0.6)
    out = np.array(process_logits(logits_of(), cfg))[0]
    # temperature 2 turns p into ~sqrt(p): 0.632, 0.5, 0.387, 0.316...; 0.6 of the top is 0.379
    assert set(np.flatnonzero(np.isfinite(out))) == set(RANKED[:3])
    np.testing.assert_allclose(out[RANKED[0]], math.log(0.40) / 2, rtol=1e-6)


def test_top_k_1_sampling_is_argmax():
    logits = mx.random.normal((8, 50), key=mx.random.key(3))
    greedy = sample(logits, SamplingConfig(temperature=0), None)
    for seed in range(5):
        drawn = sample(logits, SamplingConfig(temperature=1.5, top_k=1), mx.random.key(seed))
        np.testing.assert_array_equal(np.array(drawn), np.array(greedy))


def test_sample_draws_follow_the_distribution_and_the_key():
    logits = mx.broadcast_to(logits_of(), (4000, 6))
    cfg = SamplingConfig(temperature=1.0)
    draws = np.array(sample(logits, cfg, mx.random.key(0)))
    freq = np.bincount(draws, minlength=6) / draws.size
    np.testing.assert_allclose(freq, PROBS, atol=0.03)
    np.testing.assert_array_equal(draws, np.array(sample(logits, cfg, mx.random.key(0))))
    assert (draws != np.array(sample(logits, cfg, mx.random.key(1)))).any()


def test_truncated_tokens_are_never_drawn():
    logits = mx.broadcast_to(logits_of(), (2000, 6))
    draws = np.array(sample(logits, SamplingConfig(top_p=0.5), mx.random.key(0)))
    assert set(draws.tolist()) == set(RANKED[:2])


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(min_p=-0.1), dict(min_p=1.1), dict(repetition_penalty=0.0),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)
