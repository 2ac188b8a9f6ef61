"""PyTorch's ``torch.save`` files (``pytorch_model.bin``), read with numpy and a locked-down unpickler.

A pickle is a program: its GLOBAL opcodes name any importable callable and REDUCE calls it,
so loading an untrusted one with ``pickle.load`` runs whatever it names. Our unpickler's
``find_class`` answers from a fixed table of stand-ins (a tensor description, the storage
types, OrderedDict) and refuses every other name before anything is imported, so nothing a
file names ever runs. Storages are never unpickled at all: they are raw bytes read with numpy.

Two layouts exist:
  zip (torch >= 1.6): ``<archive>/data.pkl`` holds the pickle, ``<archive>/data/<key>`` each
      storage's bytes, stored uncompressed with a CRC.
  legacy: five pickles in a row (magic number, protocol version, system info, the object,
      the sorted storage keys), then for each key an int64 element count and the bytes.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..limits import check_bytes
from .tensors import STORAGE, LazyTensor, file_size, read_at

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch's typed storage classes, as pickles name them, and the dtype of their elements
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorView:
    """What ``_rebuild_tensor_v2`` would have built: a strided view of a storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(i) is int and i >= 0 for i in x):
        raise pickle.UnpicklingError(f"bad tensor {what}: {x!r}")
    return x


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorView:
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor without a valid storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("tensor size and stride differ in length")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= storage.numel:
        raise pickle.UnpicklingError(f"a tensor reaches past the end of storage {storage.key}")
    return _TensorView(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_ignored) -> _TensorView:
    if not isinstance(data, _TensorView):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_TYPES.items()},
}


