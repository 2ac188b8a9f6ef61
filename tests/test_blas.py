import platform
import subprocess
import sys

import pytest

from mlx_gpt.blas import blas_status

linux_x86 = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                               reason="OpenBLAS is loaded on Linux x86_64 only")


@linux_x86
def test_openblas_is_loaded_before_mlx():
    assert blas_status().startswith("OpenBLAS")
    maps = open("/proc/self/maps").read()
    assert "libopenblas" in maps


@linux_x86
def test_openblas_gives_correct_matmuls():
    import mlx.core as mx
    import numpy as np

    a = mx.random.normal((300, 200), key=mx.random.key(0))
    b = mx.random.normal((200, 100), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(a @ b), np.array(a).astype(np.float64) @ np.array(b), rtol=1e-4, atol=1e-4)


@linux_x86
def test_importing_mlx_first_warns_once_with_the_fix():
    code = "import warnings; warnings.simplefilter('always'); import mlx.core; import mlx_gpt; import mlx_gpt.train"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("RuntimeWarning") == 1
    assert "import mlx_gpt first" in proc.stderr
