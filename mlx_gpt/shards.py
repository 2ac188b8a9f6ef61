"""A split as a series of llm.c token files ("shards"): their names, writing them, finding them.

Names follow llm.c's ``dev/data/fineweb.py``: ``NAME_val_000000.bin``, ``NAME_train_000001.bin``,
``NAME_train_000002.bin`` ... (val numbered from 0, train from 1). A slice of a corpus prepared on
its own (``prepare --part I/N``) puts ``pIIIofNNN`` before the number, so the shards of all the
slices can sit in one folder without colliding, and sort slice by slice.

A shard is written under a hidden name and renamed when whole, so a reader never takes a
half-written one for a shard.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .data import HEADER_DTYPE, header_bytes, header_for, read_header
from .errors import UserError

SHARD = re.compile(r"^(?P<name>.+)_(?P<split>train|val)(?:_p(?P<part>\d{3,})of(?P<parts>\d{3,}))?_(?P<index>\d{6,})\.bin$")
FIRST_INDEX = {"val": 0, "train": 1}


def shard_name(name: str, split: str, index: int, part: tuple[int, int] | None = None) -> str:
    """``NAME_train_000001.bin``, or ``NAME_train_p002of004_000001.bin`` for slice 2 of 4."""
    slice_ = f"_p{part[0]:03d}of{part[1]:03d}" if part else ""
    return f"{name}_{split}{slice_}_{index:06d}.bin"


class ShardWriter:
    """One split's tokens, written as shards of ``shard_tokens`` (the last one shorter).

    Tokens go straight to a hidden file (memory stays flat whatever the shard size); the header,
    which holds the count, is written last and the file renamed to its shard name.
    """

    def __init__(self, directory: Path, name: str, split: str, vocab_size: int, shard_tokens: int,
                 part: tuple[int, int] | None = None, done: int = 0):
        """``done``: shards of this split already written (an interrupted prepare going on)."""
        self.directory, self.name, self.split, self.part = Path(directory), name, split, part
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.dtype = HEADER_DTYPE[header_for(vocab_size)]
        self.index = FIRST_INDEX[split] + done
        self.count, self._file = 0, None

    @property
    def path(self) -> Path:
        return self.directory / shard_name(self.name, self.split, self.index, self.part)

    @property
    def _partial(self) -> Path:
        return self.directory / f".{self.path.name}.partial"

    def write(self, tokens: np.ndarray) -> list[tuple[Path, int, int]]:
        """Append tokens; returns (shard, its tokens, tokens of this call in it and earlier shards) for
        each shard this call completed."""
        done, at = [], 0
        while at < len(tokens):
            take = min(len(tokens) - at, self.shard_tokens - self.count)
            self._append(tokens[at : at + take])
            at += take
            if self.count == self.shard_tokens:
                done.append((*self._finish(), at))
        return done

    def close(self) -> tuple[Path, int] | None:
        """Finish the last, shorter shard (None when it holds nothing)."""
        return self._finish() if self.count else None

    def abandon(self) -> None:
        """Drop the shard being written (an error or an interruption): it never gets a shard's name."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._partial.unlink(missing_ok=True)

    def _append(self, tokens: np.ndarray) -> None:
        try:
            if self._file is None:
                self._file = open(self._partial, "wb")
                self._file.write(bytes(len(header_bytes(0, self.vocab_size))))
            self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        except OSError as e:
            self.abandon()
            raise UserError(f"writing {self.path} failed: {e.strerror}") from None
        self.count += len(tokens)

    def _finish(self) -> tuple[Path, int]:
        path, count = self.path, self.count
        try:
            self._file.seek(0)
            self._file.write(header_bytes(count, self.vocab_size))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._partial, path)
        except OSError as e:
            self.abandon()
            raise UserError(f"writing {path} failed: {e.strerror}") from None
        self.index, self.count = self.index + 1, 0
        return path, count


# ---------------------------------------------------------------------------- reading


def find_splits(directory: Path) -> tuple[list[Path], list[Path]] | None:
    """(train files, val files) of a prepared folder, in the order llm.c's loader globs them.

    The folder holds ``train.bin`` + ``val.bin``, one ``*_train.bin`` + ``*_val.bin`` (llm.c's
    TinyStories, tinyshakespeare), or shards. None when it holds none of these.
    """
    d = Path(directory)
    if (d / "train.bin").exists():
        return [d / "train.bin"], [d / "val.bin"]
    sharded = {"train": [], "val": []}
    for f in d.iterdir() if d.is_dir() else ():
        m = SHARD.match(f.name)
        if m:
            sharded[m["split"]].append(f)
    if sharded["train"]:
        return sorted(sharded["train"]), sorted(sharded["val"])
    trains, vals = sorted(d.glob("*_train.bin")), sorted(d.glob("*_val.bin"))
    if trains or vals:
        if len(trains) != 1 or len(vals) != 1:
            raise UserError(f"{d} must hold one *_train.bin and one *_val.bin token file, or shards "
                            "(NAME_train_000001.bin ...)")
        return trains, vals
    return None


def check_series(files: list[Path]) -> None:
    """Refuse shards numbered with a gap (one missing) or of mixed token widths."""
    series: dict[tuple, list[int]] = {}
    for f in files:
        m = SHARD.match(f.name)
        if m:
            series.setdefault((m["name"], m["split"], m["part"], m["parts"]), []).append(int(m["index"]))
    for (name, split, part, parts), indices in series.items():
        start = min(FIRST_INDEX[split], min(indices))
        for i in range(start, max(indices) + 1):
            if i not in indices:
                missing = shard_name(name, split, i, (int(part), int(parts)) if part else None)
                raise UserError(f"shard {files[0].parent / missing} is missing (its neighbours are there)")
    kinds = {f: read_header(f) for f in files}
    first = files[0]
    for f, info in kinds.items():
        if info.dtype != kinds[first].dtype:
            raise UserError(f"{f} holds {info.dtype.itemsize * 8}-bit tokens but {first} "
                            f"{kinds[first].dtype.itemsize * 8}-bit ones: the shards come from different vocabularies")
