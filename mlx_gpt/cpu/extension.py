"""The C++ CPU kernels (``ext/``): built once on first use, cached, and loaded as MLX primitives.

MLX's CPU backend runs each operation on one thread and evaluates ``exp``/``tanh`` one element at
a time, so GELU, softmax, layer norm and cross-entropy cost more than the matmuls around them
however their graphs are written, and attention's per-head matmuls and copies cost more than
its arithmetic. ``ext/`` implements them (and their backward passes, and the AdamW update) as
MLX primitives: vectorized loops split over the cores, each one kernel where the graph took
several.

It is compiled and cached as ``native.Module`` builds any compiled module, against the installed
MLX's headers as well, and under a key that also holds MLX's version and the instruction-set flags.
Whenever it cannot be built or loaded (no compiler or CMake, no nanobind, a nanobind whose ABI
differs from MLX's, a GPU build of MLX) or ``MLX_GPT_NO_EXT=1`` is set, ``load()`` returns None
and ``mlx_gpt.cpu.ops`` runs MLX's own operations; ``status()`` says which path runs and why.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from ..native import Module
from .blas import cpu_flags


def arch_flags() -> str:
    """Instruction-set flags for this processor: AVX2 + FMA (x86-64-v3) where /proc/cpuinfo has them."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    flags = cpu_flags()
    if {"avx2", "fma", "bmi2", "f16c", "movbe"} <= flags:
        return "-march=x86-64-v3"
    if {"sse4_2", "popcnt", "ssse3"} <= flags:
        return "-march=x86-64-v2"
    return ""


def _smoke_test(module: ModuleType) -> None:
    """Raise unless the module takes and returns MLX arrays (it does not when nanobind's ABI differs)."""
    x = mx.array([-1.0, 0.0, 2.0])
    got = module.gelu_approx(x)
    mx.eval(got)
    if not mx.allclose(got, mx.array([-0.158808, 0.0, 1.954598]), atol=1e-5).item():
        raise RuntimeError("gelu_approx gave wrong values")


def _unavailable() -> str | None:
    gpus = (getattr(mx, name, None) for name in ("metal", "cuda"))
    if any(gpu is not None and gpu.is_available() for gpu in gpus):
        return "MLX has a GPU backend here (its own kernels run there)"
    if not hasattr(os, "sched_getaffinity") and sys.platform != "darwin":
        return f"unsupported platform {sys.platform}"
    return None


KERNELS = Module(
    "_mlx_gpt_ext", Path(__file__).resolve().parent / "ext", what="the C++ CPU kernels", built="C++ extension",
    fallback="pure MLX", key_parts=lambda: (mx.__version__, arch_flags()),
    cmake_args=lambda: (f"-DMLX_DIR={Path(mx.__file__).parent / 'share' / 'cmake' / 'MLX'}",
                        f"-DMLX_GPT_ARCH_FLAGS={arch_flags()}"),
    unavailable=_unavailable, smoke_test=_smoke_test)
load = KERNELS.load
status = KERNELS.status
