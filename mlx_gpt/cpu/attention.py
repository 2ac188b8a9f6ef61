"""Attention on MLX's CPU backend: the C++ kernels' primitives where they load, MLX's own
attention elsewhere and without them."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ..models.cache import PrefixMask
from ..models.gpt import Packed
from .ops import _kernels, fast_ops_enabled, softmax


def causal_mask(t: int, s: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive (t, s) mask: query i sees keys up to i + s - t (the last query sees them all)."""
    rows = mx.arange(s - t, s)[:, None]
    return mx.contiguous(mx.where(mx.arange(s)[None] > rows, mx.array(-mx.inf, dtype), mx.array(0, dtype)))


# causal attention on the CPU takes queries in blocks of about this many: a block skips the keys
# after its last query, which every row of it masks (a quarter of the work at 256 positions)
QUERY_BLOCK = 128


def attention_weights_kept(dtype: mx.Dtype, dropout: float) -> bool:
    """Whether training keeps each layer's attention weights for the backward pass: not where
    ``attention`` runs the C++ kernel (CPU, float32, no dropout), which recomputes them."""
    return not (fast_ops_enabled(dtype) and not dropout and _kernels() is not None)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool,
              dropout: Callable[[mx.array], mx.array] | None = None, packed: Packed | None = None) -> mx.array:
    """softmax(q k^T * scale [+ causal mask]) v for q (B, nh, T, hs) and k, v (B, nh, S, hs).

    With ``causal`` the mask is aligned to the last query, which is what a prefill after cached
    positions needs. On the CPU it is one C++ primitive per pass where the kernels load (the
    heads read in place from the projection's views, the weights recomputed in the backward
    pass); with ``dropout`` (applied to the attention weights, which must then be written out)
    it is batched matmuls around ``softmax``, by blocks of queries when causal. Elsewhere, and
    without the kernels, it is ``mx.fast.scaled_dot_product_attention``.

    ``packed`` rows (several examples a row, T == S) see only their own example: the kernel skips
    the other examples' keys; without it, and with dropout, the mask is written out.
    """
    kernels = _kernels() if fast_ops_enabled(q.dtype) else None
    if packed is not None:
        return packed_attention(q, k, v, scale, dropout, packed, kernels)
    if dropout is None:
        if kernels is not None:
            return kernels.attention(q, k, v, scale, causal)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    T, S = q.shape[2], k.shape[2]
    if kernels is None:
        q = q * scale
    n_blocks = -(-T // QUERY_BLOCK) if causal else 1
    size = -(-T // n_blocks)
    outs = []
    for start in range(0, T, size):
        stop = min(start + size, T)
        seen = stop + S - T  # keys any query of this block may see
        qb = q if n_blocks == 1 else q[:, :, start:stop]
        kb, vb = (k, v) if seen == S else (k[:, :, :seen], v[:, :, :seen])
        scores = qb @ kb.swapaxes(-1, -2)  # (B, nh, block, seen)
        if kernels is not None:  # scale and mask fused into the softmax
            weights = kernels.softmax(scores, scale, causal)
        else:
            if causal:
                scores = scores + causal_mask(stop - start, seen)
            weights = softmax(scores)
        outs.append((weights if dropout is None else dropout(weights)) @ vb)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def packed_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                     dropout: Callable[[mx.array], mx.array] | None, packed: Packed, kernels) -> mx.array:
    """``attention`` of packed rows: the kernel with each query's first key, or the mask written out."""
    if dropout is None and kernels is not None:
        return kernels.attention(q, k, v, scale, True, packed.starts())
    mask = packed.as_array()
    if dropout is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = mx.where(mask, (q * scale) @ k.swapaxes(-1, -2), mx.array(-mx.inf, q.dtype))
    return dropout(softmax(scores)) @ v


def cache_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: PrefixMask) -> mx.array:
    """Attention of the newest queries over a fixed-capacity cache (decoding; no gradient).

    The C++ kernel reads only the ``mask.length`` written positions, where a boolean mask would
    have every query score the whole capacity; without the kernels, MLX's attention with the mask.
    """
    kernels = _kernels() if fast_ops_enabled(q.dtype) else None
    if kernels is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask.as_array())
    return kernels.cache_attention(q, k, v, mask.length.astype(mx.int32), scale)
