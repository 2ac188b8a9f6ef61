"""The optimizer every model trains with: AdamW as PyTorch computes it, its schedule, and clipping.

``AdamW`` divides the moments by (1 - beta1^t) and (1 - beta2^t), as ``torch.optim.AdamW``,
nanoGPT and llm.c do (MLX's own default leaves the first updates several times larger), and
decays 2-D weights only (matmuls and embeddings; never biases or norms), as nanoGPT and llm.c
do. The learning-rate schedule lives inside the optimizer, so it is part of the compiled step.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .cpu import ops


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 0
    decay_iters: int = 1  # step at which the cosine reaches min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


class AdamW(optim.AdamW):
    """Bias-corrected AdamW whose weight decay applies to 2-D parameters only.

    ``stream_for`` (optional) maps a parameter to the MLX stream its update runs on, so the
    updates of a CPU step split over several streams run on all cores.
    """

    stream_for: Callable[[mx.array], mx.Stream] | None = None

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        with mx.stream(self.stream_for(parameter)) if self.stream_for is not None else nullcontext():
            decay = self.weight_decay if parameter.ndim >= 2 else 0.0
            parameter, state["m"], state["v"] = ops.adamw_update(
                parameter, gradient, state["m"], state["v"], self.learning_rate, self.step, tuple(self.betas),
                self.eps, decay, self.bias_correction)
            return parameter


def lr_schedule(cfg: OptimConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup to learning_rate over warmup_iters, then cosine decay to min_lr at decay_iters."""
    decay_iters = max(cfg.decay_iters, 1)
    warmup = min(cfg.warmup_iters, decay_iters)
    cosine = optim.cosine_decay(cfg.learning_rate, max(decay_iters - warmup, 1), end=cfg.min_lr)
    if warmup == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1)
                                 if warmup > 1 else (lambda _: mx.array(cfg.learning_rate)), cosine], [warmup])


def make_optimizer(cfg: OptimConfig) -> AdamW:
    return AdamW(learning_rate=lr_schedule(cfg), betas=[cfg.beta1, cfg.beta2], eps=cfg.eps,
                 weight_decay=cfg.weight_decay, bias_correction=True)


def clip_and_update(model, optimizer: AdamW, grads: dict, max_norm: float,
                    stream_for: Callable[[mx.array], mx.Stream] | None = None) -> mx.array:
    """Clip ``grads`` to a global norm of ``max_norm`` (off when 0), apply the optimizer; return the norm.

    The norm is accumulated from per-parameter BLAS dot products (``ops.squared_norm``), which
    on the CPU is faster and steadier than a reduction over the gradients. With ``stream_for``,
    each parameter's share of the work (its norm, clip and update) runs on its stream.
    """
    place = (lambda g: mx.stream(stream_for(g))) if stream_for is not None else (lambda g: nullcontext())
    flat = tree_flatten(grads)
    squares = []
    for _, g in flat:
        with place(g):
            squares.append(ops.squared_norm(g))
    norm = mx.sqrt(sum(squares))
    if max_norm > 0:
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
        clipped = []
        for key, g in flat:
            with place(g):
                clipped.append((key, (g * scale).astype(g.dtype)))
        grads = tree_unflatten(clipped)
    optimizer.stream_for = stream_for
    optimizer.update(model, grads)
    return norm


def compute_in(dtype: mx.Dtype, loss: Callable) -> Callable:
    """Mixed precision: ``loss(model, x, y)`` computed with the model's trainable parameters cast to ``dtype``.

    The model keeps its float32 master weights, so AdamW's moments and updates stay float32 (a
    bfloat16 weight cannot take an update under 1/256 of its size), and the gradients come back
    float32 through the cast's own gradient; only the forward and backward passes run in
    ``dtype``. The cast copies are made inside the step and dropped after it.
    """
    if dtype == mx.float32:
        return loss

    def f(model, x: mx.array, y: mx.array) -> mx.array:
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(dtype), master))
        try:
            return loss(model, x, y)
        finally:
            model.update(master)

    return f