class RefusedGlobal(Exception):
    """The pickle names something outside ALLOWED."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals in ALLOWED; storages become _Storage descriptions."""

    def __init__(self, file, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != (6 if self.legacy else 5) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")
        _, kind, key, _location, numel = pid[:5]
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("malformed storage reference")
        if self.legacy and pid[5] is not None:
            raise pickle.UnpicklingError("storage views of the pre-1.6 format are not supported")
        storage = self.storages.setdefault(key, _Storage(key, kind.dtype, numel))
        if storage != _Storage(key, kind.dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is referenced with two types or sizes")
        return storage


def _unpickle(f, path: Path, legacy: bool) -> tuple[object, dict[str, _Storage]]:
    u = _RestrictedUnpickler(f, legacy)
    try:
        return u.load(), u.storages
    except RefusedGlobal as e:
        raise UserError(f"{path} was refused: its pickle calls {_printable(str(e))}, which a tensor file never needs "
                        "(only torch tensors, their storages and OrderedDict are allowed)") from None
    except UserError:
        raise
    except Exception as e:  # any malformed pickle: EOF, bad opcode, wrong argument types
        raise UserError(f"{path} is truncated or corrupt: {type(e).__name__}: {_printable(str(e))}") from None


def _printable(text: str, limit: int = 100) -> str:
    """An exception's text for a one-line error: names the file chose (globals, zip members) may hold
    line breaks or other control characters, shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def read_torch(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The tensors of a ``torch.save``d state dict (zip or legacy layout), read on demand."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return _read_zip(path)
    if magic[:1] == b"\x80":
        return _read_legacy(path)
    raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip nor a pickle)")


def _state_dict(obj: object, path: Path) -> dict[str, _TensorView]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _TensorView) for k, v in obj.items()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


# zip members are read whole only when small: a state dict's pickle is kilobytes per tensor, never this
MAX_PICKLE = 1 << 30
# what a damaged zip raises while it is read: bad headers, a bad CRC, a broken deflate stream,
# a compression method this Python lacks, bytes that are not text
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, KeyError, zlib.error,
              NotImplementedError, RuntimeError, ValueError)


def _read_zip(path: Path) -> dict[str, LazyTensor]:
    size = file_size(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [i for i in z.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pkls) != 1:
                raise UserError(f"{path} is a zip but not a PyTorch checkpoint (no <archive>/data.pkl)")
            prefix = pkls[0].filename[: -len("data.pkl")]
            names = set(z.namelist())
            if pkls[0].file_size > MAX_PICKLE:
                raise UserError(f"{path} is corrupt: its pickle claims {pkls[0].file_size:,} bytes")
            byteorder = (z.read(prefix + "byteorder")[:16].decode("ascii", "replace")
                         if prefix + "byteorder" in names else "little")
            obj, storages = _unpickle(io.BytesIO(z.read(pkls[0])), path, legacy=False)
            entries = {key: z.getinfo(prefix + f"data/{key}") for key in storages if prefix + f"data/{key}" in names}
    except UserError:
        raise
    except ZIP_ERRORS as e:
        raise UserError(f"{path} is truncated or corrupt: {_printable(str(e))}") from None
    if byteorder != "little":
        raise UserError(f"{path} was saved on a {byteorder}-endian machine, which is not supported")
    views = _state_dict(obj, path)
    for key, s in storages.items():
        info = entries.get(key)
        if info is None:
            raise UserError(f"{path} is corrupt: storage {key} is missing")
        if info.file_size != s.numel * STORAGE[s.dtype].itemsize:
            raise UserError(f"{path} is corrupt: storage {key} holds {info.file_size} bytes, "
                            f"expected {s.numel * STORAGE[s.dtype].itemsize}")
        # stored, as torch writes them: the bytes must be in the file (a deflated entry may be smaller,
        # so its size is checked against memory before it is read)
        if info.compress_type == zipfile.ZIP_STORED and info.header_offset + info.file_size > size:
            raise UserError(f"{path} is truncated: storage {key} needs {info.file_size:,} bytes past the file's end")
        check_bytes(info.file_size, f"{path}: storage {key}")

    def loader(s: _Storage):
        def load() -> np.ndarray:
            out = np.empty(s.numel, dtype=STORAGE[s.dtype])
            try:
                with zipfile.ZipFile(path) as z, z.open(entries[s.key]) as f:
                    n = f.readinto(memoryview(out).cast("B"))  # reading to the end checks the CRC
            except ZIP_ERRORS as e:
                raise UserError(f"{path} is truncated or corrupt: {_printable(str(e))}") from None
            if n != out.nbytes:
                raise UserError(f"{path} is truncated: storage {s.key} is short")
            return out
        return load

    return {name: _lazy(v, loader(v.storage), path, entries[v.storage.key].header_offset)
            for name, v in views.items()}


def _read_legacy(path: Path) -> dict[str, LazyTensor]:
    size = file_size(path)
    with open(path, "rb") as f:
        magic, _ = _unpickle(f, path, legacy=True)
        if magic != LEGACY_MAGIC:
            raise UserError(f"{path} is a pickle but not a PyTorch checkpoint")
        version, _ = _unpickle(f, path, legacy=True)
        if version != LEGACY_PROTOCOL:
            raise UserError(f"{path}: unsupported PyTorch legacy protocol {version!r}")
        info, _ = _unpickle(f, path, legacy=True)
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise UserError(f"{path} was saved on a big-endian machine, which is not supported")
        obj, storages = _unpickle(f, path, legacy=True)
        keys, _ = _unpickle(f, path, legacy=True)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or sorted(keys) != sorted(storages):
            raise UserError(f"{path} is corrupt: its storage list does not match its tensors")
        offsets, pos = {}, f.tell()
        for key in keys:  # each storage: int64 element count, then its bytes
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is truncated: storage {key} is missing")
            (numel,) = struct.unpack("<q", head)
            s = storages[key]
            if numel != s.numel:
                raise UserError(f"{path} is corrupt: storage {key} holds {numel} elements, expected {s.numel}")
            offsets[key] = pos + 8
            pos += 8 + numel * STORAGE[s.dtype].itemsize
    if pos > size:
        raise UserError(f"{path} is truncated: its storages need {pos} bytes, the file has {size}")
    views = _state_dict(obj, path)

    def loader(s: _Storage):
        return lambda: read_at(path, offsets[s.key], STORAGE[s.dtype], (s.numel,))

    return {name: _lazy(v, loader(v.storage), path, offsets[v.storage.key]) for name, v in views.items()}


def _lazy(v: _TensorView, load_storage, path: Path, position: int) -> LazyTensor:
    """A LazyTensor for a strided view: reads the storage, then takes the view of it."""
    dtype = v.storage.dtype
    n = math.prod(v.shape)
    contiguous = tuple(math.prod(v.shape[i + 1:]) for i in range(len(v.shape)))

    def load() -> np.ndarray:
        # a view may repeat its storage (stride 0) into any size: the file bounds the storage, not this
        check_bytes(n * STORAGE[dtype].itemsize, f"{path}: a tensor of shape {v.shape}")
        flat = load_storage()
        if n == 0:
            return np.zeros(v.shape, dtype=flat.dtype)
        if all(s == c or d == 1 for s, c, d in zip(v.stride, contiguous, v.shape)):
            return flat[v.offset : v.offset + n].reshape(v.shape)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[v.offset :], shape=v.shape, strides=[s * item for s in v.stride])
        return np.ascontiguousarray(view)

    return LazyTensor(v.shape, dtype, load, path, (position, v.storage.key, v.offset, v.shape, v.stride))
