"""GPT-2's BPE in C++ (``bpe/``) for prepare's workers: built once on first use, cached, else None.

Cutting text into GPT-2's pieces with Python's ``re`` and looking each piece up costs more per
token than the whole of a Rust encoder's work, so ``bpe/encoder.cpp`` does both in C++: the
pre-tokenizer's pattern written out as a loop over the UTF-8 bytes, then each distinct piece
byte-pair-encoded once (GPT2Tokenizer's merges, best first) and remembered.

Which characters are letters (``\\p{L}``), numbers (``\\p{N}``) and spaces (Unicode's
White_Space, what ``\\s`` means to the pattern) is decided here, from ``unicodedata``, into a
table handed to the encoder. A code point that this Python's Unicode database does not know
(assigned by a later Unicode) could be classed wrongly, so a text holding one is left to the
Python path (``encode`` gives None).

The module is compiled like the CPU kernels (``cpu/extension.py``): CMake and the C++ compiler
against nanobind, into the same cache folder under a key of its sources and the nanobind, Python
and compiler versions, behind a file lock, recorded with its size and SHA-256 and loaded only
when it matches. Without CMake, a compiler or nanobind, after a failed build, or with
``MLX_GPT_NO_EXT=1``, ``load()`` gives None and the Python encoder runs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .cpu.matvec import cache_dir, install_sealed, is_sealed, warn

SOURCES = Path(__file__).resolve().parent / "bpe"
MODULE_NAME = "_mlx_gpt_bpe"
DISABLE_ENV = "MLX_GPT_NO_EXT"
BUILD_TIMEOUT_S = 600
OTHER, LETTER, NUMBER, SPACE, UNKNOWN = range(5)  # bpe/encoder.cpp's classes
# Unicode's White_Space property: what \s matches in GPT-2's pattern (str.isspace also takes U+001C..U+001F)
WHITE_SPACE = (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000)

_state: dict = {}


@lru_cache(maxsize=1)
def char_classes() -> bytes:
    """Each code point's class for the encoder: letter, number, space, other, or unknown (unassigned
    in this Python's Unicode database)."""
    by_category = {"L": LETTER, "N": NUMBER}
    table = bytearray([UNKNOWN]) * 0x110000
    # planes 4 to 13 hold nothing yet; 15 and 16 are private use
    for start, end in ((0, 0x40000), (0xE0000, 0xF0000)):
        for cp in range(start, end):
            category = unicodedata.category(chr(cp))
            table[cp] = UNKNOWN if category == "Cn" else by_category.get(category[0], OTHER)
    table[0xF0000:] = bytes(0x110000 - 0xF0000)
    for cp in WHITE_SPACE:
        table[cp] = SPACE
    return bytes(table)


def encoder(tokenizer, remember: int):
    """A C++ encoder of a GPT2Tokenizer's vocabulary and merges (``encode(text)``: a uint32 array,
    or None for text to encode otherwise), or None where the module is not available."""
    from .gpt2_tokenizer import byte_to_unicode

    module = load()
    if module is None:
        return None
    vocab = tokenizer.vocab
    chars = byte_to_unicode()
    byte_ids = [vocab[chars[b]] for b in range(256)]
    merges = [(vocab[a], vocab[b], vocab[a + b]) for a, b in tokenizer.merges]
    return module.Encoder(char_classes(), byte_ids, merges, remember)


def load() -> ModuleType | None:
    """The compiled module (built on the first call of a process if needed), or None."""
    if "module" not in _state:
        _state["module"], _state["status"] = _load()
    return _state["module"]


def status() -> str:
    """Which GPT-2 bulk encoder runs: the C++ one (and where it is), or Python's and why."""
    load()
    return _state["status"]


def _load() -> tuple[ModuleType | None, str]:
    why = _why_not_available()
    if why is not None:
        return None, f"Python ({why})"
    target = cache_dir() / f"{MODULE_NAME}-{_build_key()}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        why = None if is_sealed(target) else _locked_build(target)
        if why is not None:
            return None, f"Python ({why})"
        spec = importlib.util.spec_from_file_location(MODULE_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # any failure to load leaves the Python encoder in place
        return None, f"Python (the C++ encoder at {target} did not load: {type(e).__name__}: {e})"
    return module, f"C++ ({target})"


def _why_not_available() -> str | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    if _cmake() is None:
        return "no cmake on PATH"
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler on PATH"
    if importlib.util.find_spec("nanobind") is None:
        return "nanobind is not installed"
    return None


def _cmake() -> str | None:
    """cmake on PATH, or beside this interpreter (a virtual environment's bin, not activated)."""
    return shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))


def _build_key() -> str:
    """Hash of everything the compiled module depends on."""
    import nanobind

    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (getattr(nanobind, "__version__", "?"), sys.implementation.cache_tag, platform.machine(),
                 os.environ.get("CXX", "")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _locked_build(target: Path) -> str | None:
    """Build ``target`` unless another process has (or has failed to); None, or why not."""
    import fcntl

    failed, log = target.with_suffix(".failed"), target.with_suffix(".log")
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_sealed(target):
            return None
        if failed.exists():
            return f"an earlier build failed (log: {log}; delete {failed} to retry)"
        print(f"mlx_gpt: building the C++ GPT-2 encoder once (log: {log}) ...", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
                install_sealed(_compile(Path(tmp), log), target)
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            failed.write_text(f"{type(e).__name__}: {e}\n")
            warn(f"building the C++ GPT-2 encoder failed (log: {log}); the Python one runs instead")
            return f"the build failed (log: {log})"
    return None


def _compile(tmp: Path, log: Path) -> Path:
    """The module compiled in the folder ``tmp`` (the build's log written to ``log``)."""
    import nanobind

    cmake = _cmake()
    configure = [cmake, "-S", str(SOURCES), "-B", str(tmp), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dnanobind_DIR={nanobind.cmake_dir()}"]
    with open(log, "w") as out:
        for cmd in (configure, [cmake, "--build", str(tmp)]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    return next(tmp.glob(MODULE_NAME + "*" + importlib.machinery.EXTENSION_SUFFIXES[0]))
