"""safetensors files, read and written with numpy alone.

Layout: an unsigned 64-bit little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensors' bytes, row-major and little-endian, offsets counted from the end of the header.
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
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt: its safetensors header is not a JSON object")
    start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _describe(path, name, entry, start, data_size)
    return tensors


def _describe(path: Path, name: str, entry: object, start: int, data_size: int) -> LazyTensor:
    try:
        dtype = CODES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise UserError(f"{path}: tensor {name!r} has a malformed header entry")
    t = LazyTensor(shape, dtype, lambda: read_at(path, start + begin, STORAGE[dtype], shape), path, (start + begin,))
    if end - begin != t.nbytes:
        raise UserError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {t.nbytes}")
    if end > data_size:
        raise UserError(f"{path} is truncated: tensor {name!r} ends at byte {start + end}, "
                        f"the file has {start + data_size}")
    return t


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
