"""Data parallelism on MLX's distributed group: one process a rank, each on its rows of every batch.

Launched by MLX's launcher (``mlx.launch -n 2 -- python -m mlx_gpt.train ...`` on one machine,
``--hosts`` or ``--hostfile`` across several; ring over TCP, JACCL over Thunderbolt, NCCL on
GPUs, MPI), every process builds the same model from the same seed, reads its own rows of each
global batch, and averages its loss and gradients with the others' inside the compiled step, so
every rank applies the same update to the same weights. Run alone, a process is a group of one
and nothing here communicates: the step it compiles is the single-process step.

A rank that dies closes its sockets and the others' next collective fails; mlx.launch then stops
every rank. A rank that hangs (or a machine that drops off the network without closing its
connections) would leave the others waiting forever, so a watchdog ends a rank whose training
loop has not moved for ``timeout`` seconds.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError

T = TypeVar("T")

# Arrays are reduced in buckets of about this size: large enough that a 124M model's 148
# gradients cross in a few dozen all-reduces, small enough to start sending before the last
# gradient of a bucket exists.
BUCKET_BYTES = 16 << 20
# What the backends' errors start with when a peer is gone.
BACKEND_TAGS = ("[ring]", "[jaccl]", "[nccl]", "[mpi]")


def init() -> mx.distributed.Group:
    """Every rank mlx.launch started, or a group of one when this process runs alone."""
    return mx.distributed.init()


def buckets(flat: list[tuple[str, mx.array]], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``flat`` in groups of one dtype that fill about ``bucket_bytes`` each, in order.

    A bucket closes once it holds ``bucket_bytes`` or more, so no array is split and an array
    larger than a bucket travels in one of its own.
    """
    out: list[list[int]] = []
    open_bucket: dict[mx.Dtype, tuple[list[int], int]] = {}
    for i, (_, a) in enumerate(flat):
        members, size = open_bucket.get(a.dtype, ([], 0))
        members.append(i)
        size += a.nbytes
        if size >= bucket_bytes:
            out.append(members)
            open_bucket.pop(a.dtype, None)
        else:
            open_bucket[a.dtype] = (members, size)
    out.extend(members for members, _ in open_bucket.values())
    return out


def all_mean(tree: T, group: mx.distributed.Group, bucket_bytes: int = BUCKET_BYTES) -> T:
    """The mean over the group's ranks of every array in ``tree`` (the same structure on each rank).

    The arrays are flattened and concatenated into a few buckets (``buckets``), each summed by
    one ``all_sum`` and split back, so a model's gradients take a few all-reduces rather than one
    per parameter. A group of one gets ``tree`` back untouched: no collective enters the graph.
    """
    n = group.size()
    if n == 1:
        return tree
    flat = tree_flatten(tree)
    out: list[Any] = [None] * len(flat)
    for bucket in buckets(flat, bucket_bytes):
        parts = [flat[i][1].reshape(-1) for i in bucket]
        summed = mx.distributed.all_sum(mx.concatenate(parts) if len(parts) > 1 else parts[0], group=group)
        mean = summed / n  # a Python scalar keeps the bucket's dtype
        bounds = list(itertools.accumulate(p.size for p in parts[:-1]))
        for i, piece in zip(bucket, mx.split(mean, bounds)):
            out[i] = (flat[i][0], piece.reshape(flat[i][1].shape))
    return tree_unflatten(out)


def barrier(group: mx.distributed.Group) -> None:
    """Wait until every rank gets here."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(0), group=group))


def rank_zero_first(group: mx.distributed.Group, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the others: rank 0 writes a cache (a prepared dataset) that
    the others then read instead of writing it at the same time."""
    if group.rank() != 0:
        barrier(group)
    result = fn()
    if group.rank() == 0:
        barrier(group)
    return result


def check_world_size(saved: int, group: mx.distributed.Group, out: str) -> None:
    """Refuse to resume on another number of processes: each rank's share of a batch would change."""
    if saved != group.size():
        how = "alone" if saved == 1 else f"with mlx.launch -n {saved} (or {saved} hosts)"
        raise UserError(f"{out} was trained on {saved} process{'es' if saved > 1 else ''}, not {group.size()}; "
                        f"resume it {how}")


def any_rank(flag: bool, group: mx.distributed.Group) -> bool:
    """Whether ``flag`` holds on any rank; every rank gets the same answer (after all have asked)."""
    if group.size() == 1:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=group).item() > 0


class AnyRank:
    """Whether any rank has raised a flag (a Ctrl-C), decided alike on every rank.

    Each call sends this rank's flag and answers with the vote of the call before, which
    arrived long ago, so reading it does not wait for the step in flight; a run stops one step
    after the request, at the same step everywhere. Alone, the flag is its own answer.
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self._pending: mx.array | None = None

    def __call__(self, flag: bool) -> bool:
        if self.group.size() == 1:
            return flag
        previous, self._pending = self._pending, mx.distributed.all_sum(mx.array(int(flag)), group=self.group)
        mx.async_eval(self._pending)
        return previous is not None and previous.item() > 0


class Watchdog:
    """Ends a rank whose loop has not called ``beat`` for ``timeout`` seconds, and turns a lost
    peer into one ``error:`` line.

    The clock starts at the first ``beat``, after the first step, whose compilation may take
    long. The main thread waits on collectives inside MLX, which releases the GIL, so a plain
    thread can watch it. On timeout the process prints why and exits at once (its last
    checkpoint was written atomically, so it is whole); mlx.launch then stops the other ranks.
    """

    def __init__(self, group: mx.distributed.Group, timeout: float):
        self.rank, self.size, self.timeout = group.rank(), group.size(), timeout
        self.last: float | None = None
        self._done = threading.Event()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if self.last is not None and time.monotonic() - self.last > self.timeout:
                print(f"error: rank {self.rank} of {self.size}: no step finished for {self.timeout:g} s, so a process "
                      "hangs or has stopped; the last checkpoint is intact; continue with --resume",
                      file=sys.stderr, flush=True)
                os._exit(2)

    def __enter__(self) -> "Watchdog":
        if self.size > 1 and self.timeout > 0:
            threading.Thread(target=self._watch, name="mlx_gpt-watchdog", daemon=True).start()
        return self

    def __exit__(self, kind, error, tb) -> None:
        self._done.set()
        if self.size > 1 and isinstance(error, RuntimeError) and str(error).startswith(BACKEND_TAGS):
            raise UserError(f"rank {self.rank} of {self.size} lost another process ({error}); "
                            "the last checkpoint is intact; continue with --resume") from None
