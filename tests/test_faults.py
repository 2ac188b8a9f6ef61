"""Bad input and faults through every CLI, as a careless user or an unlucky machine causes them.

Each case runs a command in a subprocess and checks three things: the exit status, a single
``error:`` line (no traceback, no signal death), and that no file of the user's or of the last
good checkpoint changed (hashes before and after). Faults that cannot be caused from outside
(a full disk, a read-only file system) are injected by a small wrapper that patches the write
it names, or made real with a tiny tmpfs or a read-only bind mount where this machine allows it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "1", "--sample-tokens", "4", "--max-iters", "2", "--eval-interval", "2"]
CLIS = {"train": ["-m", "mlx_gpt.train"], "generate": ["-m", "mlx_gpt.generate"], "prepare": ["-m", "mlx_gpt.prepare"],
        "ladder": ["-m", "mlx_gpt.ladder"], "convert": [str(ROOT / "tools" / "convert.py")],
        "mlx-gpt": ["-m", "mlx_gpt"]}

# Patches one kind of write to fail with an errno, then runs the command as ``python -m`` would.
INJECT = r'''
import builtins, errno, io, os, runpy, sys
import mlx_gpt
import mlx.core as mx
code = getattr(errno, os.environ["FAULT_ERRNO"])
marker = os.environ["FAULT_PATH"]

def fail(path):
    raise OSError(code, os.strerror(code), str(path))

real_open = io.open
def open_(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and marker in str(file):
        fail(file)
    return real_open(file, mode, *a, **k)
builtins.open = io.open = open_
real_save = mx.save_safetensors
def save(file, *a, **k):
    if marker in str(file):
        fail(file)
    return real_save(file, *a, **k)
mx.save_safetensors = save
target = sys.argv[1]
sys.argv = sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
'''


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(name: str, *args, cwd: Path, stdin: bytes | None = None, fault: tuple[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one CLI; ``fault=(errno name, path fragment)`` makes writes to matching paths fail."""
    argv = [sys.executable, *CLIS[name], *map(str, args)]
    e = env()
    if fault is not None:
        (cwd / "inject.py").write_text(INJECT)
        target = CLIS[name][-1]
        argv = [sys.executable, str(cwd / "inject.py"), target, *map(str, args)]
        e.update(FAULT_ERRNO=fault[0], FAULT_PATH=fault[1])
    proc = subprocess.run(argv, cwd=cwd, env=e, input=stdin, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def digest(*paths: Path) -> dict[str, str]:
    """Every file under paths (hidden ones too), by path, with its hash."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def untouched(*paths: Path) -> Iterator[None]:
    """The block leaves every file under paths as it found them (digest before and after)."""
    before = digest(*paths)
    yield
    assert digest(*paths) == before


def expect_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert_one_line_error(proc, *fragments)


def expect_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr


def corpus_text() -> str:
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "to", "be", "or", "not"]
    return "\n".join(" ".join(rng.choice(words, 9)) + "." for _ in range(300)) + "\n"


class Base:
    """A finished tiny run (and its data) that cases copy before they touch it."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = root / "corpus.txt"
        self.corpus.write_text(corpus_text())
        self.data_dir = root / "data"
        self.run = root / "run"
        # a GPT-2, which every export takes
        proc = cli("train", "--data", self.corpus, "--data-dir", self.data_dir, "--out", self.run, "--model", "gpt",
                   *TINY, cwd=root)
        assert proc.returncode == 0, proc.stderr
        self.dataset = next(self.data_dir.iterdir())

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.run, dest)
        return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return Base(tmp_path_factory.mktemp("base"))


CASES: dict[str, Callable] = {}


def case(fn: Callable) -> Callable:
    CASES[fn.__name__] = fn
    return fn


def user_folder(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "thesis.md").write_text("# Chapter 1\nSix years of work.\n")
    (d / "notes").mkdir(exist_ok=True)
    (d / "notes" / "todo.txt").write_text("finish\n")
    return d


