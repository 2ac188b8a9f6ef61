import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import kernels
from mlx_gpt.cpu import accelerate, ops
from mlx_gpt.loss import IGNORE, chunked_cross_entropy, cross_entropy
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.training.step import loss_fn


def head_inputs(rows=96, c=16, vocab=200, seed=0):
    k = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((2, rows // 2, c), key=k[0]), 0.5 * mx.random.normal((vocab, c), key=k[1]),
            mx.random.randint(0, vocab, (2, rows // 2), key=k[2]))


def plain(h, w, y, smoothing=0.0):
    return cross_entropy(ops.linear(h, w), y, smoothing)


@pytest.mark.parametrize("chunk,smoothing", [(16, 0.0), (40, 0.1), (96, 0.0), (500, 0.0)])
def test_chunked_loss_equals_the_plain_loss_in_values_and_gradients(chunk, smoothing):
    h, w, y = head_inputs()
    weights = mx.random.uniform(shape=y.shape, key=mx.random.key(9))  # a cotangent that is not uniform
    results = []
    for f in (lambda h, w: plain(h, w, y, smoothing), lambda h, w: chunked_cross_entropy(h, w, y, chunk, smoothing)):
        per_position = f(h, w)
        g = mx.compile(mx.value_and_grad(lambda h, w: mx.sum(f(h, w) * weights), argnums=(0, 1)))
        total, (dh, dw) = g(h, w)
        results.append([np.array(a) for a in (per_position, total, dh, dw)])
    for name, got, want in zip(("losses", "total", "dh", "dw"), results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7 * np.abs(want).max(), err_msg=name)


def test_a_frozen_head_gets_no_gradient_work():
    h, w, y = head_inputs()
    dh_plain = mx.grad(lambda h: mx.mean(plain(h, w, y)))(h)
    dh, dw = mx.grad(lambda h, w: mx.mean(chunked_cross_entropy(h, w, y, 32, weight_grad=False)), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(np.array(dh), np.array(dh_plain), rtol=2e-6, atol=2e-7 * np.abs(np.array(dh_plain)).max())
    assert not np.array(dw).any()


def test_gpt_loss_with_chunks_matches_the_plain_loss():
    model = accelerate(build(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=0))
    x = mx.random.randint(0, 300, (4, 32), key=mx.random.key(1))
    y = mx.random.randint(0, 300, (4, 32), key=mx.random.key(2))
    out = []
    for chunk in (0, 48):
        loss, grads = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y, loss_chunk=chunk))(model, x, y)
        out.append((loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    for k, want in out[0][1].items():
        np.testing.assert_allclose(out[1][1][k], want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=k)


def test_chunked_loss_lowers_the_peak():
    h, w, y = head_inputs(rows=2048, c=16, vocab=4096)
    mx.eval(h, w, y)
    peaks = []
    for f in (lambda h, w: mx.mean(plain(h, w, y)), lambda h, w: mx.mean(chunked_cross_entropy(h, w, y, 64))):
        g = mx.compile(mx.value_and_grad(f, argnums=(0, 1)))
        mx.eval(g(h, w))
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(g(h, w))
        peaks.append(mx.get_peak_memory())
    logits = 2048 * 4096 * 4
    assert peaks[1] < logits < peaks[0] and peaks[1] < 0.5 * peaks[0], [p / logits for p in peaks]


def masked_targets(shape, vocab, seed):
    """Targets with whole prompt-like runs and padding set to IGNORE, as an example batch has them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, vocab, shape)
    for row in y:
        a, b = sorted(rng.integers(0, shape[-1], 2))
        row[:a], row[b + 1:] = IGNORE, IGNORE  # a prompt before, padding after
    return mx.array(y.astype(np.int32))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_mean_and_its_gradient_equal_torch_ignore_index(smoothing):
    import torch
    import torch.nn.functional as F

    logits = mx.random.normal((3, 16, 50), key=mx.random.key(3))
    y = masked_targets((3, 16), 50, 0)
    loss, dlogits = mx.value_and_grad(lambda z: mx.mean(cross_entropy(z, y, smoothing)))(logits)
    t = torch.tensor(np.array(logits), requires_grad=True)
    want = F.cross_entropy(t.reshape(-1, 50), torch.tensor(np.array(y)).long().reshape(-1), ignore_index=IGNORE,
                           label_smoothing=smoothing)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    np.testing.assert_allclose(np.array(dlogits), t.grad.numpy(), atol=1e-7)
    assert not np.array(dlogits)[np.array(y) == IGNORE].any()  # prompt positions get no gradient


def test_without_ignored_targets_the_loss_is_unchanged():
    logits = mx.random.normal((2, 8, 30), key=mx.random.key(4))
    y = mx.random.randint(0, 30, (2, 8), key=mx.random.key(5))
    assert mx.array_equal(cross_entropy(logits, y), kernels.cross_entropy(logits, y)).item()  # scaled by exactly 1


@pytest.mark.parametrize("chunk", [0, 48])
def test_gpt_masked_loss_and_gradients_equal_a_direct_computation(chunk):
    model = accelerate(build(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=0))
    x = mx.random.randint(0, 300, (4, 32), key=mx.random.key(1))
    y = masked_targets((4, 32), 300, 1)

    def direct(m, x, y):
        keep = y != IGNORE
        losses = nn.losses.cross_entropy(m(x), mx.where(keep, y, 0))
        return mx.sum(losses * keep) / mx.sum(keep)

    got = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y, loss_chunk=chunk))(model, x, y)
    want = nn.value_and_grad(model, direct)(model, x, y)
    assert got[0].item() == pytest.approx(want[0].item(), abs=1e-6)
    for (k, g), (_, w) in zip(tree_flatten(got[1]), tree_flatten(want[1])):
        w = np.array(w)
        np.testing.assert_allclose(np.array(g), w, rtol=1e-4, atol=1e-6 * np.abs(w).max(), err_msg=k)
