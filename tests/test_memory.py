"""memory: a run's peak is estimated before it starts, close to what MLX measures, and a run that
cannot fit is refused before anything is allocated."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import assert_one_line_error, run_module
from mlx_gpt.cpu import attention as attn
from mlx_gpt.backend import cpu_cores
from mlx_gpt.cpu.blas import set_blas_threads
from mlx_gpt import memory
from mlx_gpt.cpu import accelerate, ops, parallel
from mlx_gpt.errors import UserError
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_train_step

CFG = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
# estimate / measured peak of real steps: 1.10-1.53 here (the split step holds less than the
# one-stream step); the factor is asserted within [0.8, 1.6]
LOW, HIGH = 0.8, 1.6


def measured_peak(streams: int, accum: int, batch: int = 8) -> tuple[int, memory.MemoryEstimate]:
    model = accelerate(build(CFG, seed=0))
    cfg = TrainConfig.of(batch_size=batch, grad_accum=accum, streams=streams, max_iters=10, warmup_iters=0)
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, opt, cfg)
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, CFG.vocab_size, (accum, batch, CFG.block_size))) for _ in range(2))
    mx.eval(step(x, y), model.parameters(), opt.state)  # the first step compiles
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(step(x, y), model.parameters(), opt.state)
    peak = mx.get_peak_memory()
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    set_blas_threads(cpu_cores())
    kept = attn.attention_weights_kept(mx.float32, CFG.dropout)
    return peak, memory.estimate_train_peak(CFG, n_params, batch, grad_accum=accum, streams=streams,
                                            attention_weights=kept)


@pytest.mark.parametrize("streams,accum", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_the_estimate_is_close_to_the_measured_peak(streams, accum):
    peak, estimate = measured_peak(streams, accum)
    assert LOW * peak <= estimate.total <= HIGH * peak, (estimate.describe(), peak)


def test_the_estimate_grows_with_what_a_step_holds():
    base = memory.estimate_train_peak(CFG, 10**6, 8)
    assert memory.estimate_train_peak(CFG, 10**6, 16).activations == 2 * base.activations
    bf16 = memory.estimate_train_peak(CFG, 10**6, 8, dtype="bfloat16")  # float32 master weights and a copy
    assert bf16.parameters == base.parameters * 3 // 2 and bf16.optimizer == base.optimizer
    assert bf16.activations == base.activations // 2
    assert memory.estimate_train_peak(CFG, 10**6, 8, loss_chunk=16).logits < base.logits
    assert memory.estimate_train_peak(CFG, 10**6, 8, streams=2).gradients == 2 * base.gradients
    deep = GPTConfig(vocab_size=512, block_size=64, n_layer=12, n_head=4, n_embd=64)
    assert (memory.estimate_train_peak(deep, 10**6, 8, grad_checkpoint=True).activations
            < memory.estimate_train_peak(deep, 10**6, 8).activations / 3)
    assert base.logits == 8 * 64 * 512 * 4 * 2  # logits and their gradient, float32


def test_a_run_that_does_not_fit_is_refused_with_a_batch_that_does():
    with pytest.raises(UserError, match=r"--batch-size (\d+) --grad-accum") as e:
        memory.check_fits(CFG, 10**6, 32, available=60 * 10**6, grad_accum=2)
    smaller = int(str(e.value).split("--batch-size ")[1].split()[0])
    assert f"--grad-accum {2 * 32 // smaller}" in str(e.value)
    assert memory.estimate_train_peak(CFG, 10**6, smaller, grad_accum=2).total <= 60 * 10**6
    assert memory.check_fits(CFG, 10**6, smaller, available=60 * 10**6, grad_accum=2).total <= 60 * 10**6


def test_an_impossible_run_is_refused_in_one_line_before_anything_is_built(tmp_path, shakespeare):
    proc = run_module("mlx_gpt.train", "--data", str(shakespeare), "--data-dir", str(tmp_path / "data"),
                      "--out", str(tmp_path / "run"), "--preset", "gpt2-xl", "--batch-size", "64", cwd=tmp_path,
                      timeout=120)
    assert_one_line_error(proc, "this run needs about", "GB", "does not fit")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


def test_the_estimate_is_printed_at_the_start(tmp_path, shakespeare):
    proc = run_module("mlx_gpt.train", "--data", str(shakespeare), "--data-dir", str(tmp_path / "data"),
                      "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                      "--block-size", "32", "--batch-size", "4", "--max-iters", "1", "--eval-iters", "1",
                      "--sample-tokens", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "memory: estimated peak" in proc.stderr
