"""mlx_gpt.cpu.attention on packed rows (several examples a row, each seeing only itself): the C++
kernel against PyTorch's attention with the block-diagonal causal mask in float64, forward and
backward, and the accelerated model against the plain one."""

from contextlib import nullcontext

import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gpt import backend
from mlx_gpt.cpu import attention as attn
from mlx_gpt.cpu import extension, ops
from mlx_gpt.models.gpt import GPTConfig, Packed, build

needs_kernels = pytest.mark.skipif(extension.load() is None, reason="the C++ kernels do not load here")


def positions_of(rows: list[list[int]], T: int) -> np.ndarray:
    """(B, T) positions restarting at each example of the given lengths, then padding as one run."""
    out = []
    for lengths in rows:
        runs = [np.arange(n) for n in lengths]
        out.append(np.concatenate(runs + [np.arange(T - sum(lengths))]))
    return np.stack(out).astype(np.int32)


# examples straddling the kernel's 4-row tiles, one-token examples, a row of one example, padding
ROWS = [[3, 1, 6, 9, 1, 2], [37], [10, 10, 10]]


def qkv(rng, B=3, nh=2, T=37, hs=8):
    return [rng.normal(0, 1, (B, nh, T, hs)).astype(np.float32) for _ in range(3)]


@needs_kernels
def test_packed_attention_matches_torch_with_its_gradients(torch):
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng)
    g = rng.normal(0, 1, q.shape).astype(np.float32)
    packed = Packed(mx.array(positions_of(ROWS, 37)))
    scale = 0.3

    def fast(q, k, v):
        return attn.attention(q, k, v, scale, causal=True, packed=packed)

    out, grads = mx.compile(lambda q, k, v, g: mx.vjp(fast, [q, k, v], [g]))(*(mx.array(a) for a in (q, k, v, g)))
    mask = torch.tensor(np.array(packed.as_array()))
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scale)
    want.backward(torch.tensor(g, dtype=torch.float64))
    np.testing.assert_allclose(np.array(out[0]), want.detach().numpy(), atol=2e-6)
    for got, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.array(got), ref.numpy(), atol=1e-5)


@needs_kernels
def test_a_packed_example_never_sees_another():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, B=1)
    packed = Packed(mx.array(positions_of([[12, 15]], 37)))
    out = np.array(attn.attention(*(mx.array(a) for a in (q, k, v)), 0.35, True, packed=packed))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, :12] += 5.0  # the first example's keys and values
    v2[:, :, :12] -= 3.0
    out2 = np.array(attn.attention(mx.array(q), mx.array(k2), mx.array(v2), 0.35, True, packed=packed))
    np.testing.assert_array_equal(out[:, :, 12:], out2[:, :, 12:])
    assert not np.allclose(out[:, :, :12], out2[:, :, :12])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_accelerated_gpt_on_packed_rows_equals_the_plain_one(dropout):
    """The CPU's layers (the kernel; with dropout the weights written out) against plain MLX's
    masked attention, logits and gradients, the same dropout drawn by both."""
    cfg = GPTConfig(vocab_size=101, block_size=37, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    plain, fast = build(cfg, seed=3), backend.layers(build(cfg, seed=3))
    x = mx.random.randint(0, 101, (3, 37), key=mx.random.key(4))
    y = mx.random.randint(0, 101, (3, 37), key=mx.random.key(5))
    positions = mx.array(positions_of(ROWS, 37))

    def loss(model, x, y):
        return ops.cross_entropy(model(x, positions=positions), y).mean()

    results = []
    for model in (fast, plain):
        mx.random.seed(7)
        with ops.native_ops() if model is plain else nullcontext():
            value, grads = nn.value_and_grad(model, loss)(model, x, y)
            mx.eval(value, grads)
        results.append((value.item(), grads))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(results[0][1]), tree_flatten(results[1][1])):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, err_msg=name)
