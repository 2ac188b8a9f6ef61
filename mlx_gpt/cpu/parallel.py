"""Data parallelism across MLX's CPU streams: every core works on its share of each micro-batch.

MLX's CPU backend evaluates all operations of a stream on that stream's one thread, and only the
BLAS library inside a matmul uses more cores. Between matmuls (layer norms, GELU, softmax, the
loss, the optimizer) one core works and the others wait, and a BLAS pool spinning between calls
stalls as soon as another process wants a core. A step built here splits each micro-batch into
one slice per core, runs the forward and backward pass of each slice on a stream (a thread) of
its own with single-threaded BLAS, sums the slices' gradients weighted by their sizes (exactly
the full batch's mean-loss gradient), and spreads the gradient sums, the clipping norms and the
optimizer's updates over the same streams.

Each stream's forward and backward pass is its own compiled function (``mx.compile`` keeps one
trace per stream). Traced together in one graph, the streams' identical constants would be
merged into arrays shared across streams, which the compiler then writes out in full and reads
back with strided, unvectorized loops. For the same reason the updates are spread so that all
parameters of one shape share a stream.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from functools import lru_cache
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .blas import set_blas_threads


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def slices(batch: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``range(batch)``, as equal as possible."""
    bounds = [batch * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


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
        groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for key, shape in shapes.items():
            groups[shape].append(key)
        sizes = {shape: len(keys) * math.prod(shape) for shape, keys in groups.items()}
        owner = balance(sizes, n_streams)
        self.owner = {key: owner[shape] for shape, keys in groups.items() for key in keys}
        self.by_shape = owner

    def __len__(self) -> int:
        return len(self.streams)

    def stream_of(self, key: str) -> mx.Stream:
        return self.streams[self.owner[key]]

    def stream_for(self, a: mx.array) -> mx.Stream:
        """The stream of the parameters shaped like ``a`` (and of their gradients)."""
        return self.streams[self.by_shape[tuple(a.shape)]]


def split_for(batch_size: int, streams: int = 0) -> tuple[int, int]:
    """(streams, BLAS threads per stream) for batches of ``batch_size`` and a ``--streams`` setting.

    ``streams`` 0 means one per core; there are never more streams than sequences. One stream
    lets BLAS use every core; several share the cores out (one each, on a machine with no more
    cores than sequences in a batch).
    """
    cores = cpu_cores()
    n = min(streams or cores, batch_size)
    return (n, max(1, cores // n)) if n >= 2 else (1, cores)


def plan_for(model, batch_size: int, streams: int = 0) -> StreamPlan | None:
    """A plan splitting batches of ``batch_size`` over ``streams`` CPU streams (0: one per core),
    or None where one stream does the work.

    Sets the BLAS library to the threads ``split_for`` gives each stream, which is a
    process-wide setting.
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    n, threads = split_for(batch_size, streams)
    set_blas_threads(threads)
    if n < 2:
        return None
    return StreamPlan(n, {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())})


def make_parallel_eval(model, loss_fn: Callable, plan: StreamPlan, compile: bool = True
                       ) -> Callable[[mx.array, mx.array], mx.array]:
    """eval(x, y) -> the mean loss of a batch x, y (B, T), its rows split over the plan's streams.

    ``loss_fn(model, x, y)`` is the mean loss of one slice; the slices' losses are weighted by
    their share of the batch. An evaluation is forward passes only, and on one stream every
    operation between the matmuls runs on one core.
    """

    def slice_loss(x: mx.array, y: mx.array) -> mx.array:
        return loss_fn(model, x, y)

    if compile:
        slice_loss = mx.compile(slice_loss, inputs=model.state)

    def evaluate(x: mx.array, y: mx.array) -> mx.array:
        batch = x.shape[0]
        total = mx.array(0.0)
        for stream, part in zip(plan.streams, slices(batch, len(plan))):
            with mx.stream(stream):
                total = total + slice_loss(x[part], y[part]) * ((part.stop - part.start) / batch)
        return total

    return evaluate


def make_parallel_step(model, optimizer, loss_fn: Callable, update: Callable, plan: StreamPlan,
                       compile: bool = True, reduce: Callable | None = None, state: list | None = None
                       ) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """step(x, y) -> (mean loss, gradient norm) for x, y of shape (accum, B, T), as ``mlx_gpt.train``'s step.

    ``loss_fn(model, x, y)`` is the mean loss of one slice; ``update(model, optimizer, grads,
    stream_for=...)`` clips and applies the summed gradients and returns their norm
    (``optim.clip_and_update``), each parameter's share on the stream ``plan.stream_for`` gives it.
    ``reduce((loss, grads))``, when given, combines them with other processes' before the update
    (``distributed.all_mean``). ``state``: further arrays the loss reads and the update writes
    (a loss scaler's), taken in and given back by the compiled pieces.
    """
    state = state or []

    def slice_loss(params: dict, x: mx.array, y: mx.array) -> mx.array:
        model.update(params)
        return loss_fn(model, x, y)

    slice_grads = mx.value_and_grad(slice_loss)
    if compile:
        # dropout draws from (and advances) the global key, slice by slice
        slice_grads = mx.compile(slice_grads, inputs=[mx.random.state, *state], outputs=[mx.random.state])

    def weighted_sum(weights: mx.array, losses: list[mx.array], grads_list: list[dict]) -> tuple[mx.array, dict]:
        """The slices' losses and gradients weighted by their share of the batch (a flat dict)."""
        w = [weights[i] for i in range(len(losses))]
        loss = sum(wi * li for wi, li in zip(w, losses))
        flat = [dict(tree_flatten(g)) for g in grads_list]
        grads = {}
        for key in flat[0]:
            with mx.stream(plan.stream_of(key)):
                grads[key] = sum(wi * f[key] for wi, f in zip(w, flat)).astype(flat[0][key].dtype)
        return loss, grads

    def fold(weights: mx.array, loss: mx.array, grads: dict, losses: list[mx.array],
             grads_list: list[dict]) -> tuple[mx.array, dict]:
        """The running sums, one micro-batch further."""
        loss_i, grads_i = weighted_sum(weights, losses, grads_list)
        out = {}
        for key, g in grads.items():
            with mx.stream(plan.stream_of(key)):
                out[key] = g + grads_i[key]
        return loss + loss_i, out

    def finish(loss: mx.array, grads: dict) -> tuple[mx.array, mx.array]:
        grads = tree_unflatten(list(grads.items()))
        if reduce is not None:
            loss, grads = reduce((loss, grads))
        return loss, update(model, optimizer, grads, stream_for=plan.stream_for)

    def apply(weights: mx.array, losses: list[mx.array], grads_list: list[dict]) -> tuple[mx.array, mx.array]:
        return finish(*weighted_sum(weights, losses, grads_list))

    if compile:
        held = [model.state, optimizer.state, *state]
        apply = mx.compile(apply, inputs=held, outputs=held)
        finish = mx.compile(finish, inputs=held, outputs=held)
        weighted_sum, fold = mx.compile(weighted_sum), mx.compile(fold)

    def micro_batch(params: dict, x: mx.array, y: mx.array, share: float) -> tuple[list, list, list]:
        """Weights, losses and gradients of one micro-batch's slices, each on its stream."""
        weights, losses, grads_list = [], [], []
        batch = x.shape[0]
        for stream, part in zip(plan.streams, slices(batch, len(plan))):
            with mx.stream(stream):
                loss, grads = slice_grads(params, x[part], y[part])
            weights.append(share * (part.stop - part.start) / batch)
            losses.append(loss)
            grads_list.append(grads)
        return weights, losses, grads_list

    def step(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        params = model.trainable_parameters()
        accum = x.shape[0]
        if accum == 1:  # the whole step as one graph
            weights, losses, grads_list = micro_batch(params, x[0], y[0], 1.0)
            model.update(params)  # tracing a slice left its placeholders in the model
            return apply(mx.array(weights, dtype=mx.float32), losses, grads_list)
        # each micro-batch is summed and evaluated before the next starts: one micro-batch's
        # activations and slice gradients are alive at a time
        loss = grads = None
        for i in range(accum):
            weights, losses, grads_list = micro_batch(params, x[i], y[i], 1.0 / accum)
            w = mx.array(weights, dtype=mx.float32)
            loss, grads = weighted_sum(w, losses, grads_list) if grads is None else \
                fold(w, loss, grads, losses, grads_list)
            mx.eval(loss, grads)
        model.update(params)
        return finish(loss, grads)

    return step
