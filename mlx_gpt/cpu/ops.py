"""GELU, softmax, cross-entropy and layer norm written for MLX's CPU backend, and chosen only there.

On Linux, MLX's CPU backend evaluates ``exp``, ``tanh`` and ``erf`` one element at a time
through libm calls (each costing many additions), so ``nn.gelu_approx`` and
``mx.softmax`` cost more than the matmuls around them. Additions, multiplications,
comparisons, selects and integer shifts, on the other hand, are fused by ``mx.compile`` into
C++ loops that the compiler vectorizes. This module builds the transcendental functions the
model needs out of those: ``exp`` as a Cody-Waite range reduction, a degree-6 polynomial and an
exponent assembled in integer bits; GELU as ``x * sigmoid(z)``; softmax and causal attention
on top. Row sums (softmax, cross-entropy, layer-norm statistics) are BLAS products with a
vector of ones, several times faster than MLX's CPU reductions. Every result stays within a few float32 ulps of the exact value (``tests/test_ops.py``
checks values and gradients against float64 and against the native kernels).

How the graph is laid out matters as much as the arithmetic, because of how ``mx.compile``
fuses on the CPU:

* a fused kernel is cut where a chain of operations grows deeper than about ten, and a scalar
  constant used at the cut turns the next kernel into a slow strided loop, so each function
  here ends its kernels itself with ``mx.contiguous`` (``_cut``) after at most ~8 levels;
* ``mx.maximum``/``mx.minimum``/``mx.clip`` carry a NaN branch that stops the loop from being
  vectorized, so clamps are written as ``mx.where(x < c, c, x)``;
* a ``where`` whose operand is computed only for it is moved into a branch and not
  vectorized, so the selects here choose between values used elsewhere or constants;
* reinterpreting integer bits as float (``view``) is not fusable, so it sits between kernels.

The forward and backward passes are ``mx.custom_function``s with hand-written VJPs (the bit
tricks have no useful derivative of their own). Metal and CUDA keep MLX's native kernels, as
do non-float32 inputs: ``fast_ops_enabled()`` decides, per call, from the default device.

Where the C++ kernels of ``mlx_gpt.cpu.extension`` are built, GELU, layer norm, softmax,
attention's softmax, cross-entropy and the AdamW update run as those primitives instead (each one multithreaded,
vectorized kernel); everything in this module remains their fallback (``MLX_GPT_NO_EXT=1``, or
``pure_mlx_ops()`` inside one process).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Callable, Iterator

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
def native_ops() -> Iterator[None]:
    """Use MLX's native kernels inside this block, whatever the device (for tests and benchmarks).

    The choice is made when a function is traced: a function compiled inside the block keeps
    the native kernels afterwards, and one compiled outside keeps the fast ones.
    """
    token = _native_only.set(True)
    try:
        yield
    finally:
        _native_only.reset(token)


@contextmanager
def pure_mlx_ops() -> Iterator[None]:
    """Use this module's pure-MLX formulations inside this block even where the C++ kernels load.

    Like ``native_ops()``, the choice is made when a function is traced.
    """
    token = _pure_mlx.set(True)
    try:
        yield
    finally:
        _pure_mlx.reset(token)


def _kernels():
    """The C++ kernels' module where it is built and not turned off, else None (pure MLX)."""
    return None if _pure_mlx.get() else extension.load()


# ---------------------------------------------------------------------------- exp(d), d <= 0

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND - _ROUND rounds y to the nearest integer
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**15
_LN2_LO = -2.12194440054690582e-4
# e**r = 1 + r + r**2 * (c2 + c3 r + c4 r**2 + c5 r**3 + c6 r**4) on |r| <= ln(2)/2, minimax in
# relative error (0.06 units of 2**-24 before rounding; fitted for this module)
_C2, _C3, _C4, _C5, _C6 = 0.49999988, 0.16666515, 0.0416696, 0.008369332, 0.0013749899
_MIN_EXP = -126  # below 2**-126 the result would be subnormal: it is returned as 0
_MIN_ARG = -88.0  # where d is clamped before the reduction (e**-88 is already 0 here)


def _cut(x: mx.array) -> mx.array:
    """End the fused kernel here: ``x`` is written out and read back by the next one."""
    return mx.contiguous(x)


# MLX's CPU reductions along the last axis are scalar loops; a matrix-vector product with a
# vector of ones goes through BLAS, which is several times faster (and sums in blocked partial
# sums). Row statistics here are therefore products.


def _row_sum(x: mx.array, scale: float = 1.0) -> mx.array:
    """``scale`` times the sum of ``x`` over its last axis, keeping that axis (as size 1)."""
    c = x.shape[-1]
    ones = mx.full((c, 1), scale, x.dtype)
    return (x.reshape(-1, c) @ ones).reshape(*x.shape[:-1], 1)


def _column_sum(x: mx.array) -> mx.array:
    """The sum of ``x`` over every axis but the last: shape (x.shape[-1],)."""
    flat = x.reshape(-1, x.shape[-1])
    return (mx.ones((1, flat.shape[0]), x.dtype) @ flat).reshape(x.shape[-1])


