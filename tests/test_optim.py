"""optim: the update every train step makes is torch.optim.AdamW's, step after step.

A first step's loss or gradient norm cannot see an optimizer bug (both come before any
update), and one update cannot see a wrong bias correction or schedule. So these tests train
the same tiny GPT from the same weights on the same batches, with training.step's own step on one
side and PyTorch on the other (``torch.optim.AdamW`` with decay on 2-D weights only,
``clip_grad_norm_``, the warmup + cosine learning rate written out below), and compare every
weight after every update as well as the losses and gradient norms.

Two comparisons. Update by update: PyTorch makes each update again from the exact state MLX
reached (weights, moments, step count), so only that update's rounding differs. Free-running:
PyTorch trains on its own from the same start, for the loss trajectory.

Tolerances (float32 on both sides, different summation orders). A gradient element differs by
a few roundings of the sums that make it, ~1e-7 of its tensor's RMS gradient; Adam's update
lr * m / (sqrt(v) + eps) does not depend on the gradient's scale, so a weight moves ~1e-6 of lr
differently: WEIGHT_ATOL 2e-6 (measured <= 9.3e-7 at lr 1e-2). Moments: MOMENT_RTOL 1e-4 of
their tensor's RMS (measured <= 1.5e-5 for v, 4.2e-6 for m). Losses and gradient norms:
LOSS_RTOL = NORM_RTOL = 1e-5 (measured <= 3.1e-7 update by update, 2.2e-6 free-running).
Where the true gradient is zero or close to it (the attention's key biases: softmax ignores a
constant added to every score, so their gradient is exactly zero), rounding sways the update:
Adam divides noise by noise and either side may move by up to ~lr. Weights whose gradient is
under NOISE = 1e-3 of their tensor's RMS (under 5% of all; about 0.2% are under 1e-5) are held
only to Adam's largest move. Free-running, such a weight then feeds slightly different
gradients to the weights it touches, so weights drift apart: DRIFT_ATOL 1e-4 = 1e-2 of the
peak lr (measured 5.5e-5 after 6 updates). The whole check fails on MLX's AdamW without bias
correction (tested below).
"""

import math
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import ROOT
from mlx_gpt import backend
from mlx_gpt.backend import cpu_cores
from mlx_gpt.cpu.blas import set_blas_threads
from mlx_gpt.cpu import accelerate, parallel
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import EPS, lr_schedule, make_optimizer
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_train_step

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "tests" / "reference"))
import torch_gpt  # noqa: E402  (the same GPT-2 in PyTorch, parameter for parameter)

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
STEPS = 6
WEIGHT_ATOL, MOMENT_RTOL, LOSS_RTOL, NORM_RTOL, DRIFT_ATOL = 2e-6, 1e-4, 1e-5, 1e-5, 1e-4
NOISE = 1e-3  # a gradient element below this share of its tensor's RMS gradient is swayed by rounding
# warmup, then a cosine that reaches min_lr at the last step; clipping bites on some steps of
# this model and not on others (the test checks both happen)
TRAIN = dict(model="gpt", batch_size=4, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, max_iters=STEPS, weight_decay=0.1,
             beta1=0.9, beta2=0.95)
CLIP = {1: 1.0, 3: 0.6}  # by micro-batches per update (averaging three lowers the norm)


def reference_lr(step: int, cfg: TrainConfig) -> float:
    """The learning rate of update ``step`` (0-based): linear warmup to learning_rate over
    warmup_iters updates, then a cosine down to min_lr at lr_decay_iters (nanoGPT's shape)."""
    decay = cfg.optim.lr_decay_iters or cfg.optim.max_iters
    if step < cfg.optim.warmup_iters:
        return cfg.optim.learning_rate * (step + 1) / cfg.optim.warmup_iters
    ratio = min((step - cfg.optim.warmup_iters) / (decay - cfg.optim.warmup_iters), 1.0)
    return cfg.optim.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.optim.learning_rate - cfg.optim.min_lr)


def batches(cfg: TrainConfig, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (cfg.step.grad_accum, cfg.step.batch_size, CFG.block_size)
    return [(rng.integers(0, CFG.vocab_size, shape), rng.integers(0, CFG.vocab_size, shape)) for _ in range(STEPS)]


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def torch_model(start: dict[str, np.ndarray]):
    tmodel = torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(CFG.vocab_size, CFG.block_size, CFG.n_layer, CFG.n_head,
                                                         CFG.n_embd))
    tmodel.load_state_dict({k: torch.from_numpy(start[k].copy()) for k in tmodel.state_dict()}, strict=True)
    return tmodel


