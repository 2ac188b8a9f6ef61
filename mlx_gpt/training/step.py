"""The train step and the evaluation, each written once.

A step takes x, y of shape (accum, B, T), and packed rows' positions of the same shape where each
row holds several examples (``example_sampler``, ``models.gpt.Packed``; None otherwise, and the
models take no such argument then): for each micro-batch a *gradient source* gives its
mean loss and gradients, the sums are kept, and ``finish`` takes their mean over the
micro-batches and over the ranks (``distributed.all_mean``), clips them, and applies AdamW
(where targets are ignored, each micro-batch is first weighted by its kept targets:
``micro_batch_factors``); float16 runs unscale first and skip a step whose gradients overflow
(``scaler``). Only the gradient source varies: ``nn.value_and_grad`` of the loss, or on the CPU
the split of each micro-batch over MLX streams (``cpu/parallel.py``), whose plan also places
each parameter's share of the update on a stream (an argument, ``stream_for``).

Each compiled piece captures the model, the optimizer and the RNG as inputs and outputs. With
one micro-batch the step is one graph; with several, each micro-batch's sums are evaluated
before the next starts, so one micro-batch's activations are alive at a time (as one graph,
MLX kept about half of every micro-batch's).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .. import backend, distributed
from ..sampler import BatchSampler
from ..loss import chunked_cross_entropy, cross_entropy, kept_counts
from ..optim import AdamW, clip_and_update
from ..scaler import LossScaler
from .config import StepConfig, TrainConfig

Step = Callable[..., tuple[mx.array, mx.array]]


def loss_fn(model: nn.Module, x: mx.array, y: mx.array, label_smoothing: float = 0.0, loss_chunk: int = 0,
            positions: mx.array | None = None) -> mx.array:
    """Mean next-token cross-entropy, computed in float32 whatever the model's dtype.

    With ``loss_chunk``, a GPT's logits are computed that many positions at a time from its final
    hidden states and its tied head (``wte``), forward and backward, and never held whole.
    """
    packed = {} if positions is None else {"positions": positions}
    if loss_chunk:
        head = model.wte.weight
        return mx.mean(chunked_cross_entropy(model.features(x, **packed), head, y, loss_chunk, label_smoothing,
                                             weight_grad="weight" in model.wte.trainable_parameters()))
    return mx.mean(cross_entropy(model(x, **packed), y, label_smoothing=label_smoothing))


def compute_in(dtype: mx.Dtype, loss: Callable) -> Callable:
    """Mixed precision: ``loss(model, x, y)`` computed with the model's trainable parameters cast to ``dtype``.

    The model keeps its float32 master weights, so AdamW's moments and updates stay float32 (a
    bfloat16 weight cannot take an update under 1/256 of its size), and the gradients come back
    float32 through the cast's own gradient; only the forward and backward passes run in
    ``dtype``. The cast copies are made inside the step and dropped after it.
    """
    if dtype == mx.float32:
        return loss

    def f(model, x: mx.array, y: mx.array, positions: mx.array | None = None) -> mx.array:
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(dtype), master))
        try:
            return loss(model, x, y, positions=positions)
        finally:
            model.update(master)

    return f


def make_loss(cfg: StepConfig, label_smoothing: float | None = None) -> Callable:
    """loss(model, x, y, positions=None): the step's loss in its dtype (evaluation passes ``label_smoothing=0``).
    Packed rows' positions are passed by name, every loss of the step taking them so."""
    smoothing = cfg.label_smoothing if label_smoothing is None else label_smoothing
    return compute_in(cfg.mx_dtype, partial(loss_fn, label_smoothing=smoothing, loss_chunk=cfg.loss_chunk))


def plain_gradients(model: nn.Module, loss: Callable, compile: bool, state: list) -> Callable:
    """grads(x, y, positions=None) -> (mean loss, gradients) of one micro-batch, by ``nn.value_and_grad``."""
    grad_fn = nn.value_and_grad(model, loss)

    def grads(x: mx.array, y: mx.array, positions: mx.array | None = None) -> tuple[mx.array, dict]:
        return grad_fn(model, x, y, positions=positions)

    if compile:
        # model.state is an output too: value_and_grad leaves its traced parameters in the model
        held = [model.state, mx.random.state]
        grads = mx.compile(grads, inputs=held + state, outputs=held)
    return grads


