import shutil

import mlx_gpt  # noqa: F401  (loads OpenBLAS, and the gemv router, before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt.cpu.blas import _state, blas_status

needs_router = pytest.mark.skipif(not _state.get("matvec"), reason="no OpenBLAS or no C compiler here")


@pytest.mark.parametrize("m,n,k", [(1, 2304, 768), (2304, 1, 768), (1, 1, 5), (1, 7, 1), (3, 4, 5)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_products_with_one_row_or_column_are_exact(m, n, k, ta, tb):
    rng = np.random.default_rng(m * 7 + n + k)
    a = rng.normal(size=(k, m) if ta else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if tb else (k, n)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    A = mx.array(a).T if ta else mx.array(a)
    B = mx.array(b).T if tb else mx.array(b)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    np.testing.assert_allclose(np.array(A @ B), want, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.array(mx.addmm(mx.array(bias), A, B)), want + bias, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.array(mx.addmm(mx.array(bias), A, B, alpha=0.5, beta=2.0)), 0.5 * want + 2 * bias,
                               atol=1e-4, rtol=1e-5)


def test_output_buffers_are_not_read_when_beta_is_zero():
    # a freed buffer full of NaN, reused for the output of a matrix-vector product
    junk = mx.full((2304,), np.nan)
    mx.eval(junk)
    del junk
    w = mx.random.normal((2304, 768), key=mx.random.key(0))
    x = mx.random.normal((1, 768), key=mx.random.key(1))
    assert not np.isnan(np.array(x @ w.T)).any()


@needs_router
def test_router_is_reported():
    assert "sgemv" in blas_status()


@needs_router
def test_mlx_links_to_the_router():
    # MLX resolved cblas_sgemm from the global scope when mlx.core was imported: the first
    # global definition must be the router's, not OpenBLAS's
    import ctypes

    glob = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    router = ctypes.cast(ctypes.CDLL(_state["matvec"]).cblas_sgemm, ctypes.c_void_p).value
    blas = ctypes.cast(ctypes.CDLL(_state["blas"]).cblas_sgemm, ctypes.c_void_p).value
    assert glob == router != blas


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_build_is_cached(tmp_path, monkeypatch):
    from mlx_gpt.cpu import matvec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = matvec.build()
    assert first is not None and first.exists() and first.parent == tmp_path / "mlx_gpt"
    mtime = first.stat().st_mtime_ns
    assert matvec.build() == first and first.stat().st_mtime_ns == mtime
