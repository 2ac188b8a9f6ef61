"""safetensors files, read and written with numpy alone.

Layout: an unsigned 64-bit little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensors' bytes, row-major and little-endian, offsets counted from the end of the header.

The header is checked against the file before any tensor is read, as the format's own reader does:
whole-number shapes and offsets, each tensor spanning exactly its shape's bytes, and the tensors
tiling the data with no byte shared or skipped (two tensors over the same bytes, or a gap, are a
damaged file, not a tied weight).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UserError
from .tensors import STORAGE, LazyTensor, file_size, progress_bar, read_at

# safetensors dtype codes <-> our dtype names
CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
         "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
NAMES = {v: k for k, v in CODES.items()}
MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, described from its header, read on demand."""
    path = Path(path)
    size = file_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise UserError(f"{path} is not a safetensors file or is truncated (header of {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt: its safetensors header is not a JSON object")
    start, data_size = 8 + n, size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name], span = _describe(path, name, entry, start, data_size)
        spans.append((span, name))
    at = 0
    for (begin, end), name in sorted(spans):
        if begin != at:
            raise UserError(f"{path} is corrupt: tensor {name!r} starts at data byte {begin}, where "
                            f"{'the previous tensor ends' if at else 'the data begins'} is {at} "
                            "(tensors share or skip bytes)")
        at = end
    return tensors


def _whole(x: object) -> bool:
    return type(x) is int and x >= 0


def _describe(path: Path, name: str, entry: object, start: int, data_size: int) -> tuple[LazyTensor, tuple[int, int]]:
    try:
        dtype = CODES[entry["dtype"]]
        shape, offsets = entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{path}: tensor {name!r:.60} has a malformed or unsupported header entry") from None
    if not (isinstance(shape, list) and all(_whole(d) for d in shape) and isinstance(offsets, list)
            and len(offsets) == 2 and all(_whole(x) for x in offsets) and offsets[0] <= offsets[1]):
        raise UserError(f"{path}: tensor {name!r:.60} has a malformed header entry (shape {shape!r:.40}, "
                        f"data_offsets {offsets!r:.40}: whole numbers expected)")
    shape, (begin, end) = tuple(shape), offsets
    t = LazyTensor(shape, dtype, lambda: read_at(path, start + begin, STORAGE[dtype], shape), path, (start + begin,))
    if end - begin != t.nbytes:
        raise UserError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {t.nbytes}")
    if end > data_size:
        raise UserError(f"{path} is truncated: tensor {name!r} ends at byte {start + end}, "
                        f"the file has {start + data_size}")
    return t, (begin, end)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, LazyTensor], *,
                      metadata: dict[str, str] | None = None, progress: bool = False) -> None:
    """Write tensors in the given order, reading each only when its turn comes."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f, progress_bar(path, offset, progress, "write") as bar:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            a = np.ascontiguousarray(t.load(), dtype=STORAGE[t.dtype])
            f.write(memoryview(a.reshape(-1)).cast("B"))
            bar.update(t.nbytes)