def torch_adamw(tmodel, cfg: TrainConfig) -> torch.optim.AdamW:
    params = list(tmodel.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg.optim.learning_rate, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8, foreach=False)


def torch_step(tmodel, opt, cfg: TrainConfig, step: int, x: np.ndarray, y: np.ndarray):
    """One update as a PyTorch user writes it, micro-batch gradients accumulated; returns (loss, norm, grads)."""
    for group in opt.param_groups:
        group["lr"] = reference_lr(step, cfg)
    total = 0.0
    for xi, yi in zip(torch.from_numpy(x), torch.from_numpy(y)):
        logits = tmodel(xi)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), yi.view(-1)) / len(x)
        loss.backward()
        total += loss.item()
    grads = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, norm.item(), grads


def torch_state(tmodel, opt) -> dict[str, np.ndarray]:
    """Weights and moments under MLX's names (``wte.weight``, ``wte.weight.m``, ``wte.weight.v``)."""
    out = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    for k, p in tmodel.named_parameters():
        out[k + ".m"] = opt.state[p]["exp_avg"].numpy().copy()
        out[k + ".v"] = opt.state[p]["exp_avg_sq"].numpy().copy()
    return out


def mlx_state(model, optimizer) -> dict[str, np.ndarray]:
    out = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    out.update({k: np.array(v) for k, v in tree_flatten(optimizer.state) if k.endswith((".m", ".v"))})
    return out


def load_torch_state(tmodel, opt, state: dict[str, np.ndarray], t: int) -> None:
    """Give PyTorch the model and optimizer state MLX reached after ``t`` updates."""
    tmodel.load_state_dict({k: torch.from_numpy(state[k].copy()) for k in tmodel.state_dict()}, strict=True)
    for k, p in tmodel.named_parameters():
        if t > 0:
            opt.state[p] = {"step": torch.tensor(float(t)), "exp_avg": torch.from_numpy(state[k + ".m"].copy()),
                            "exp_avg_sq": torch.from_numpy(state[k + ".v"].copy())}


def train_torch(cfg: TrainConfig, data, start: dict[str, np.ndarray]):
    """(losses, norms, state after each update, gradients) of PyTorch training on its own."""
    tmodel = torch_model(start)
    opt = torch_adamw(tmodel, cfg)
    losses, norms, after, grads = [], [], [], []
    for step, (x, y) in enumerate(data):
        loss, norm, g = torch_step(tmodel, opt, cfg, step, x, y)
        losses.append(loss)
        norms.append(norm)
        grads.append(g)
        after.append(torch_state(tmodel, opt))
    return losses, norms, after, grads


def train_mlx(cfg: TrainConfig, data, optimizer=None):
    """The same through training.step's own step (compiled or not, one stream or split), and the
    state before the first update and after each."""
    model = accelerate(build(CFG, seed=7))
    optimizer = optimizer or make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step_fn = make_train_step(model, optimizer, cfg)
    losses, norms, states, lrs = [], [], [mlx_state(model, optimizer)], []
    for x, y in data:
        loss, norm = step_fn(mx.array(x), mx.array(y))
        mx.eval(loss, norm, model.parameters(), optimizer.state)
        losses.append(loss.item())
        norms.append(norm.item())
        lrs.append(optimizer.learning_rate.item())
        states.append(mlx_state(model, optimizer))
    return losses, norms, states, lrs, optimizer


def start_weights() -> dict[str, np.ndarray]:
    return weights(build(CFG, seed=7))


@pytest.fixture(autouse=True)
def restore_blas_threads():
    yield
    set_blas_threads(cpu_cores())  # a split step sets one BLAS thread per stream


def assert_same_update(ours: dict, theirs: dict, grads: dict, lr_sum: float) -> int:
    """Weights within WEIGHT_ATOL and moments within MOMENT_RTOL of their tensor's RMS, except the
    weights whose gradient is rounding noise (held to Adam's largest move); returns how many those are."""
    noisy = 0
    for k, g in grads.items():
        noise = np.abs(g) < NOISE * np.sqrt(np.mean(g.astype(np.float64) ** 2))
        noisy += int(noise.sum())
        diff = np.abs(ours[k] - theirs[k])
        assert diff[~noise].max(initial=0.0) <= WEIGHT_ATOL, (k, diff[~noise].max())
        assert diff[noise].max(initial=0.0) <= 4 * lr_sum, k
        for moment in (".m", ".v"):
            ref = theirs[k + moment]
            scale = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
            np.testing.assert_allclose(ours[k + moment], ref, rtol=0, atol=MOMENT_RTOL * scale, err_msg=k + moment)
    return noisy


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("streams,accum", [(1, 1), (2, 1), (1, 3), (2, 3)],
                         ids=["one-stream", "split", "one-stream-accum3", "split-accum3"])
