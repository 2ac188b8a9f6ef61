"""The loss, defined once for training, evaluation and perplexity: next-token cross-entropy in float32.

``chunked_cross_entropy`` computes the same values from the final hidden states and a tied head
without ever holding the (positions x vocabulary) logits: with GPT-2's 50,257-token vocabulary
they are the largest activation of a train step (1.6 GB in float32 at batch 8, block 1024), and
the plain loss holds them several times over (logits, their exponentials, their gradient).

A target of ``IGNORE`` counts for nothing: a prompt's tokens under ``--mask-prompt``, a row's
padding. The per-position losses come back weighted so that their plain mean, the one every
caller takes (the train step, evaluation), is the mean over the kept positions: each kept one
is scaled by (positions / kept positions), each ignored one is zero and gets no gradient. A
batch without ignored targets is scaled by exactly 1, so running text trains as before. Where a
batch is computed in parts (micro-batches, CPU streams, ranks), each part's mean is weighted by
its share of the kept targets (``kept_counts``), so the step's loss is still the batch's mean.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import mlx.core as mx
import numpy as np

from . import kernels

IGNORE = -1  # a target that is not trained on or counted (see the module's docstring)


def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-position cross-entropy (...,) of ``logits`` (..., V) against ``targets`` (...), in float32
    whatever the model's dtype; ``nn.losses.cross_entropy``'s values (``kernels``: faster on the CPU),
    weighted for ``IGNORE`` targets so that their mean is the mean over the kept positions."""
    losses = kernels.cross_entropy(logits.astype(mx.float32), kept_targets(targets), label_smoothing=label_smoothing)
    return _weighted(losses, targets)


def _signed(targets: mx.array) -> bool:
    """Whether targets can hold IGNORE (an unsigned array, such as argmax's, cannot)."""
    return not mx.issubdtype(targets.dtype, mx.unsignedinteger)


def kept_targets(targets: mx.array) -> mx.array:
    """``targets`` with IGNORE replaced by a valid id (0): its loss is computed, then weighted to zero."""
    return mx.where(targets == IGNORE, 0, targets) if _signed(targets) else targets


def _weighted(losses: mx.array, targets: mx.array) -> mx.array:
    """``losses`` weighted 0 at IGNORE targets, else (positions / kept positions), so that their
    plain mean is the mean over the kept positions (0 when none is kept)."""
    if not _signed(targets):
        return losses
    keep = targets != IGNORE
    return losses * (keep.astype(mx.float32) * (keep.size / mx.maximum(keep.sum(), 1).astype(mx.float32)))


def kept_counts(targets: mx.array) -> np.ndarray:
    """The kept (not IGNORE) targets of each leading row of ``targets``, counted on the host: where a
    batch is split (micro-batches, streams, ranks), each part's mean is weighted by its count, so
    that the whole is the mean over every kept target of the batch, not a mean of means."""
    rows = targets.shape[0]
    if not _signed(targets):
        return np.full(rows, targets.size // max(rows, 1), np.int64)
    return np.asarray((targets != IGNORE).reshape(rows, -1).sum(axis=1)).astype(np.int64)


def _chunk_loss(label_smoothing: float) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    def f(h: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
        return cross_entropy(kernels.linear(h, weight), targets, label_smoothing)

    return f


@lru_cache(maxsize=None)
def _chunked(rows: int, label_smoothing: float, weight_grad: bool) -> Callable:
    """The custom function for chunks of ``rows`` positions (see ``chunked_cross_entropy``)."""
    loss = _chunk_loss(label_smoothing)

    def bounds(n: int) -> list[tuple[int, int]]:
        return [(a, min(a + rows, n)) for a in range(0, n, rows)]

    @mx.custom_function
    def f(h: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
        # chunk k+1 starts once chunk k's losses exist (``mx.depends``); MLX would otherwise be
        # free to compute every chunk's logits before reducing any of them
        losses = []
        for a, b in bounds(h.shape[0]):
            hc = mx.depends(h[a:b], losses[-1:]) if losses else h[a:b]
            losses.append(loss(hc, weight, targets[a:b]))
        return mx.concatenate(losses)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        h, weight, targets = primals
        dh, dw = [], None
        # Each chunk's logits are recomputed from h and the weight, and chunk k+1 starts only
        # once chunk k's gradients exist (``mx.depends``), so one chunk's logits are alive at a
        # time. The first chunk waits for the cotangent: recomputed logits that did not would be
        # the forward pass's own expression, which ``mx.compile`` would merge with it and keep.
        after = [cotangent]
        for a, b in bounds(h.shape[0]):
            hc = mx.depends(h[a:b], after)
            if weight_grad:
                _, (dhc, dwc) = mx.vjp(lambda x, w: loss(x, w, targets[a:b]), [hc, weight], [cotangent[a:b]])
                dw = dwc if dw is None else dw + dwc
                after = [dhc, dw]
            else:
                _, (dhc,) = mx.vjp(lambda x: loss(x, weight, targets[a:b]), [hc], [cotangent[a:b]])
                after = [dhc]
            dh.append(dhc)
        return mx.concatenate(dh), dw if weight_grad else mx.zeros_like(weight), mx.zeros_like(targets)

    return f


def chunked_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, chunk: int,
                          label_smoothing: float = 0.0, weight_grad: bool = True) -> mx.array:
    """``cross_entropy(h @ weight.T, targets)`` for hidden states ``h`` (..., C) and a head ``weight``
    (V, C), computed ``chunk`` positions at a time, forward and backward.

    The backward pass recomputes each chunk's logits instead of keeping them: the same values
    and gradients as the plain loss (to float32 rounding), for one more head matmul, with at
    most ``chunk`` rows of logits alive. ``weight_grad=False`` skips the head's gradient (a
    frozen head, as in LoRA).
    """
    lead = targets.shape
    flat = _chunked(int(chunk), float(label_smoothing), bool(weight_grad))(
        h.reshape(-1, h.shape[-1]), weight, kept_targets(targets).reshape(-1))
    return _weighted(flat.reshape(lead), targets)
