import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_gpt  # noqa: F401  (loads OpenBLAS before any test imports mlx.core)

ROOT = Path(__file__).resolve().parents[1]


DATA = ROOT / "tests" / "data"  # public files the tests read (see its README: sources and licences)


@pytest.fixture(scope="session")
def data_files() -> Path:
    return DATA


@pytest.fixture(scope="session")
def shakespeare(data_files) -> Path:
    return data_files / "tinyshakespeare.txt"


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, in cwd, capturing text output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, no traceback, one 'error:' line naming the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="session")
def sp_tokenizer():
    """A small SentencePiece BPE trained on English only, so accents, CJK and emoji fall back to bytes."""
    from mlx_gpt.tokenizer import SentencePieceTokenizer

    lines = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question.",
             "All the world's a stage, and all the men and women merely players."] * 40
    return SentencePieceTokenizer.train(lines, 300)


@pytest.fixture(scope="session")
def torch():
    """PyTorch, a test-only oracle: the tests that compare against it skip without it, no others."""
    return pytest.importorskip("torch")