def test_training_equals_torch_adamw_update_by_update(streams, accum, compile):
    """Each of 6 updates from the state MLX reached, made again by PyTorch from that same state
    (weights, moments, step count): the same loss, norm, weights and moments after every update."""
    cfg = TrainConfig.of(**TRAIN, streams=streams, grad_accum=accum, compile=compile, grad_clip=CLIP[accum])
    data = batches(cfg)
    losses, norms, states, lrs, optimizer = train_mlx(cfg, data)
    assert (backend.stream_plan(build(CFG), cfg.step.batch_size, streams) is not None) == (streams > 1)  # a split step
    np.testing.assert_allclose(lrs, [reference_lr(s, cfg) for s in range(STEPS)], rtol=1e-6)
    tmodel = torch_model(states[0])
    opt = torch_adamw(tmodel, cfg)
    t_norms = []
    for t, (x, y) in enumerate(data):
        load_torch_state(tmodel, opt, states[t], t)
        loss, norm, grads = torch_step(tmodel, opt, cfg, t, x, y)
        assert losses[t] == pytest.approx(loss, rel=LOSS_RTOL) and norms[t] == pytest.approx(norm, rel=NORM_RTOL)
        noisy = assert_same_update(states[t + 1], torch_state(tmodel, opt), grads, sum(lrs[:t + 1]))
        assert noisy < 0.05 * sum(g.size for g in grads.values())
        t_norms.append(norm)
    assert any(n > cfg.optim.grad_clip for n in t_norms) and any(n < cfg.optim.grad_clip for n in t_norms), t_norms


@pytest.mark.parametrize("streams,accum", [(1, 1), (2, 3)])
def test_loss_trajectory_equals_torch_running_on_its_own(streams, accum):
    """Left to itself, PyTorch follows the same losses and gradient norms, and the weights stay within
    DRIFT_ATOL (rounding noise amplified by Adam, see the module's docstring)."""
    cfg = TrainConfig.of(**TRAIN, streams=streams, grad_accum=accum, grad_clip=CLIP[accum])
    data = batches(cfg)
    t_losses, t_norms, t_after, _ = train_torch(cfg, data, start_weights())
    losses, norms, states, _, _ = train_mlx(cfg, data)
    np.testing.assert_allclose(losses, t_losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(norms, t_norms, rtol=NORM_RTOL)
    for t in range(STEPS):
        for k in t_after[t]:
            np.testing.assert_allclose(states[t + 1][k], t_after[t][k], rtol=0, atol=DRIFT_ATOL, err_msg=f"{k} {t}")


def test_without_clipping_or_decay():
    cfg = TrainConfig.of(**{**TRAIN, "grad_clip": 0.0, "weight_decay": 0.0, "warmup_iters": 0, "min_lr": 1e-2},
                      streams=1)
    data = batches(cfg, seed=1)
    t_losses, _, t_after, _ = train_torch(cfg, data, start_weights())
    losses, _, states, _, _ = train_mlx(cfg, data)
    np.testing.assert_allclose(losses, t_losses, rtol=LOSS_RTOL)
    for k in t_after[-1]:
        np.testing.assert_allclose(states[-1][k], t_after[-1][k], rtol=0, atol=DRIFT_ATOL, err_msg=k)


def test_the_comparison_sees_a_missing_bias_correction():
    """MLX's AdamW as it comes (no bias correction) fails the update-by-update comparison at once."""
    from mlx_gpt.optim import AdamW

    cfg = TrainConfig.of(**TRAIN, streams=1)
    data = batches(cfg)
    plain = AdamW(learning_rate=lr_schedule(cfg.optim), betas=[cfg.optim.beta1, cfg.optim.beta2], eps=EPS,
                  weight_decay=cfg.optim.weight_decay, bias_correction=False)
    _, _, states, lrs, _ = train_mlx(cfg, data, optimizer=plain)
    tmodel = torch_model(states[0])
    opt = torch_adamw(tmodel, cfg)
    _, _, grads = torch_step(tmodel, opt, cfg, 0, *data[0])
    with pytest.raises(AssertionError):
        assert_same_update(states[1], torch_state(tmodel, opt), grads, lrs[0])
    worst = max(np.abs(states[1][k] - torch_state(tmodel, opt)[k]).max() for k in grads)
    assert worst > 1000 * WEIGHT_ATOL, worst
