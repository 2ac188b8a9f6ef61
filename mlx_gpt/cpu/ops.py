"""The model's elementwise and row operations on MLX's CPU backend: the C++ kernels where they load.

On Linux, MLX's CPU backend evaluates ``exp``, ``tanh`` and ``erf`` one element at a time and
its reductions are scalar loops, so GELU, softmax, layer and RMS norm and cross-entropy cost more than
the matmuls around them. Where the C++ kernels of ``mlx_gpt.cpu.extension`` are built, each of
these (and the AdamW update) is one multithreaded, vectorized primitive with its own VJP. Where
they are not (no compiler or cmake, ``MLX_GPT_NO_EXT=1``, a failed build, or ``pure_mlx_ops()``
inside one process), MLX's own operations run: slower on the CPU, the same results.

Metal and CUDA keep MLX's native kernels, as do non-float32 inputs: ``fast_ops_enabled()``
decides, per call, from the default device. Two things stay here even without the kernels:
``linear``'s VJP, which lays the weight's gradient out like the weight, and ``squared_norm`` as
a BLAS dot product.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..kernels import PLAIN as plain
from . import extension

_native_only: ContextVar[bool] = ContextVar("mlx_gpt_native_ops", default=False)
_pure_mlx: ContextVar[bool] = ContextVar("mlx_gpt_pure_mlx_ops", default=False)


def fast_ops_enabled(dtype: mx.Dtype = mx.float32) -> bool:
    """True when the default device is the CPU (and ``native_ops()`` is not in force)."""
    return dtype == mx.float32 and not _native_only.get() and mx.default_device().type == mx.DeviceType.cpu


@contextmanager
def _set(flag: ContextVar[bool]) -> Iterator[None]:
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def native_ops():
    """Use MLX's native kernels inside this block, whatever the device (for tests and benchmarks).

    The choice is made when a function is traced: a function compiled inside the block keeps
    the native kernels afterwards, and one compiled outside keeps the fast ones.
    """
    return _set(_native_only)


def pure_mlx_ops():
    """Use MLX's own operations inside this block even where the C++ kernels load.

    Like ``native_ops()``, the choice is made when a function is traced.
    """
    return _set(_pure_mlx)


def _kernels():
    """The C++ kernels' module where it is built and not turned off, else None (pure MLX)."""
    return None if _pure_mlx.get() else extension.load()


# ---------------------------------------------------------------------------- GELU, softmax


def gelu_approx(x: mx.array) -> mx.array:
    """GPT-2's tanh-approximated GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))``."""
    kernels = _kernels() if fast_ops_enabled(x.dtype) else None
    return nn.gelu_approx(x) if kernels is None else kernels.gelu_approx(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax over ``axis`` (float32 inputs on the CPU take the kernel for the last axis)."""
    kernels = _kernels() if axis in (-1, x.ndim - 1) and fast_ops_enabled(x.dtype) else None
    return mx.softmax(x, axis=axis, precise=True) if kernels is None else kernels.softmax(x)


# ---------------------------------------------------------------------------- linear layers


@mx.custom_function
def _linear(x: mx.array, weight: mx.array) -> mx.array:
    return x @ weight.T


@_linear.vjp
def _linear_vjp(primals, cotangent, output):
    # the weight's gradient as dy^T x, laid out like the weight: MLX's own VJP returns it as the
    # transpose of x^T dy, and adding a transposed (V, C) array to the embedding's gradient, or
    # reading it beside contiguous optimizer state, takes a strided loop several times slower
    x, weight = primals
    dy = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ weight, dy.T @ x.reshape(-1, x.shape[-1])


@mx.custom_function
def _linear_bias(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return mx.addmm(bias, x, weight.T)


@_linear_bias.vjp
def _linear_bias_vjp(primals, cotangent, output):
    x, weight, _ = primals
    dy = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ weight, dy.T @ x.reshape(-1, x.shape[-1]), mx.sum(dy, axis=0)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ weight.T + bias`` for a weight laid out (out, in), as ``nn.Linear`` computes it."""
    if not fast_ops_enabled(x.dtype):
        return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)
    return _linear(x, weight) if bias is None else _linear_bias(x, weight, bias)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """Layer normalization over the last axis, as ``mx.fast.layer_norm`` computes it (the C++
    kernel on the CPU for float32 with a weight)."""
    kernels = _kernels() if weight is not None and fast_ops_enabled(x.dtype) else None
    if (kernels is None or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype)):  # e.g. a LoRA base kept in bfloat16
        return mx.fast.layer_norm(x, weight, bias, eps)
    return kernels.layer_norm(x, weight, mx.zeros_like(weight) if bias is None else bias, float(eps))


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMS normalization over the last axis, as ``mx.fast.rms_norm`` computes it (the C++ kernel on
    the CPU for float32)."""
    kernels = _kernels() if fast_ops_enabled(x.dtype) and weight.dtype == x.dtype else None
    return mx.fast.rms_norm(x, weight, eps) if kernels is None else kernels.rms_norm(x, weight, float(eps))


def squared_norm(x: mx.array) -> mx.array:
    """sum(x**2) as a float32 scalar.

    On the CPU it is a dot product through BLAS: one vectorized pass instead of a squares array
    and a reduction, and accumulated in partial sums (MLX's CPU sum over 28M elements drifts by
    several percent).
    """
    if not fast_ops_enabled(x.dtype) or x.size == 0:
        return plain.squared_norm(x)
    flat = x.reshape(1, -1)
    return (flat @ flat.T).reshape(())


# ---------------------------------------------------------------------------- AdamW


def adamw_update(parameter: mx.array, gradient: mx.array, m: mx.array, v: mx.array, lr: mx.array, step: mx.array,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 bias_correction: bool) -> tuple[mx.array, mx.array, mx.array]:
    """One AdamW update: (parameter, m, v) after it, ``parameter`` decayed by ``lr * weight_decay``.

    On the CPU (float32) it is one C++ kernel per parameter that reads the parameter, gradient
    and moments once and writes them once; elsewhere, MLX's own AdamW arithmetic.
    """
    kernels = _kernels() if fast_ops_enabled(parameter.dtype) and gradient.dtype == mx.float32 else None
    if kernels is None:
        return plain.adamw_update(parameter, gradient, m, v, lr, step, betas, eps, weight_decay, bias_correction)
    b1, b2 = betas
    return kernels.adamw_update(parameter, gradient, m, v, lr, step, b1, b2, eps, weight_decay, bias_correction)


# ---------------------------------------------------------------------------- cross-entropy


def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-position cross-entropy of ``logits`` (..., V) against class indices ``targets`` (...).

    Matches ``nn.losses.cross_entropy(logits, targets, label_smoothing=...)`` (reduction "none"),
    which other devices, non-float32 logits and the CPU without its kernels use.
    """
    kernels = _kernels() if fast_ops_enabled(logits.dtype) else None
    if kernels is None:
        return plain.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return kernels.cross_entropy(logits, targets, float(label_smoothing))
