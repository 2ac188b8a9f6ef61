"""KV caches: a prefill plus one-token steps must give the logits of a full forward pass."""

import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt.cpu import accelerate
from mlx_gpt.models.cache import FixedKVCache, KVCache
from mlx_gpt.models.gpt import GPTConfig, build

CFG = GPTConfig(vocab_size=64, block_size=24, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module", params=["plain", "cpu-kernels"])
def model(request):
    """MLX's layers, and on the CPU the same model through mlx_gpt's CPU kernels (a fixed cache's
    attention then reads only the written positions)."""
    m = build(CFG, seed=0)
    if request.param == "cpu-kernels":
        accelerate(m)
    m.eval()
    return m


def tokens(n: int, batch: int = 2) -> mx.array:
    return mx.array(np.random.default_rng(0).integers(0, CFG.vocab_size, (batch, n)), mx.int32)


def incremental_logits(model, caches, idx: mx.array, n_prefill: int) -> mx.array:
    """Logits for every position of idx: one pass over the first n_prefill, then one token at a time."""
    out = [model(idx[:, :n_prefill], caches)]
    for t in range(n_prefill, idx.shape[1]):
        out.append(model(idx[:, t : t + 1], caches))
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("make", [
    lambda: KVCache(),
    lambda: FixedKVCache(CFG.block_size),
    lambda: FixedKVCache(20),
], ids=["growing", "fixed-block", "fixed-20"])
def test_cached_logits_equal_full_forward(model, make):
    idx = tokens(20)
    full = model(idx)
    caches = [make() for _ in range(CFG.n_layer)]
    inc = incremental_logits(model, caches, idx, n_prefill=7)
    np.testing.assert_allclose(np.array(inc), np.array(full), atol=2e-5, rtol=1e-4)
    assert int(np.array(caches[0].offset)) == 20


def test_fixed_cache_prefill_in_two_chunks(model):
    idx = tokens(15)
    caches = [FixedKVCache(16) for _ in range(CFG.n_layer)]
    a = model(idx[:, :6], caches)
    b = model(idx[:, 6:], caches)  # a cached prefill of 9 tokens after 6
    np.testing.assert_allclose(np.array(mx.concatenate([a, b], axis=1)), np.array(model(idx)), atol=2e-5, rtol=1e-4)


def test_fixed_cache_writes_in_place_and_masks_the_rest():
    cache = FixedKVCache(6)
    k = mx.ones((1, 2, 2, 4))
    keys, values = cache.update_and_fetch(k, 2 * k)
    assert keys.shape == (1, 2, 6, 4) and int(cache.offset) == 2
    keys, values = cache.update_and_fetch(3 * k[:, :, :1], 4 * k[:, :, :1])
    np.testing.assert_array_equal(np.array(keys[0, 0, :, 0]), [1, 1, 3, 0, 0, 0])
    np.testing.assert_array_equal(np.array(values[0, 0, :, 0]), [2, 2, 4, 0, 0, 0])
    # the one query just added (position 2) sees positions 0..2
    np.testing.assert_array_equal(np.array(cache.attention_mask(1).as_array()), [[1, 1, 1, 0, 0, 0]])


def test_fixed_cache_mask_for_a_prefill():
    cache = FixedKVCache(5)
    cache.update_and_fetch(mx.zeros((1, 1, 3, 2)), mx.zeros((1, 1, 3, 2)))
    np.testing.assert_array_equal(np.array(cache.attention_mask(3).as_array()),
                                  [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])


def test_growing_cache_past_its_step(model, monkeypatch):
    monkeypatch.setattr(KVCache, "step", 4)  # grow several times within one sequence
    idx = tokens(19)
    caches = model.make_cache()
    inc = incremental_logits(model, caches, idx, n_prefill=5)
    np.testing.assert_allclose(np.array(inc), np.array(model(idx)), atol=2e-5, rtol=1e-4)


def test_slot_cache_rows_at_different_lengths_decode_as_each_alone(model):
    """Rows that started at different times share a step: each row's next logits, decoded over a
    SlotKVCache with the others, equal that row's decoded over a cache of its own (on the CPU
    kernels each row's attention reads only its own written positions)."""
    from mlx_gpt.models.cache import SlotKVCache

    lengths = [3, 9, 14]
    seqs = [tokens(n + 1, batch=1)[0] for n in lengths]
    nh, hs, capacity = CFG.n_head, CFG.n_embd // CFG.n_head, CFG.block_size
    keys = [mx.zeros((len(seqs), nh, capacity, hs)) for _ in model.h]
    values = [mx.zeros((len(seqs), nh, capacity, hs)) for _ in model.h]
    alone = []
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        caches = [KVCache() for _ in model.h]
        model(seq[None, :n], caches)  # the row's prompt, prefilled alone
        for layer, c in enumerate(caches):
            keys[layer][row, :, :n] = c.keys[0, :, :n]
            values[layer][row, :, :n] = c.values[0, :, :n]
        alone.append(model(seq[None, n:], caches)[0, -1])
    slots = [SlotKVCache(k, v, mx.array(lengths, mx.int32)) for k, v in zip(keys, values)]
    together = model(mx.stack([seq[n] for seq, n in zip(seqs, lengths)])[:, None], slots)[:, -1]
    assert mx.allclose(together, mx.stack(alone), atol=1e-5).item()
