"""Compiled code built on first use: cached under a key of all it depends on, and loaded only when
it is still what its build wrote.

Three things are compiled: the C++ CPU kernels (``cpu/ext``, see ``cpu/extension.py``), GPT-2's
bulk BPE encoder (``bpe/``, see ``gpt2_native.py``) and the matrix-vector router
(``cpu/matvec.py``). Each goes into ``~/.cache/mlx_gpt/`` (``$MLX_GPT_CACHE_DIR`` if set) under a
name holding a hash of its sources and of the versions it was built against, so a change to any of
them builds a new one.

A library is built in a temporary folder and renamed into place with its size and SHA-256 recorded
beside it, and is loaded only when it still matches that record: loading a library cut short or
overwritten (a full disk, a copy interrupted) kills the process with SIGBUS before Python can catch
anything. A file lock lets one process build while the others wait for it, and a failed build is
remembered (with its log) so that later processes do not retry it until something in the key
changes. Whatever goes wrong, or with ``MLX_GPT_NO_EXT=1``, the caller's Python or MLX path runs;
``status()`` says which and why.

This module imports nothing from MLX: the router is built before ``mlx.core`` is loaded.
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
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

CACHE_ENV = "MLX_GPT_CACHE_DIR"
DISABLE_ENV = "MLX_GPT_NO_EXT"


def cache_dir() -> Path:
    """Where compiled code is cached: ``$MLX_GPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlx_gpt``
    (``~/.cache/mlx_gpt``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_gpt"


def _record(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path) -> str:
    """``SIZE SHA256`` of a file."""
    return f"{path.stat().st_size} {sha256_of(path)}"


def is_sealed(library: Path) -> bool:
    """Whether a cached library is the one its build recorded: the same size and SHA-256."""
    try:
        return _record(library).read_text().strip() == _fingerprint(library)
    except (OSError, UnicodeDecodeError):
        return False


def install_sealed(built: Path, target: Path) -> None:
    """Put a freshly built library at ``target`` with its record beside it, each by an atomic rename:
    a reader sees the old pair, the new library with a record that does not match (and rebuilds),
    or the new pair; never half a file."""
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(built, staged)
    os.chmod(staged, 0o755)
    record = _record(staged)
    record.write_text(_fingerprint(staged) + "\n")
    os.replace(staged, target)
    os.replace(record, _record(target))


def warn(message: str) -> None:
    print(f"mlx_gpt: warning: {message}", file=sys.stderr, flush=True)


def cmake() -> str | None:
    """cmake on PATH, or beside this interpreter (a virtual environment's bin, not activated)."""
    return shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))


def _nanobind_version() -> str | None:
    try:
        import nanobind
    except ImportError:
        return None
    return getattr(nanobind, "__version__", "unknown")


class Module:
    """A nanobind module compiled with CMake from a folder of sources, built once and cached.

    ``what`` names it in messages ("the C++ CPU kernels"); ``built``/``fallback`` begin ``status()``
    when it loads and when it does not. ``key_parts`` and ``cmake_args`` add what the build depends
    on beyond the sources, nanobind, Python, the machine and the compiler; ``unavailable`` says why
    it cannot run here (None: it can); ``smoke_test`` raises when a loaded module does not work.
    """

    def __init__(self, name: str, sources: Path, *, what: str, built: str, fallback: str,
                 key_parts: Callable[[], Sequence[str]] = tuple, cmake_args: Callable[[], Sequence[str]] = tuple,
                 unavailable: Callable[[], str | None] = lambda: None,
                 smoke_test: Callable[[ModuleType], None] = lambda module: None, timeout_s: int = 900) -> None:
        self.name, self.sources, self.what, self.built, self.fallback = name, sources, what, built, fallback
        self.key_parts, self.cmake_args = key_parts, cmake_args
        self.unavailable, self.smoke_test, self.timeout_s = unavailable, smoke_test, timeout_s
        self._loaded: tuple[ModuleType | None, str] | None = None

    def load(self) -> ModuleType | None:
        """The compiled module (built on the first call of a process if needed), or None."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded[0]

    def status(self) -> str:
        """Which path runs: the compiled module (and where it is), or the fallback and why."""
        self.load()
        return self._loaded[1]

    def target(self) -> Path:
        """Where the module for this build key is cached."""
        h = hashlib.sha256()
        for path in sorted(self.sources.iterdir()):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        for part in (*self.key_parts(), _nanobind_version() or "", sys.implementation.cache_tag, platform.machine(),
                     os.environ.get("CXX", "")):
            h.update(part.encode() + b"\0")
        return cache_dir() / f"{self.name}-{h.hexdigest()[:16]}{importlib.machinery.EXTENSION_SUFFIXES[0]}"

    def why_not(self) -> str | None:
        """Why the module cannot be built or run here, or None."""
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            return f"{DISABLE_ENV} is set"
        why = self.unavailable()
        if why is not None:
            return why
        if cmake() is None:
            return "no cmake on PATH"
        if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return "no C++ compiler on PATH"
        if _nanobind_version() is None:
            return "nanobind is not installed"
        return None

    def _load(self) -> tuple[ModuleType | None, str]:
        why = self.why_not()
        if why is not None:
            return None, f"{self.fallback} ({why})"
        target = self.target()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            why = None if is_sealed(target) else self._locked_build(target)
            if why is not None:
                return None, f"{self.fallback} ({why})"
            spec = importlib.util.spec_from_file_location(self.name, target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.smoke_test(module)
        except Exception as e:  # any failure to load leaves the fallback in place
            return None, f"{self.fallback} ({self.what} at {target} did not load: {type(e).__name__}: {e})"
        return module, f"{self.built} ({target})"

    def _locked_build(self, target: Path) -> str | None:
        """Build ``target`` unless another process has (or has failed to); None, or why not."""
        import fcntl

        failed, log = target.with_suffix(".failed"), target.with_suffix(".log")
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if is_sealed(target):
                return None
            if failed.exists():
                return f"an earlier build failed (log: {log}; delete {failed} to retry)"
            damaged = target.exists()
            if damaged:
                print(f"mlx_gpt: the cached {self.what} {target} do not match their recorded size and SHA-256; "
                      f"rebuilding them (log: {log}) ...", file=sys.stderr, flush=True)
            else:
                print(f"mlx_gpt: building {self.what} once (log: {log}) ...", file=sys.stderr, flush=True)
            try:
                with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
                    install_sealed(self.compile(Path(tmp), log), target)
            except (OSError, subprocess.SubprocessError, StopIteration) as e:
                failed.write_text(f"{type(e).__name__}: {e}\n")
                if damaged:
                    target.unlink(missing_ok=True)  # never to be loaded
                    warn(f"rebuilding {self.what} failed (log: {log}); {self.fallback} runs instead")
                return f"the build failed (log: {log})"
        return None

    def compile(self, tmp: Path, log: Path) -> Path:
        """The module compiled in the folder ``tmp`` (the build's log written to ``log``)."""
        import nanobind

        jobs = str(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
        configure = [cmake(), "-S", str(self.sources), "-B", str(tmp), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={sys.executable}", f"-Dnanobind_DIR={nanobind.cmake_dir()}",
                     *self.cmake_args()]
        with open(log, "w") as out:
            for cmd in (configure, [cmake(), "--build", str(tmp), "-j", jobs]):
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=self.timeout_s)
        return next(tmp.glob(self.name + "*" + importlib.machinery.EXTENSION_SUFFIXES[0]))
