import json
import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint, flags
from mlx_gpt.data import prepare
from mlx_gpt.errors import UserError
from mlx_gpt.models.gpt import PRESETS, GPTConfig, build
from mlx_gpt.optim import lr_schedule, make_optimizer
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.model import shaped_config
from mlx_gpt.training.step import loss_fn, make_train_step

SMALL = dict(model="gpt", preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2,
             log_interval=1, sample_tokens=8)


def small_cfg(tmp_path, data, **kw) -> TrainConfig:
    # --init brings its model and shape; another --model brings its own
    small = {k: v for k, v in SMALL.items() if not ((kw.get("init") and k in ("model", "preset")) or
                                                    (k == "model" and "model" in kw))}
    return TrainConfig.of(**{"data": str(data), "data_dir": str(tmp_path / "data"), "out": str(tmp_path / "run"),
                          **small, **kw})


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def losses_of(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig.of(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lr = lr_schedule(cfg.optim)
    values = [float(lr(mx.array(s))) for s in range(101)]
    assert values[0] == pytest.approx(1e-4) and values[9] == pytest.approx(1e-3)
    assert all(a <= b + 1e-12 for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b - 1e-12 for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(1e-4, rel=1e-3)


def test_weight_decay_spares_biases_and_norms():
    model = build(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    model.h[0].attn.c_attn.bias = mx.ones_like(model.h[0].attn.c_attn.bias)
    before = params(model)
    opt = make_optimizer(TrainConfig.of(learning_rate=0.1, weight_decay=0.5, warmup_iters=0, max_iters=10).optim)
    opt.init(model.trainable_parameters())
    zero = {k: mx.zeros_like(v) for k, v in tree_flatten(model.trainable_parameters())}
    from mlx.utils import tree_unflatten

    opt.update(model, tree_unflatten(list(zero.items())))
    after = params(model)
    np.testing.assert_array_equal(after["h.0.attn.c_attn.bias"], before["h.0.attn.c_attn.bias"])
    np.testing.assert_array_equal(after["h.0.ln_1.weight"], before["h.0.ln_1.weight"])
    np.testing.assert_allclose(after["wte.weight"], before["wte.weight"] * (1 - 0.1 * 0.5), rtol=1e-6)


def _step_pair(accum=1, compile=True, dropout=0.0):
    cfg = TrainConfig.of(grad_accum=accum, compile=compile, warmup_iters=0, max_iters=10, learning_rate=1e-2)
    model = build(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=dropout), seed=1)
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    return model, opt, make_train_step(model, opt, cfg)


def test_compiled_and_uncompiled_steps_agree():
    x = mx.random.randint(0, 50, (1, 4, 16), key=mx.random.key(0))
    y = mx.random.randint(0, 50, (1, 4, 16), key=mx.random.key(1))
    results = []
    for compiled in (True, False):
        model, _, step = _step_pair(compile=compiled)
        losses = [step(x, y)[0].item() for _ in range(3)]
        results.append((losses, params(model)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for k in results[0][1]:
        np.testing.assert_allclose(results[0][1][k], results[1][1][k], atol=1e-5)


@pytest.mark.parametrize("streams", [1, 2])
def test_step_reports_the_exact_gradient_norm_and_clips_to_it(streams):
    x = mx.random.randint(0, 50, (1, 4, 16), key=mx.random.key(4))
    y = mx.random.randint(0, 50, (1, 4, 16), key=mx.random.key(5))
    model = build(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0), seed=1)
    grads = mx.grad(lambda p: (model.update(p), loss_fn(model, x[0], y[0]))[1])(model.trainable_parameters())
    want = math.sqrt(sum((np.array(g, np.float64) ** 2).sum() for _, g in tree_flatten(grads)))
    cfg = TrainConfig.of(warmup_iters=0, max_iters=10, learning_rate=1e-2, grad_clip=want / 2, streams=streams)
    model = build(model.config, seed=1)
    opt = make_optimizer(cfg.optim)
    opt.init(model.trainable_parameters())
    before = params(model)
    _, norm = make_train_step(model, opt, cfg)(x, y)
    assert norm.item() == pytest.approx(want, rel=1e-6)
    # Adam's first step moves each weight by about lr whatever the gradient's scale, so the
    # clipping shows in the optimizer's first moment: (1 - beta1) * g * clip / norm
    g = dict(tree_flatten(grads))["wte.weight"]
    m = dict(tree_flatten(opt.state))["wte.weight.m"]
    np.testing.assert_allclose(np.array(m), (1 - cfg.optim.beta1) * np.array(g) / 2, rtol=1e-4, atol=1e-7)
    assert any(not np.array_equal(v, params(model)[k]) for k, v in before.items())


def test_gradient_accumulation_equals_the_big_batch():
    x = mx.random.randint(0, 50, (2, 3, 16), key=mx.random.key(2))
    y = mx.random.randint(0, 50, (2, 3, 16), key=mx.random.key(3))
    m1, _, accumulated = _step_pair(accum=2)
    m2, _, whole = _step_pair(accum=1)
    la = accumulated(x, y)[0].item()
    lw = whole(x.reshape(1, 6, 16), y.reshape(1, 6, 16))[0].item()
    assert la == pytest.approx(lw, rel=1e-5)
    for k, v in params(m1).items():
        np.testing.assert_allclose(v, params(m2)[k], atol=1e-5)


def test_label_smoothing_raises_the_loss_of_a_confident_model():
    model = build(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=16), seed=0)
    x = mx.zeros((1, 4), dtype=mx.int32)
    y = mx.argmax(model(x), axis=-1)
    assert loss_fn(model, x, y, 0.1).item() > loss_fn(model, x, y, 0.0).item()


@pytest.mark.slow
def test_val_loss_falls_well_below_unigram_entropy(tmp_path, shakespeare):
    counts = np.array(list(Counter(shakespeare.read_bytes()).values()), dtype=np.float64)
    p = counts / counts.sum()
    unigram_nats = float(-(p * np.log(p)).sum())  # ~3.3 nats for tiny shakespeare's bytes
    cfg = small_cfg(tmp_path, shakespeare, n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16,
                    max_iters=250, eval_interval=250, eval_iters=10, learning_rate=3e-3, warmup_iters=20,
                    log_interval=50)
    run = train(cfg, progress=False)
    val = [json.loads(r)["val_loss"] for r in (run.out / "metrics.jsonl").read_text().splitlines() if "val_loss" in r]
    assert val[-1] < unigram_nats - 0.6, (val, unigram_nats)


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, shakespeare, sampler):
    common = dict(max_iters=12, lr_decay_iters=12, warmup_iters=3, dropout=0.1, eval_interval=4,
                  checkpoint_interval=100, sample_interval=100, sampler=sampler)
    whole = small_cfg(tmp_path, shakespeare, **common, out=str(tmp_path / "whole"))
    train(whole, progress=False)
    first = small_cfg(tmp_path, shakespeare, **{**common, "max_iters": 5}, out=str(tmp_path / "split"))
    train(first, progress=False)
    assert checkpoint.load_state(tmp_path / "split")["step"] == 5
    if sampler == "sequential":  # five steps have read the first five windows of the file
        assert checkpoint.load_state(tmp_path / "split")["sampler"] == {"sampler": "sequential", "position": 5}
    resumed = first.replace(max_iters=12, resume=True)
    train(resumed, progress=False)
    a, b = losses_of(tmp_path / "whole"), losses_of(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit
    wa, wb = params(checkpoint.load_model(tmp_path / "whole")), params(checkpoint.load_model(tmp_path / "split"))
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


def test_failure_during_save_leaves_previous_checkpoint_loadable(tmp_path, shakespeare, monkeypatch):
    cfg = small_cfg(tmp_path, shakespeare, max_iters=4, eval_interval=4, checkpoint_interval=2)
    real = mx.save_safetensors
    calls = {"n": 0}

    def failing(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # model and optimizer of the step-2 save pass; the step-4 save dies midway
            real(path, *a, **kw)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise OSError("disk full")
        return real(path, *a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(UserError, match="disk full"):
        train(cfg, progress=False)
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert checkpoint.load_state(tmp_path / "run")["step"] == 2
    model, tok = checkpoint.load(tmp_path / "run")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 256)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")]
    assert leftovers == []


def test_swap_interrupted_between_renames_is_recovered(tmp_path, shakespeare):
    cfg = small_cfg(tmp_path, shakespeare, max_iters=2, eval_interval=2)
    train(cfg, progress=False)
    (tmp_path / "run").rename(tmp_path / ".run.old")  # as if the process died mid-swap
    model, _ = checkpoint.load(tmp_path / "run")
    assert model.config.n_layer == 2


def test_fine_tune_from_a_checkpoint_with_a_sentencepiece_tokenizer(tmp_path, shakespeare):
    base = small_cfg(tmp_path, shakespeare, tokenizer="sp:400", max_iters=3, eval_interval=3, out=str(tmp_path / "base"))
    train(base, progress=False)
    verdict = shakespeare.parent / "the-verdict.txt"
    tuned = small_cfg(tmp_path, verdict, init=str(tmp_path / "base"), max_iters=3, eval_interval=3,
                      block_size=16, out=str(tmp_path / "tuned"))
    run = train(tuned, progress=False)
    assert run.model.config.block_size == 16 and run.model.wpe.weight.shape[0] == 16
    ds = prepare(str(verdict), run.tokenizer, data_dir=tmp_path / "data")
    assert ds.tokenizer.encode("the verdict") == run.tokenizer.encode("the verdict")
    model, tok = checkpoint.load(tmp_path / "tuned")
    assert tok.kind == "sentencepiece" and model.config.vocab_size == 400


def test_bfloat16_training_keeps_float32_weights_and_loss(tmp_path, shakespeare):
    run = train(small_cfg(tmp_path, shakespeare, dtype="bfloat16", max_iters=3, eval_interval=3), progress=False)
    assert run.model.wte.weight.dtype == mx.float32  # master weights; bfloat16 is the compute dtype
    losses = losses_of(tmp_path / "run")
    assert all(math.isfinite(v) for v in losses.values()) and losses[3] < losses[1]


# ---------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("flag,value", [("learning_rate", math.nan), ("learning_rate", math.inf),
                                        ("learning_rate", -1e-3), ("min_lr", math.nan), ("beta1", 1.0),
                                        ("beta2", -0.1), ("beta2", math.nan), ("weight_decay", -0.1),
                                        ("weight_decay", math.inf), ("grad_clip", math.nan), ("grad_clip", -1.0)])
def test_optimizer_settings_that_cannot_train_are_refused(flag, value):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be"):
        TrainConfig.of(**{flag: value})


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare):
    out = tmp_path / "run"
    proc = run_module("mlx_gpt.train", "--data", str(shakespeare), "--data-dir", str(tmp_path / "data"),
                      "--out", str(out), "--model", "gpt", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                      "--block-size", "32",
                      "--batch-size", "4", "--max-iters", "40", "--learning-rate", "1e3", "--log-interval", "2",
                      "--checkpoint-interval", "2", "--eval-interval", "100", "--eval-iters", "1",
                      "--sample-tokens", "4", cwd=tmp_path)
    assert_one_line_error(proc, "training diverged: at step", "the last good checkpoint (step")
    assert proc.returncode == 2
    bad_step = int(proc.stderr.split("at step ")[1].split()[0])
    saved = checkpoint.load_state(out)["step"]
    assert saved < bad_step and f"(step {saved})" in proc.stderr
    model, _ = checkpoint.load(out)
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(model.parameters()))
    assert all(math.isfinite(v) for v in losses_of(out).values())


