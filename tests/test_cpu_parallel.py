import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import backend
from mlx_gpt.backend import cpu_cores
from mlx_gpt.cpu.blas import set_blas_threads
from mlx_gpt.cpu import parallel
from mlx_gpt.errors import UserError
from mlx_gpt.loss import IGNORE
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_eval_loss, make_train_step

CFG = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def test_slices_cover_the_batch_evenly():
    assert parallel.slices(5, 2) == [slice(0, 2), slice(2, 5)]
    assert parallel.slices(4, 2) == [slice(0, 2), slice(2, 4)]
    assert parallel.slices(2, 4) == [slice(0, 1), slice(1, 2)]
    parts = parallel.slices(17, 3)
    assert sum(p.stop - p.start for p in parts) == 17 and max(p.stop - p.start for p in parts) <= 6


def test_balance_spreads_parameters_by_size():
    owner = parallel.balance({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    load = [sum(s for k, s in {"a": 100, "b": 60, "c": 50, "d": 10}.items() if owner[k] == b) for b in range(2)]
    assert sorted(load) == [110, 110]


def train(monkeypatch, streams: int, batch: int, accum: int, steps: int = 3):
    """Losses, gradient norms and final weights of a few steps with the batch split over ``streams``."""
    monkeypatch.setattr(backend, "cpu_cores", lambda: streams)
    model = build(CFG, seed=0)
    tc = TrainConfig.of(batch_size=batch, grad_accum=accum, max_iters=100, warmup_iters=2)
    opt = make_optimizer(tc.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, tc)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = mx.array(rng.integers(0, 65, (accum, batch, 32)))
        y = mx.array(rng.integers(0, 65, (accum, batch, 32)))
        loss, norm = step(x, y)
        mx.eval(loss, norm, model.parameters(), opt.state)
        out.append((loss.item(), norm.item()))
    return out, dict(tree_flatten(model.parameters())), opt


@pytest.mark.parametrize("streams,batch,accum", [(2, 4, 1), (2, 5, 2), (3, 4, 1)])
def test_a_step_split_over_streams_equals_the_single_stream_step(monkeypatch, streams, batch, accum):
    one, w1, _ = train(monkeypatch, 1, batch, accum)
    many, w2, opt = train(monkeypatch, streams, batch, accum)
    assert backend.stream_plan(build(CFG), batch, 0) is not None  # the split step ran
    np.testing.assert_allclose(np.array(one), np.array(many), rtol=2e-6)
    for k in w1:
        a, b = np.array(w1[k]), np.array(w2[k])
        if k.endswith("attn.c_attn.bias"):
            # the key biases' true gradient is exactly zero (softmax ignores a constant added to
            # every score): Adam moves them by rounding noise, differently in each split
            c = CFG.n_embd
            a, b = np.delete(a, np.s_[c:2 * c]), np.delete(b, np.s_[c:2 * c])
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg=k)
    set_blas_threads(cpu_cores())


@pytest.mark.parametrize("streams,batch", [(2, 4), (3, 5)])
def test_an_evaluation_split_over_streams_equals_the_single_stream_one(monkeypatch, streams, batch):
    model = build(CFG, seed=0)
    model.eval()
    rng = np.random.default_rng(1)
    batches = [(mx.array(rng.integers(0, 65, (batch, 32))), mx.array(rng.integers(0, 65, (batch, 32))))
               for _ in range(3)]
    losses = {}
    for n in (1, streams):
        monkeypatch.setattr(backend, "cpu_cores", lambda: n)
        eval_loss = make_eval_loss(model, TrainConfig.of(batch_size=batch))
        assert (eval_loss.__name__ == "evaluate") == (n > 1)  # the split evaluator, where there are streams
        losses[n] = [eval_loss(x, y).item() for x, y in batches]
    np.testing.assert_allclose(losses[1], losses[streams], rtol=2e-6)
    set_blas_threads(cpu_cores())


def test_one_core_or_one_sequence_keeps_a_single_stream(monkeypatch):
    monkeypatch.setattr(backend, "cpu_cores", lambda: 1)
    assert backend.stream_plan(build(CFG), 8, 0) is None
    monkeypatch.setattr(backend, "cpu_cores", lambda: 4)
    assert backend.stream_plan(build(CFG), 1, 0) is None
    plan = backend.stream_plan(build(CFG), 3, 0)
    assert len(plan) == 3
    set_blas_threads(2)


def test_streams_setting_chooses_the_split(monkeypatch):
    monkeypatch.setattr(backend, "cpu_cores", lambda: 4)
    assert backend.stream_plan(build(CFG), 8, 1) is None
    assert len(backend.stream_plan(build(CFG), 8, 2)) == 2
    assert len(backend.stream_plan(build(CFG), 8, 0)) == 4
    assert len(backend.stream_plan(build(CFG), 3, 8)) == 3  # never more streams than sequences
    set_blas_threads(cpu_cores())
    with pytest.raises(UserError, match="--streams must be 0"):
        TrainConfig.of(streams=-1)


def test_split_steps_keep_the_parameters_dtype(monkeypatch):
    monkeypatch.setattr(backend, "cpu_cores", lambda: 2)
    model = build(CFG, seed=0)
    model.set_dtype(mx.bfloat16)
    tc = TrainConfig.of(batch_size=4, max_iters=10, warmup_iters=2)
    opt = make_optimizer(tc.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, tc)
    x = mx.random.randint(0, 65, (1, 4, 32), key=mx.random.key(0))
    loss, norm = step(x, x)
    mx.eval(loss, norm, model.parameters())
    assert model.wte.weight.dtype == mx.bfloat16 and np.isfinite(loss.item())
    set_blas_threads(cpu_cores())


def masked_run(monkeypatch, streams: int, batch: int, accum: int, batches: list) -> tuple[list, dict]:
    """Losses and final weights of steps over ``batches`` (x, y of (accum * batch, T)), cut into
    ``accum`` micro-batches of ``batch`` rows, each split over ``streams``."""
    monkeypatch.setattr(backend, "cpu_cores", lambda: streams)
    model = build(CFG, seed=0)
    tc = TrainConfig.of(batch_size=batch, grad_accum=accum, max_iters=100, warmup_iters=2, dropout=0.0)
    opt = make_optimizer(tc.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, tc)
    losses = []
    for x, y in batches:
        loss, _ = step(mx.array(x.reshape(accum, batch, -1)), mx.array(y.reshape(accum, batch, -1)))
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    set_blas_threads(cpu_cores())
    return losses, dict(tree_flatten(model.parameters()))


def test_ignored_targets_weigh_every_part_by_its_kept_targets(monkeypatch):
    """A batch whose rows keep different numbers of targets (--mask-prompt, padding) trains to the
    mean over every kept target however it is cut: micro-batches, streams, or both."""
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(3):
        x = rng.integers(0, 65, (8, 16))
        y = rng.integers(0, 65, (8, 16))
        for row, keep in enumerate([16, 2, 9, 0, 16, 5, 1, 12]):  # a prompt, then the answer kept
            y[row, : 16 - keep] = IGNORE
        batches.append((x, y))
    whole, w_whole = masked_run(monkeypatch, 1, 8, 1, batches)
    direct = build(CFG, seed=0)
    x, y = (mx.array(a) for a in batches[0])
    logits = direct(x)
    want = nn.losses.cross_entropy(logits, mx.maximum(y, 0), reduction="none")
    assert whole[0] == pytest.approx((mx.sum(want * (y != IGNORE)) / mx.sum(y != IGNORE)).item(), rel=1e-6)
    for streams, batch, accum in [(2, 8, 1), (1, 4, 2), (2, 2, 4)]:
        losses, weights = masked_run(monkeypatch, streams, batch, accum, batches)
        np.testing.assert_allclose(losses, whole, rtol=2e-6)
        for k in w_whole:
            a, b = np.array(w_whole[k]), np.array(weights[k])
            if k.endswith("attn.c_attn.bias"):  # zero true gradient: rounding noise only (as above)
                a, b = np.delete(a, np.s_[CFG.n_embd:2 * CFG.n_embd]), np.delete(b, np.s_[CFG.n_embd:2 * CFG.n_embd])
            np.testing.assert_allclose(a, b, atol=3e-6, err_msg=(streams, batch, accum, k))
