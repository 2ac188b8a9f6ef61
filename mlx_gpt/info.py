"""``python -m mlx_gpt.info``: what MLX runs on here, and how fast it multiplies matrices."""

from __future__ import annotations

import argparse
import platform
import time
from typing import Sequence

import mlx.core as mx

from .cpu import extension
from .cpu.blas import blas_status
from .errors import run_cli


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 n x n x n matmul throughput on the default device (best of repeats)."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.info", description=__doc__)
    p.add_argument("--size", type=int, default=2048, help="matrix size for the sgemm measurement")
    a = p.parse_args(argv)
    print(f"mlx {mx.__version__} on {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    print(f"device: {mx.default_device()}")
    print(f"blas: {blas_status()}")
    print(f"cpu kernels: {extension.status()}")
    print(f"sgemm {a.size}^3: {sgemm_gflops(a.size):.1f} GFLOP/s")


if __name__ == "__main__":
    run_cli(main)
