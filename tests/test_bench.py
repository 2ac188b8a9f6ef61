"""tools/bench.py and its references: both sides must do the same work for a ratio to mean anything."""

import importlib.util
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT
from mlx_gpt import checkpoint
from mlx_gpt.convert import export_checkpoint
from mlx_gpt.decoding import Decoder
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.sampling import SamplingConfig
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_train_step

torch = pytest.importorskip("torch")
REFERENCE = ROOT / "tests" / "reference"
sys.path.insert(0, str(REFERENCE))
import torch_gpt  # noqa: E402

CFG = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def batch(seed: int = 0, shape=(4, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CFG.vocab_size, shape, dtype=np.int32),
            rng.integers(0, CFG.vocab_size, shape, dtype=np.int32))


def test_reference_has_the_same_logits_loss_and_gradient_norm_over_steps():
    x, y = batch()
    model = build(CFG, seed=3)
    tmodel = torch_gpt.from_mlx(model)
    np.testing.assert_allclose(tmodel(torch.from_numpy(x.astype(np.int64))).detach().numpy(),
                               np.array(model(mx.array(x))), atol=2e-5)
    # a constant learning rate on both sides, so that several steps compare (AdamW's update included)
    tcfg = TrainConfig.of(model="gpt", batch_size=4, max_iters=10, warmup_iters=0, learning_rate=2e-3, min_lr=2e-3,
                          streams=1)
    opt = make_optimizer(tcfg.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, tcfg)
    tstep = torch_gpt.make_train_step(tmodel, torch_gpt.make_optimizer(tmodel, lr=2e-3), grad_clip=1.0)
    for i in range(3):
        x, y = batch(i)
        loss, norm = step(mx.array(x[None]), mx.array(y[None]))
        tloss, tnorm = tstep(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
        assert abs(loss.item() - float(tloss)) < 1e-4, i
        assert abs(norm.item() - float(tnorm)) < 1e-3 * float(tnorm), i


def test_reference_decodes_the_same_greedy_tokens():
    model = build(CFG, seed=4)
    model.eval()
    prompt = [5, 9, 2, 7]
    ours = [row[0] for row in Decoder(model, SamplingConfig(temperature=0)).tokens(prompt, 12)]
    theirs, _, _ = torch_gpt.decode(torch_gpt.from_mlx(model).eval(), prompt, 12)
    assert ours == theirs


def test_reference_loads_our_hugging_face_export(tmp_path):
    """The harness gives PyTorch its weights through ``convert --to hf``: the same logits come back."""
    model = build(CFG, seed=5)
    checkpoint.save(tmp_path / "ckpt", model, None)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", to="hf", progress=False)
    x, _ = batch()
    logits = torch_gpt.from_hf_dir(tmp_path / "hf")(torch.from_numpy(x.astype(np.int64))).detach().numpy()
    np.testing.assert_allclose(logits, np.array(model(mx.array(x))), atol=2e-5)


def test_nanogpt_reference_prepares_characters_and_trains(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("to be, or not to be: that is the question.\n" * 40)
    script = [sys.executable, str(REFERENCE / "nanogpt_train.py")]
    prep = subprocess.run([*script, "prepare", "--input", str(text), "--out", str(tmp_path / "data")],
                          capture_output=True, text=True, check=True)
    meta = json.loads(prep.stdout)
    assert meta["vocab_size"] == len(set(text.read_text()))
    train = np.fromfile(tmp_path / "data" / "train.bin", np.uint16)
    assert len(train) == meta["train_tokens"] == int(len(text.read_text()) * 0.9)
    proc = subprocess.run([*script, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                           "--max-iters", "20", "--warmup-iters", "2", "--lr-decay-iters", "20", "--eval-interval",
                           "10", "--eval-iters", "2", "--block-size", "16", "--batch-size", "4", "--n-layer", "1",
                           "--n-head", "2", "--n-embd", "16", "--threads", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 21  # nanoGPT's loop runs max_iters + 1 steps
    assert [e["step"] for e in result["evals"]] == [0, 10, 20]
    assert result["evals"][-1]["val"] < result["evals"][0]["val"]
    assert (tmp_path / "run" / "ckpt.pt").is_file()


def tiny_args(bench, *flags: str):
    return bench.build_parser().parse_args(["--vs-torch", "--rounds", "1", "--pause", "0", *flags])


MACHINE = {"sgemm_peak_gflops": 100.0, "matvec_gb_s": 10.0, "torch_device": "cpu"}


def test_harness_times_each_side_in_its_own_process(tmp_path):
    bench = load_bench()
    tiny = bench.TrainBench("tiny", "smoke", bench.Shape(61, 2, 2, 32, 24), 4, 24, steps=2, warmup=0)
    r = bench.bench_train(tiny, tiny_args(bench), tmp_path, MACHINE)
    assert r["same_first_loss"], (r["mlx"]["first_loss"], r["torch"]["first_loss"])
    for impl in ("mlx", "torch"):
        assert r[impl]["ms_per_step"] > 0 and len(r[impl]["steps_ms"][0]) == 2
    assert r["mlx_vs_torch"] == pytest.approx(r["torch"]["ms_per_step"] / r["mlx"]["ms_per_step"])
    report = {"machine": {**MACHINE, "mlx_gpt": "0", "mlx": "0", "device": "cpu", "cores": 1, "blas": "b"},
              "commit": None, "train": {"tiny": r}}
    bench.apply_ceilings(report)
    assert "tiny" in bench.format_table(report)


def test_utilisation_and_bound_divide_by_the_best_measured_ceilings():
    bench = load_bench()
    report = {"machine": {"measured": [{"sgemm_peak_gflops": 100.0, "matvec_gb_s": 20.0},
                                       {"sgemm_peak_gflops": 150.0, "matvec_gb_s": 16.0}]},
              "train": {"A": {"mlx": {"gflops": 60.0}, "torch": {"gflops": 30.0}}},
              "decode": {"bytes_per_token": 1e9, "mlx": {"decode_tok_per_s": 15.0}, "mlx_vs_hf": 1.5}}
    bench.apply_ceilings(report)
    assert report["machine"]["sgemm_peak_gflops"] == 150.0 and report["machine"]["matvec_gb_s"] == 20.0
    assert report["train"]["A"]["mlx"]["mfu"] == pytest.approx(0.4)
    assert report["train"]["A"]["torch"]["mfu"] == pytest.approx(0.2)
    assert report["decode"]["bound_tok_per_s"] == pytest.approx(20.0)
    assert report["decode"]["mlx"]["fraction_of_bound"] == pytest.approx(0.75)


def test_torch_reference_script_imports_no_mlx(tmp_path):
    bench = load_bench()
    model = build(CFG, seed=6)
    checkpoint.save(tmp_path / "ckpt", model, None)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", to="hf", progress=False)
    x, y = batch()
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    out, _ = bench.run_json([sys.executable, str(REFERENCE / "torch_gpt.py"), "train", "--weights", str(tmp_path / "hf"),
                             "--batch", str(tmp_path / "batch.npz"), "--steps", "1", "--warmup", "0", "--threads", "1"])
    assert out["mlx_loaded"] is False and len(out["step_s"]) == 1


@pytest.mark.slow
def test_harness_decodes_the_same_tokens_as_transformers_and_mlx_lm(tmp_path):
    bench = load_bench()
    tiny = bench.DecodeBench("decode", "smoke", bench.Shape(61, 2, 2, 32, 64), 4, 12)
    r = bench.bench_decode(tiny, tiny_args(bench, "--decode-runs", "1", "--decode-rounds", "1"), tmp_path)
    assert r["same_tokens"] == {"hf": True, "mlx_lm": True}
    for impl in ("mlx", "hf", "mlx_lm"):
        assert r[impl]["tok_per_s"] > 0
    assert r["mlx"]["blas_threads"] is None or r["mlx"]["blas_threads"] >= 1


@pytest.mark.parametrize("args, fragment", [
    (["--configs", "Z"], "unknown config Z"),
    (["--rounds", "0"], "--rounds"),
    (["--streams", "-1"], "--streams must be 0"),
])
def test_bad_arguments_are_one_line_errors(args, fragment):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *args], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]


def test_races_alternate_the_reference_and_the_recipe_which_stops_at_the_references_loss():
    bench = load_bench()
    calls = []

    def target(i):
        calls.append(f"reference {i}")
        return {"wall_s": [120.0, 150.0, 130.0][i], "val_loss": 1.9 + i / 100, "steps": 2000}

    def ours(i, v):
        calls.append(f"ours {i} to {v:.2f}")
        return {"wall_s": [40.0, 60.0, 50.0][i], "val_loss": v - 0.01, "steps": 200}

    r = bench.race_to(target, ours, 3)
    assert calls == ["reference 0", "ours 0 to 1.90", "reference 1", "ours 1 to 1.91", "reference 2", "ours 2 to 1.92"]
    assert r["median_wall_s"] == {"target": 130.0, "mlx": 50.0} and r["speedup"] == pytest.approx(2.6)
    assert [p["speedup"] for p in r["pairs"]] == pytest.approx([3.0, 2.5, 2.6])
    text = "\n".join(bench.recipe_lines({"pydoc": {"config": bench.asdict(bench.PydocBench()), **r}}))
    assert "2.60x less time" in text and "configs/pydoc-speedrun.toml" in text


def test_the_pydoc_race_trains_the_default_runs_shape():
    from mlx_gpt import flags
    from mlx_gpt.models import gpt, rungs

    cfg = TrainConfig.of(**flags.read_toml(ROOT / "configs" / "pydoc-speedrun.toml", TrainConfig))
    default = TrainConfig.of()
    assert cfg.data.source == default.data.source == "pydoc"
    assert cfg.model.rung == "modern" and cfg.optim.optimizer == "muon"
    ours = rungs.build("modern", 256, overrides=cfg.model.overrides)
    theirs = gpt.GPT(gpt.preset("tiny"))
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.block_size) == (4, 128, 128)
    assert (theirs.config.n_layer, theirs.config.n_embd, theirs.config.block_size) == (4, 128, 128)
    assert abs(ours.num_params() / theirs.num_params() - 1) < 0.1


def test_the_ablations_picture_draws_every_variant_from_a_report(tmp_path, capsys):
    from mlx_gpt.errors import run_cli

    spec = importlib.util.spec_from_file_location("plot_ablation", ROOT / "tools" / "plot_ablation.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    report = {"ablation": {"config": {"max_iters": 500}, "variants": {
        "GPT-2 recipe": {"val_loss": 2.28, "wall_s": 36.8}, "+ rope": {"val_loss": 2.03, "wall_s": 41.1},
        "all + Muon": {"val_loss": 1.85, "wall_s": 63.8}}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    plot.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "a.svg")])
    svg = (tmp_path / "a.svg").read_text()
    assert svg.startswith("<?xml") and all(k in svg for k in ("GPT-2 recipe", "+ rope", "all + Muon", "1.850", "63.8"))
    (tmp_path / "bad.json").write_text(json.dumps({"race": {}}))
    with pytest.raises(SystemExit) as exit_:
        run_cli(plot.main, [str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.svg")])
    assert exit_.value.code == 2 and not (tmp_path / "b.svg").exists()
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'bad.json'} is not a tools/bench.py report with an ablation"