def _exp2_bits(y: mx.array) -> mx.array:
    """int32 bits of the float 2**round(y) for y <= 0 (y in log2 units), or of 0 below 2**-126.

    The exponent is clamped at -127 as an integer (a float clamp would not vectorize), which
    makes the exponent field 0 there: the float 0. -inf and huge y convert to INT_MIN first.
    """
    n = ((y + _ROUND) - _ROUND).astype(mx.int32)
    n = mx.where(n < _MIN_EXP - 1, _MIN_EXP - 1, n)
    return _cut(mx.left_shift(n + 127, 23))


def _reduce(d: mx.array, bits: mx.array) -> mx.array:
    """r = d - n ln2 for the n encoded in ``bits``, |r| <= ln(2)/2 (Cody-Waite, two-part ln 2)."""
    n = (mx.right_shift(bits, 23) - 127).astype(mx.float32)
    d = mx.where(d < _MIN_ARG, _MIN_ARG, d)  # keeps r finite where bits is 0 (and NaN stays NaN)
    return _cut((d - n * _LN2_HI) - n * _LN2_LO)


def _expm_poly(r: mx.array) -> mx.array:
    """e**r for |r| <= ln(2)/2, as a polynomial evaluated in Estrin's scheme (5 levels deep)."""
    r2 = r * r
    high = (_C4 + _C5 * r) + r2 * _C6
    return ((1.0 + r) + r2 * (_C2 + _C3 * r)) + (r2 * r2) * high


