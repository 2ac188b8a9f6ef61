"""The optimizer every model trains with: AdamW as PyTorch computes it, its schedule, and clipping.

``AdamW`` divides the moments by (1 - beta1^t) and (1 - beta2^t), as ``torch.optim.AdamW``,
nanoGPT and llm.c do (MLX's own default leaves the first updates several times larger), and
decays 2-D weights only (matmuls and embeddings; never biases or norms), as nanoGPT and llm.c
do. The learning-rate schedule lives inside the optimizer, so it is part of the compiled step.
``--optimizer muon`` trains the transformer blocks' matrices with Muon instead (``muon.py``), on
the same schedule and through the same ``apply_gradients``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import kernels
from .errors import UserError
from .flags import setting

EPS = 1e-8
OPTIMIZERS = ("adamw", "muon")
StreamFor = Callable[[mx.array], mx.Stream]  # a parameter -> the stream its share of the work runs on


@dataclass(frozen=True)
class OptimConfig:
    """How long the run is, its learning-rate schedule, and the optimizer's settings. Those left None
    take the run's recipe's value (``training.config``): today's for a new model, GPT-2's for
    ``--model gpt`` and the ladder's other rungs."""

    max_iters: int | None = setting(None, "optimizer steps in the run (default: 200; 600 for GPT-2; 20 with --init)",
                                    resumable=True)
    max_seconds: float | None = setting(
        None, "the whole run (data, compiling, training, evaluations, saves) in about this many seconds instead of "
              "--max-iters: a few steps and evaluation batches are timed first and the schedule laid over the steps "
              "that fit (warmup at most a tenth of them); a run 10%% and 2 s past it ends there, evaluated and saved")
    learning_rate: float | None = setting(None, "peak learning rate, with Muon AdamW's (default: 2e-2; 2e-3 for "
                                                "GPT-2; 3e-5 with --init, 2e-4 with --lora-rank)")
    min_lr: float | None = setting(None, "learning rate at the end of the cosine decay (default: a tenth of the "
                                         "default learning rate; --init's and --lora-rank's equal it)")
    warmup_iters: int | None = setting(None, "steps of linear warmup (default: a tenth of --max-iters, at most 5; "
                                             "at most 60 for GPT-2; 0 with --init)")
    lr_decay_iters: int | None = setting(None, "step where cosine decay reaches min-lr (default: max-iters)")
    weight_decay: float | None = setting(None, "AdamW's decoupled weight decay, on 2-D weights only (default: 0; 0.1 "
                                               "for GPT-2 and with --init)")
    beta1: float = setting(0.9, "AdamW's beta1")
    beta2: float = setting(0.99, "AdamW's beta2")
    grad_clip: float = setting(1.0, "clip the gradients' global norm to this (0: off)")
    optimizer: str | None = setting(None, "adamw, or muon: Newton-Schulz-orthogonalised momentum for the transformer "
                                          "blocks' 2-D weights, AdamW for embeddings, head, norms and biases "
                                          "(default: muon; adamw for GPT-2 and with --init)")
    muon_lr: float | None = setting(None, "--optimizer muon: Muon's peak rate (default: 0.015; 0.02 for GPT-2)")
    muon_momentum: float | None = setting(None, "--optimizer muon: Muon's momentum (default: 0.85; 0.95 for GPT-2)")

    def __post_init__(self) -> None:
        def need(name: str, ok: Callable[[float], bool], what: str) -> None:
            value = getattr(self, name)
            if value is not None and not (ok(value) and math.isfinite(value)):
                raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")

        need("learning_rate", lambda v: v > 0, "a positive number")
        need("min_lr", lambda v: v >= 0, "zero or a positive number")
        need("weight_decay", lambda v: v >= 0, "zero or a positive number")
        need("grad_clip", lambda v: v >= 0, "zero (off) or a positive number")
        need("beta1", lambda v: 0 <= v < 1, "in [0, 1)")
        need("beta2", lambda v: 0 <= v < 1, "in [0, 1)")
        need("max_seconds", lambda v: v > 0, "a positive number of seconds")
        need("muon_lr", lambda v: v > 0, "a positive number")
        need("muon_momentum", lambda v: 0 <= v < 1, "in [0, 1)")
        if self.optimizer not in (None, *OPTIMIZERS):
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_iters" else 0):
                raise UserError(f"--{name.replace('_', '-')} must be at least {1 if name == 'max_iters' else 0}, "
                                f"got {value}")

    @property
    def decay_iters(self) -> int:
        """The step at which the cosine reaches min_lr."""
        return self.lr_decay_iters or self.max_iters or 1


