"""The backend seam: the few operations of the loss and the optimizer whose fastest form depends
on where MLX runs.

Each function here is MLX's plain formulation, which Metal and CUDA run best. ``backend.install``
replaces them, once per process, by the CPU wing's (``cpu/ops.py``: C++ kernels and BLAS
products, which fall back to these same formulations off the CPU). Callers look them up at call
time (``kernels.cross_entropy(...)``), so they see what was installed; the models never meet
them (their layers are swapped by ``cpu.accelerate`` instead).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-position cross-entropy of ``logits`` (..., V) against class indices ``targets`` (...)."""
    return nn.losses.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """``x @ weight.T`` for a weight laid out (out, in), as ``nn.Linear`` holds it."""
    return x @ weight.T


def squared_norm(x: mx.array) -> mx.array:
    """sum(x**2) as a float32 scalar."""
    return mx.sum(mx.square(x.astype(mx.float32)))


def adamw_update(parameter: mx.array, gradient: mx.array, m: mx.array, v: mx.array, lr: mx.array, step: mx.array,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 bias_correction: bool) -> tuple[mx.array, mx.array, mx.array]:
    """One AdamW update: (parameter, m, v) after it, ``parameter`` decayed by ``lr * weight_decay``."""
    b1, b2 = betas
    lr = lr.astype(gradient.dtype)
    if weight_decay:
        parameter = parameter * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * gradient
    v = b2 * v + (1 - b2) * mx.square(gradient)
    if not bias_correction:
        return parameter - lr * m / (mx.sqrt(v) + eps), m, v
    c1 = (lr / (1 - b1**step)).astype(gradient.dtype)
    c2 = mx.rsqrt(1 - b2**step).astype(gradient.dtype)
    return parameter - (c1 * m) / (mx.sqrt(v) * c2 + eps), m, v


NAMES = ("cross_entropy", "linear", "squared_norm", "adamw_update")
# the formulations above, whatever is installed later: another backend's fallback
PLAIN = SimpleNamespace(**{name: globals()[name] for name in NAMES})


def install(**impls: Callable) -> None:
    """Replace some of these operations by another backend's (same signatures, same values)."""
    unknown = set(impls) - set(NAMES)
    assert not unknown, f"no such kernel: {unknown}"
    globals().update(impls)
