import json
import math

import pytest

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint
from mlx_gpt.errors import UserError
from mlx_gpt.ladder import LadderConfig, climb, lr_at, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_ladder_on_a_small_corpus_writes_table_json_and_png(tmp_path, shared_data, capsys):
    out = tmp_path / "ladder"
    rungs = ["unigram", "bigram", "kneser-ney:3", "bengio", "gpt"]
    main(["--data", str(shared_data / "the-verdict.txt"), "--budget", "0.5", "--rungs", ",".join(rungs[:3]),
          *rungs[3:], "--block-size", "32", "--batch-size", "8", "--sample-tokens", "16",
          "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["rung", "params", "train time", "tok/s", "val loss",
                                                              "val ppl", "bits per byte"]
    assert [line.split("|")[1].strip() for line in table[2:]] == rungs

    report = json.loads((out / "ladder.json").read_text())
    assert [r["rung"] for r in report["rungs"]] == rungs
    by_name = {r["rung"]: r for r in report["rungs"]}
    for r in report["rungs"]:
        assert r["bits_per_byte"] == pytest.approx(r["val_loss"] * r["val_tokens"] / r["val_bytes"] / math.log(2))
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["params"] > 0 and r["train_time"] > 0 and isinstance(r["sample"], str)
        model, _ = checkpoint.load(r["checkpoint"])  # every rung is an ordinary checkpoint
        assert model.num_params() == r["params"]
    assert by_name["bengio"]["steps"] > 0 and by_name["bengio"]["train_time"] >= 0.5
    assert by_name["unigram"]["steps"] == 0 and by_name["unigram"]["tokens"] > 0
    # on the same text, counting more context pays
    bpb = [by_name[r]["bits_per_byte"] for r in ("unigram", "bigram", "kneser-ney:3")]
    assert bpb == sorted(bpb, reverse=True)

    png = (out / "ladder.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    image = matplotlib.image.imread(out / "ladder.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("args,message", [
    (["--budget", "0"], "--budget must be a positive"),
    (["--budget", "-5"], "--budget must be a positive"),
    (["--rungs", "unigram,gpt3"], "unknown rung 'gpt3'"),
    (["--rungs", "ngram:0"], "n must be at least 1"),
    (["--rungs", "lstm", "--block-size", "100000"], "longer than the data"),
    (["--rungs", "kneser-ney:99999"], "longer than the data"),
])
def test_bad_input_is_a_user_error(args, message, tmp_path, shared_data):
    with pytest.raises(UserError, match=message):
        main(["--data", str(shared_data / "the-verdict.txt"), "--data-dir", str(tmp_path / "data"),
              "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()  # refused before anything is trained or written


def test_cli_bad_input_is_one_line(tmp_path, shared_data):
    proc = run_module("mlx_gpt.ladder", "--data", str(shared_data / "the-verdict.txt"), "--budget", "0",
                      "--data-dir", str(tmp_path / "data"), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "--budget")


def test_learning_rate_warms_up_then_decays_with_the_budget():
    assert lr_at(1e-3, 0, 0.0) == pytest.approx(1e-5)
    assert lr_at(1e-3, 99, 0.01) == pytest.approx(1e-3, rel=1e-3)
    assert lr_at(1e-3, 5, 0.1) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.1 * math.pi))))
    values = [lr_at(1e-3, 1000, p / 10) for p in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(1e-4)


@pytest.mark.slow
def test_gpt_beats_unigram_by_far_on_tiny_shakespeare(tmp_path, shakespeare):
    # a shorter block and val split keep the test near a minute on two busy cores
    results = climb(LadderConfig(data=str(shakespeare), rungs=("unigram", "gpt"), budget=45, block_size=64,
                                 val_fraction=0.05, sample_tokens=0, data_dir=str(tmp_path / "data"),
                                 out=str(tmp_path / "out")), say=print)
    unigram, gpt = (r.val.bits_per_byte for r in results)
    assert 4.5 < unigram < 5.0  # the byte entropy of Shakespeare's letters
    assert gpt < unigram - 0.6  # once off the unigram plateau it drops fast; 3.8 here on two busy cores