def test_weights_that_turn_non_finite_between_log_lines_are_never_saved(tmp_path, shakespeare, monkeypatch):
    """No log line after step 3, a save at 6: the check before that save finds the NaN loss of step 4."""
    from mlx_gpt.training import loop

    real = loop.make_train_step

    def poisoned(model, optimizer, cfg, *args, **kw):
        step, calls = real(model, optimizer, cfg, *args, **kw), []

        def wrapped(x, y):
            calls.append(1)
            if len(calls) == 4:  # the fourth update leaves a NaN in the weights
                model.wte.weight = model.wte.weight.at[0, 0].add(mx.array(math.nan))
            return step(x, y)

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    cfg = small_cfg(tmp_path, shakespeare, max_iters=9, log_interval=100, checkpoint_interval=3, eval_interval=100,
                    sample_interval=100)
    with pytest.raises(UserError, match=r"at step 4 the loss is nan .* checkpoint \(step 3\)"):
        train(cfg, progress=False)
    assert checkpoint.load_state(tmp_path / "run")["step"] == 3
    model, _ = checkpoint.load(tmp_path / "run")
    assert np.isfinite(np.array(model.wte.weight)).all()


def test_max_seconds_lays_the_schedule_over_the_steps_that_fit(tmp_path, shakespeare, monkeypatch):
    from mlx_gpt.training import run as run_module

    monkeypatch.setattr(run_module, "OVERRUN", 1e9)  # the schedule is what is compared, whatever the machine's load
    common = dict(warmup_iters=30, log_interval=1, eval_interval=1000, checkpoint_interval=1000, sample_tokens=0)
    timed = train(small_cfg(tmp_path, shakespeare, max_seconds=3.0, out=str(tmp_path / "timed"), **common),
                  progress=False)
    steps = timed.cfg.optim.max_iters
    assert steps >= 1 and timed.cfg.optim.max_seconds is None and timed.train_seconds > 0
    assert timed.cfg.optim.warmup_iters == min(30, steps // 10)
    saved = checkpoint.read_config(tmp_path / "timed")["train"]
    assert saved["max_iters"] == steps and saved["max_seconds"] is None  # --resume continues by steps
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines() if '"lr"' in r]
    # the cosine ends where the time does: the last update's rate is the schedule's last
    assert timed.cfg.optim.decay_iters == steps
    assert lrs[-1] == pytest.approx(lr_schedule(timed.cfg.optim)(mx.array(steps - 1)).item())
    # the steps timed beforehand leave no trace: the same run as one given that many steps outright
    counted = train(small_cfg(tmp_path, shakespeare, max_iters=steps, out=str(tmp_path / "counted"),
                              **{**common, "warmup_iters": timed.cfg.optim.warmup_iters}), progress=False)
    assert losses_of(tmp_path / "timed") == losses_of(tmp_path / "counted")
    wa, wb = params(timed.model), params(counted.model)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


