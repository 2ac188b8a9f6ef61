"""Matrix-vector products through BLAS gemv, for decoding one token at a time on MLX's CPU backend.

MLX's CPU backend sends every float32 matmul to ``cblas_sgemm``, and OpenBLAS's sgemm packs the
whole weight matrix even when the other operand is a single row, so it streams a decode
step's weights several times slower than ``cblas_sgemv`` (a minimal reproduction is ``a @ v`` on
a matrix far larger than the caches; ``python -m mlx_gpt.info`` measures the gemv rate). This module builds, once, a library of one function: a ``cblas_sgemm`` that hands
row-major products with one row or one column to ``cblas_sgemv`` and everything else to
OpenBLAS. ``blas.load_optimized_blas`` loads it ahead of OpenBLAS, so MLX links to it.

It is compiled with the system C compiler, which MLX's CPU backend already needs to build its
fused kernels, into a cache folder; without a compiler, MLX keeps calling OpenBLAS's sgemm.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..native import cache_dir, install_sealed, is_sealed, warn

SOURCE = r"""
#include <dlfcn.h>

/* CBLAS enums: CblasRowMajor 101, CblasNoTrans 111, CblasTrans 112 */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

int mlx_gpt_matvec_init(const char *blas_path) {
    void *h = dlopen(blas_path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen(blas_path, RTLD_NOW);
    if (!h) return 1;
    real_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(h, "cblas_sgemv");
    return real_sgemm && real_sgemv ? 0 : 2;
}

static void zero(float *y, int n, int inc) {
    for (int i = 0; i < n; ++i) y[(long)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (order == 101 && k > 0 && real_sgemv && (m == 1 || n == 1)) {
        /* gemv reads y when beta is 0 in some BLAS builds: an uninitialised NaN would survive */
        if (m == 1) {
            /* c (1 x n) = alpha op(a) (1 x k) op(b) (k x n) + beta c, i.e. c = op(b)^T a */
            if (beta == 0.0f) zero(c, n, 1);
            int incx = ta == 111 ? 1 : lda;
            if (tb == 111) real_sgemv(101, 112, k, n, alpha, b, ldb, a, incx, beta, c, 1);
            else real_sgemv(101, 111, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        } else {
            /* c (m x 1) = alpha op(a) (m x k) op(b) (k x 1) + beta c */
            if (beta == 0.0f) zero(c, m, ldc);
            int incx = tb == 111 ? ldb : 1;
            if (ta == 111) real_sgemv(101, 111, m, k, alpha, a, lda, b, incx, beta, c, ldc);
            else real_sgemv(101, 112, k, m, alpha, a, lda, b, incx, beta, c, ldc);
        }
        return;
    }
    real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


def build() -> Path | None:
    """The compiled library (built on first use, then cached), or None without a C compiler.

    A cached library whose size or SHA-256 differs from its record is rebuilt; if that fails,
    one warning says so and MLX keeps OpenBLAS's own sgemm.
    """
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = cache_dir() / f"libmlx_gpt_matvec-{digest}.so"
    if is_sealed(target):
        return target
    damaged = target.exists()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "matvec.c", Path(tmp) / target.name
            src.write_text(SOURCE)
            subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(out), "-ldl"], check=True,
                           capture_output=True, timeout=120)
            install_sealed(out, target)
    except (OSError, subprocess.SubprocessError) as e:
        if damaged:
            warn(f"the cached library {target} does not match its recorded size and SHA-256, and rebuilding it "
                 f"failed ({type(e).__name__}); matrix-vector products use OpenBLAS's sgemm")
        return None
    return target


def install(blas_path: str) -> str | None:
    """Load the gemv router into the global symbol scope, forwarding to the BLAS at ``blas_path``.

    Must run before that BLAS is exported globally and before ``mlx.core`` is imported: the
    first global ``cblas_sgemm`` is the one MLX links to. Returns the router's path, or None.
    """
    lib = build()
    if lib is None:
        return None
    try:
        router = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
        router.mlx_gpt_matvec_init.argtypes = [ctypes.c_char_p]
        if router.mlx_gpt_matvec_init(blas_path.encode()) != 0:
            return None
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # export its cblas_sgemm only once it works
    except OSError:
        return None
    return str(lib)
