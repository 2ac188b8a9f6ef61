"""A tensor known by shape and dtype whose values are read only when asked for.

Readers describe every tensor of a file first (so names and shapes are checked before any
data is touched) and read each one on its own later, so converting never holds more than the
model plus the tensor in hand.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import numpy as np

from ..errors import UserError

# dtype names -> how the bytes are stored; numpy has no bfloat16, so its bits travel as uint16
STORAGE = {
    "float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
FLOATS = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """shape and dtype now, values on ``read()``.

    ``where`` says where the values lie, starting with their byte position in the file: two
    tensors with equal ``where`` hold equal values (a tied head shares wte's storage).
    """

    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray]  # the stored values: this shape, the storage dtype
    file: Path | None = None
    where: Hashable = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """The values as float32 (exact for float16 and bfloat16)."""
        if self.dtype not in FLOATS:
            raise UserError(f"{self.file}: a {self.dtype} tensor stands where a float weight belongs")
        a = self.load()
        if a.shape != self.shape:  # a reader bug, not a user's
            raise AssertionError(f"read {a.shape}, expected {self.shape}")
        if self.dtype == "bfloat16":
            return bfloat16_to_float32(a)
        return a.astype(np.float32, copy=False)

    @classmethod
    def of(cls, array: np.ndarray) -> "LazyTensor":
        """An in-memory array, for writers that take LazyTensors."""
        name = {v: k for k, v in STORAGE.items() if k != "bfloat16"}[array.dtype.newbyteorder("<")]
        return cls(tuple(array.shape), name, lambda: array)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the bits back into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as its uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def read_at(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Read one array from a byte offset, failing cleanly if the file ends early."""
    out = np.empty(shape, dtype=dtype)
    view = memoryview(out.reshape(-1)).cast("B")
    with open(path, "rb") as f:
        f.seek(offset)
        n = f.readinto(view)
    if n != view.nbytes:
        raise UserError(f"{path} is truncated: a tensor at byte {offset} needs {view.nbytes} bytes, "
                        f"the file has {max(n or 0, 0)}")
    return out


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def progress_bar(path: Path, total: int, enabled: bool, verb: str = "read"):
    """One byte-counting bar per file (silent when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{verb} {Path(path).name}", unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=True, dynamic_ncols=True)