def test_a_short_run_warms_up_over_a_tenth_of_itself_unless_told():
    assert TrainConfig.of(max_iters=20).optim.warmup_iters == 2
    assert TrainConfig.of().optim.warmup_iters == 5  # the default run's, at most 5 in today's recipe
    assert TrainConfig.of(model="gpt").optim.warmup_iters == 60  # GPT-2's, a tenth of 600
    assert TrainConfig.of(model="gpt", max_iters=6000).optim.warmup_iters == 60
    assert TrainConfig.of(max_iters=20, warmup_iters=15).optim.warmup_iters == 15
    assert TrainConfig.of(init="ckpt").optim.warmup_iters == 0  # a fine-tune: nanoGPT's constant rate


def test_a_new_model_is_the_modern_gpt_with_its_recipe_and_gpt2_keeps_its_own():
    """Without --model, a run trains the modern GPT with today's recipe (configs/pydoc-speedrun.toml's
    settings); GPT-2's presets and --model gpt train GPT-2's recipe, as do fine-tunes and resumed
    runs, whose saved settings may predate the choice; a setting given is always taken."""
    from mlx_gpt.training.config import RunConfig

    speedrun = flags.read_toml(Path(__file__).parents[1] / "configs" / "pydoc-speedrun.toml", TrainConfig)
    default = TrainConfig.of().flat()
    shape = {**PRESETS["tiny"], "dropout": 0.0, "lr_decay_iters": default["max_iters"]}  # the unset ones: the preset's
    assert {k: shape[k] if default[k] is None else default[k] for k in speedrun if k != "out"} == \
        {k: v for k, v in speedrun.items() if k != "out"}
    for given in (dict(model="gpt"), dict(preset="gpt2"), dict(preset="gpt2-medium"), dict(model="lstm")):
        o = TrainConfig.of(**given).optim
        assert (o.optimizer, o.learning_rate, o.max_iters, o.weight_decay) == ("adamw", 2e-3, 600, 0.1), given
    assert TrainConfig.of(preset="gpt2").model.rung == "gpt"
    modern_gpt2 = TrainConfig.of(model="modern", preset="gpt2")  # GPT-2's shape, today's recipe
    assert modern_gpt2.optim.optimizer == "muon"
    c = shaped_config(modern_gpt2, 50257)
    assert (type(c).__name__, c.n_layer, c.n_embd, c.block_size, c.vocab_size) == ("ModernConfig", 12, 768, 1024, 50257)
    assert TrainConfig.of(init="ckpt").optim.optimizer == "adamw"
    resumed = TrainConfig(run=RunConfig(resume=True, out="run")).resolved()
    assert (resumed.model.rung, resumed.optim.optimizer, resumed.optim.weight_decay) == ("gpt", "adamw", 0.1)
    assert TrainConfig.of(optimizer="adamw", weight_decay=0.05).optim.weight_decay == 0.05


