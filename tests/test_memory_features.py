"""Memory savings that must not change what is trained: recomputed blocks and mixed precision."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt.cpu import accelerate
from mlx_gpt.errors import UserError
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.recompute import recompute_blocks
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import loss_fn, make_train_step


def tiny(dropout=0.0, **kw):
    cfg = dict(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
    return accelerate(build(GPTConfig(**{**cfg, **kw}), seed=3))


def batch(shape, vocab=64, seed=0):
    return (mx.random.randint(0, vocab, shape, key=mx.random.key(seed)),
            mx.random.randint(0, vocab, shape, key=mx.random.key(seed + 1)))


def grads_of(model, x, y):
    loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def test_recomputed_blocks_give_the_same_gradients():
    x, y = batch((4, 32))
    loss, grads = grads_of(tiny(), x, y)
    loss_r, grads_r = grads_of(recompute_blocks(tiny()), x, y)
    assert loss_r == loss
    for k in grads:
        np.testing.assert_array_equal(grads_r[k], grads[k], err_msg=k)


@pytest.mark.parametrize("streams", [1, 2])
def test_recomputed_blocks_train_the_same_weights_over_several_steps(streams):
    x, y = batch((2, 4, 32))  # two micro-batches
    weights = []
    for recompute in (False, True):
        model = tiny()
        if recompute:
            recompute_blocks(model)
        cfg = TrainConfig.of(grad_accum=2, batch_size=4, streams=streams, warmup_iters=0, max_iters=10, learning_rate=1e-2)
        opt = make_optimizer(cfg.optim)
        opt.init(model.trainable_parameters())
        step = make_train_step(model, opt, cfg)
        losses = [step(x, y)[0].item() for _ in range(3)]
        weights.append((losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}))
    np.testing.assert_allclose(weights[1][0], weights[0][0], rtol=1e-6)
    for k, v in weights[0][1].items():
        np.testing.assert_allclose(weights[1][1][k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_recomputed_blocks_under_mixed_precision_leave_the_float32_master_weights_in_place():
    """The backward pass recomputes each block after the bfloat16 copies of the weights are gone;
    it must leave the master weights in the model, or AdamW updates the rounded copies."""
    x, y = batch((1, 4, 32))
    weights = []
    for recompute in (False, True):
        model = tiny()
        if recompute:
            recompute_blocks(model)
        cfg = TrainConfig.of(dtype="bfloat16", batch_size=4, streams=1, warmup_iters=0, learning_rate=1e-2)
        opt = make_optimizer(cfg.optim)
        opt.init(model.trainable_parameters())
        step = make_train_step(model, opt, cfg)
        for _ in range(3):
            step(x, y)
        weights.append({k: np.array(v) for k, v in tree_flatten(model.parameters())})
    for k, v in weights[0].items():
        np.testing.assert_array_equal(weights[1][k], v, err_msg=k)


def test_recomputed_blocks_still_generate_with_a_cache():
    model = tiny()
    model.eval()
    x, _ = batch((1, 8))
    expected = model(x)
    recompute_blocks(model)
    cache = model.make_cache()
    np.testing.assert_array_equal(np.array(model(x, cache)), np.array(expected))


def test_recomputing_with_dropout_is_refused():
    with pytest.raises(UserError, match="dropout"):
        recompute_blocks(tiny(dropout=0.1))


def peak_of(fn) -> int:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory()


def test_recomputed_blocks_lower_the_peak():
    x, y = batch((2, 128), vocab=256)
    peaks = []
    for recompute in (False, True):
        model = tiny(n_layer=8, n_embd=64, n_head=4, block_size=128, vocab_size=256)
        if recompute:
            recompute_blocks(model)
        grad_fn = nn.value_and_grad(model, loss_fn)
        peaks.append(peak_of(lambda: grad_fn(model, x, y)))
    assert peaks[1] < 0.75 * peaks[0], peaks  # weights and logits stay; 8 blocks' activations go


# ---------------------------------------------------------------------------- mixed precision


def trajectory(dtype, steps=6):
    model = tiny(vocab_size=256, n_layer=2, n_embd=64, n_head=4, block_size=64)
    cfg = TrainConfig.of(dtype=dtype, batch_size=8, streams=1, warmup_iters=0, max_iters=steps, learning_rate=3e-3)
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, cfg)
    text = np.frombuffer((b"the quick brown fox jumps over the lazy dog; " * 40)[:8 * 65 + steps], np.uint8)
    losses = []
    for i in range(steps):
        rows = np.stack([text[i + 65 * r:i + 65 * r + 65] for r in range(8)]).astype(np.int32)
        losses.append(step(mx.array(rows[None, :, :-1]), mx.array(rows[None, :, 1:]))[0].item())
    return losses, model, opt


def test_bfloat16_mixed_precision_tracks_float32_with_float32_master_weights_and_state():
    ref, ref_model, _ = trajectory("float32")
    got, model, opt = trajectory("bfloat16")
    # bfloat16 keeps 8 bits of mantissa: the losses agree to about 1%, step for step
    np.testing.assert_allclose(got, ref, rtol=1e-2)
    assert got[-1] < got[0] - 0.5  # and it learns
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert {v.dtype for _, v in tree_flatten(opt.state) if v.ndim} == {mx.float32}
    weights = dict(tree_flatten(model.parameters()))
    for k, v in tree_flatten(ref_model.parameters()):
        if v.ndim < 2:  # biases start at 0: their drift is relative to a few updates
            continue
        drift = float(mx.linalg.norm(weights[k] - v) / mx.linalg.norm(v))
        assert drift < 0.05, (k, drift)
