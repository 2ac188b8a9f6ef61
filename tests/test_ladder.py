import json
import math

import numpy as np
import pytest

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint, perplexity
from mlx_gpt.cpu import accelerate
from mlx_gpt.data import open_tokens, prepare
from mlx_gpt.errors import UserError
from mlx_gpt.ladder import LadderConfig, climb, main
from mlx_gpt.ladder_report import best_by_budget, plot
from mlx_gpt.models.rungs import LEARNING_RATE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCK = 32


def small(tmp_path, data_files, **kw) -> LadderConfig:
    """A study of seconds' work: token budgets (reproducible), a short block, a two-trial search."""
    base = dict(data=str(data_files / "the-verdict.txt"), unit="tokens", budgets=(1024.0, 4096.0),
                rungs=("unigram", "kneser-ney:3", "bengio", "gpt"), batch_sizes=(4, 8), lr_scales=(1.0,),
                block_size=BLOCK, sample_tokens=8, data_dir=str(tmp_path / "data"), out=str(tmp_path / "ladder"))
    return LadderConfig(**{**base, **kw})


@pytest.mark.slow
def test_study_trains_each_neural_rung_at_every_budget_through_train(tmp_path, data_files, capsys):
    out = tmp_path / "ladder"
    main(["--data", str(data_files / "the-verdict.txt"), "--unit", "tokens", "--budgets", "1024,4096",
          "--rungs", "unigram,kneser-ney:3", "bengio", "gpt", "--batch-sizes", "4,8", "--lr-scales", "1",
          "--block-size", str(BLOCK), "--sample-tokens", "8", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in printed[0].split("|")[1:-1]] == ["rung", "params", "1024 tokens", "4096 tokens"]
    assert [line.split("|")[1].strip() for line in printed[2:7]] == ["unigram", "kneser-ney:3", "bengio", "gpt",
                                                                     "best"]
    report = json.loads((out / "ladder.json").read_text())
    assert set(report["method"]) == {"search", "schedule"}
    rungs = {r["rung"]: r for r in report["rungs"]}
    for name in ("bengio", "gpt"):
        r = rungs[name]
        # the smallest budget searches the grid; the larger one tries its winner and half its rate
        first, second = ([t for t in r["search"] if t["budget"] == b] for b in (1024.0, 4096.0))
        assert sorted((t["batch_size"], t["learning_rate"]) for t in first) == [(4, LEARNING_RATE[name]),
                                                                                (8, LEARNING_RATE[name])]
        winner = min(first, key=lambda t: t["search_loss"])
        assert [(t["batch_size"], t["learning_rate"]) for t in second] == [
            (winner["batch_size"], winner["learning_rate"]), (winner["batch_size"], winner["learning_rate"] / 2)]
        # each point is its budget's best trial by val-head loss, trained through train(): its steps fill the budget
        assert [p["budget"] for p in r["points"]] == [1024.0, 4096.0]
        for p, trials in zip(r["points"], (first, second)):
            best = min(trials, key=lambda t: t["search_loss"])
            B = best["batch_size"]
            assert (p["batch_size"], p["learning_rate"], p["seconds"]) == (B, best["learning_rate"], best["seconds"])
            assert p["steps"] == round(p["budget"] / (B * BLOCK))
            assert p["tokens"] == p["steps"] * B * BLOCK and p["flops"] == p["tokens"] * r["flops_per_token"]
            saved = json.loads((out / name / f"{p['budget']:g}tokens" / "config.json").read_text())["train"]
            assert saved["max_iters"] == p["steps"] and saved["lr_decay_iters"] is None  # the cosine ends there
            assert saved["learning_rate"] == p["learning_rate"] and saved["batch_size"] == B
            assert saved["min_lr"] == pytest.approx(saved["learning_rate"] / 10)
        assert r["points"][1]["val_loss"] < r["points"][0]["val_loss"]  # four times the tokens pay
    # every point's loss is exact: the whole val split, scored again from its checkpoint
    val = open_tokens(prepare(str(data_files / "the-verdict.txt"), "byte", data_dir=str(tmp_path / "data")).val_file)
    for r in report["rungs"]:
        for p in r["points"]:
            model, tok = checkpoint.load(p["checkpoint"])
            again = perplexity.score(accelerate(model), val, tok)
            assert p["val_loss"] == pytest.approx(again.loss, rel=1e-5)
            assert p["val_tokens"] == again.tokens
            assert p["bits_per_byte"] == pytest.approx(p["val_loss"] * p["val_tokens"] / p["val_bytes"] / math.log(2))
    assert not (out / "bengio" / "search").exists()  # the losing trials are gone, the winner is a point
    # the best row names, per budget, the lowest loss among what that budget affords: a count rung
    # reads the whole train split (more tokens than these budgets), so only neural points compete here
    best = best_by_budget(report)
    everything = [p for r in report["rungs"] for p in r["points"]]
    for budget, (name, point) in best.items():
        affordable = [p["val_loss"] for p in everything if p["budget"] == budget or p["tokens"] <= budget]
        assert point["val_loss"] == min(affordable) and point["budget"] == budget
    assert best_by_budget({**report, "study": {**report["study"], "budgets": [1e9]}})[1e9][0] == "kneser-ney:3"
    assert [c.strip() for c in printed[6].split("|")[3:-1]] == [best[1024.0][0], best[4096.0][0]]
    # on the same text, counting more context pays
    assert rungs["kneser-ney:3"]["points"][0]["val_loss"] < rungs["unigram"]["points"][0]["val_loss"]


def test_picture_draws_the_exact_values_of_ladder_json(tmp_path, data_files):
    cfg = small(tmp_path, data_files, rungs=("unigram", "bigram", "gpt"), batch_sizes=(4,), sample_tokens=0)
    climb(cfg, say=lambda s: None)
    out = tmp_path / "ladder"
    assert (out / "ladder.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads((out / "ladder.json").read_text())
    fig = plot(report, tmp_path / "again.png")
    seconds, flops = fig.axes[0], fig.axes[1]
    for ax, key in ((seconds, "seconds"), (flops, "flops")):
        assert ax.get_xscale() == "log"
        lines = {line.get_label().removesuffix(" (counted)"): line for line in ax.get_lines()}
        assert set(lines) == {"unigram", "bigram", "gpt"}
        for r in report["rungs"]:
            points = sorted(r["points"], key=lambda p: -1 if p["budget"] is None else p["budget"])
            np.testing.assert_array_equal(lines[r["rung"]].get_xdata(), [p[key] for p in points])
            np.testing.assert_array_equal(lines[r["rung"]].get_ydata(), [p["val_loss"] for p in points])
        assert len(lines["gpt"].get_xdata()) == 2 and len(lines["unigram"].get_xdata()) == 1
    import matplotlib.image

    image = matplotlib.image.imread(out / "ladder.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, data_files):
    whole = small(tmp_path, data_files, rungs=("unigram", "bengio", "gpt"), out=str(tmp_path / "whole"))
    expected_messages = []
    expected = climb(whole, say=expected_messages.append)

    cut = small(tmp_path, data_files, rungs=("unigram", "bengio", "gpt"), out=str(tmp_path / "cut"))
    seen = []

    def interrupt_in_gpts_search(message: str) -> None:  # Ctrl-C after bengio and one trial of gpt
        seen.append(message)
        if message.startswith("gpt: search") and sum(m.startswith("gpt: search") for m in seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        climb(cut, say=interrupt_in_gpts_search)
    saved = json.loads((tmp_path / "cut" / "ladder.json").read_text())
    finished = {r["rung"]: r for r in saved["rungs"]}
    assert len(finished["gpt"]["search"]) == 1 and not finished["gpt"]["points"]

    with pytest.raises(UserError, match="already holds a study"):
        climb(cut, say=lambda s: None)
    messages = []
    resumed = climb(LadderConfig(**{**cut.__dict__, "resume": True}), say=messages.append)
    assert not any(m.startswith(("unigram: counted", "bengio: search")) for m in messages)  # not redone
    trials = sum(m.startswith("gpt: search") for m in expected_messages)
    assert trials == 4  # two at each budget
    assert sum(m.startswith("gpt: search") for m in messages) == trials - 1  # all but the finished trial
    got = {r["rung"]: r for r in resumed["rungs"]}
    for name in ("unigram", "bengio"):  # the finished part, exactly as it was saved
        assert got[name] == finished[name]
    assert got["gpt"]["search"][0] == finished["gpt"]["search"][0]
    # and the whole equals an uninterrupted study: token budgets are reproducible
    for r, e in zip(resumed["rungs"], expected["rungs"]):
        assert [p["val_loss"] for p in r["points"]] == pytest.approx([p["val_loss"] for p in e["points"]], rel=1e-6)
        assert [(p.get("batch_size"), p.get("learning_rate")) for p in r["points"]] == \
            [(p.get("batch_size"), p.get("learning_rate")) for p in e["points"]]

    # a resumed study keeps its settings
    with pytest.raises(UserError, match="--budgets differs"):
        climb(LadderConfig(**{**cut.__dict__, "resume": True, "budgets": (1024.0, 8192.0)}), say=lambda s: None)


def test_resume_from_the_command_line_reads_the_study(tmp_path, data_files, capsys):
    cfg = small(tmp_path, data_files, rungs=("unigram", "bigram"))
    climb(cfg, say=lambda s: None)
    report = main(["--resume", "--out", cfg.out])  # nothing left to do: the table again
    assert [r["rung"] for r in report["rungs"]] == ["unigram", "bigram"]
    assert "| unigram" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--budgets", "0"], "--budgets must be positive"),
    (["--budgets", "10,-5"], "--budgets must be positive"),
    (["--budgets", "10,10"], "listed twice"),
    (["--rungs", "unigram,gpt3"], "unknown rung 'gpt3'"),
    (["--rungs", "ngram:0"], "n must be at least 1"),
    (["--rungs", "lstm", "--block-size", "100000"], "longer than the data"),
    (["--rungs", "kneser-ney:99999"], "longer than the data"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--resume"], "holds no study to resume"),
])
def test_bad_input_is_a_user_error(args, message, tmp_path, data_files):
    with pytest.raises(UserError, match=message):
        main(["--data", str(data_files / "the-verdict.txt"), "--data-dir", str(tmp_path / "data"),
              "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()  # refused before anything is trained or written


def test_refuses_a_folder_that_is_not_a_study(tmp_path, data_files):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a ladder study"):
        climb(small(tmp_path, data_files, out=str(theirs)), say=lambda s: None)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_cli_bad_input_is_one_line(tmp_path, data_files):
    proc = run_module("mlx_gpt.ladder", "--data", str(data_files / "the-verdict.txt"), "--budgets", "0",
                      "--data-dir", str(tmp_path / "data"), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "--budgets")


@pytest.mark.slow
def test_gpt_beats_unigram_by_far_on_tiny_shakespeare(tmp_path, shakespeare):
    # a shorter block and val split keep the test near a minute on two busy cores
    report = climb(LadderConfig(data=str(shakespeare), rungs=("unigram", "gpt"), budgets=(40.0,), batch_sizes=(8,),
                                lr_scales=(1.0,), block_size=64, val_fraction=0.05, sample_tokens=0,
                                data_dir=str(tmp_path / "data"), out=str(tmp_path / "out")), say=print)
    unigram, gpt = (r["points"][0]["bits_per_byte"] for r in report["rungs"])
    assert 4.5 < unigram < 5.0  # the byte entropy of Shakespeare's letters
    assert gpt < unigram - 0.6


def test_resume_keeps_a_point_moved_but_not_yet_saved(tmp_path, data_files):
    # the winning trial's run had moved to its point's folder when the study stopped, before ladder.json said so
    cfg = small(tmp_path, data_files, rungs=("gpt",), batch_sizes=(4,), budgets=(1024.0,), sample_tokens=0)
    done = climb(cfg, say=lambda s: None)
    report = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    point = report["rungs"][0]["points"].pop()
    (tmp_path / "ladder" / "ladder.json").write_text(json.dumps(report))
    messages = []
    resumed = climb(LadderConfig(**{**cfg.__dict__, "resume": True}), say=messages.append)
    assert not any("search at" in m or "training for" in m for m in messages)  # nothing trained again
    again = resumed["rungs"][0]["points"][0]
    assert again["checkpoint"] == point["checkpoint"] and again["val_loss"] == done["rungs"][0]["points"][0]["val_loss"]


def test_a_diverging_trial_loses_the_search_and_the_study_goes_on(tmp_path, data_files):
    cfg = small(tmp_path, data_files, rungs=("gpt",), budgets=(2048.0,), batch_sizes=(4,), lr_scales=(1.0, 1e5))
    report = climb(cfg, say=lambda s: None)
    search = report["rungs"][0]["search"]
    assert [t.get("diverged") is not None for t in search] == [False, True]
    assert "training diverged" in search[1]["diverged"]
    point = report["rungs"][0]["points"][0]
    assert point["learning_rate"] == search[0]["learning_rate"] and math.isfinite(point["val_loss"])
