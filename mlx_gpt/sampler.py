"""Batches of a split (one token file or shards): random windows, or the shards in order as
llm.c's DataLoader reads them.

Every batch has the same shape, so a compiled step is traced once; each sampler's position is
plain JSON, saved with a checkpoint so that a resumed run draws exactly what it would have.
Shards are memory-mapped once; a window never crosses from one shard into the next.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .data import open_tokens
from .errors import UserError


SAMPLERS = ("random", "sequential")
Files = str | os.PathLike | Sequence[str | os.PathLike]


def open_split(files: Files) -> tuple[list[str], list[np.ndarray]]:
    """(names, memory-mapped tokens) of a token file or of a split's shards, in order."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return [str(p) for p in paths], [open_tokens(p) for p in paths]


class BatchSampler:
    """Random windows of block_size + 1 tokens from memory-mapped token files (a split's shards).

    A shard of n tokens holds n - block_size windows; a window is drawn uniformly from all the
    shards' windows together (so each shard in proportion to its size), and for one file exactly
    as before shards existed, so older checkpoints resume drawing the same batches.

    Shapes are fixed, (accum, batch, block) for x and y, so the compiled train step is
    traced once. The generator's state is plain JSON, saved in checkpoints so a resumed run
    draws exactly the batches the uninterrupted run would have drawn.

    With ``world`` processes, every rank draws the same global batch of ``world * batch``
    windows from the same seed and keeps rows ``rank * batch`` to ``(rank + 1) * batch``: the
    ranks read different windows, their rows together are the batch one process would draw
    with ``world`` times the batch size, and every rank's state is the same.
    """

    def __init__(self, path: Files, batch_size: int, block_size: int, seed: int, accum: int = 1,
                 rank: int = 0, world: int = 1):
        names, self.shards = open_split(path)
        self.batch_size, self.block_size, self.accum = batch_size, block_size, accum
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.world = world
        windows = np.array([max(len(t) - block_size, 0) for t in self.shards], dtype=np.int64)
        if not windows.sum():
            where = names[0] if len(names) == 1 else f"every shard of {os.path.dirname(names[0]) or '.'}"
            raise UserError(f"{where} holds {max(len(t) for t in self.shards)} tokens, fewer than one block of "
                            f"{block_size} + 1; use a larger corpus or a smaller --block-size")
        self._ends = np.cumsum(windows)  # window i is in the first shard whose end exceeds i
        self._firsts = self._ends - windows
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y of shape (accum, batch, block) as int32; y is x shifted left by one."""
        n = self.accum * self.world * self.batch_size
        starts = self.rng.integers(0, int(self._ends[-1]), size=n)
        starts = starts.reshape(self.accum, self.world * self.batch_size)[:, self.rows]
        shard = np.searchsorted(self._ends, starts, side="right")
        local = starts - self._firsts[shard]
        window = np.empty((*starts.shape, self.block_size + 1), dtype=np.int32)
        for index in np.ndindex(starts.shape):
            s, at = shard[index], local[index]
            window[index] = self.shards[s][at : at + self.block_size + 1]
        return window[..., :-1], window[..., 1:]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        if state.get("sampler", "random") != "random":
            raise UserError(f"the run was saved with --sampler {state['sampler']}, not random")
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise UserError(f"the saved state of the random sampler is corrupt ({e})") from None


class SequentialSampler:
    """The shards in order, each read front to back, as llm.c's DataLoader reads them unshuffled.

    Micro-batch k of a shard is tokens[k*B*T : k*B*T + B*T + 1] cut into B rows of T (y one
    token on); the next starts B*T later. When no whole window of B*T + 1 is left in a shard,
    reading goes on at the start of the next, and after the last shard at the first again, so a
    shard's last (n - 1) % (B*T) tokens are never targets (a shard shorter than one window is
    passed over). With gradient accumulation, a step's micro-batches are consecutive windows.
    The state is the shard and the next window's index in it.

    With ``world`` processes, a window is ``world`` times longer and each rank reads its own
    stripe of B*T tokens (+ 1) in rank order, as llm.c's DistributedDataLoader does: the ranks'
    rows together are the micro-batch one process reads with ``world`` times the batch size.
    """

    def __init__(self, path: Files, batch_size: int, block_size: int, accum: int = 1,
                 rank: int = 0, world: int = 1):
        names, self.shards = open_split(path)
        self.batch_size, self.block_size, self.accum = batch_size, block_size, accum
        self.rank, self.world = rank, world
        # llm.c's shard_num_samples, for the ranks' windows together
        self.windows = [(len(t) - 1) // (world * batch_size * block_size) for t in self.shards]
        if not any(w >= 1 for w in self.windows):
            processes = f" on each of {world} processes" if world > 1 else ""
            where = names[0] if len(names) == 1 else f"no shard of {os.path.dirname(names[0]) or '.'}"
            raise UserError(f"{where} holds {max(len(t) for t in self.shards)} tokens, fewer than one batch of "
                            f"{batch_size} x {block_size} + 1{processes} that --sampler sequential reads; "
                            "use a larger corpus or a smaller --batch-size or --block-size")
        self.shard, self.position = 0, 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y of shape (accum, batch, block) as int32; y is x shifted left by one."""
        B, T = self.batch_size, self.block_size
        x = np.empty((self.accum, B, T), dtype=np.int32)
        y = np.empty_like(x)
        for a in range(self.accum):
            while self.position >= self.windows[self.shard]:
                self.shard, self.position = (self.shard + 1) % len(self.shards), 0
            start = (self.position * self.world + self.rank) * B * T
            window = self.shards[self.shard][start : start + B * T + 1].astype(np.int32)
            x[a], y[a] = window[:-1].reshape(B, T), window[1:].reshape(B, T)
            self.position += 1
        return x, y

    def state(self) -> dict:
        """The next window: its index, and its shard's when the split has several (a one-file
        split's state reads as it did before shards)."""
        shard = {"shard": self.shard} if len(self.shards) > 1 else {}
        return {"sampler": "sequential", **shard, "position": self.position}

    def set_state(self, state: dict) -> None:
        if state.get("sampler") != "sequential":
            raise UserError(f"the run was saved with --sampler {state.get('sampler', 'random')}, not sequential")
        shard, position = state.get("shard", 0), state.get("position")  # runs saved before shards: one file
        for what, value in (("position", position), ("shard", shard)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"the saved {what} of the sequential sampler is not a whole number: {value!r}")
        if shard >= len(self.shards):
            raise UserError(f"the run was saved reading shard {shard + 1}, but the data has {len(self.shards)}")
        self.shard, self.position = shard, position


def make_sampler(kind: str, path: Files, batch_size: int, block_size: int, seed: int,
                 accum: int = 1, rank: int = 0, world: int = 1) -> BatchSampler | SequentialSampler:
    """The training sampler ``--sampler`` names: random windows, or the shards in order (rank
    ``rank``'s rows of the ``world`` processes' batch)."""
    if kind == "sequential":
        return SequentialSampler(path, batch_size, block_size, accum, rank, world)
    if kind == "random":
        return BatchSampler(path, batch_size, block_size, seed, accum, rank, world)
    raise UserError(f"unknown sampler {kind!r}; choose from {', '.join(SAMPLERS)}")