def test_a_run_speaks_after_its_first_step_and_every_half_minute(tmp_path, shakespeare, monkeypatch, capsys):
    """Log lines by step count, after the first step, and by time; an evaluation says how far it is."""
    from mlx_gpt.training import loop

    cfg = small_cfg(tmp_path, shakespeare, max_iters=6, log_interval=100, eval_interval=100, sample_interval=100)
    train(cfg, progress=False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in lines if " | " in ln] == ["step 1/6", "step 6/6"]
    assert not any("evaluating" in ln for ln in lines)
    monkeypatch.setattr(loop, "LINE_SECONDS", 0.0)  # every step and every evaluation batch is "long"
    train(cfg.replace(out=str(tmp_path / "timed")), progress=False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in lines if " | " in ln] == [f"step {i}/6" for i in range(1, 7)]
    assert "step 6: evaluating: 1/4 batches" in lines and "step 6: evaluating: 3/4 batches" in lines
    # the log lines are metrics as any other: the same losses as the quiet run's
    assert losses_of(tmp_path / "timed")[6] == losses_of(tmp_path / "run")[6]


def test_damaged_run_files_and_impossible_resumes_are_one_error(tmp_path, shakespeare, capsys):
    """What --resume reads is checked before it is trusted: state.json's values, the saved
    settings' types; a resume behind the run's step is refused, and one at it says so."""
    cfg = small_cfg(tmp_path, shakespeare, max_iters=2, eval_interval=2)
    train(cfg, progress=False)
    out = tmp_path / "run"
    state, config = (out / "state.json").read_text(), (out / "config.json").read_text()
    with pytest.raises(UserError, match="is at step 2, past --max-iters 1"):
        train(TrainConfig.of(resume=True, out=str(out), max_iters=1), progress=False)
    capsys.readouterr()
    assert train(TrainConfig.of(resume=True, out=str(out)), progress=False).start_step == 2
    assert "already at step 2 of --max-iters 2: nothing to train" in capsys.readouterr().err
    for damage, message in [({"step": "x"}, "state.json is corrupt: its step is 'x'"),
                            ({"sampler": [1, 2]}, "state.json is corrupt: its sampler"),
                            ({"sampler": {"state": 3}}, "random sampler is corrupt"),
                            ({"loss_scale": {"scale": "big"}}, "state.json is corrupt: its loss_scale")]:
        (out / "state.json").write_text(json.dumps({**json.loads(state), **damage}))
        with pytest.raises(UserError, match=message):
            train(TrainConfig.of(resume=True, out=str(out), max_iters=4), progress=False)
    (out / "state.json").write_text(state)
    saved = json.loads(config)
    saved["train"]["batch_size"] = "many"
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="config.json: batch_size must be int, got 'many'"):
        TrainConfig.of(resume=True, out=str(out), max_iters=4)
    (out / "config.json").write_text(config)
    with pytest.raises(UserError, match="a step's batches .* needs at least"):
        train(small_cfg(tmp_path, shakespeare, grad_accum=10**9, out=str(tmp_path / "huge")), progress=False)
    assert not (tmp_path / "huge").exists()


