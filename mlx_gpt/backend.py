"""Where MLX runs decides a few things; this module decides them, and is the one place the core
reaches the CPU wing (``cpu/``).

- ``install()``, once per process (``import mlx_gpt`` calls it, right after loading OpenBLAS):
  the loss's and the optimizer's operations behind ``kernels`` become the CPU wing's, which pick
  MLX's own formulation wherever MLX does not run on the CPU.
- ``layers(model)``, where a model is built for use (a run's setup, ``checkpoint.load``): on the
  CPU, its plain layers are swapped for the CPU's (same parameters).
- ``configure(batch_size, streams)``, at a run's start: process-wide settings for training
  (the allocator's cache, BLAS threads on the CPU; the wired limit on Metal).
- ``stream_plan``: how a CPU step splits its batches over MLX streams, or None elsewhere.
- ``decoding_threads(model)``: BLAS threads while a decoder runs; ``BlasThreads``: per batch size,
  for a server's steps.

Metal and CUDA see plain MLX everywhere.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Iterator

import mlx.core as mx

from . import kernels


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def install() -> None:
    """Put the CPU wing's operations behind ``kernels`` (each chooses per call, by device)."""
    from .cpu import ops

    kernels.install(**{name: getattr(ops, name) for name in kernels.NAMES})


def layers(model):
    """``model`` with the CPU's layers when MLX runs on the CPU (unchanged elsewhere); returns it."""
    from .cpu import accelerate

    return accelerate(model)


def split_for(batch_size: int, streams: int = 0) -> tuple[int, int]:
    """(streams, BLAS threads per stream) for a CPU step over batches of ``batch_size`` and a
    ``--streams`` setting (0: one per core); (1, cores) off the CPU's split."""
    if not on_cpu():
        return 1, 1
    from .cpu.parallel import split_for as split

    return split(batch_size, cpu_cores(), streams)


def configure(batch_size: int, streams: int = 0) -> None:
    """Process-wide settings for training batches of ``batch_size``.

    On the CPU, freed buffers are kept for reuse up to the memory limit, as MLX does on Metal:
    its CPU allocator caches only 32 MB by default, and a train step frees far more every step,
    each buffer handed back returning as fresh pages the kernel must fault in and zero again.
    BLAS gets the threads each stream's share of the cores allows. On Metal, the recommended
    working set is wired so weights are not paged out (as mlx-lm does).
    """
    if on_cpu():
        from .cpu.blas import set_blas_threads

        mx.set_cache_limit(mx.get_memory_limit())
        set_blas_threads(split_for(batch_size, streams)[1])
    elif mx.metal.is_available():
        mx.set_wired_limit(mx.metal.device_info()["max_recommended_working_set_size"])


def stream_plan(model, batch_size: int, streams: int = 0):
    """The CPU streams a step splits its batches over (``cpu.parallel.StreamPlan``), or None
    where one stream does the work (one core's worth, or not the CPU)."""
    n, _ = split_for(batch_size, streams)
    if n < 2:
        return None
    from mlx.utils import tree_flatten

    from .cpu.parallel import StreamPlan

    return StreamPlan(n, {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())})


def blas_threads() -> int | None:
    """BLAS threads per call on the CPU with OpenBLAS; None where they cannot be set."""
    if not on_cpu():
        return None
    from .cpu.blas import get_blas_threads

    return get_blas_threads()


def set_blas_threads(n: int) -> None:
    from .cpu.blas import set_blas_threads as set_threads

    set_threads(n)


def orthogonalise_dtype() -> mx.Dtype:
    """The dtype Muon's Newton-Schulz products run in: bfloat16 as the references do where the
    hardware multiplies it fast, float32 on the CPU, where only float32 products reach BLAS."""
    return mx.float32 if on_cpu() else mx.bfloat16


def attention_weights_kept(dtype: mx.Dtype, dropout: float) -> bool:
    """Whether a train step keeps each layer's attention weights for its backward pass."""
    if not on_cpu():
        return True
    from .cpu.attention import attention_weights_kept as kept

    return kept(dtype, dropout)


@contextlib.contextmanager
def decoding_threads(shape: tuple[int, int], chosen: list) -> Iterator[None]:
    """BLAS threads for decoding products of ``shape`` (rows, cols), the previous setting after.

    Each token is a chain of matrix-vector products, and a second BLAS thread helps only while
    a core is free for it: on a busy machine every product waits for one. So the first use
    measures which is faster now and keeps it in ``chosen`` (a one-item list the caller holds);
    training wants every core, so the setting is restored afterwards.
    """
    if not on_cpu():
        yield
        return
    from .cpu.blas import fastest_threads, get_blas_threads, set_blas_threads

    previous = get_blas_threads()
    if previous is None:
        yield
        return
    if not chosen:
        chosen.append(fastest_threads(*shape, cpu_cores()))
    set_blas_threads(chosen[0])
    try:
        yield
    finally:
        set_blas_threads(previous)


class BlasThreads:
    """The BLAS thread count for each batch size, chosen by timing the steps themselves.

    A decode step is a chain of matrix products with a few rows. A second BLAS thread helps
    only while a core is free for it: on a busy machine every product waits for one, and the
    step slows down instead (``generate`` measures the same choice once per Decoder). So
    for each number of rows the first steps alternate between one thread and one per core,
    the faster median wins, and the race is run again every ``every`` steps of that size, since
    the machine's load changes.
    """

    trials = 4  # steps timed with each count
    every = 512

    def __init__(self, cores: int) -> None:
        self.counts = (1, cores) if cores > 1 else (1,)
        self._times: dict[int, dict[int, list[float]]] = {}
        self._chosen: dict[int, tuple[int, int]] = {}  # rows -> (threads, steps since chosen)

    def pick(self, rows: int) -> int:
        """The thread count to run the next step of this many rows with."""
        chosen = self._chosen.get(rows)
        if chosen is not None and chosen[1] < self.every:
            self._chosen[rows] = (chosen[0], chosen[1] + 1)
            return chosen[0]
        times = self._times.setdefault(rows, {n: [] for n in self.counts})
        return min(self.counts, key=lambda n: len(times[n]))  # the count with the fewest trials

    def record(self, rows: int, threads: int, seconds: float) -> None:
        if rows in self._chosen and self._chosen[rows][1] < self.every:
            return
        times = self._times.setdefault(rows, {n: [] for n in self.counts})
        times[threads].append(seconds)
        if all(len(t) >= self.trials for t in times.values()):
            best = min(self.counts, key=lambda n: statistics.median(times[n]))
            self._chosen[rows] = (best, 0)
            self._times.pop(rows)