def make_train_step(model: nn.Module, optimizer: AdamW, cfg: TrainConfig,
                    group: mx.distributed.Group | None = None, scaler: LossScaler | None = None) -> Step:
    """step(x, y, positions=None) -> (loss, grad_norm) over x, y (and packed rows' positions) of
    shape (accum, B, T); updates model and optimizer.

    With several processes (``group``), the loss and gradients are the means over every rank's
    batch, so the norm, the clipping and the update are the same on every rank. A float16 run
    scales its loss with ``scaler`` (a fresh one if none is given) and skips the steps whose
    gradients overflow; their norm is then not finite.
    """
    group = group or distributed.init()
    s, accum = cfg.step, cfg.step.grad_accum
    loss = make_loss(s)
    update = partial(clip_and_update, max_norm=cfg.optim.grad_clip)
    state = []  # what the step reads and writes besides the model and the optimizer
    if s.dtype == "float16":
        scaler = scaler or LossScaler()
        loss, update, state = scaler.scaled(loss), scaler.guarded(update), [scaler.state]
    plan = backend.stream_plan(model, s.batch_size, s.streams)
    if plan is not None:
        grads_of, stream_for = plan.gradients(model, loss, s.compile, state), plan.stream_for
    else:
        grads_of, stream_for = plain_gradients(model, loss, s.compile, state), None

    def place(a: mx.array):
        """A parameter's share of the work on its stream (a scalar, the loss, on the default one)."""
        return mx.stream(stream_for(a)) if stream_for is not None and a.ndim else nullcontext()

    def mean(tree, n: int):
        def one(a: mx.array) -> mx.array:
            with place(a):
                return a / n
        return tree_map(one, tree)

    def finish(loss: mx.array, grads: dict) -> tuple[mx.array, mx.array]:
        if accum > 1:
            loss, grads = mean((loss, grads), accum)
        loss, grads = distributed.all_mean((loss, grads), group)
        return loss, update(model, optimizer, grads, stream_for=stream_for)

    def weigh(tree, factor: mx.array):
        """A micro-batch's loss and gradients times its factor (``micro_batch_factors``)."""
        def one(a: mx.array) -> mx.array:
            with place(a):
                return (a * factor).astype(a.dtype)
        return tree_map(one, tree)

    def fold(total: tuple, part: tuple) -> tuple:
        """The running sums of the loss and gradients, one micro-batch further."""
        def add(a: mx.array, b: mx.array) -> mx.array:
            with place(a):
                return a + b
        return tree_map(add, total, part)

    if s.compile:
        held = [model.state, optimizer.state, *state]
        finish, fold, weigh = mx.compile(finish, inputs=held, outputs=held), mx.compile(fold), mx.compile(weigh)

    def part(i: int, x: mx.array, y: mx.array, positions: mx.array | None, factors: list[float] | None) -> tuple:
        out = grads_of(x[i], y[i], None if positions is None else positions[i])
        return out if factors is None else weigh(out, mx.array(factors[i], mx.float32))

    def step(x: mx.array, y: mx.array, positions: mx.array | None = None) -> tuple[mx.array, mx.array]:
        assert x.shape[0] == accum, f"a step takes {accum} micro-batches, got {x.shape[0]}"
        factors = micro_batch_factors(y, group)
        total = part(0, x, y, positions, factors)
        for i in range(1, accum):
            mx.eval(total)
            total = fold(total, part(i, x, y, positions, factors))
        return finish(*total)

    return step


def micro_batch_factors(y: mx.array, group: mx.distributed.Group) -> list[float] | None:
    """Where targets are ignored (``loss.IGNORE``): each micro-batch's factor so that the mean over
    micro-batches and ranks that ``finish`` takes is the mean over every kept target of the step
    (its kept targets' share of the step's, times the micro-batches and ranks); None where every
    target counts, and the plain means are already that."""
    counts = kept_counts(y)  # per micro-batch
    kept, positions = int(counts.sum()), y.size
    if group.size() > 1:  # every rank takes the same branch, and divides by the same total
        kept, positions = (int(v) for v in
                           mx.distributed.all_sum(mx.array([kept, positions], mx.int32), group=group).tolist())
    if kept == positions or len(counts) * group.size() == 1:
        return None
    return [len(counts) * group.size() * int(c) / max(kept, 1) for c in counts]


def make_eval_loss(model: nn.Module, cfg: TrainConfig) -> Callable[..., mx.array]:
    """eval_loss(x, y, positions=None) -> the mean loss of a batch (B, T); on the CPU its rows are
    split over the train step's streams, as the step's are."""
    loss = make_loss(cfg.step, label_smoothing=0.0)
    plan = backend.stream_plan(model, cfg.step.batch_size, cfg.step.streams)
    if plan is not None:
        return plan.loss(model, loss, compile=cfg.step.compile)

    def f(x: mx.array, y: mx.array, positions: mx.array | None = None) -> mx.array:
        return loss(model, x, y, positions=positions)

    return mx.compile(f, inputs=model.state) if cfg.step.compile else f


def estimate_loss(eval_loss: Callable, sampler: BatchSampler, iters: int, seed: int,
                  group: mx.distributed.Group | None = None, tick: Callable[[], None] | None = None) -> float:
    """Mean loss over the kept targets of the same ``iters`` batches every time (a fixed seed), so
    evals compare; with several processes, over every rank's rows of those batches. Each batch
    counts by its kept targets, as the train step's parts do: an example set's masked loss is the
    mean over every answer token evaluated, however batches and ranks divide them (running text
    keeps every target, so each batch counts the same). ``tick()`` after each batch (evaluated
    then, one at a time, so that a progress line means what it says)."""
    sampler.set_state(np.random.Generator(np.random.PCG64(seed)).bit_generator.state)
    total, kept = mx.array(0.0), 0
    for _ in range(iters):
        batch = [mx.array(a[0]) for a in sampler.next()]
        n = int(kept_counts(batch[1]).sum())
        total, kept = total + eval_loss(*batch) * n, kept + n
        if tick is not None:
            mx.eval(total)
            tick()
    total, kept = distributed.all_mean([total, mx.array(float(kept))], group or distributed.init())
    return (total / kept).item()


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The global RNG (dropout) is re-seeded from (seed, step) every step: resume is exact.
    Each rank draws its own dropout masks."""
    return (seed * 1_000_003 + step + (rank << 40)) % (1 << 63)