class AdamW(optim.AdamW):
    """Bias-corrected AdamW whose weight decay applies to 2-D parameters only."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        decay = self.weight_decay if parameter.ndim >= 2 else 0.0
        parameter, state["m"], state["v"] = kernels.adamw_update(
            parameter, gradient, state["m"], state["v"], self.learning_rate, self.step, tuple(self.betas),
            self.eps, decay, self.bias_correction)
        return parameter

    def apply_gradients(self, gradients: dict, parameters: dict, stream_for: StreamFor | None = None) -> dict:
        """The updated parameters; with ``stream_for``, each parameter's update runs on its stream
        (the steps of ``optim.Optimizer.apply_gradients``, each leaf placed)."""
        if stream_for is None:
            return super().apply_gradients(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1

        def placed(g: mx.array, p: mx.array, s: dict) -> mx.array:
            with mx.stream(stream_for(p)):
                return self.apply_single(g, p, s)

        return tree_map(placed, gradients, parameters, self.state)


def lr_schedule(cfg: OptimConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup to learning_rate over warmup_iters, then cosine decay to min_lr at decay_iters."""
    decay_iters = max(cfg.decay_iters, 1)
    warmup = min(cfg.warmup_iters or 0, decay_iters)
    cosine = optim.cosine_decay(cfg.learning_rate, max(decay_iters - warmup, 1), end=cfg.min_lr)
    if warmup == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup - 1)
                                 if warmup > 1 else (lambda _: mx.array(cfg.learning_rate)), cosine], [warmup])


def make_optimizer(cfg: OptimConfig) -> AdamW:
    """AdamW, or Muon (``muon.Muon``: AdamW for what Muon does not take) on the same schedule."""
    kw = dict(learning_rate=lr_schedule(cfg), betas=[cfg.beta1, cfg.beta2], eps=EPS, weight_decay=cfg.weight_decay,
              bias_correction=True)
    if cfg.optimizer == "muon":
        from .muon import Muon

        return Muon(**kw, lr_ratio=cfg.muon_lr / cfg.learning_rate, momentum=cfg.muon_momentum)
    return AdamW(**kw)


def clip_and_update(model, optimizer: AdamW, grads: dict, max_norm: float, stream_for: StreamFor | None = None
                    ) -> mx.array:
    """Clip ``grads`` to a global norm of ``max_norm`` (off when 0), apply the optimizer; return the norm.

    The norm is accumulated from per-parameter squared norms (``kernels.squared_norm``: BLAS dot
    products on the CPU, faster and steadier than a reduction). With ``stream_for``, each
    parameter's share of the work (its norm, clip and update) runs on its stream.
    """
    place = (lambda g: mx.stream(stream_for(g))) if stream_for is not None else (lambda g: nullcontext())
    flat = tree_flatten(grads)
    squares = []
    for _, g in flat:
        with place(g):
            squares.append(kernels.squared_norm(g))
    norm = mx.sqrt(sum(squares))
    if max_norm > 0:
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
        clipped = []
        for key, g in flat:
            with place(g):
                clipped.append((key, (g * scale).astype(g.dtype)))
        grads = tree_unflatten(clipped)
    model.update(optimizer.apply_gradients(grads, model, stream_for=stream_for))
    return norm
