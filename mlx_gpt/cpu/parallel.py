"""Data parallelism across MLX's CPU streams: every core works on its share of each micro-batch.

MLX's CPU backend evaluates all operations of a stream on that stream's one thread, and only the
BLAS library inside a matmul uses more cores. Between matmuls (layer norms, GELU, softmax, the
loss, the optimizer) one core works and the others wait, and a BLAS pool spinning between calls
stalls as soon as another process wants a core. A step built here splits each micro-batch into
one slice per core, runs the forward and backward pass of each slice on a stream (a thread) of
its own with single-threaded BLAS, and sums the slices' gradients weighted by their sizes, or
their kept targets' where some are ignored (exactly the full batch's mean-loss gradient). It is
a gradient source for ``training.step``'s one step, which spreads the gradient sums, the
clipping norms and the optimizer's updates over the same streams (``StreamPlan.stream_for``).

Each stream's forward and backward pass is its own compiled function (``mx.compile`` keeps one
trace per stream). Traced together in one graph, the streams' identical constants would be
merged into arrays shared across streams, which the compiler then writes out in full and reads
back with strided, unvectorized loops. For the same reason the updates are spread so that all
parameters of one shape share a stream.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..loss import kept_counts


def slices(batch: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``range(batch)``, as equal as possible."""
    bounds = [batch * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def shares(y: mx.array, parts: list[slice]) -> list[float]:
    """Each slice's weight in the batch's mean loss: its share of the rows, or, where targets are
    ignored (``loss.IGNORE``), its share of the kept targets, so that the slices' weighted means
    are the mean over every kept target of the batch."""
    batch = y.shape[0]
    kept = kept_counts(y)
    if kept.sum() == y.size:
        return [(p.stop - p.start) / batch for p in parts]
    total = max(int(kept.sum()), 1)
    return [int(kept[p].sum()) / total for p in parts]


def balance(sizes: dict[str, int], bins: int) -> dict[str, int]:
    """Assign each key to one of ``bins`` so that the bins' total sizes are close (largest first)."""
    load = [0] * bins
    out = {}
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        b = load.index(min(load))
        out[key] = b
        load[b] += sizes[key]
    return out


@lru_cache(maxsize=None)
def _extra_streams(n: int) -> list[mx.Stream]:
    """``n`` CPU streams besides the default one, made once: every plan of a process (the train
    step's, the evaluation's) shares them, as they share the default stream, rather than each
    starting threads of its own."""
    return [mx.new_stream(mx.cpu) for _ in range(n)]


class StreamPlan:
    """The CPU streams a train step uses, and which of them updates each parameter."""

    def __init__(self, n_streams: int, shapes: dict[str, tuple[int, ...]]):
        self.streams = [mx.default_stream(mx.cpu)] + _extra_streams(n_streams - 1)
        sizes: dict[tuple[int, ...], int] = defaultdict(int)
        for shape in shapes.values():
            sizes[shape] += math.prod(shape)
        self.by_shape = balance(sizes, n_streams)

    def __len__(self) -> int:
        return len(self.streams)

    def stream_for(self, a: mx.array) -> mx.Stream:
        """The stream of the parameters shaped like ``a`` (and of their gradients)."""
        return self.streams[self.by_shape[tuple(a.shape)]]

    def gradients(self, model, loss_fn: Callable, compile: bool = True, state: list | None = None) -> Callable:
        """The step's gradient source for this plan (``split_gradients``)."""
        return split_gradients(model, loss_fn, self, compile, state)

    def loss(self, model, loss_fn: Callable, compile: bool = True) -> Callable:
        """The evaluation's loss for this plan (``split_loss``)."""
        return split_loss(model, loss_fn, self, compile)


def split_for(batch_size: int, cores: int, streams: int = 0) -> tuple[int, int]:
    """(streams, BLAS threads per stream) for batches of ``batch_size`` and a ``--streams`` setting.

    ``streams`` 0 means one per core; there are never more streams than sequences. One stream
    lets BLAS use every core; several share the cores out (one each, on a machine with no more
    cores than sequences in a batch).
    """
    n = min(streams or cores, batch_size)
    return (n, max(1, cores // n)) if n >= 2 else (1, cores)


def rows_of(positions: mx.array | None, part: slice) -> mx.array | None:
    """A slice's rows of packed rows' positions (None where rows are not packed)."""
    return None if positions is None else positions[part]


def split_loss(model, loss_fn: Callable, plan: StreamPlan, compile: bool = True) -> Callable[..., mx.array]:
    """loss(x, y, positions=None) -> the mean loss of a batch x, y (B, T), its rows split over the
    plan's streams.

    ``loss_fn(model, x, y, positions=...)`` is the mean loss of one slice; the slices' losses are
    weighted by their share of the batch (``shares``). An evaluation is forward passes only, and
    on one stream every operation between the matmuls runs on one core.
    """

    def slice_loss(x: mx.array, y: mx.array, positions: mx.array | None) -> mx.array:
        return loss_fn(model, x, y, positions=positions)

    if compile:
        slice_loss = mx.compile(slice_loss, inputs=model.state)

    def evaluate(x: mx.array, y: mx.array, positions: mx.array | None = None) -> mx.array:
        parts = slices(x.shape[0], len(plan))
        total = mx.array(0.0)
        for stream, part, share in zip(plan.streams, parts, shares(y, parts)):
            with mx.stream(stream):
                total = total + slice_loss(x[part], y[part], rows_of(positions, part)) * share
        return total

    return evaluate


def split_gradients(model, loss_fn: Callable, plan: StreamPlan, compile: bool = True, state: list | None = None
                    ) -> Callable[..., tuple[mx.array, dict]]:
    """grads(x, y, positions=None) -> (mean loss, its gradients) of a micro-batch x, y (B, T), as
    ``nn.value_and_grad`` gives them, computed slice by slice on the plan's streams.

    ``loss_fn(model, x, y, positions=...)`` is the mean loss of one slice. ``state``: further arrays
    the loss reads (a loss scaler's), taken in by the compiled slices.
    """
    state = state or []

    def slice_loss(params: dict, x: mx.array, y: mx.array, positions: mx.array | None) -> mx.array:
        model.update(params)
        return loss_fn(model, x, y, positions=positions)

    slice_grads = mx.value_and_grad(slice_loss)
    if compile:
        # dropout draws from (and advances) the global key, slice by slice
        slice_grads = mx.compile(slice_grads, inputs=[mx.random.state, *state], outputs=[mx.random.state])

    def weighted_sum(weights: mx.array, losses: list[mx.array], grads_list: list[dict]) -> tuple[mx.array, dict]:
        """The slices' losses and gradients weighted by their share of the batch, each
        parameter's sum on its stream."""
        w = [weights[i] for i in range(len(losses))]
        loss = sum(wi * li for wi, li in zip(w, losses))
        flat = [tree_flatten(g) for g in grads_list]
        grads = []
        for i, (key, g) in enumerate(flat[0]):
            with mx.stream(plan.stream_for(g)):
                grads.append((key, sum(wi * f[i][1] for wi, f in zip(w, flat)).astype(g.dtype)))
        return loss, tree_unflatten(grads)

    if compile:
        weighted_sum = mx.compile(weighted_sum)

    def grads(x: mx.array, y: mx.array, positions: mx.array | None = None) -> tuple[mx.array, dict]:
        params = model.trainable_parameters()
        losses, grads_list = [], []
        parts = slices(x.shape[0], len(plan))
        for stream, part in zip(plan.streams, parts):
            with mx.stream(stream):
                loss, g = slice_grads(params, x[part], y[part], rows_of(positions, part))
            losses.append(loss)
            grads_list.append(g)
        weights = shares(y, parts)
        model.update(params)  # tracing a slice left its placeholders in the model
        return weighted_sum(mx.array(weights, dtype=mx.float32), losses, grads_list)

    return grads
