"""Pictures of runs: loss.png is written at each evaluation, holds the run's own numbers, and
python -m mlx_gpt.plot overlays runs."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import assert_one_line_error, run_module
from mlx_gpt import plot


def fake_run(path, val, lr=1e-3, steps=(10, 20, 30)):
    path.mkdir(parents=True)
    lines = []
    for i, s in enumerate(steps):
        lines.append({"step": s, "loss": 3.0 - 0.1 * i, "norm": 1.0, "lr": lr * (1 - i / 10), "ms": 5, "tok_s": 9})
        lines.append({"step": s, "train_loss": 2.9 - 0.1 * i, "val_loss": val[i]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "config.json").write_text(json.dumps({"model": {"block_size": 64},
                                                  "train": {"batch_size": 4, "grad_accum": 2}}))
    return path


def test_the_picture_draws_the_runs_own_numbers(tmp_path):
    run = plot.read_run(fake_run(tmp_path / "a", [3.1, 2.5, 2.7]))
    assert run.best_val == (20, 2.5) and run.tokens_per_step == 4 * 2 * 64
    fig = plot.figure([run])
    loss_ax, lr_ax = fig.axes[:2]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_ax.lines}
    assert drawn["val loss"] == ([10, 20, 30], [3.1, 2.5, 2.7])
    assert drawn["train loss (logged)"][1] == [3.0, 2.9, 2.8]
    assert [line.get_ydata()[0] for line in loss_ax.lines if line.get_marker() == "*"] == [2.5]  # the best val
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), [1e-3, 9e-4, 8e-4])
    assert loss_ax.get_ylabel().startswith("loss") and lr_ax.get_ylabel() == "learning rate"
    assert any("tokens" in ax.get_xlabel() for ax in loss_ax.child_axes)  # steps read as tokens too


def test_cli_overlays_runs_into_a_png(tmp_path):
    a, b = fake_run(tmp_path / "lr-1e-3", [3.1, 2.5, 2.7]), fake_run(tmp_path / "lr-3e-4", [3.2, 3.0, 2.9], lr=3e-4)
    out = tmp_path / "both.png"
    proc = run_module("mlx_gpt.plot", str(a), str(b), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10  # drawn, not blank
    assert_one_line_error(run_module("mlx_gpt.plot", str(tmp_path / "nothing"), cwd=tmp_path), "no metrics.jsonl")


def test_the_picture_replaces_only_a_picture_it_drew(tmp_path):
    """--out takes a new path or a PNG plot drew before; never a user's file, a folder, a device,
    a link's target or a file inside a checkpoint (a run's weights)."""
    import os

    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer

    run = fake_run(tmp_path / "run", [3.1, 2.5, 2.7])
    ckpt = checkpoint.save(tmp_path / "ckpt", build(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1,
                                                              n_embd=8)), ByteTokenizer())
    weights = (ckpt / "model.safetensors").read_bytes()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my own picture")
    os.symlink(mine, tmp_path / "link.png")
    (tmp_path / "folder").mkdir()
    for out, message in [(ckpt / "model.safetensors", "inside the checkpoint"),
                         (mine, "was not written by mlx_gpt"), (tmp_path / "link.png", "not a regular file"),
                         (tmp_path / "folder", "not a regular file"), ("/dev/null", "not a regular file")]:
        assert_one_line_error(run_module("mlx_gpt.plot", str(run), "--out", str(out), cwd=tmp_path), message)
    assert (ckpt / "model.safetensors").read_bytes() == weights and mine.read_bytes() == b"my own picture"
    for _ in range(2):  # a picture plot drew is its own to draw again
        assert run_module("mlx_gpt.plot", str(run), "--out", "runs.png", cwd=tmp_path).returncode == 0
    assert plot.drawn_here(tmp_path / "runs.png")


@pytest.mark.slow
def test_training_writes_loss_png_at_each_evaluation(tmp_path, shakespeare):
    out = tmp_path / "run"
    proc = run_module("mlx_gpt.train", "--data", str(shakespeare), "--max-iters", "20", "--eval-interval", "10",
                      "--eval-iters", "2", "--batch-size", "4", "--block-size", "32", "--out", str(out),
                      "--data-dir", str(tmp_path / "data"), "--sample-tokens", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert imread(out / "loss.png").shape[0] > 300
    assert "step 10/20" in proc.stderr and "eta" in proc.stderr  # a log, not a terminal: whole lines
    from mlx_gpt import flags
    from mlx_gpt.training.config import TrainConfig

    ran = TrainConfig.of(**json.loads((out / "config.json").read_text())["train"])
    assert TrainConfig.of(**flags.read_toml(out / "train.toml", TrainConfig)) == ran  # --config reproduces it
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [plot.read_run(out).eval_val[i][1] for i in range(2)] == [e["val_loss"] for e in evals]


def test_a_log_scale_reads_in_plain_numbers(tmp_path):
    run = plot.read_run(fake_run(tmp_path / "a", [5.0, 1.2, 0.9], steps=(10, 20, 30)))
    fig = plot.figure([run])
    fig.canvas.draw()
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == "log"
    labels = [t.get_text() for t in loss_ax.get_yticklabels(minor=True) + loss_ax.get_yticklabels()]
    assert any(labels) and not any("10^" in t or "times" in t or "×" in t for t in labels), labels
