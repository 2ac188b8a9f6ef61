"""tools/bench.py and its PyTorch reference: both sides must do the same work for a ratio to mean anything."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error
from mlx_gpt.generate import Decoder
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.sampling import SamplingConfig
from mlx_gpt.optim import make_optimizer
from mlx_gpt.train import TrainConfig, make_train_step

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "tools"))
import torch_gpt  # noqa: E402

CFG = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def batch(seed: int = 0, shape=(4, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CFG.vocab_size, shape, dtype=np.int32),
            rng.integers(0, CFG.vocab_size, shape, dtype=np.int32))


def test_reference_has_the_same_logits_loss_and_gradient_norm():
    x, y = batch()
    model = build(CFG, seed=3)
    tmodel = torch_gpt.from_mlx(model)
    np.testing.assert_allclose(tmodel(torch.from_numpy(x.astype(np.int64))).detach().numpy(),
                               np.array(model(mx.array(x))), atol=2e-5)
    tcfg = TrainConfig(batch_size=4, max_iters=10, warmup_iters=2, streams=1)
    opt = make_optimizer(tcfg.optim)
    opt.init(model.trainable_parameters())
    loss, norm = make_train_step(model, opt, tcfg)(mx.array(x[None]), mx.array(y[None]))
    tstep = torch_gpt.make_train_step(tmodel, torch_gpt.make_optimizer(tmodel), grad_clip=1.0)
    tloss, tnorm = tstep(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
    assert abs(loss.item() - float(tloss)) < 1e-5
    assert abs(norm.item() - float(tnorm)) < 1e-4 * float(tnorm)


def test_reference_decodes_the_same_greedy_tokens():
    model = build(CFG, seed=4)
    model.eval()
    prompt = [5, 9, 2, 7]
    ours = [row[0] for row in Decoder(model, SamplingConfig(temperature=0)).tokens(prompt, 12)]
    theirs, _, _ = torch_gpt.decode(torch_gpt.from_mlx(model).eval(), prompt, 12)
    assert ours == theirs


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, fragment", [
    (["--configs", "Z"], "unknown config Z"),
    (["--streams", "one"], "--streams takes comma-separated integers"),
    (["--streams", "-1"], "--streams values must be 0"),
    (["--steps", "0"], "--steps"),
])
def test_bad_arguments_are_one_line_errors(args, fragment):
    assert_one_line_error(run_bench(*args), fragment)


@pytest.mark.slow
def test_config_a_against_torch_reports_ratios_for_each_stream_setting(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--configs", "A", "--steps", "1", "--warmup", "0", "--vs-torch", "--streams", "0,1",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    a = report["train"]["A"]
    assert abs(a["first_loss"]["mlx"] - a["first_loss"]["torch"]) < 1e-5
    for impl in ("mlx", "mlx_streams1", "torch"):
        assert a[impl]["ms_per_step"] > 0 and 0 < a[impl]["mfu"] < 1
    assert a["mlx_vs_torch"] == pytest.approx(a["mlx"]["tok_per_s"] / a["torch"]["tok_per_s"])
    assert "mlx_streams1/torch" in proc.stdout and "mlx/torch" in proc.stdout
    assert report["sgemm_peak_gflops"] > 0 and report["flop_formula"].startswith("6N")
