"""The C++ CPU kernels (``ext/``): built once on first use, cached, and loaded as MLX primitives.

MLX's CPU backend runs each operation on one thread and evaluates ``exp``/``tanh`` one element at
a time, so GELU, softmax, layer norm and cross-entropy cost more than the matmuls around them
however their graphs are written, and attention's per-head matmuls and copies cost more than
its arithmetic. ``ext/`` implements them (and their backward passes, and the AdamW update) as
MLX primitives: vectorized loops split over the cores, each one kernel where the graph took
several.

The module is compiled with CMake and the C++ compiler (which MLX's CPU backend already needs
for ``mx.compile``) against the installed MLX's headers and nanobind, into
``~/.cache/mlx_gpt/`` (``$MLX_GPT_CACHE_DIR`` if set) under a key made of the sources, the MLX,
nanobind and Python versions and the compiler flags, so a change to any of them builds a new one.
A file lock lets one process build while the others wait for it. The library is built in a
temporary folder and renamed into place with its size and SHA-256 recorded beside it, and is
loaded only when it still matches that record: loading a library cut short or overwritten (a
full disk, a copy interrupted) kills the process with SIGBUS before Python can catch anything.
A library that does not match is rebuilt; if the rebuild fails, one warning says so.

Whenever it cannot be built or loaded (no compiler or CMake, no nanobind, a nanobind whose ABI
differs from MLX's, a GPU build of MLX) or ``MLX_GPT_NO_EXT=1`` is set, ``load()`` returns None
and ``mlx_gpt.cpu.ops`` runs MLX's own operations; ``status()`` says which path runs and why. A
failed build is remembered (with its log) so that later processes do not retry it until something
in the key changes.
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

import mlx.core as mx

from .matvec import cache_dir, install_sealed, is_sealed, warn

SOURCES = Path(__file__).resolve().parent / "ext"
MODULE_NAME = "_mlx_gpt_ext"
DISABLE_ENV = "MLX_GPT_NO_EXT"
BUILD_TIMEOUT_S = 900

_state: dict[str, object] = {"loaded": False, "module": None, "status": "not loaded yet"}


def arch_flags() -> str:
    """Instruction-set flags for this processor: AVX2 + FMA (x86-64-v3) where /proc/cpuinfo has them."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    if {"avx2", "fma", "bmi2", "f16c", "movbe"} <= set(flags):
        return "-march=x86-64-v3"
    if {"sse4_2", "popcnt", "ssse3"} <= set(flags):
        return "-march=x86-64-v2"
    return ""


def _nanobind_version() -> str | None:
    try:
        import nanobind
    except ImportError:
        return None
    return getattr(nanobind, "__version__", "unknown")


def build_key(nanobind_version: str) -> str:
    """Hash of everything the compiled module depends on."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (mx.__version__, nanobind_version, sys.implementation.cache_tag, platform.machine(),
                 arch_flags(), os.environ.get("CXX", "")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def _build(target: Path, log: Path) -> None:
    """Configure and compile ``ext/`` with CMake, then put the module at ``target`` with its record
    (see ``matvec.install_sealed``); raises on failure."""
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        install_sealed(_compile(Path(tmp), log), target)


def _compile(tmp: Path, log: Path) -> Path:
    """The module compiled in the folder ``tmp`` (the build's log written to ``log``)."""
    import nanobind

    jobs = str(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    cmake = _cmake()
    configure = [cmake, "-S", str(SOURCES), "-B", str(tmp), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dnanobind_DIR={nanobind.cmake_dir()}",
                 f"-DMLX_DIR={Path(mx.__file__).parent / 'share' / 'cmake' / 'MLX'}",
                 f"-DMLX_GPT_ARCH_FLAGS={arch_flags()}"]
    with open(log, "w") as out:
        for cmd in (configure, [cmake, "--build", str(tmp), "-j", jobs]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    return next(tmp.glob(MODULE_NAME + "*" + _suffix()))


def _locked_build(target: Path) -> str | None:
    """Build ``target`` unless another process has (or has failed to); None, or why not."""
    import fcntl

    failed = target.with_suffix(".failed")
    log = target.with_suffix(".log")
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_sealed(target):
            return None
        if failed.exists():
            return f"an earlier build failed (log: {log}; delete {failed} to retry)"
        damaged = target.exists()
        if damaged:
            print(f"mlx_gpt: the cached C++ CPU kernels {target} do not match their recorded size and SHA-256; "
                  f"rebuilding them (log: {log}) ...", file=sys.stderr, flush=True)
        else:
            print(f"mlx_gpt: building the C++ CPU kernels once (log: {log}) ...", file=sys.stderr, flush=True)
        try:
            _build(target, log)
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            failed.write_text(f"{type(e).__name__}: {e}\n")
            if damaged:
                target.unlink(missing_ok=True)  # never to be loaded
                warn(f"rebuilding the C++ CPU kernels failed (log: {log}); MLX's own operations run instead")
            return f"the build failed (log: {log})"
    return None


def _smoke_test(module: ModuleType) -> None:
    """Raise unless the module takes and returns MLX arrays (it does not when nanobind's ABI differs)."""
    x = mx.array([-1.0, 0.0, 2.0])
    got = module.gelu_approx(x)
    mx.eval(got)
    if not mx.allclose(got, mx.array([-0.158808, 0.0, 1.954598]), atol=1e-5).item():
        raise RuntimeError("gelu_approx gave wrong values")


def _cmake() -> str | None:
    """cmake on PATH, or beside this interpreter (a virtual environment's bin, not activated)."""
    return shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))


def _why_not_available() -> str | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    gpus = (getattr(mx, name, None) for name in ("metal", "cuda"))
    if any(gpu is not None and gpu.is_available() for gpu in gpus):
        return "MLX has a GPU backend here (its own kernels run there)"
    if not hasattr(os, "sched_getaffinity") and sys.platform != "darwin":
        return f"unsupported platform {sys.platform}"
    if _cmake() is None:
        return "no cmake on PATH"
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler on PATH"
    if _nanobind_version() is None:
        return "nanobind is not installed"
    return None


def _load() -> tuple[ModuleType | None, str]:
    why = _why_not_available()
    if why is not None:
        return None, f"pure MLX ({why})"
    target = cache_dir() / f"{MODULE_NAME}-{build_key(_nanobind_version())}{_suffix()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_sealed(target):
            why = _locked_build(target)
            if why is not None:
                return None, f"pure MLX ({why})"
        spec = importlib.util.spec_from_file_location(MODULE_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _smoke_test(module)
    except Exception as e:  # any failure to load leaves MLX's own operations in place
        return None, f"pure MLX (the C++ kernels at {target} did not load: {type(e).__name__}: {e})"
    return module, f"C++ extension ({target})"


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call of a process if needed), or None."""
    if not _state["loaded"]:
        _state["module"], _state["status"] = _load()
        _state["loaded"] = True
    return _state["module"]  # type: ignore[return-value]


def status() -> str:
    """Which CPU kernels run: the C++ extension (and where it is), or pure MLX and why."""
    load()
    return str(_state["status"])
