"""The compiled-kernel cache: a library is loaded only when it matches the size and SHA-256 its build
recorded; a damaged one is rebuilt, and a failed rebuild leaves the pure path with one warning.

Every case runs in a cache of its own (``MLX_GPT_CACHE_DIR``), never the user's, and in a
subprocess: loading a damaged library kills the process that loads it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mlx_gpt import native
from mlx_gpt.native import install_sealed, is_sealed

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

# a product through the router (one row) and one the router leaves to sgemm, checked against numpy
MATVEC = """
import numpy as np
import mlx_gpt
import mlx.core as mx
from mlx_gpt.cpu import blas
print(blas.blas_status())
rng = np.random.default_rng(0)
a, v, m = (rng.standard_normal(s).astype(np.float32) for s in ((64, 300), (1, 300), (5, 300)))
for x in (v, m):
    got = np.array(mx.array(x) @ mx.array(a).T)
    assert np.allclose(got, x @ a.T, atol=1e-4), "wrong product"
print("products ok")
"""


def run(script: str, cache: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), native.CACHE_ENV: str(cache), **env}
    return subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, timeout=300)


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "flipped":
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid : mid + 512]) + raw[mid + 512 :])
    else:
        path.write_bytes(b"")


def test_a_sealed_library_is_checked_by_size_and_hash(tmp_path):
    built = tmp_path / "built.so"
    built.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    target = tmp_path / "cache" / "lib.so"
    target.parent.mkdir()
    assert not is_sealed(target)
    install_sealed(built, target)
    assert is_sealed(target) and target.read_bytes() == built.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["lib.so", "lib.so.sha256"]  # nothing staged left
    for how in ("truncated", "flipped", "empty"):
        install_sealed(built, target)
        damage(target, how)
        assert not is_sealed(target), how
    install_sealed(built, target)
    (target.parent / "lib.so.sha256").unlink()
    assert not is_sealed(target)  # a library without a record (built before records were kept) is rebuilt


@needs_cc
@pytest.mark.parametrize("how", ["truncated", "flipped", "empty"])
def test_a_damaged_matvec_library_is_rebuilt_and_products_are_right(tmp_path, how):
    first = run(MATVEC, tmp_path)
    assert first.returncode == 0 and "via sgemv" in first.stdout, first.stderr
    (lib,) = tmp_path.glob("libmlx_gpt_matvec-*.so")
    damage(lib, how)
    proc = run(MATVEC, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "via sgemv" in proc.stdout and "products ok" in proc.stdout
    assert is_sealed(lib) and "warning" not in proc.stderr


@needs_cc
def test_a_failed_rebuild_of_the_matvec_library_warns_once_and_uses_sgemm(tmp_path):
    assert run(MATVEC, tmp_path).returncode == 0
    (lib,) = tmp_path.glob("libmlx_gpt_matvec-*.so")
    damage(lib, "truncated")
    proc = run(MATVEC, tmp_path, CC="/bin/false")
    assert proc.returncode == 0, proc.stderr
    assert "products ok" in proc.stdout and "via sgemv" not in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(lib) in warnings[0], proc.stderr


# The C++ extension takes a minute or more to compile, so its rebuild here is a copy of the library
# this process already built (or the failure of one): what is checked is the cache's handling.
EXTENSION = """
import os, shutil, subprocess, sys
from pathlib import Path
import mlx_gpt
import mlx.core as mx
from mlx_gpt.cpu import extension

def compile_(tmp, log):
    if os.environ["GOOD"] == "fail":
        raise subprocess.CalledProcessError(1, "cmake")
    return Path(shutil.copy(os.environ["GOOD"], tmp))

extension.KERNELS.compile = compile_
module = extension.load()
print(extension.status())
if module is not None:
    got = module.gelu_approx(mx.array([-1.0, 0.0, 2.0]))
    assert mx.allclose(got, mx.array([-0.158808, 0.0, 1.954598]), atol=1e-5).item()
    print("gelu ok")
"""


@pytest.fixture(scope="module")
def built_extension() -> Path:
    from mlx_gpt.cpu import extension

    if extension.load() is None:
        pytest.skip(f"the C++ kernels are not built here: {extension.status()}")
    return Path(extension.status().split("(", 1)[1].rstrip(")"))


def planted(cache: Path, good: Path, how: str) -> Path:
    cache.mkdir(exist_ok=True)
    target = cache / good.name
    shutil.copyfile(good, target)
    damage(target, how)
    return target


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty"])
def test_a_damaged_extension_is_rebuilt_before_it_is_loaded(tmp_path, built_extension, how):
    target = planted(tmp_path, built_extension, how)
    proc = run(EXTENSION, tmp_path, GOOD=str(built_extension))
    assert proc.returncode == 0, proc.stderr  # loading the damaged file would have died of SIGBUS or SIGSEGV
    assert "gelu ok" in proc.stdout and "C++ extension" in proc.stdout
    assert "do not match their recorded size and SHA-256; rebuilding" in proc.stderr
    assert is_sealed(target) and target.read_bytes() == built_extension.read_bytes()
    again = run(EXTENSION, tmp_path, GOOD="fail")  # sealed now: loaded as it is, nothing rebuilt
    assert again.returncode == 0 and "gelu ok" in again.stdout and again.stderr == "", again.stderr


def test_a_failed_rebuild_of_the_extension_warns_once_and_runs_pure_mlx(tmp_path, built_extension):
    target = planted(tmp_path, built_extension, "truncated")
    proc = run(EXTENSION, tmp_path, GOOD="fail")
    assert proc.returncode == 0, proc.stderr
    assert "pure MLX (the build failed" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "pure MLX runs instead" in warnings[0], proc.stderr
    assert not target.exists()  # the damaged library is gone; the failure is remembered, not retried
    later = run(EXTENSION, tmp_path, GOOD=str(built_extension))
    assert later.returncode == 0 and "an earlier build failed" in later.stdout and "warning" not in later.stderr
