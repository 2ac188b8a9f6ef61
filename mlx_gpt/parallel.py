"""Data parallelism across MLX's CPU streams: every core works on its share of each micro-batch.

MLX's CPU backend evaluates all operations of a stream on that stream's one thread, and only the
BLAS library inside a matmul uses more cores. Between matmuls (layer norms, GELU, softmax, the
loss, the optimizer) one core works and the others wait, and a BLAS pool spinning between calls
stalls as soon as another process wants a core. A train step built here splits each micro-batch
into one slice per core, runs the forward and backward pass of each slice on a stream (a thread)
of its own with single-threaded BLAS, sums the slices' gradients weighted by their sizes (which
gives exactly the full batch's mean-loss gradient), and spreads the gradient sums and the
optimizer's updates over the same streams.
"""

from __future__ import annotations

import os
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


class StreamPlan:
    """The CPU streams a train step uses and which parameters each one updates."""

    def __init__(self, n_streams: int, param_sizes: dict[str, int]):
        self.streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n_streams - 1)]
        self.owner = balance(param_sizes, n_streams)

    def __len__(self) -> int:
        return len(self.streams)

    def stream_of(self, key: str) -> mx.Stream:
        return self.streams[self.owner[key]]


def plan_for(model, batch_size: int) -> StreamPlan | None:
    """A plan splitting batches of ``batch_size`` over the CPU's cores, or None where one stream is best.

    Sets the BLAS library to the cores each stream gets (one, on a machine with no more cores
    than sequences in a batch), which is a process-wide setting.
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    cores = cpu_cores()
    n = min(cores, batch_size)
    if n < 2:
        return None
    set_blas_threads(max(1, cores // n))
    sizes = {k: v.size for k, v in tree_flatten(model.trainable_parameters())}
    return StreamPlan(n, sizes)


def value_and_grad_split(plan: StreamPlan, grad_fn: Callable, model, x: mx.array, y: mx.array
                         ) -> tuple[mx.array, dict]:
    """Mean loss and its gradients over the batch (x, y), each slice on its own stream.

    ``grad_fn(model, x, y) -> (mean loss, grads)``. The slices' results are combined with
    weights len(slice) / batch, each parameter's sum on the stream that will update it.
    """
    batch = x.shape[0]
    parts = slices(batch, len(plan))
    results = []
    for stream, part in zip(plan.streams, parts):
        with mx.stream(stream):
            results.append(grad_fn(model, x[part], y[part]))
    weights = [(p.stop - p.start) / batch for p in parts]
    loss = sum(w * r[0] for w, r in zip(weights, results))
    flat = [dict(tree_flatten(r[1])) for r in results]
    grads = {}
    for key in flat[0]:
        with mx.stream(plan.stream_of(key)):
            grads[key] = sum(w * f[key] for w, f in zip(weights, flat))
    return loss, tree_unflatten(list(grads.items()))


def clip_grad_norm_split(plan: StreamPlan, grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """``optim.clip_grad_norm`` with each parameter's squared norm and scaling on its own stream."""
    flat = dict(tree_flatten(grads))
    squares = []
    for key, g in flat.items():
        with mx.stream(plan.stream_of(key)):
            squares.append(mx.sum(mx.square(g)))
    norm = mx.sqrt(sum(squares))
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    clipped = {}
    for key, g in flat.items():
        with mx.stream(plan.stream_of(key)):
            clipped[key] = g * scale
    return tree_unflatten(list(clipped.items())), norm
