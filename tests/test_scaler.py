"""float16 mixed precision with dynamic loss scaling: the update rule against torch.amp.GradScaler,
the gradients against float32's, skipped steps that leave everything untouched, and runs that
follow float32's and resume exactly."""

import json
import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import checkpoint
from mlx_gpt.training import run as run_module
from mlx_gpt.cpu import accelerate
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import OptimConfig, clip_and_update, make_optimizer
from mlx_gpt.recompute import recompute_blocks
from mlx_gpt.errors import UserError
from mlx_gpt.scaler import INIT_SCALE, MIN_SCALE, LossScaler
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import compute_in, loss_fn, make_train_step


def tiny(**kw):
    cfg = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return accelerate(build(GPTConfig(**{**cfg, **kw}), seed=3))


def batch(shape, vocab=64, seed=0):
    return (mx.random.randint(0, vocab, shape, key=mx.random.key(seed)),
            mx.random.randint(0, vocab, shape, key=mx.random.key(seed + 1)))


def snapshot(*trees) -> list[dict]:
    return [{k: np.array(v) for k, v in tree_flatten(t)} for t in trees]


def stepper(model, scaler, **kw):
    cfg = TrainConfig.of(**{"model": "gpt", "dtype": "float16", "batch_size": 4, "streams": 1, "warmup_iters": 0,
                            "max_iters": 100, "learning_rate": 1e-2, **kw})
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    return opt, make_train_step(model, opt, cfg, scaler=scaler)


def scaler_values(scaler) -> tuple[float, int, int]:
    s = scaler.state_dict()
    return s["scale"], s["good_steps"], s["skipped"]


# ---------------------------------------------------------------------------- the update rule


