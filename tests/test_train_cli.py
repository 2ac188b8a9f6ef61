"""The train CLI as a user meets it: bad input gives one line and a non-zero exit, never damage."""

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig

TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "4",
              "--eval-iters", "1", "--sample-tokens", "4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shakespeare):
    """A finished tiny run every case can point at."""
    d = tmp_path_factory.mktemp("base")
    train(TrainConfig.of(data=str(shakespeare), data_dir=str(d / "data"), out=str(d / "run"), n_layer=1, n_head=2,
                      n_embd=16, block_size=32, batch_size=4, max_iters=2, eval_interval=2, eval_iters=1,
                      sample_tokens=4), progress=False)
    return d


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def train_cli(cwd, *args):
    return run_module("mlx_gpt.train", "--max-iters", "2", *TINY_FLAGS, *args, cwd=cwd)


def test_missing_corpus(tmp_path):
    assert_one_line_error(train_cli(tmp_path, "--data", "missing.txt"), "missing.txt", "not found")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(train_cli(tmp_path, "--data", "empty.txt"), "empty")


def test_unreadable_corpus(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    assert_one_line_error(train_cli(tmp_path, "--data", "binary.txt"), "not UTF-8")
    (tmp_path / "nothing").mkdir()
    assert_one_line_error(train_cli(tmp_path, "--data", "nothing"), "no .txt files")


def test_corpus_shorter_than_one_block(tmp_path):
    (tmp_path / "short.txt").write_text("To be or not to be, that is the question.\n")
    assert_one_line_error(train_cli(tmp_path, "--data", "short.txt"), "fewer than one block")


def test_n_embd_not_divisible_by_n_head(tmp_path, shakespeare):
    proc = train_cli(tmp_path, "--data", str(shakespeare), "--n-embd", "30", "--n-head", "4")
    assert_one_line_error(proc, "n_embd (30)", "n_head (4)")


def test_block_size_beyond_the_model_positions(tmp_path, base_run, shakespeare):
    proc = train_cli(tmp_path, "--data", str(shakespeare), "--init", str(base_run / "run"), "--block-size", "64")
    assert_one_line_error(proc, "--block-size 64", "32 positions")


def test_existing_run_is_never_overwritten_unasked(tmp_path, base_run, shakespeare):
    before = tree_digest(base_run / "run")
    proc = train_cli(tmp_path, "--data", str(shakespeare), "--out", str(base_run / "run"))
    assert_one_line_error(proc, "already holds a run", "--resume", "--overwrite", "another --out")
    assert tree_digest(base_run / "run") == before


def test_resume_with_a_different_model_config(tmp_path, base_run, shakespeare):
    before = tree_digest(base_run / "run")
    proc = run_module("mlx_gpt.train", "--resume", "--out", str(base_run / "run"), "--n-layer", "3",
                      "--max-iters", "4", cwd=tmp_path)
    assert_one_line_error(proc, "--n-layer 3", "differs")
    assert tree_digest(base_run / "run") == before


@pytest.mark.parametrize("victim,cut", [("model.safetensors", 200), ("optimizer.safetensors", 50),
                                        ("state.json", 5), ("config.json", 10)])
def test_corrupt_or_truncated_checkpoint(tmp_path, base_run, victim, cut):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(base_run / "run", run)
    data = (run / victim).read_bytes()
    (run / victim).write_bytes(data[:cut])
    before = tree_digest(run)
    proc = run_module("mlx_gpt.train", "--resume", "--out", str(run), "--max-iters", "4", cwd=tmp_path)
    assert_one_line_error(proc, victim)
    assert tree_digest(run) == before


def test_truncated_token_file(tmp_path, base_run):
    import shutil

    data = tmp_path / "prepared"
    shutil.copytree(base_run / "data" / "tinyshakespeare-byte", data)
    val = sorted(data.glob("*_val_*.bin"))[0]
    val.write_bytes(val.read_bytes()[:5000])
    assert_one_line_error(train_cli(tmp_path, "--data", str(data)), val.name, "truncated")


def test_bad_flags_and_values(tmp_path, shakespeare):
    assert_one_line_error(train_cli(tmp_path, "--data", str(shakespeare), "--preset", "gpt5"), "unknown preset")
    assert_one_line_error(train_cli(tmp_path, "--data", str(shakespeare), "--tokenizer", "wordpiece"),
                          "unknown tokenizer")
    assert_one_line_error(train_cli(tmp_path, "--data", str(shakespeare), "--batch-size", "0"), "--batch-size")


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, shakespeare):
    flags = ["--data", str(shakespeare), "--data-dir", str(tmp_path / "data"), *TINY_FLAGS, "--max-iters", "60",
             "--log-interval", "1", "--eval-interval", "1000", "--checkpoint-interval", "1000",
             "--dropout", "0.1", "--lr-decay-iters", "60"]
    whole = run_module("mlx_gpt.train", *flags, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gpt.train", *flags, "--out", str(tmp_path / "cut")],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 10/"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: saved step" in err and "Traceback" not in err
    saved = json.loads((tmp_path / "cut" / "state.json").read_text())["step"]
    assert 10 <= saved < 60
    resumed = run_module("mlx_gpt.train", "--resume", "--out", str(tmp_path / "cut"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    def losses(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
