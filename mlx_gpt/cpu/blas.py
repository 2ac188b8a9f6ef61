"""Make MLX's CPU backend multiply matrices with OpenBLAS instead of the reference BLAS.

The Linux ``mlx-cpu`` wheel links netlib's reference BLAS, which runs a 2048^3 sgemm at a few
GFLOP/s. If an optimized ``libopenblas.so`` is loaded with ``RTLD_GLOBAL`` *before*
``mlx.core`` is first imported, the dynamic linker resolves MLX's ``cblas_*`` calls to it.

The ``cmeel-openblas`` wheel ships a standard ``libopenblas.so.0`` but not the
``libgfortran.so.5`` it needs. The ``mlx-cpu`` wheel bundles a libgfortran under a hashed
soname; when the system has none, we copy that one into a temporary folder with its soname
set back to ``libgfortran.so.5``, load it, load OpenBLAS, and delete the folder (the loaded
libraries stay mapped).

This module must not import ``mlx``: it runs before MLX is loaded.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings

_state: dict[str, str | None] = {"blas": None, "error": None, "matvec": None}


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _find(pattern: str) -> str | None:
    for d in _site_dirs():
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


def _load_bundled_gfortran() -> None:
    """Load mlx-cpu's bundled libgfortran so that it answers to the soname libgfortran.so.5."""
    gfortran = _find("mlx_cpu.libs/libgfortran*.so*")
    if gfortran is None:
        raise OSError("no libgfortran.so.5 on the system and none bundled with mlx-cpu")
    quadmath = _find("mlx_cpu.libs/libquadmath*.so*")
    if quadmath is not None:  # the bundled libgfortran needs it under its hashed name
        ctypes.CDLL(quadmath, mode=ctypes.RTLD_GLOBAL)
    old = os.path.basename(gfortran).encode() + b"\0"
    new = b"libgfortran.so.5\0"
    with open(gfortran, "rb") as f:
        image = f.read()
    if image.count(old) != 1 or len(new) > len(old):
        raise OSError(f"unexpected soname layout in {gfortran}")
    image = image.replace(old, new + b"\0" * (len(old) - len(new)))
    tmp = tempfile.mkdtemp(prefix="mlx_gpt_blas_")
    try:
        path = os.path.join(tmp, "libgfortran.so.5")
        with open(path, "wb") as f:
            f.write(image)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# OpenBLAS builds made for one processor family, and the instruction set each one needs
_CORE_NEEDS = {"SKYLAKEX": "avx512f", "COOPERLAKE": "avx512bf16", "SAPPHIRERAPIDS": "amx_tile",
               "HASWELL": "avx2", "ZEN": "avx2"}


def cpu_flags() -> set[str]:
    """The processor's instruction-set flags in /proc/cpuinfo (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runs_here(lib: ctypes.CDLL) -> str | None:
    """None if this OpenBLAS build can run on this processor, else why not.

    A wheel built without DYNAMIC_ARCH has the kernels of its build machine only; calling one
    that needs AVX-512 on a processor without it kills the process with SIGILL.
    """
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
    except (AttributeError, OSError):
        return None
    if "DYNAMIC_ARCH" in config:
        return None
    flags = cpu_flags()
    for core, flag in _CORE_NEEDS.items():
        if f" {core}" in f" {config.upper()}" and flags and flag not in flags:
            return f"{config.strip()} needs {flag}, which this processor lacks"
    return None


def load_optimized_blas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU backend uses it; return its path, or None.

    Does nothing on macOS (MLX uses Accelerate there), when ``MLX_GPT_NO_BLAS=1`` is set, or
    when no OpenBLAS is installed. Warns once if ``mlx.core`` was already imported, since
    then it is too late for the linker to pick OpenBLAS.
    """
    if _state["blas"] or _state["error"]:
        return _state["blas"]
    if not sys.platform.startswith("linux") or os.environ.get("MLX_GPT_NO_BLAS") == "1":
        _state["error"] = "not applicable on this platform" if sys.platform == "darwin" else "disabled"
        return None
    if "mlx.core" in sys.modules:
        _state["error"] = "mlx.core was imported before mlx_gpt"
        warnings.warn(
            "mlx.core was imported before mlx_gpt, so MLX keeps its slow reference BLAS; "
            "import mlx_gpt first (or run through python -m mlx_gpt...) for optimized matmuls",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    lib = _find("cmeel.prefix/lib/libopenblas.so.0")
    if lib is None:
        _state["error"] = "cmeel-openblas is not installed"
        return None
    try:
        try:
            local = ctypes.CDLL(lib, mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            if "libgfortran" not in str(e):
                raise
            _load_bundled_gfortran()
            local = ctypes.CDLL(lib, mode=ctypes.RTLD_LOCAL)
        mismatch = _runs_here(local)
        if mismatch:
            raise OSError(mismatch)
    except OSError as e:
        _state["error"] = str(e)
        warnings.warn(f"could not load OpenBLAS ({e}); MLX keeps its reference BLAS", RuntimeWarning)
        return None
    # matrix-vector products go to gemv: the router must precede OpenBLAS in the global scope
    from .matvec import install

    _state["matvec"] = install(lib)
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    _state["blas"] = lib
    return lib


def set_blas_threads(n: int) -> None:
    """Let OpenBLAS use ``n`` threads per call (no-op without OpenBLAS, e.g. on macOS)."""
    if _state["blas"]:
        ctypes.CDLL(_state["blas"]).openblas_set_num_threads(int(n))


def get_blas_threads() -> int | None:
    """The threads OpenBLAS uses per call, or None without OpenBLAS."""
    if _state["blas"]:
        return int(ctypes.CDLL(_state["blas"]).openblas_get_num_threads())
    return None


def blas_status() -> str:
    """One line saying which BLAS MLX's CPU backend calls."""
    if _state["blas"]:
        return f"OpenBLAS ({_state['blas']})" + (", matrix-vector products via sgemv" if _state["matvec"] else "")
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"reference BLAS ({_state['error'] or 'OpenBLAS not loaded'})"


def fastest_threads(rows: int, cols: int, threads: int, calls: int = 16, rounds: int = 3) -> int:
    """1 or ``threads``: the BLAS thread count that runs matrix-vector products of this shape faster now.

    Each try runs ``calls`` products of a (1, cols) row with a (rows, cols) matrix, as a decode
    step runs one per weight. On a busy machine a second BLAS thread waits for a core at every
    call, and decoding collapses; alone it streams a matrix faster than one. Measuring when
    decoding starts catches the machine as it is; a near tie goes to one thread, which holds
    up when the load changes. The BLAS setting is left as it was.
    """
    import statistics
    import time

    import mlx.core as mx

    previous = get_blas_threads()
    if threads <= 1 or previous is None:
        return 1
    w = mx.random.normal((rows, cols), key=mx.random.key(0))
    x = mx.random.normal((1, cols), key=mx.random.key(1))
    mx.eval(w, x, x @ w.T)
    seconds: dict[int, list[float]] = {1: [], threads: []}
    try:
        for _ in range(rounds):
            for n in seconds:
                set_blas_threads(n)
                t0 = time.perf_counter()
                mx.eval([x @ w.T for _ in range(calls)])
                seconds[n].append(time.perf_counter() - t0)
    finally:
        set_blas_threads(previous)
    return threads if statistics.median(seconds[threads]) < 0.9 * statistics.median(seconds[1]) else 1
