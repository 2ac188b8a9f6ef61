"""``python -m mlx_gpt.info``: what MLX runs on here, and how fast it multiplies and streams.

The two measurements are the ceilings the benchmark (tools/bench.py) divides by: training is
matrix products, so its utilisation is against the sgemm peak; decoding one token at a time
reads every weight once through matrix-vector products, so its bound is the rate at which
such a product streams a matrix far larger than the caches.
"""

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
    mx.eval(a, b)
    return 2 * n**3 / _best_seconds(lambda: mx.eval(a @ b), repeats) / 1e9


def sgemm_peak(repeats: int = 3) -> float:
    """The best float32 matmul throughput over sizes that fill the device (a GPU needs larger ones), GFLOP/s."""
    sizes = (2048, 4096, 8192) if mx.default_device().type == mx.DeviceType.gpu else (1024, 2048)
    return max(sgemm_gflops(n, repeats) for n in sizes)


def matvec_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s at which a matrix-vector product reads a float32 matrix far larger than the caches (best of repeats)."""
    cols = 4096
    rows = megabytes * 2**20 // 4 // cols
    a = mx.full((rows, cols), 0.5)
    v = mx.full((cols,), 0.25)
    mx.eval(a, v)
    return a.nbytes / _best_seconds(lambda: mx.eval(a @ v), repeats) / 1e9


def _best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.info", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="matrix size for the sgemm measurement")
    a = p.parse_args(argv)
    print(f"mlx {mx.__version__} on {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    print(f"device: {mx.default_device()}")
    print(f"blas: {blas_status()}")
    print(f"cpu kernels: {extension.status()}")
    print(f"sgemm {a.size}^3: {sgemm_gflops(a.size):.1f} GFLOP/s")
    print(f"matrix-vector read bandwidth: {matvec_bandwidth():.1f} GB/s")


if __name__ == "__main__":
    run_cli(main)
