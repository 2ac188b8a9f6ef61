"""Batches of an example set (``examples.py``): one example a row, or with ``--pack`` as many whole
examples as fit, as ``sampler.py`` draws windows of running text, with the same seeds, state and
split over processes.

An example is its first block_size + 1 tokens (cut there); it takes a row's next positions with
its tokens as inputs and the tokens one on as targets, ``loss.IGNORE`` where the token is prompt
with ``--mask-prompt``. A row is one example, or packed, whole examples drawn at random: a few
are drawn ahead (``HELD``), and each row takes the oldest of them and then, while any fits, the
oldest that fits its tail (the sampler's state holds the rest), so every drawn example is
trained on once, whatever its length, and rows end nearly full. The rest of a row is padding
(targets IGNORE). Packed batches come with each token's position in its own example (``models.gpt.Packed``),
which keeps the examples of a row from seeing each other. Every batch has the same shape, so
the compiled step is traced once.
"""

from __future__ import annotations

import sys

import numpy as np

from .errors import UserError
from .examples import ExampleSet, ExampleSplit
from .loss import IGNORE

# packed: examples drawn ahead, each row taking the oldest and then the oldest that fits its
# tail, so that rows end full where the next example drawn would not fit; each is placed within
# this many rows of being drawn (a row starts with the oldest), so none waits for ever
HELD = 8


def rows(split: ExampleSplit, indices: np.ndarray, block_size: int, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """x, y (len(indices), block_size) int32: one example a row, cut to block_size + 1 tokens and
    padded; y is x one token on, IGNORE where padded and, with ``mask_prompt``, where the token
    is prompt."""
    return packed_rows(split, [[int(i)] for i in indices], block_size, mask_prompt)[:2]


def packed_rows(split: ExampleSplit, groups: list[list[int]], block_size: int, mask_prompt: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, positions (len(groups), block_size) int32: each group's examples one after the other
    in its row (as ``rows`` lays one out), and each token's position in its own example. The
    padding after them is a run of positions of its own, seen by nothing else."""
    x = np.zeros((len(groups), block_size), np.int32)
    y = np.full((len(groups), block_size), IGNORE, np.int32)
    positions = np.empty((len(groups), block_size), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            ids, mask = split.example(i)
            ids, mask = ids[: block_size + 1].astype(np.int32), mask[: block_size + 1]
            n = max(min(len(ids) - 1, block_size - at), 0)
            x[r, at:at + n] = ids[:n]
            y[r, at:at + n] = np.where(mask[1:n + 1] == 1, ids[1:n + 1], IGNORE) if mask_prompt else ids[1:n + 1]
            positions[r, at:at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(block_size - at)
    return x, y, positions


class ExampleSampler:
    """Random examples, one a row or packed (``pack``), in batches of fixed shape (accum, batch,
    block), as ``sampler.BatchSampler`` draws windows: the same seeds, state and rank split.
    Packed batches are (x, y, positions), others (x, y)."""

    def __init__(self, split: ExampleSplit, batch_size: int, block_size: int, seed: int, accum: int = 1,
                 rank: int = 0, world: int = 1, mask_prompt: bool = False, pack: bool = False) -> None:
        self.split, self.batch_size, self.block_size, self.accum = split, batch_size, block_size, accum
        self.world, self.rows, self.mask_prompt = world, slice(rank * batch_size, (rank + 1) * batch_size), mask_prompt
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.pack, self.held = pack, []  # packed: examples drawn and not yet placed, oldest first

    def next(self) -> tuple[np.ndarray, ...]:
        n = self.accum * self.world * self.batch_size
        if not self.pack:
            picks = self.rng.integers(0, len(self.split), size=n).reshape(self.accum, -1)[:, self.rows]
            x, y = rows(self.split, picks.reshape(-1), self.block_size, self.mask_prompt)
            return x.reshape(*picks.shape, -1), y.reshape(*picks.shape, -1)
        groups = [self.fill() for _ in range(n)]  # every rank draws every row, and takes its own
        per = n // self.accum  # rows of a micro-batch, over every rank
        mine = [g for a in range(self.accum) for g in groups[a * per:(a + 1) * per][self.rows]]
        batch = packed_rows(self.split, mine, self.block_size, self.mask_prompt)
        return tuple(a.reshape(self.accum, self.batch_size, -1) for a in batch)

    def fill(self) -> list[int]:
        """One packed row's examples: the oldest held example, then the oldest that fits, the held
        ones topped up with fresh draws, until none fits."""
        offsets, group, used = self.split.offsets, [], 0
        while used < self.block_size:
            while len(self.held) < HELD:
                self.held.append(int(self.rng.integers(0, len(self.split))))
            sizes = [min(int(offsets[i + 1] - offsets[i]), self.block_size + 1) - 1 for i in self.held]
            k = next((k for k, size in enumerate(sizes) if used + size <= self.block_size), None)
            if k is None:
                break
            group.append(self.held.pop(k))
            used += max(sizes[k], 1)  # an example of one token takes no position, but ends a row of them
        return group

    def state(self) -> dict:
        rng = self.rng.bit_generator.state
        return {"rng": rng, "held": list(self.held)} if self.pack else rng

    def set_state(self, state: dict) -> None:
        """A saved ``state()``; packed, also a generator's state alone (nothing held), as evaluation sets it."""
        held = []
        if self.pack and isinstance(state, dict) and "rng" in state:
            state, held = state["rng"], state.get("held")
            if not (isinstance(held, list) and all(isinstance(i, int) and 0 <= i < len(self.split) for i in held)):
                raise UserError(f"the saved state of the example sampler is corrupt (held examples {held!r})")
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise UserError(f"the saved state of the example sampler is corrupt ({e})") from None
        self.held = list(held)


def check_lengths(split: ExampleSplit, block_size: int, truncate: bool) -> int:
    """How many examples are longer than a row (block_size + 1 tokens) and will be cut; with
    ``truncate`` off, the first of them is an error naming its line."""
    long = np.flatnonzero(split.lengths() > block_size + 1)
    if long.size and not truncate:
        i = int(long[0])
        raise UserError(f"{split.source}:{int(split.lines[i])}: an example of {int(split.lengths()[i])} tokens is "
                        f"longer than the block of {block_size} (+1); {long.size} are, of {len(split)} (drop "
                        "--no-truncate to cut them, or give a larger --block-size)")
    return int(long.size)


def samplers(dataset: ExampleSet, batch_size: int, block_size: int, seed: int, accum: int, data,
             rank: int = 0, world: int = 1) -> tuple[ExampleSampler, ExampleSampler, ExampleSampler]:
    """A run's (train, val, train_eval) samplers over ``dataset`` (``data``: the run's DataConfig),
    seeded as a corpus run's are; the examples cut to fit are counted on stderr."""
    if data.sampler != "random":
        raise UserError("example sets are drawn at random; --sampler sequential reads running text")
    for split in ("train", "val"):
        cut = check_lengths(dataset.splits[split], block_size, data.truncate)
        if cut and rank == 0:
            print(f"examples: {cut} of {len(dataset.splits[split])} {split} examples are longer than the block of "
                  f"{block_size} tokens and are cut to fit", file=sys.stderr)
    kw = dict(rank=rank, world=world, mask_prompt=data.mask_prompt, pack=data.pack)
    train, val = dataset.splits["train"], dataset.splits["val"]
    return (ExampleSampler(train, batch_size, block_size, seed, accum, **kw),
            ExampleSampler(val, batch_size, block_size, seed + 1, **kw),
            ExampleSampler(train, batch_size, block_size, seed + 2, **kw))