def train_in(t: Path, b: Base, *args, **kw) -> subprocess.CompletedProcess:
    return cli("train", "--data", b.corpus, "--data-dir", b.data_dir, *TINY, *args, cwd=t, **kw)


# ---------------------------------------------------------------------------- --out: the user's own folder


@case
def out_user_folder(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(train_in(t, b, "--out", user), "mine")


@case
def out_user_folder_overwrite(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(train_in(t, b, "--out", user, "--overwrite"), "mine")


@case
def out_user_folder_mlx_gpt_command(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(cli("mlx-gpt", "train", "--data", b.corpus, "--data-dir", b.data_dir, *TINY, "--out", user,
                         "--overwrite", cwd=t), "mine")


@case
def out_run_with_a_user_file_added(t, b):
    run = b.copy_run(t / "run")
    (run / "thesis.md").write_text("mine\n")
    with untouched(run):
        expect_error(train_in(t, b, "--out", run, "--overwrite"), "thesis.md")


@case
def out_dot_in_user_folder(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(train_in(user, b, "--out", "."))


@case
def out_dot_overwrite(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(train_in(user, b, "--out", ".", "--overwrite"))


@case
def out_parent_of_cwd(t, b):
    user = user_folder(t / "mine")
    (user / "sub").mkdir()
    with untouched(user):
        expect_error(train_in(user / "sub", b, "--out", "..", "--overwrite"))


@case
def out_is_a_file(t, b):
    (t / "results.csv").write_text("a,b\n1,2\n")
    with untouched(t / "results.csv"):
        expect_error(train_in(t, b, "--out", t / "results.csv", "--overwrite"), "results.csv")


@case
def out_under_a_file(t, b):
    (t / "results.csv").write_text("a,b\n")
    expect_error(train_in(t, b, "--out", t / "results.csv" / "run"), "results.csv")
    assert (t / "results.csv").read_text() == "a,b\n"


@case
def data_dir_is_a_file(t, b):
    (t / "data").write_text("mine\n")
    expect_error(cli("train", "--data", b.corpus, "--data-dir", t / "data", *TINY, "--out", t / "run", cwd=t), "data")
    assert (t / "data").read_text() == "mine\n" and not (t / "run").exists()


@case
def prepare_data_dir_is_a_file(t, b):
    (t / "data").write_text("mine\n")
    expect_error(cli("prepare", b.corpus, "--data-dir", t / "data", cwd=t), "data")
    assert (t / "data").read_text() == "mine\n"


@case
def ladder_out_user_folder(t, b):
    user = user_folder(t / "mine")
    (user / "ladder.json").write_text("{\"mine\": true}\n")
    with untouched(user):
        expect_error(cli("ladder", "--data", b.corpus, "--data-dir", b.data_dir, "--budgets", "0.2",
                         "--rungs", "ngram:1", "--out", user, cwd=t), "mine")


@case
def ladder_out_is_a_file(t, b):
    (t / "x").write_text("mine\n")
    expect_error(cli("ladder", "--data", b.corpus, "--data-dir", b.data_dir, "--budgets", "0.2", "--rungs", "ngram:1",
                     "--out", t / "x", cwd=t), "x")
    assert (t / "x").read_text() == "mine\n"


@case
def convert_out_user_folder_overwrite(t, b):
    user = user_folder(t / "mine")
    with untouched(user):
        expect_error(cli("convert", b.run, "--to", "hf", "--out", user, "--overwrite", cwd=t), "mine")


@case
def generate_checkpoint_is_a_user_folder(t, b):
    user = user_folder(t / "mine")
    expect_error(cli("generate", "--checkpoint", user, "--prompt", "hi", cwd=t), "mine")


# ---------------------------------------------------------------------------- --overwrite, then a mistake


def overwrite_then(t: Path, b: Base, *args, fault=None, fragment: str = "") -> None:
    run = b.copy_run(t / "run")
    with untouched(run):
        proc = train_in(t, b, "--out", run, "--overwrite", *args, fault=fault)
        expect_error(proc, fragment)


@case
def overwrite_preset_typo(t, b):
    overwrite_then(t, b, "--preset", "gpt5", fragment="preset")


@case
def overwrite_heads_do_not_divide(t, b):
    overwrite_then(t, b, "--n-embd", "100", "--n-head", "3", fragment="n_head")


@case
def overwrite_missing_data(t, b):
    overwrite_then(t, b, "--data", t / "missing.txt", fragment="missing.txt")


@case
def overwrite_binary_data(t, b):
    (t / "bin.txt").write_bytes(b"\xff\xfe\x00\x89PNG" * 100)
    overwrite_then(t, b, "--data", t / "bin.txt", fragment="UTF-8")


@case
def overwrite_negative_sample_tokens(t, b):
    overwrite_then(t, b, "--sample-tokens", "-1", fragment="--sample-tokens")


@case
def overwrite_bad_seed(t, b):
    overwrite_then(t, b, "--seed", "-1", fragment="--seed")


@case
def overwrite_huge_block(t, b):
    overwrite_then(t, b, "--block-size", "100000000", fragment="block")


@case
def overwrite_disk_full_at_first_save(t, b):
    overwrite_then(t, b, fault=("ENOSPC", "model.safetensors"), fragment="No space left")


@case
def overwrite_replaces_only_at_first_save(t, b):
    """A good --overwrite replaces the run, and its log holds only the new run's lines."""
    run = b.copy_run(t / "run")
    (run / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    expect_ok(train_in(t, b, "--out", run, "--overwrite"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 999 not in steps and steps and max(steps) == 2


# ---------------------------------------------------------------------------- token ids past the vocabulary


def write_token_file(path: Path, tokens: list[int], magic: int = 20240520, version: int = 1) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens)]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@case
def token_ids_past_byte_vocab(t, b):
    data = t / "bad"
    shutil.copytree(b.dataset, data)
    train = sorted(data.glob("*_train_*.bin"))[0]
    tokens = np.frombuffer(train.read_bytes()[1024:], dtype="<u2").copy()
    tokens[100] = 300
    write_token_file(train, tokens.tolist())
    expect_error(cli("train", "--data", data, *TINY, "--out", t / "run", cwd=t), "300")
    assert not (t / "run").exists()


@case
def token_id_65535_llmc_dataset(t, b):
    data = t / "llmc"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        tokens = rng.integers(0, 50257, 2000).tolist()
        tokens[7] = 65535
        write_token_file(data / f"tiny_{split}.bin", tokens)
    expect_error(cli("train", "--data", data, *TINY, "--out", t / "run", cwd=t), "65535")


@case
def token_ids_bad_on_resume(t, b):
    run = b.copy_run(t / "run")
    data = t / "data"
    shutil.copytree(b.data_dir, data)
    ds = next(data.iterdir())
    val = sorted(ds.glob("*_val_*.bin"))[0]
    tokens = np.frombuffer(val.read_bytes()[1024:], dtype="<u2").copy()
    tokens[3] = 5000
    write_token_file(val, tokens.tolist())
    with untouched(run):
        expect_error(cli("train", "--resume", "--out", run, "--data-dir", data, "--max-iters", "4", cwd=t), "5000")


# ---------------------------------------------------------------------------- two runs on one --out


def popen(*argv, cwd: Path, limit: float = 120, **kw) -> subprocess.Popen:
    """A CLI in the background, killed after ``limit`` seconds whatever happens (no case hangs)."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env(), stderr=subprocess.PIPE, text=True,
                            **kw)
    timer = threading.Timer(limit, proc.kill)
    timer.daemon = True
    timer.start()
    return proc


def start_training(t: Path, b: Base, out: Path, *extra) -> subprocess.Popen:
    args = ["--data", b.corpus, "--data-dir", b.data_dir, *TINY, "--max-iters", "100000", "--log-interval", "1",
            "--eval-interval", "100000", "--checkpoint-interval", "5", "--no-compile", "--out", out, *extra]
    return popen("-m", "mlx_gpt.train", *args, cwd=t)


def wait_for_step(proc: subprocess.Popen, step: int = 1) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith((f"step {step} ", f"step {step}:", f"step {step}/")):
            return lines
    raise AssertionError("".join(lines))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@case
def concurrent_runs_same_out(t, b):
    run = b.copy_run(t / "run")
    first = start_training(t, b, run, "--overwrite")
    try:
        wait_for_step(first, 6)  # its first checkpoint is in
        second = train_in(t, b, "--out", run, "--resume", "--max-iters", "50")
        expect_error(second, str(first.pid))
    finally:
        stop(first)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), steps


@case
def concurrent_overwrite_same_out(t, b):
    run = b.copy_run(t / "run")
    first = start_training(t, b, run, "--overwrite")
    try:
        wait_for_step(first, 1)
        second = train_in(t, b, "--out", run, "--overwrite")
        expect_error(second, str(first.pid))
    finally:
        stop(first)


@case
def generate_while_training(t, b):
    run = b.copy_run(t / "run")
    first = start_training(t, b, run, "--overwrite")
    try:
        wait_for_step(first, 6)
        expect_ok(cli("generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "3", "--seed", "1",
                      cwd=t))
    finally:
        stop(first)


@case
def stale_lock_of_a_dead_run(t, b):
    run = b.copy_run(t / "run")
    first = start_training(t, b, run, "--resume")
    wait_for_step(first, 3)
    first.kill()
    first.communicate()
    expect_ok(train_in(t, b, "--out", run, "--resume", "--max-iters", "4"))


# ---------------------------------------------------------------------------- the log matches the checkpoint


@case
def metrics_truncated_on_resume(t, b):
    run = b.copy_run(t / "run")
    with open(run / "metrics.jsonl", "a") as f:  # a killed run logged steps 3 and 4, saved neither
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    expect_ok(train_in(t, b, "--out", run, "--resume", "--max-iters", "4", "--log-interval", "1"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert [s for s, _ in losses] == sorted({s for s, _ in losses}), losses
    assert 9.0 not in [v for _, v in losses]


@case
def run_into_a_folder_of_run_like_files(t, b):
    """A folder is ours by the checkpoint we wrote in it, not by its files' names: a user's own
    metrics.jsonl and loss.png are kept, with --overwrite too."""
    run = t / "results"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 50, "loss": 9.0}) + "\n")
    (run / "loss.png").write_bytes(b"my picture")
    for extra in ((), ("--overwrite",)):
        expect_error(train_in(t, b, "--out", run, *extra), "but no mlx_gpt checkpoint")
    assert (run / "loss.png").read_bytes() == b"my picture" and "50" in (run / "metrics.jsonl").read_text()


@case
def metrics_write_fails(t, b):
    resume_with_fault(t, b, ("ENOSPC", "metrics.jsonl"), "No space left")


# ---------------------------------------------------------------------------- interrupted saves


def crashed_between_renames(t: Path, b: Base, with_log_line: bool) -> Path:
    """run/ moved to .run.old, the new one never renamed in (and maybe a log line since)."""
    b.copy_run(t / ".run.old")
    run = t / "run"
    if with_log_line:
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    (t / ".run.tmp-abc123").mkdir()
    (t / ".run.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    return run


@case
def old_generate(t, b):
    run = crashed_between_renames(t, b, False)
    expect_ok(cli("generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "3", "--seed", "1", cwd=t))


@case
def old_with_log_line_generate(t, b):
    run = crashed_between_renames(t, b, True)
    expect_ok(cli("generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "3", "--seed", "1", cwd=t))


@case
def old_with_log_line_load(t, b):
    run = crashed_between_renames(t, b, True)
    proc = subprocess.run([sys.executable, "-c", f"import mlx_gpt; m, tok = mlx_gpt.load({str(run)!r}); "
                                                 "print(m.num_params())"], cwd=t, env=env(), capture_output=True,
                          text=True, timeout=60)
    expect_ok(proc)


@case
def old_with_log_line_export(t, b):
    run = crashed_between_renames(t, b, True)
    expect_ok(cli("convert", run, "--to", "hf", "--out", t / "hf", "--quiet", cwd=t))


def resume_after_crash(t: Path, b: Base, with_log_line: bool) -> None:
    run = crashed_between_renames(t, b, with_log_line)
    expect_ok(train_in(t, b, "--out", run, "--resume", "--max-iters", "4"))
    assert json.loads((run / "state.json").read_text())["step"] == 4
    assert not (t / ".run.old").exists() and not list(t.glob(".run.tmp-*"))


@case
def old_resume(t, b):
    resume_after_crash(t, b, False)


@case
def old_with_log_line_resume(t, b):
    resume_after_crash(t, b, True)


@case
def stale_temp_folders_removed(t, b):
    run = b.copy_run(t / "run")
    (t / ".run.tmp-dead01").mkdir()
    (t / ".run.tmp-dead01" / "model.safetensors").write_bytes(b"half")
    expect_ok(train_in(t, b, "--out", run, "--resume", "--max-iters", "4"))
    assert not list(t.glob(".run.tmp-*"))


# ---------------------------------------------------------------------------- file system errors


def resume_with_fault(t: Path, b: Base, fault: tuple[str, str], fragment: str) -> None:
    """A resumed run whose next save meets the fault: one line, the run as it was, no temp left."""
    run = b.copy_run(t / "run")
    with untouched(run):
        expect_error(train_in(t, b, "--out", run, "--resume", "--max-iters", "4", fault=fault), fragment)
    assert not list(t.glob(".run.tmp-*"))


@case
def disk_full_at_save(t, b):
    resume_with_fault(t, b, ("ENOSPC", "model.safetensors"), "No space left")


@case
def disk_full_writing_config(t, b):
    resume_with_fault(t, b, ("ENOSPC", "config.json"), "No space left")


@case
def disk_full_prepare(t, b):
    proc = cli("prepare", b.corpus, "--data-dir", t / "data", fault=("ENOSPC", "_train_"), cwd=t)
    expect_error(proc, "No space left")
    assert not [p for p in (t / "data").rglob("*.bin")] if (t / "data").exists() else True


@case
def disk_full_convert(t, b):
    proc = cli("convert", b.run, "--to", "hf", "--out", t / "hf", "--quiet", fault=("ENOSPC", "model.safetensors"),
               cwd=t)
    expect_error(proc, "No space left")
    assert not (t / "hf").exists()


@case
def read_only_fs_injected(t, b):
    resume_with_fault(t, b, ("EROFS", "run"), "Read-only")


def mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@case
def disk_full_small_tmpfs(t, b):
    fs = t / "fs"
    fs.mkdir()
    size = sum(p.stat().st_size for p in b.run.iterdir()) * 3 // 2  # one checkpoint fits, two (at a swap) do not
    if not mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = b.copy_run(fs / "run")
        with untouched(run):
            proc = train_in(t, b, "--out", run, "--resume", "--max-iters", "4")
            expect_error(proc, "No space left")
        assert not list(fs.glob(".run.tmp-*"))
    finally:
        subprocess.run(["umount", str(fs)])


@pytest.fixture
def read_only_mount():
    mounted = []

    def make(path: Path) -> Path:
        if not (mount("--bind", str(path), str(path)) and mount("-o", "remount,bind,ro", str(path))):
            pytest.skip("cannot make a read-only bind mount here")
        mounted.append(path)
        return path

    yield make
    for p in mounted:
        subprocess.run(["umount", str(p)])


@case
def read_only_out(t, b, ro):
    run = b.copy_run(t / "ro" / "run")
    with untouched(run):
        ro(t / "ro")
        expect_error(train_in(t, b, "--out", run, "--resume", "--max-iters", "4"), "Read-only")


@case
def read_only_cwd_default_out(t, b, ro):
    cwd = t / "ro"
    cwd.mkdir()
    ro(cwd)
    expect_error(cli("train", "--data", b.corpus, "--data-dir", b.data_dir, *TINY, cwd=cwd), "Read-only")


@case
def read_only_data_dir(t, b, ro):
    data = t / "data"
    data.mkdir()
    ro(data)
    expect_error(cli("prepare", b.corpus, "--data-dir", data, cwd=t), "Read-only")


# ---------------------------------------------------------------------------- seeds, prompts, sample sizes


@case
def train_seed_negative(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--seed", "-1"), "--seed")
    assert not (t / "run").exists()


@case
def train_seed_huge(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--seed", str(2**70)), "--seed")


@case
def generate_seed_negative(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", "the", "--seed", "-1", cwd=t), "--seed")


@case
def generate_seed_huge(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", "the", "--seed", str(2**70), cwd=t), "--seed")


@case
def ladder_seed_negative(t, b):
    expect_error(cli("ladder", "--data", b.corpus, "--data-dir", b.data_dir, "--budgets", "0.2", "--rungs", "ngram:1",
                     "--out", t / "l", "--seed", "-1", cwd=t), "--seed")


def raw_args(*parts: bytes) -> list:
    return [os.fsdecode(p) for p in parts]  # as Python's argv holds undecodable bytes: surrogates


@case
def generate_prompt_invalid_utf8(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", *raw_args(b"caf\xe9"), "--seed", "1", cwd=t),
                 "UTF-8")


@case
def generate_stop_invalid_utf8(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", "the", "--stop", *raw_args(b"\xff"), "--seed",
                     "1", cwd=t), "UTF-8")


@case
def generate_prompt_stdin_invalid_utf8(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", "-", "--seed", "1", stdin=b"caf\xe9\n", cwd=t),
                 "UTF-8")


@case
def generate_interactive_invalid_utf8(t, b):
    proc = cli("generate", "--checkpoint", b.run, "--interactive", "--max-new-tokens", "2", "--seed", "1",
               stdin=b"caf\xe9\nthe\n", cwd=t)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1, proc.stderr
    assert proc.stdout.startswith("the"), proc.stdout


@case
def train_sample_prompt_invalid_utf8(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--sample-prompt", *raw_args(b"caf\xe9")), "UTF-8")
    assert not (t / "run").exists()


@case
def train_sample_tokens_negative(t, b):
    proc = train_in(t, b, "--out", t / "run", "--sample-tokens", "-1", "--max-iters", "100000")
    expect_error(proc, "--sample-tokens")
    assert not (t / "run").exists()


@case
def train_sample_interval_negative(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--sample-interval", "-5"), "--sample-interval")


@case
def prepare_corpus_not_utf8(t, b):
    (t / "x.txt").write_bytes(b"caf\xe9 " * 100)
    expect_error(cli("prepare", t / "x.txt", "--data-dir", t / "data", cwd=t), "UTF-8")


# ---------------------------------------------------------------------------- sizes no machine holds


@case
def generate_num_samples_huge(t, b):
    expect_error(cli("generate", "--checkpoint", b.run, "--prompt", "the", "--num-samples", "3000000", "--seed", "1",
                     cwd=t), "memory")


@case
def train_block_size_huge(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--block-size", "100000000"), "memory")


@case
def train_layers_huge(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--n-layer", "10000000"), "memory")


@case
def train_width_huge(t, b):
    expect_error(train_in(t, b, "--out", t / "run", "--n-embd", "4000000", "--n-head", "1"), "memory")


def huge_config(t: Path, b: Base, **model) -> Path:
    run = b.copy_run(t / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"].update(model)
    (run / "config.json").write_text(json.dumps(config))
    return run


@case
def checkpoint_layers_huge_generate(t, b):
    run = huge_config(t, b, n_layer=10**7)
    expect_error(cli("generate", "--checkpoint", run, "--prompt", "the", cwd=t), "memory")


@case
def checkpoint_layers_huge_resume(t, b):
    run = huge_config(t, b, n_layer=10**7)
    with untouched(run):
        expect_error(train_in(t, b, "--out", run, "--resume", "--max-iters", "4"), "memory")


@case
def checkpoint_layers_huge_init(t, b):
    run = huge_config(t, b, n_layer=10**7)
    expect_error(train_in(t, b, "--out", t / "ft", "--init", run), "memory")


@case
def checkpoint_vocab_huge_export(t, b):
    run = huge_config(t, b, vocab_size=10**12)
    expect_error(cli("convert", run, "--to", "llmc", "--out", t / "m.bin", cwd=t), "memory")


@case
def checkpoint_layers_negative(t, b):
    run = huge_config(t, b, n_layer=-3)
    expect_error(cli("generate", "--checkpoint", run, "--prompt", "the", cwd=t), "n_layer")


@case
def checkpoint_layers_float(t, b):
    run = huge_config(t, b, n_layer=1.5)
    expect_error(cli("generate", "--checkpoint", run, "--prompt", "the", cwd=t), "n_layer")


# ---------------------------------------------------------------------------- hostile converter inputs


def hf_dir(t: Path, **config) -> Path:
    """A small GPT-2 directory with a byte-level tokenizer, its config.json changed."""
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    d = t / "hf"
    d.mkdir()
    GPT2Tokenizer.from_token_bytes([bytes([i]) for i in range(256)]).write_files(d)
    base = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}
    (d / "config.json").write_text(json.dumps({**base, **config}))
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [256, 8], "data_offsets": [0, 8192]}}).encode()
    header += b" " * (-len(header) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8192))
    return d


def convert_in(t: Path, src: Path, *fragments: str, timeout: float = 60) -> None:
    start = time.perf_counter()
    proc = cli("convert", src, "--out", t / "out", "--quiet", cwd=t, timeout=timeout)
    expect_error(proc, *fragments)
    assert time.perf_counter() - start < timeout
    assert not (t / "out").exists()


@case
def hf_layers_huge(t, b):
    convert_in(t, hf_dir(t, n_layer=100000), "n_layer", timeout=30)


@case
def hf_width_float(t, b):
    convert_in(t, hf_dir(t, n_embd=8.7), "n_embd")


@case
def hf_layers_negative(t, b):
    convert_in(t, hf_dir(t, n_layer=-2), "n_layer")


@case
def hf_heads_bool(t, b):
    convert_in(t, hf_dir(t, n_head=True), "n_head")


@case
def hf_vocab_string(t, b):
    convert_in(t, hf_dir(t, vocab_size="256"), "vocab_size")


@case
def hf_width_huge(t, b):
    convert_in(t, hf_dir(t, n_embd=2**40, n_head=1), "does not match", timeout=30)


def llmc_file(t: Path, *, block=8, vocab=256, layers=1, heads=2, width=8, vp=256, version=3) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, version, block, vocab, layers, heads, width, vp]
    path = t / "model.bin"
    path.write_bytes(header.tobytes() + bytes(4096))
    return path


@case
def llmc_layers_huge(t, b):
    convert_in(t, llmc_file(t, layers=2_000_000), "2000000", timeout=30)


@case
def llmc_width_huge(t, b):
    convert_in(t, llmc_file(t, width=2**30, heads=1), "header", timeout=30)


@case
def llmc_negative_vocab(t, b):
    convert_in(t, llmc_file(t, vocab=-5), "corrupt")


@case
def safetensors_huge_shape(t, b):
    d = hf_dir(t)
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    convert_in(t, d, "model.safetensors")


@case
def token_file_header_huge_count(t, b):
    data = t / "bad"
    shutil.copytree(b.dataset, data)
    train = sorted(data.glob("*_train_*.bin"))[0]
    raw = bytearray(train.read_bytes())
    raw[8:12] = struct.pack("<i", 2**31 - 1)
    train.write_bytes(bytes(raw))
    expect_error(cli("train", "--data", data, *TINY, "--out", t / "run", cwd=t), train.name)


# ---------------------------------------------------------------------------- SentencePiece


@case
def sp_vocab_too_large_prepare(t, b):
    expect_error(cli("prepare", b.corpus, "--tokenizer", "sp:100000", "--data-dir", t / "data", cwd=t), "at most")
    assert "INTERNAL" not in (t / "x").name


@case
def sp_vocab_too_large_train(t, b):
    proc = cli("train", "--data", b.corpus, "--tokenizer", "sp:50000", "--data-dir", t / "data", *TINY,
               "--out", t / "run", cwd=t)
    expect_error(proc, "at most")
    assert "INTERNAL" not in proc.stderr


# ---------------------------------------------------------------------------- Ctrl-C


def interrupt_twice(proc: subprocess.Popen, gap: float) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def expect_interrupted(code: int, err: str) -> None:
    assert code == 130, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "error:" not in err, err


@case
def ctrl_c_twice_while_training(t, b):
    for gap in (0.0, 0.01, 0.05, 0.2):
        run = b.copy_run(t / f"run{gap}")
        proc = start_training(t, b, run, "--resume", "--checkpoint-interval", "1")
        wait_for_step(proc, 4)
        expect_interrupted(*interrupt_twice(proc, gap))
        json.loads((run / "config.json").read_text())  # a whole checkpoint is there
        assert (run / "model.safetensors").exists() and (run / "state.json").exists()


@case
def ctrl_c_twice_while_compiling(t, b):
    proc = popen("-m", "mlx_gpt.train", "--data", b.corpus, "--data-dir", b.data_dir, *TINY, "--max-iters", "1000",
                 "--out", t / "run", cwd=t)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("data:"):
            break
    expect_interrupted(*interrupt_twice(proc, 0.02))


@case
def ctrl_c_prepare_early(t, b):
    for delay in (1.0, 2.5):  # after Python's own start-up, which no program can guard
        proc = popen("-m", "mlx_gpt.prepare", b.corpus, "--tokenizer", "sp:300", "--data-dir", t / f"data{delay}",
                     cwd=t)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished first
        expect_interrupted(proc.returncode, err)
        assert "SentencePiece training failed" not in err


@case
def ctrl_c_generate(t, b):
    proc = popen("-m", "mlx_gpt.generate", "--checkpoint", b.run, "--prompt", "the", "--max-new-tokens", "100000",
                 "--seed", "1", cwd=t, stdout=subprocess.PIPE)
    proc.stdout.read(10)
    expect_interrupted(*interrupt_twice(proc, 0.01))


# ---------------------------------------------------------------------------- the table


NEEDS_RO = {n for n, f in CASES.items() if f.__code__.co_argcount == 3}


# cases that keep a training run going in the background while they act on it
SLOW = {"concurrent_runs_same_out", "concurrent_overwrite_same_out", "generate_while_training",
        "stale_lock_of_a_dead_run", "ctrl_c_twice_while_training", "ctrl_c_twice_while_compiling",
        "ctrl_c_prepare_early", "ctrl_c_generate"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_fault(name, tmp_path, base, request):
    fn = CASES[name]
    if name in NEEDS_RO:
        fn(tmp_path, base, request.getfixturevalue("read_only_mount"))
    else:
        fn(tmp_path, base)


def test_table_is_large_enough():
    assert len(CASES) >= 60