def test_scales_and_skips_follow_torch_grad_scaler_and_adamw():
    """The same gradients (infinities and a NaN in some steps, a finite one that overflows once
    scaled in another) through our compiled guarded update and through torch.amp.GradScaler with
    torch.optim.AdamW, all float32: the same scales, the same skipped steps (Adam's step count
    not advanced), the same weights."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    xs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(16)]
    for i in (2, 3, 9):
        xs[i][1, 2] = np.inf
    xs[12][0, 0] = np.nan
    xs[6][2, 3] = 1e38  # finite, but not once multiplied by the scale
    lr, betas, eps, wd = 0.05, (0.9, 0.95), 1e-8, 0.1

    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    expected = []
    for x in xs:
        topt.zero_grad()
        tscaler.scale((tw * torch.tensor(x)).sum()).backward()
        tscaler.step(topt)
        tscaler.update()
        expected.append((tscaler.get_scale(), int(topt.state[tw]["step"]), tw.detach().numpy().copy()))

    class W(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = mx.array(w0)

    model = W()
    opt = make_optimizer(OptimConfig(learning_rate=lr, min_lr=lr, beta1=betas[0], beta2=betas[1],
                                     weight_decay=wd))
    opt.init(model.trainable_parameters())
    scaler = LossScaler(init_scale=2.0**10, growth_interval=3)
    grad_fn = nn.value_and_grad(model, scaler.scaled(lambda m, x, y: mx.sum(m.weight * x)))
    update = scaler.guarded(partial(clip_and_update, max_norm=0.0))

    def step(x):
        _, grads = grad_fn(model, x, None)
        return update(model, opt, grads)

    state = [model.state, opt.state, scaler.state]
    step = mx.compile(step, inputs=state, outputs=state)
    got = []
    for x in xs:
        step(mx.array(x))
        got.append((scaler.state_dict()["scale"], opt.state["step"].item(), np.array(model.weight)))

    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert scaler.state_dict()["skipped"] == 5 == len(xs) - expected[-1][1]
    assert len({e[0] for e in expected}) > 3  # it both grew and backed off
    for (_, _, gw), (_, _, ew) in zip(got, expected):
        np.testing.assert_allclose(gw, ew, rtol=1e-5, atol=1e-6)


def test_the_scale_grows_after_the_interval_of_good_steps():
    model = tiny()
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    _, step = stepper(model, scaler)
    x, y = batch((1, 4, 32))
    seen = []
    for _ in range(7):
        step(x, y)
        seen.append(scaler_values(scaler))
    assert seen == [(8, 1, 0), (8, 2, 0), (16, 0, 0), (16, 1, 0), (16, 2, 0), (32, 0, 0), (32, 1, 0)]


# ---------------------------------------------------------------------------- gradients


def float16_grads(model, x, y, scale: float) -> dict:
    scaler = LossScaler(init_scale=scale)
    _, grads = nn.value_and_grad(model, scaler.scaled(compute_in(mx.float16, loss_fn)))(model, x, y)
    return {k: np.array(v) / scale for k, v in tree_flatten(grads)}


def test_unscaled_gradients_equal_float32_gradients_where_plain_float16_underflows():
    """8,192 tokens of vocabulary and 2,048 positions: the mean loss's gradient reaches most logits
    as about 1 / (8192 * 2048), at the bottom of float16's range. Scaled by 2**16 and unscaled in
    float32, every gradient matches float32's to float16 precision; unscaled, some are far off."""
    V = 8192
    model = tiny(vocab_size=V, block_size=128, n_embd=16)
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, V, (16, 128)).astype(np.int32)) for _ in range(2))
    _, ref = nn.value_and_grad(model, loss_fn)(model, x, y)
    ref = {k: np.array(v) for k, v in tree_flatten(ref)}

    def errors(grads):
        return {k: float(np.linalg.norm(grads[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref}

    scaled, plain = errors(float16_grads(model, x, y, INIT_SCALE)), errors(float16_grads(model, x, y, 1.0))
    assert max(scaled.values()) < 5e-3, scaled  # float16 keeps 11 bits: about 5e-4 relative per value
    assert max(plain.values()) > 0.2, plain  # ln_f.weight's gradient is mostly lost to underflow


# ---------------------------------------------------------------------------- skipped steps


@pytest.mark.parametrize("kw", [{}, {"streams": 2, "grad_accum": 2}, {"grad_checkpoint": True, "loss_chunk": 8}],
                         ids=["plain", "streams+accum", "checkpoint+chunks"])
def test_an_overflowing_step_changes_nothing_but_halves_the_scale(kw):
    model = tiny()
    if kw.get("grad_checkpoint"):
        recompute_blocks(model)
    scaler = LossScaler(init_scale=2.0**40)  # any gradient times 2**40 is beyond float16's 65504
    opt, step = stepper(model, scaler, **kw)
    x, y = batch((kw.get("grad_accum", 1), 4, 32))
    before = snapshot(model.parameters(), opt.state)
    loss, norm = step(x, y)
    assert math.isfinite(loss.item()) and not math.isfinite(norm.item())
    after = snapshot(model.parameters(), opt.state)
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # weights, moments, step count, lr
    assert scaler_values(scaler) == (2.0**39, 0, 1)

    losses, skips = [], 1
    for _ in range(40):  # halving until the gradients fit, then training
        loss, norm = step(x, y)
        if math.isfinite(norm.item()):
            losses.append(loss.item())
        else:
            skips += 1
        if len(losses) == 5:
            break
    scale, good, skipped = scaler_values(scaler)
    assert (scale, skipped) == (2.0 ** (40 - skips), skips) and 1 <= good <= 5  # no growth: halvings only
    assert opt.state["step"].item() == 5  # only applied updates count (bias correction, schedule)
    assert losses[-1] < losses[0] - 0.1, losses


# ---------------------------------------------------------------------------- trajectories


def trajectory(dtype, scaler=None, V=256, B=8, T=64, n_embd=64, steps=10, seed=0, lr=5e-3):
    """Losses, gradient norms and skipped-step counts of ``steps`` steps on one fixed batch."""
    model = tiny(vocab_size=V, block_size=T, n_embd=n_embd, n_head=2)
    cfg = TrainConfig.of(model="gpt", dtype=dtype, batch_size=B, streams=1, warmup_iters=0, max_iters=steps,
                         learning_rate=lr)
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, cfg, scaler=scaler)
    rng = np.random.default_rng(seed)
    tokens = np.tile(rng.integers(0, V, 37), B * (T + 1) // 37 + 2)  # a period to learn
    rows = np.stack([tokens[5 * r:5 * r + T + 1] for r in range(B)]).astype(np.int32)[None]
    x, y = mx.array(rows[:, :, :-1]), mx.array(rows[:, :, 1:])
    out = []
    for _ in range(steps):
        loss, norm = step(x, y)
        out.append((loss.item(), norm.item(), scaler.state_dict()["skipped"] if scaler else 0))
    return out


def test_float16_follows_float32_update_for_update():
    """On one fixed batch each loss is a function of the updates applied before it, so a float16
    run with skipped steps is compared with float32 at the same count of updates."""
    ref = [loss for loss, _, _ in trajectory("float32")]
    got = trajectory("float16", LossScaler())
    assert got[-1][2] == 1  # the default scale, 2**16, overflows once (at step 3, gradient norm 4.5)
    skipped_before = [0] + [s for _, _, s in got[:-1]]
    for i, ((loss, _, _), k) in enumerate(zip(got, skipped_before)):
        assert loss == pytest.approx(ref[i - k], rel=1e-3), (i, k, loss, ref[i - k])  # 1e-4 measured
    assert got[-1][0] < got[0][0] - 1.0


@pytest.mark.slow
def test_float16_tracks_float32_where_unscaled_float16_underflows():
    """Vocabulary 8,192 over 4,096 positions a batch: most logits' gradients (about 3e-8) are
    below float16's smallest number. With the loss scaled, 8 steps follow float32's to 0.1%
    (1e-4 measured); without, they fall behind."""
    kw = dict(V=8192, B=32, T=128, n_embd=16, steps=8, lr=1e-2)
    ref = np.array([loss for loss, _, _ in trajectory("float32", **kw)])
    scaled = trajectory("float16", LossScaler(), **kw)
    assert all(s == 0 for _, _, s in scaled)
    plain = np.array([loss for loss, _, _ in trajectory("float16", LossScaler(1.0, growth_interval=10**9), **kw)])
    scaled = np.array([loss for loss, _, _ in scaled])
    np.testing.assert_allclose(scaled, ref, rtol=1e-3)
    # unscaled, the run learns a fifth less (the float32 loss falls by 1.14 in 8 steps, this one by 0.91)
    assert plain[0] - plain[-1] < 0.9 * (ref[0] - ref[-1]), (plain, ref)


# ---------------------------------------------------------------------------- a run


def test_a_float16_run_logs_its_skips_and_resumes_bit_exact(tmp_path, shakespeare, monkeypatch, capsys):
    # a scale far too large to start with and a short growth interval: the run skips steps, and
    # the scale at the checkpoint is one a fresh scaler would not have
    monkeypatch.setattr(run_module, "LossScaler", partial(LossScaler, init_scale=2.0**24, growth_interval=2))
    common = dict(data=str(shakespeare), data_dir=str(tmp_path / "data"), n_layer=2, n_head=2, n_embd=32,
                  block_size=32, batch_size=4, eval_iters=1, log_interval=1, sample_tokens=4, dtype="float16",
                  max_iters=10, eval_interval=5, warmup_iters=2)
    train(TrainConfig.of(**common, out=str(tmp_path / "whole")), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ") and "|" in line]
    assert len(lines) == 10 and all("| scale " in line and "| skipped " in line for line in lines)
    train(TrainConfig.of(**{**common, "max_iters": 5}, out=str(tmp_path / "split")), progress=False)
    saved = checkpoint.load_state(tmp_path / "split")["loss_scale"]
    assert saved["skipped"] > 0 and saved["scale"] != 2.0**24
    train(TrainConfig.of(**common, out=str(tmp_path / "split"), resume=True), progress=False)

    records = [[json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("whole", "split")]
    steps = [[(r["step"], r["loss"], r["loss_scale"], r["skipped"]) for r in rows if "loss" in r] for rows in records]
    assert steps[0] == steps[1] and len(steps[0]) == 10  # bit for bit, scales and skips included
    assert steps[0][-1][3] > saved["skipped"]  # it kept skipping after the resume too
    wa, wb = (snapshot(checkpoint.load_model(tmp_path / d).parameters())[0] for d in ("whole", "split"))
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


def test_a_run_whose_scale_falls_out_of_reach_stops_as_diverged(tmp_path, shakespeare, monkeypatch):
    monkeypatch.setattr(run_module, "LossScaler", partial(LossScaler, init_scale=MIN_SCALE / 2))
    cfg = TrainConfig.of(data=str(shakespeare), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), n_layer=1,
                      n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=1, log_interval=1,
                      sample_tokens=4, dtype="float16", max_iters=3)
    with pytest.raises(UserError, match="float16 gradients overflow at every loss scale"):
        train(cfg, progress=False)
