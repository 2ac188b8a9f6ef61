"""Batches of a token file: random windows, or the file in order as llm.c's DataLoader reads it.

Every batch has the same shape, so a compiled step is traced once; each sampler's position is
plain JSON, saved with a checkpoint so that a resumed run draws exactly what it would have.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from .data import open_tokens
from .errors import UserError


SAMPLERS = ("random", "sequential")


class BatchSampler:
    """Random windows of block_size + 1 tokens from a memory-mapped token file.

    Shapes are fixed, (accum, batch, block) for x and y, so the compiled train step is
    traced once. The generator's state is plain JSON, saved in checkpoints so a resumed run
    draws exactly the batches the uninterrupted run would have drawn.

    With ``world`` processes, every rank draws the same global batch of ``world * batch``
    windows from the same seed and keeps rows ``rank * batch`` to ``(rank + 1) * batch``: the
    ranks read different windows, their rows together are the batch one process would draw
    with ``world`` times the batch size, and every rank's state is the same.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, block_size: int, seed: int, accum: int = 1,
                 rank: int = 0, world: int = 1):
        self.tokens = open_tokens(path)
        self.batch_size, self.block_size, self.accum = batch_size, block_size, accum
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.world = world
        if len(self.tokens) < block_size + 1:
            raise UserError(f"{path} holds {len(self.tokens)} tokens, fewer than one block of {block_size} + 1; "
                            "use a larger corpus or a smaller --block-size")
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y of shape (accum, batch, block) as int32; y is x shifted left by one."""
        n = self.accum * self.world * self.batch_size
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=n)
        starts = starts.reshape(self.accum, self.world * self.batch_size)[:, self.rows]
        window = self.tokens[starts[..., None] + self._offsets].astype(np.int32)
        return window[..., :-1], window[..., 1:]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()

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
    """The token file in order, as llm.c's DataLoader reads one shard without shuffling.

    Micro-batch k is tokens[k*B*T : k*B*T + B*T + 1] cut into B rows of T (y one token on);
    the next starts B*T later. When no whole window of B*T + 1 is left, reading starts over
    at the beginning, so the last (n - 1) % (B*T) tokens are never targets. With
    gradient accumulation, a step's micro-batches are consecutive windows. The state is
    the next window's index.

    With ``world`` processes, a window is ``world`` times longer and each rank reads its own
    stripe of B*T tokens (+ 1) in rank order, as llm.c's DistributedDataLoader does: the ranks'
    rows together are the micro-batch one process reads with ``world`` times the batch size.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, block_size: int, accum: int = 1,
                 rank: int = 0, world: int = 1):
        self.tokens = open_tokens(path)
        self.batch_size, self.block_size, self.accum = batch_size, block_size, accum
        self.rank, self.world = rank, world
        # llm.c's shard_num_samples, for the ranks' windows together
        self.windows = (len(self.tokens) - 1) // (world * batch_size * block_size)
        if self.windows < 1:
            processes = f" on each of {world} processes" if world > 1 else ""
            raise UserError(f"{path} holds {len(self.tokens)} tokens, fewer than one batch of "
                            f"{batch_size} x {block_size} + 1{processes} that --sampler sequential reads; "
                            "use a larger corpus or a smaller --batch-size or --block-size")
        self.position = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y of shape (accum, batch, block) as int32; y is x shifted left by one."""
        B, T = self.batch_size, self.block_size
        x = np.empty((self.accum, B, T), dtype=np.int32)
        y = np.empty_like(x)
        for a in range(self.accum):
            if self.position >= self.windows:
                self.position = 0
            start = (self.position * self.world + self.rank) * B * T
            window = self.tokens[start : start + B * T + 1].astype(np.int32)
            x[a], y[a] = window[:-1].reshape(B, T), window[1:].reshape(B, T)
            self.position += 1
        return x, y

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next()

    def state(self) -> dict:
        return {"sampler": "sequential", "position": self.position}

    def set_state(self, state: dict) -> None:
        if state.get("sampler") != "sequential":
            raise UserError(f"the run was saved with --sampler {state.get('sampler', 'random')}, not sequential")
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise UserError(f"the saved position of the sequential sampler is not a whole number: {position!r}")
        self.position = position


def make_sampler(kind: str, path: str | os.PathLike, batch_size: int, block_size: int, seed: int,
                 accum: int = 1, rank: int = 0, world: int = 1) -> BatchSampler | SequentialSampler:
    """The training sampler ``--sampler`` names: random windows, or the file in order (rank
    ``rank``'s rows of the ``world`` processes' batch)."""
    if kind == "sequential":
        return SequentialSampler(path, batch_size, block_size, accum, rank, world)
    if kind == "random":
        return BatchSampler(path, batch_size, block_size, seed, accum, rank, world)
    raise UserError(f"unknown sampler {kind!r}; choose from {', '.join(SAMPLERS)}")