def _exp_parts(d: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
    """The two arrays that e**d = poly(r) * scale is made of, for d <= 0 and y = d * log2(e).

    ``y`` is passed separately so a caller can fold log2(e) into its own constants (and so
    that the expression differs from ``d``'s and is not merged with it into one shared,
    written-out array).
    """
    bits = _exp2_bits(y)
    r = _reduce(d, bits)
    return r, bits.view(mx.float32)


def exp_nonpositive(d: mx.array) -> mx.array:
    """e**d for d <= 0 (and -inf), within 2 ulp; the building block of ``softmax``."""
    r, scale = _exp_parts(d, d * _LOG2E)
    return _expm_poly(r) * scale


# ---------------------------------------------------------------------------- GELU (tanh form)

# 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x**3); z = 2u = x (K1 + K2 x**2)
_K1 = 2.0 * math.sqrt(2.0 / math.pi)
_K2 = _K1 * 0.044715


def _gelu_exp(x: mx.array) -> tuple[mx.array, mx.array]:
    """(r, scale) with e**(-|z|) = poly(r) * scale.

    -|z| and -|z| log2(e) are written with different operations so that the compiler does
    not merge their common parts into arrays shared (and written out) between kernels.
    """
    d = -mx.abs(x * (_K1 + _K2 * mx.square(x)))  # -|z|
    y = mx.abs(x) * (-_K1 * _LOG2E - (_K2 * _LOG2E) * (x * x))  # -|z| log2(e)
    return _exp_parts(d, y)


def _gelu_e(x: mx.array) -> mx.array:
    """e**(-|z|), written out: the forward pass and its VJP share this one array."""
    r, scale = _gelu_exp(x)
    return _cut(_expm_poly(r) * scale)


@mx.custom_function
def _fast_gelu(x: mx.array) -> mx.array:
    e = _gelu_e(x)
    # sigmoid(z) from e = e**(-|z|), without cancellation for either sign of z
    return x * (mx.where(x >= 0, 1.0, e) / (1.0 + e))


@_fast_gelu.vjp
def _fast_gelu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    # d/dx x s(z) = s + x z' s (1 - s), and s (1 - s) = e / (1 + e)**2 for either sign of z.
    # Inside a compiled train step, e is the forward's array; the expressions around it are
    # spelled differently from the forward's (x < 0, e + 1) so that they are not merged with
    # them into arrays written out by one kernel and read by another.
    e = _gelu_e(x)
    e1 = e + 1.0
    dz = _K1 + ((3.0 * _K2) * x) * x
    return cotangent * (mx.where(x < 0, e, 1.0) / e1 + (x * dz) * (e / (e1 * e1)))


def gelu_approx(x: mx.array) -> mx.array:
    """GPT-2's tanh-approximated GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))``."""
    if not fast_ops_enabled(x.dtype):
        return nn.gelu_approx(x)
    kernels = _kernels()
    return _fast_gelu(x) if kernels is None else kernels.gelu_approx(x)


# ---------------------------------------------------------------------------- softmax


@mx.custom_function
def _fast_softmax(x: mx.array) -> mx.array:
    # x - max is written out once: the kernels reading the broadcast max directly would run as
    # strided, unvectorized loops
    d = _cut(x - mx.max(x, axis=-1, keepdims=True))
    r, scale = _exp_parts(d, d * _LOG2E)
    e = _cut(_expm_poly(r) * scale)
    return e / _row_sum(e)


@_fast_softmax.vjp
def _fast_softmax_vjp(x: mx.array, cotangent: mx.array, p: mx.array) -> mx.array:
    return p * (cotangent - _row_sum(_cut(cotangent * p)))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax over ``axis`` (float32 inputs on the CPU take the fast path for the last axis)."""
    if axis not in (-1, x.ndim - 1) or not fast_ops_enabled(x.dtype):
        return mx.softmax(x, axis=axis, precise=True)
    kernels = _kernels()
    return _fast_softmax(x) if kernels is None else kernels.softmax(x)


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


@lru_cache(maxsize=None)
def _fast_layer_norm(eps: float) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """The layer-norm custom function for one epsilon: statistics by BLAS, two-pass variance."""

    def centred(x: mx.array) -> tuple[mx.array, mx.array]:
        c = 1.0 / x.shape[-1]
        d = _cut(x - _row_sum(x, c))
        # rsqrt on its own: a fused kernel with a square root is not vectorized (errno)
        return d, mx.rsqrt(_cut(_row_sum(_cut(d * d), c) + eps))

    @mx.custom_function
    def norm(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
        d, rstd = centred(x)
        return (d * rstd) * weight + bias

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        # dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), the standard layer-norm gradient
        x, weight, _ = primals
        d, rstd = centred(x)
        xhat = _cut(d * rstd)
        gw = _cut(cotangent * weight)
        c = 1.0 / x.shape[-1]
        dx = rstd * ((gw - _row_sum(gw, c)) - xhat * _row_sum(_cut(gw * xhat), c))
        return dx, _column_sum(_cut(cotangent * xhat)), _column_sum(cotangent)

    return norm


# below this many elements (a few rows: decoding) MLX's own layer norm is faster than the
# pure-MLX one: the BLAS statistics take more kernels, and each kernel costs microseconds however
# small its input. The C++ kernel is one primitive at any size.
LAYER_NORM_MIN_SIZE = 8192


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """Layer normalization over the last axis, as ``mx.fast.layer_norm`` computes it.

    On the CPU (float32, with a weight) it is the C++ kernel; without it, the mean and variance
    are BLAS products: faster than MLX's reductions both ways, and closer to the float64 result.
    """
    if (weight is None or not fast_ops_enabled(x.dtype) or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype)):  # e.g. a LoRA base kept in bfloat16
        return mx.fast.layer_norm(x, weight, bias, eps)
    if bias is None:
        bias = mx.zeros_like(weight)
    kernels = _kernels()
    if kernels is not None:
        return kernels.layer_norm(x, weight, bias, float(eps))
    if x.size < LAYER_NORM_MIN_SIZE:
        return mx.fast.layer_norm(x, weight, bias, eps)
    return _fast_layer_norm(float(eps))(x, weight, bias)


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


def _exp_shifted(x: mx.array) -> tuple[mx.array, mx.array]:
    """(max over the last axis, e**(x - max)) with the exponentials written out."""
    m = mx.max(x, axis=-1, keepdims=True)
    d = _cut(x - m)
    r, scale = _exp_parts(d, d * _LOG2E)
    return m, _cut(_expm_poly(r) * scale)


@lru_cache(maxsize=None)
def _fast_cross_entropy(smoothing: float) -> Callable[[mx.array, mx.array], mx.array]:
    """The cross-entropy custom function for one label-smoothing value."""

    @mx.custom_function
    def loss_fn(logits: mx.array, targets: mx.array) -> mx.array:
        m, e = _exp_shifted(logits)
        lse = m[..., 0] + mx.log(_row_sum(e)[..., 0])
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        if smoothing == 0.0:
            return lse - picked
        return lse - (1.0 - smoothing) * picked - smoothing * mx.mean(logits, axis=-1)

    @loss_fn.vjp
    def loss_vjp(primals, cotangent, output):
        # d loss / d logits = softmax - (1 - s) onehot(target) - s / V
        logits, targets = primals
        _, e = _exp_shifted(logits)
        grad = e * (cotangent[..., None] / _row_sum(e))
        if smoothing != 0.0:
            grad = grad - (cotangent * (smoothing / logits.shape[-1]))[..., None]
        idx = targets[..., None]
        at_target = mx.take_along_axis(grad, idx, axis=-1) - ((1.0 - smoothing) * cotangent)[..., None]
        return mx.put_along_axis(grad, idx, at_target, axis=-1), mx.zeros_like(targets)

    return loss_fn


def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-position cross-entropy of ``logits`` (..., V) against class indices ``targets`` (...).

    Matches ``nn.losses.cross_entropy(logits, targets, label_smoothing=...)`` (reduction "none"),
    which other devices and non-float32 logits use.
    """
    if not fast_ops_enabled(logits.dtype):
        return plain.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    kernels = _kernels()
    if kernels is None:
        return _fast_cross_entropy(float(label_smoothing))(logits, targets)
    return kernels.cross_entropy(logits, targets, float(label_smoothing))
