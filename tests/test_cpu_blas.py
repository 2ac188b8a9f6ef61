import platform
import subprocess
import sys

import pytest

from mlx_gpt.cpu.blas import blas_status

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


def test_mlx_without_a_backend_says_which_extra_to_install():
    # what `pip install mlx` alone gives on Linux: mlx.core fails to find libmlx.so
    code = ("import sys\n"
            "class NoBackend:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mlx.core':\n"
            "            raise ImportError('libmlx.so: cannot open shared object file')\n"
            "sys.meta_path.insert(0, NoBackend())\n"
            "import mlx_gpt\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MLX cannot load its backend (libmlx.so" in proc.stderr
    assert ".[cpu]" in proc.stderr and ".[cuda12]" in proc.stderr


def test_fastest_threads_measures_one_against_many_and_leaves_the_setting():
    from mlx_gpt.cpu.blas import fastest_threads, get_blas_threads

    before = get_blas_threads()
    assert fastest_threads(256, 64, 1) == 1
    assert fastest_threads(256, 64, 3) in (1, 3)
    assert get_blas_threads() == before