def test_max_seconds_is_a_budget_for_the_whole_run(tmp_path, shakespeare, capsys):
    """Timing, stepping, every evaluation and the saves fit the budget; a run that passes it anyway
    (the machine got busier than its timing) ends there, evaluated and saved."""
    import time

    from mlx_gpt.training import budget

    cfg = small_cfg(tmp_path, shakespeare, max_seconds=8.0, eval_interval=20, eval_iters=10, sample_tokens=0,
                    log_interval=1000, checkpoint_interval=1000)
    start = time.perf_counter()
    run = train(cfg, progress=False)
    took = time.perf_counter() - start
    assert 8.0 * 0.5 < took < 8.0 * budget.OVERRUN + budget.SLACK + 1.0, took
    assert checkpoint.load_state(run.out)["step"] >= 1
    evals = [json.loads(r) for r in (run.out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in r]
    assert evals and evals[-1]["step"] == checkpoint.load_state(run.out)["step"]  # the last step is evaluated



def test_a_run_past_its_budget_ends_evaluated_and_saved(tmp_path, shakespeare, monkeypatch, capsys):
    """Whatever the timing foresaw (here: far too many steps), the run ends once it passes
    OVERRUN x --max-seconds + SLACK, evaluated and saved at that step."""
    import time

    from mlx_gpt.training import budget
    from mlx_gpt.training import run as run_module

    monkeypatch.setattr(run_module, "fit_to_seconds", lambda cfg, *a, **kw: budget.over_steps(cfg, 10**6))
    cfg = small_cfg(tmp_path, shakespeare, max_seconds=1.0, eval_interval=10**5, sample_tokens=0,
                    log_interval=10**5, checkpoint_interval=10**5)
    start = time.perf_counter()
    run = train(cfg, progress=False)
    assert time.perf_counter() - start < 1.0 * budget.OVERRUN + budget.SLACK + 15  # the final evaluation and save
    step = checkpoint.load_state(run.out)["step"]
    assert 1 <= step < 10**6 and f"the budget ran out at step {step} of 1000000" in capsys.readouterr().err
    evals = [json.loads(r) for r in (run.out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in r]
    assert evals[-1]["step"] == step
