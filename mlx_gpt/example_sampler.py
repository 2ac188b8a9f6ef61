"""Batches of an example set (``examples.py``): one example a row, as ``sampler.py`` draws windows
of running text, with the same seeds, state and split over processes.

A row is an example's first block_size + 1 tokens, padded after; its targets are the tokens one
on, ``loss.IGNORE`` where padded and, with ``--mask-prompt``, where the token is prompt. Every
batch has the same shape, so the compiled step is traced once.
"""

from __future__ import annotations

import sys

import numpy as np

from .errors import UserError
from .examples import ExampleSet, ExampleSplit
from .loss import IGNORE


def rows(split: ExampleSplit, indices: np.ndarray, block_size: int, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """x, y (len(indices), block_size) int32: one example a row, cut to block_size + 1 tokens and
    padded; y is x one token on, IGNORE where padded and, with ``mask_prompt``, where the token
    is prompt."""
    x = np.zeros((len(indices), block_size), np.int32)
    y = np.full((len(indices), block_size), IGNORE, np.int32)
    for r, i in enumerate(indices):
        ids, mask = split.example(int(i))
        ids, mask = ids[: block_size + 1].astype(np.int32), mask[: block_size + 1]
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:] == 1, ids[1:], IGNORE) if mask_prompt else ids[1:]
    return x, y


class ExampleSampler:
    """Random examples, one a row, in batches of fixed shape (accum, batch, block), as
    ``sampler.BatchSampler`` draws windows: the same seeds, state and rank split."""

    def __init__(self, split: ExampleSplit, batch_size: int, block_size: int, seed: int, accum: int = 1,
                 rank: int = 0, world: int = 1, mask_prompt: bool = False) -> None:
        self.split, self.batch_size, self.block_size, self.accum = split, batch_size, block_size, accum
        self.world, self.rows, self.mask_prompt = world, slice(rank * batch_size, (rank + 1) * batch_size), mask_prompt
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.accum * self.world * self.batch_size
        picks = self.rng.integers(0, len(self.split), size=n).reshape(self.accum, -1)[:, self.rows]
        x, y = rows(self.split, picks.reshape(-1), self.block_size, self.mask_prompt)
        return x.reshape(*picks.shape, -1), y.reshape(*picks.shape, -1)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise UserError(f"the saved state of the example sampler is corrupt ({e})") from None


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
    kw = dict(rank=rank, world=world, mask_prompt=data.mask_prompt)
    train, val = dataset.splits["train"], dataset.splits["val"]
    return (ExampleSampler(train, batch_size, block_size, seed, accum, **kw),
            ExampleSampler(val, batch_size, block_size, seed + 1, **kw),
            ExampleSampler(train, batch_size, block_size, seed + 2, **kw))
