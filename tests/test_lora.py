"""lora: adapters that start at the base, train as peft's LoRA under torch.optim.AdamW, leave the
base untouched, save alone against a named base, resume exactly, and fuse into the same model.

The oracle is PyTorch: the same GPT-2 (tests/reference/torch_gpt.py) with each targeted
``nn.Linear`` wrapped as peft computes LoRA (``base(x) + scale * B(A(x))``, the base frozen),
``torch.optim.AdamW`` over the adapters alone and ``clip_grad_norm_`` over them, trained on the
same batches from the same start. The adapters' B starts at zero, so the first update moves only
B (A's gradient is zero) and the comparison needs several updates to see A train at all.
"""

import json
import math
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import ROOT, assert_one_line_error, run_module
from mlx_gpt.backend import cpu_cores
from mlx_gpt.cpu.blas import set_blas_threads
from mlx_gpt import checkpoint, lora, memory
from mlx_gpt.cpu import accelerate, parallel
from mlx_gpt.cpu.layers import Linear as CPULinear
from mlx_gpt.errors import UserError
from mlx_gpt.fuse import fuse
from mlx_gpt.models.gpt import PRESETS, GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.tokenizer import ByteTokenizer
from mlx_gpt.train import parse_args, train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_train_step

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
STEPS = 6
TRAIN = dict(batch_size=4, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, max_iters=STEPS, weight_decay=0.1,
             beta1=0.9, beta2=0.95, grad_clip=0.5)
# float32 on both sides in different orders; Adam's update does not depend on the gradient's
# scale, so adapters differ by ~1e-6 of lr per update: LOSS_RTOL, and ADAPTER_ATOL after six
# free-running updates at lr 1e-2 (measured: losses 1.2e-7, adapters 1.1e-6)
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-5


def adapted(seed: int = 7) -> "GPT":  # noqa: F821
    return lora.apply(accelerate(build(CFG, seed=seed)), LORA, seed=seed + 1)


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(tree)}


@pytest.fixture(autouse=True)
def restore_blas_threads():
    yield
    set_blas_threads(cpu_cores())  # a split step sets one BLAS thread per stream


# ---------------------------------------------------------------------------- the layers


def test_the_adapted_model_starts_equal_to_its_base_and_trains_only_the_adapters():
    base = accelerate(build(CFG, seed=7))
    x = mx.array(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, CFG.block_size)))
    before = base(x)
    model = lora.apply(base, LORA, seed=8)
    assert mx.array_equal(model(x), before).item()  # B starts at zero: exactly the base
    layer = model.h[0].attn.c_attn
    assert isinstance(layer, CPULinear)  # the CPU's layer still computes W x + b underneath
    assert layer.lora_a.shape == (4, 32) and layer.lora_b.shape == (96, 4)
    assert float(mx.abs(layer.lora_a).max()) <= 1 / math.sqrt(32) and float(mx.abs(layer.lora_a).min()) > 0
    trainable = flat(model.trainable_parameters())
    assert trainable and all(lora.is_adapter(k) for k in trainable)
    assert sum(v.size for v in trainable.values()) == lora.count(CFG, LORA) == 2 * 4 * (32 + 96 + 64 + 160 + 160)
    # every weight the base had is still there, under its own name
    assert {k for k in flat(model.parameters()) if not lora.is_adapter(k)} == set(flat(build(CFG).parameters()))


def test_targets():
    assert lora.parse_targets("c_attn,c_proj,c_fc") == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert lora.parse_targets("mlp.c_proj, c_attn") == ("attn.c_attn", "mlp.c_proj")
    assert lora.parse_targets("attn.c_proj") == ("attn.c_proj",)
    with pytest.raises(UserError, match="unknown layer 'q_proj'"):
        lora.parse_targets("c_attn,q_proj")
    model = lora.apply(accelerate(build(CFG)), lora.LoRAConfig(2, 4.0, "attn.c_attn"))
    assert [k for k in flat(model.trainable_parameters())] == [f"h.{i}.attn.c_attn.lora_{ab}" for i in (0, 1)
                                                                for ab in "ab"]
    with pytest.raises(UserError, match="more than the narrowest"):
        lora.apply(accelerate(build(CFG)), lora.LoRAConfig(33, 4.0))
    from mlx_gpt.models.rungs import build as build_rung
    with pytest.raises(UserError, match="LoRA applies to GPT models"):
        lora.apply(build_rung("lstm", 61, overrides={"n_layer": 1, "n_embd": 16}), LORA)


def test_fusing_gives_the_adapted_model_as_plain_layers():
    model = adapted()
    rng = np.random.default_rng(1)
    for layer in lora.adapted_layers(model):  # adapters that are far from zero
        layer.lora_b = mx.array(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))
    x = mx.array(rng.integers(0, CFG.vocab_size, (2, CFG.block_size)))
    want = model(x)
    fused = lora.fuse(model)
    assert not lora.adapted_layers(fused) and type(fused.h[0].mlp.c_fc) is CPULinear
    assert set(flat(fused.trainable_parameters())) == set(flat(build(CFG).parameters()))
    np.testing.assert_allclose(np.array(fused(x)), np.array(want), rtol=0, atol=2e-6)
    assert float(mx.abs(want - build(CFG, seed=7)(x)).max()) > 1e-2  # the adapters did change the logits


# ---------------------------------------------------------------------------- training, against PyTorch

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "tests" / "reference"))
import torch_gpt  # noqa: E402


class TorchLoRA(torch.nn.Module):
    """peft's LoRA of one linear layer: the frozen base plus scale * B(A(x))."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = torch.nn.Parameter(torch.from_numpy(a.copy()))
        self.lora_b = torch.nn.Parameter(torch.from_numpy(b.copy()))

    def forward(self, x):
        return self.base(x) + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a),
                                                                      self.lora_b)


def torch_lora_model(start: dict[str, np.ndarray]):
    tmodel = torch_gpt.TorchGPT(torch_gpt.TorchGPTConfig(CFG.vocab_size, CFG.block_size, CFG.n_layer, CFG.n_head,
                                                         CFG.n_embd))
    tmodel.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items() if not lora.is_adapter(k)})
    tmodel.requires_grad_(False)
    for i, block in enumerate(tmodel.h):
        for path in LORA.paths:
            owner, name = path.split(".")
            parent = getattr(block, owner)
            key = f"h.{i}.{path}"
            setattr(parent, name, TorchLoRA(getattr(parent, name), start[key + ".lora_a"], start[key + ".lora_b"],
                                            LORA.scale))
    return tmodel


def torch_adapters(tmodel) -> dict[str, np.ndarray]:
    return {k.replace(".base", ""): p.detach().numpy().copy() for k, p in tmodel.named_parameters() if p.requires_grad}


def train_torch(cfg: TrainConfig, data, start: dict[str, np.ndarray]):
    """(losses, adapters after each update) of PyTorch training the adapters as test_optim trains
    every weight: the same schedule, clipping (over the adapters: the frozen base has no gradient)
    and AdamW."""
    from test_optim import torch_step

    tmodel = torch_lora_model(start)
    opt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=cfg.optim.learning_rate,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=1e-8, weight_decay=cfg.optim.weight_decay, foreach=False)
    losses, after = [], []
    for step, (x, y) in enumerate(data):
        losses.append(torch_step(tmodel, opt, cfg, step, x, y)[0])
        after.append(torch_adapters(tmodel))
    return losses, after


def batches(cfg: TrainConfig, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random tokens, each followed by a fixed function of itself: something to learn."""
    rng = np.random.default_rng(seed)
    shape = (cfg.step.grad_accum, cfg.step.batch_size, CFG.block_size)
    xs = [rng.integers(0, CFG.vocab_size, shape) for _ in range(STEPS)]
    return [(x, (3 * x + 1) % CFG.vocab_size) for x in xs]


def train_mlx(cfg: TrainConfig, data, model=None):
    model = model or adapted()
    if cfg.step.dtype != "float32":
        lora.cast_frozen(model, mx.bfloat16)
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg)
    losses, after = [], []
    for x, y in data:
        loss, _ = step(mx.array(x), mx.array(y))
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
        after.append(lora.adapters(model))
    return losses, after, model, optimizer


@pytest.mark.parametrize("variant", [
    dict(streams=1), dict(streams=2), dict(streams=1, grad_accum=3), dict(streams=2, grad_accum=3),
    dict(streams=1, compile=False), dict(streams=1, grad_checkpoint=True), dict(streams=2, loss_chunk=5),
    dict(streams=1, grad_accum=2, grad_checkpoint=True, loss_chunk=16)],
    ids=["one-stream", "split", "accum3", "split-accum3", "eager", "grad-checkpoint", "split-loss-chunk",
         "accum2-checkpoint-chunk"])
def test_adapters_train_as_torch_adamw_on_a_frozen_base(variant):
    """Six updates from the same start on the same batches: the same losses and adapters after
    every update as PyTorch's LoRA under torch.optim.AdamW; the base weights bit for bit as they were."""
    cfg = TrainConfig.of(**TRAIN, **variant)
    data = batches(cfg)
    model = adapted()
    start = flat(model.parameters())
    t_losses, t_after = train_torch(cfg, data, start)
    losses, after, model, optimizer = train_mlx(cfg, data, model)
    np.testing.assert_allclose(losses, t_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0] - 0.05  # the adapters learned something
    for t in range(STEPS):
        assert set(after[t]) == set(t_after[t])
        for k, v in after[t].items():
            np.testing.assert_allclose(np.array(v), t_after[t][k], rtol=0, atol=ADAPTER_ATOL, err_msg=f"{k} {t}")
    a_moved = [float(mx.abs(layer.lora_a - start[f"{name}.lora_a"]).max()) for name, layer in
               ((n, m) for n, m in model.named_modules() if isinstance(m, lora._Adapted))]
    assert min(a_moved) > 1e-3  # A trained too, not only B
    for k, v in flat(model.parameters()).items():
        if not lora.is_adapter(k):
            np.testing.assert_array_equal(v, start[k], err_msg=k)
    assert {k.rsplit(".", 1)[0] for k, _ in tree_flatten(optimizer.state) if k.endswith(".m")} == set(after[0])


def test_bfloat16_holds_the_frozen_base_in_bfloat16_and_trains_float32_adapters():
    cfg = TrainConfig.of(**TRAIN, streams=1)
    data = batches(cfg)
    ref, ref_after, _, _ = train_mlx(cfg, data)
    got, after, model, optimizer = train_mlx(cfg.replace(dtype="bfloat16"), data)
    np.testing.assert_allclose(got, ref, rtol=1e-2)  # bfloat16's 8 bits of mantissa, step for step
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    assert {d for k, d in dtypes.items() if lora.is_adapter(k)} == {mx.float32}
    assert {d for k, d in dtypes.items() if not lora.is_adapter(k)} == {mx.bfloat16}
    assert {v.dtype for _, v in tree_flatten(optimizer.state) if v.ndim} == {mx.float32}
    for k, v in after[-1].items():
        drift = float(mx.linalg.norm(v - ref_after[-1][k]) / mx.linalg.norm(ref_after[-1][k]))
        assert drift < 0.05, (k, drift)


def test_the_memory_estimate_counts_gradients_and_moments_of_the_adapters_only():
    config = GPTConfig(**{**PRESETS["gpt2"], "block_size": 256})
    n = 124_439_808
    adapters = lora.count(config, lora.LoRAConfig(8, 16.0))
    assert adapters == 12 * 8 * (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768)
    full = memory.estimate_train_peak(config, n, 4)
    low = memory.estimate_train_peak(config, n + adapters, 4, trainable=adapters)
    assert low.parameters == 4 * (n + adapters) and low.gradients == 4 * adapters and low.optimizer == 8 * adapters
    assert (low.activations, low.logits) == (full.activations, full.logits)
    assert full.total - low.total > 0.98 * 3 * 4 * n  # the base's gradients and moments are gone
    bf16 = memory.estimate_train_peak(config, n + adapters, 4, trainable=adapters, dtype="bfloat16")
    assert bf16.parameters == 2 * n + (4 + 2) * adapters  # a bfloat16 base, float32 adapters and their cast


# ---------------------------------------------------------------------------- runs and checkpoints


RUN = dict(block_size=24, batch_size=4, grad_accum=2, eval_interval=3, eval_iters=2, log_interval=1, sample_tokens=8,
           max_iters=6, lr_decay_iters=6, learning_rate=3e-3, min_lr=3e-4, warmup_iters=1, checkpoint_interval=100)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small byte-level GPT checkpoint to fine-tune (on fewer positions than it has: RUN)."""
    d = tmp_path_factory.mktemp("base") / "base"
    model = build(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=3)
    checkpoint.save(d, model, ByteTokenizer())
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory, shakespeare):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(shakespeare.read_text()[:60000])
    return p


def lora_cfg(tmp_path, text, base_dir, out="run", **kw) -> TrainConfig:
    return TrainConfig.of(**{**RUN, "data": str(text), "data_dir": str(tmp_path / "data"), "init": str(base_dir),
                          "out": str(tmp_path / out), "lora_rank": 4, **kw})


def losses_of(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, text, base_dir):
    tmp = tmp_path_factory.mktemp("lora")
    run = train(lora_cfg(tmp, text, base_dir), progress=False)
    return run


def test_a_lora_checkpoint_holds_only_the_adapters_and_names_its_base(lora_run, base_dir):
    out = lora_run.out
    assert not (out / "model.safetensors").exists()
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved and all(lora.is_adapter(k) for k in saved)
    assert sum(v.size for v in saved.values()) == lora.count(lora_run.model.config, lora_run.cfg.lora)
    moments = mx.load(str(out / "optimizer.safetensors"))
    assert {k.rsplit(".", 1)[0] for k in moments if k.endswith((".m", ".v"))} == set(saved)
    record = checkpoint.read_config(out)["lora"]
    assert record["rank"] == 4 and record["alpha"] == 16.0 and len(record["targets"]) == 4
    weights = base_dir / "model.safetensors"
    assert record["base"]["path"] == str(base_dir.absolute()) and record["base"]["bytes"] == weights.stat().st_size
    import hashlib
    assert record["base"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    base_weights = {k: np.array(v) for k, v in mx.load(str(weights)).items()}
    for k, v in flat(lora_run.model.parameters()).items():  # the run never touched its base
        if not lora.is_adapter(k):
            np.testing.assert_array_equal(v, base_weights[k][:24] if k == "wpe.weight" else base_weights[k], err_msg=k)
    assert lora_run.cfg.optim.learning_rate == 3e-3  # what the test set, not the LoRA defaults


def test_resuming_a_lora_run_is_exact(tmp_path, text, base_dir, lora_run):
    first = lora_cfg(tmp_path, text, base_dir, max_iters=3)
    train(first, progress=False)
    train(first.replace(max_iters=6, resume=True), progress=False)
    a, b = losses_of(lora_run.out), losses_of(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit
    wa, wb = (mx.load(str(d / "adapters.safetensors")) for d in (lora_run.out, tmp_path / "run"))
    for k in wa:
        assert mx.array_equal(wa[k], wb[k]).item(), k


@pytest.mark.parametrize("kw", [dict(grad_checkpoint=True, loss_chunk=8), dict(dtype="bfloat16"),
                                dict(dtype="bfloat16", grad_checkpoint=True), dict(dtype="float16")],
                         ids=["checkpoint-chunk", "bfloat16", "bfloat16-checkpoint", "float16"])
def test_lora_runs_with_the_memory_savings(tmp_path, text, base_dir, lora_run, kw):
    run = train(lora_cfg(tmp_path, text, base_dir, **kw), progress=False)
    a, b = losses_of(lora_run.out), losses_of(run.out)
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-2 if kw.get("dtype") else 1e-5)
    if kw.get("dtype"):  # the checkpoint's adapters are float32 all the same
        assert {v.dtype for v in mx.load(str(run.out / "adapters.safetensors")).values()} == {mx.float32}


def test_generate_and_eval_from_the_adapters_equal_those_of_the_fused_checkpoint(tmp_path, text, lora_run, capsys):
    from mlx_gpt.eval import main as evaluate
    from mlx_gpt.generate import main as generate

    fused = fuse(lora_run.out, tmp_path / "fused")
    assert (fused / "model.safetensors").is_file() and "lora" not in checkpoint.read_config(fused)
    assert checkpoint.read_config(fused)["model"]["block_size"] == 24  # the run's positions, of the base's 32
    outputs = []
    for d in (lora_run.out, fused):
        generate(["--checkpoint", str(d), "--prompt", "ROMEO:", "--max-new-tokens", "24", "--seed", "5"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("ROMEO:") + 10
    scores = [evaluate(["--checkpoint", str(d), "--data", str(text)]) for d in (lora_run.out, fused)]
    assert scores[0]["loss"] == scores[1]["loss"]
    # the fused weights are the adapted model's, to float32 rounding
    adapted_model = checkpoint.load_model(lora_run.out, fuse=False)
    x = mx.array([list(b"ROMEO: and JULIET")])
    np.testing.assert_allclose(np.array(checkpoint.load_model(fused)(x)), np.array(adapted_model(x)), atol=2e-5)
    assert lora.adapted_layers(adapted_model)


def test_a_changed_or_missing_base_is_one_line(tmp_path, lora_run, base_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run.out, adapter)
    config = json.loads((adapter / "config.json").read_text())
    config["lora"]["base"].update(path=str(base.absolute()), relative="../base")
    (adapter / "config.json").write_text(json.dumps(config))
    assert checkpoint.load_model(adapter)  # a copy of the base, where the record says: fine
    weights = dict(mx.load(str(base / "model.safetensors")))
    weights["ln_f.bias"] = weights["ln_f.bias"] + 1e-3  # the same size, other weights
    mx.save_safetensors(str(base / "model.safetensors"), weights, metadata={"format": "mlx"})
    proc = run_module("mlx_gpt.generate", "--checkpoint", str(adapter), "--prompt", "a", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"the checkpoint {base} has changed since the LoRA adapters in {adapter}")
    shutil.rmtree(base)
    proc = run_module("mlx_gpt.fuse", "--adapter", str(adapter), "--out", str(tmp_path / "fused"), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"apply to the checkpoint {base}, which is gone")
    assert not (tmp_path / "fused").exists()
    with pytest.raises(UserError, match="which is gone"):
        train(lora_run.cfg.replace(out=str(adapter), resume=True, max_iters=8), progress=False)


def test_a_base_moved_together_with_its_adapters_is_found_beside_them(tmp_path, lora_run, base_dir):
    """Both in one folder of checkpoints, moved (or copied to another machine) as a whole."""
    import shutil

    relative = checkpoint.read_config(lora_run.out)["lora"]["base"]["relative"]
    assert (lora_run.out / relative).resolve() == base_dir.resolve()
    root = tmp_path / "moved"  # the two as they lie under pytest's folder: base0/base, lora0/run
    adapter, base = (root / d.parent.name / d.name for d in (lora_run.out, base_dir))
    shutil.copytree(lora_run.out, adapter)
    shutil.copytree(base_dir, base)
    config = json.loads((adapter / "config.json").read_text())
    config["lora"]["base"]["path"] = str(tmp_path / "elsewhere")  # the absolute path no longer holds it
    (adapter / "config.json").write_text(json.dumps(config))
    x = mx.array([list(b"ROMEO:")])
    assert mx.array_equal(checkpoint.load_model(adapter)(x), checkpoint.load_model(lora_run.out)(x)).item()
    shutil.rmtree(base)
    with pytest.raises(UserError, match="which is gone"):
        checkpoint.load_model(adapter)


def test_a_lora_run_pins_its_base(tmp_path, text, base_dir):
    """A base being trained cannot be adapted (its hash would go stale), and an adapted base, while
    a LoRA run or a fuse reads it, cannot be trained."""
    import shutil

    from mlx_gpt import rundir

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    trainer = rundir.RunLock(base).acquire()
    try:
        with pytest.raises(UserError, match="is being written by another mlx_gpt process"):
            train(lora_cfg(tmp_path, text, base), progress=False)
    finally:
        trainer.release()
    reader = rundir.RunLock(base, shared=True).acquire()
    try:
        with pytest.raises(UserError, match="in use by another mlx_gpt process"):
            rundir.claim_out(base, overwrite=True)
        run = train(lora_cfg(tmp_path, text, base), progress=False)  # two readers share it
    finally:
        reader.release()
    rundir.claim_out(base, overwrite=True).release()  # free again once the readers are done
    assert run.adapter["base"]["path"] == str(base.absolute())


def test_adapters_holding_a_nan_are_never_fused(tmp_path, lora_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run.out, run)
    adapters = dict(mx.load(str(run / "adapters.safetensors")))
    name = sorted(adapters)[0]
    adapters[name] = adapters[name].at[0, 0].add(mx.array(mx.nan))
    mx.save_safetensors(str(run / "adapters.safetensors"), adapters)
    with pytest.raises(UserError, match=f"{name} holds NaN or infinite values"):
        fuse(run, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_fuse_writes_only_where_a_checkpoint_belongs(tmp_path, lora_run, base_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("mine")
    for out, what in ((tmp_path / "notes", "holds files that are not an mlx_gpt run"),
                      (base_dir, "is their base"), (lora_run.out, "is the adapters' own run")):
        with pytest.raises(UserError, match=what):
            fuse(lora_run.out, out, overwrite=True)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "mine"
    with pytest.raises(UserError, match="holds no LoRA adapters"):
        fuse(base_dir, tmp_path / "x")
    fuse(lora_run.out, tmp_path / "fused")
    with pytest.raises(UserError, match="already holds a checkpoint; pass --overwrite"):
        fuse(lora_run.out, tmp_path / "fused")
    fuse(lora_run.out, tmp_path / "fused", overwrite=True)
    proc = run_module("mlx_gpt", "fuse", "--adapter", str(lora_run.out), "--out", str(tmp_path / "fused2"),
                      cwd=tmp_path)
    assert proc.returncode == 0 and checkpoint.exists(tmp_path / "fused2"), proc.stderr


def test_fine_tuning_on_top_of_adapters(tmp_path, text, lora_run):
    """A full fine-tune may start from an adapter run (it is loaded fused); new adapters need a
    fused checkpoint to be saved against."""
    with pytest.raises(UserError, match="holds LoRA adapters; fuse them"):
        train(lora_cfg(tmp_path, text, lora_run.out), progress=False)
    run = train(lora_cfg(tmp_path, text, lora_run.out).replace(lora_rank=0, max_iters=1), progress=False)
    assert (run.out / "model.safetensors").is_file()


def test_the_base_is_never_the_run_directory(tmp_path, text, base_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    with pytest.raises(UserError, match="is the base checkpoint of the LoRA adapters"):
        train(lora_cfg(tmp_path, text, base, out="base", overwrite=True), progress=False)
    assert (base / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--init", "B", "--lora-rank", "-1"], "--lora-rank must be 0 (off) or at least 1, got -1"),
    (["--init", "B", "--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--init", "B", "--lora-rank", "8", "--lora-targets", "c_attn,wte"], "unknown layer 'wte'"),
    (["--init", "B", "--lora-alpha", "32"], "--lora-alpha sets up LoRA adapters; give --lora-rank R too"),
    (["--init", "B", "--lora-targets", "c_fc"], "--lora-targets sets up LoRA adapters"),
    (["--lora-rank", "8"], "--lora-rank fine-tunes a checkpoint: give --init CKPT"),
    (["--init", "B", "--model", "lstm", "--lora-rank", "8"], "--lora-rank applies to GPT checkpoints"),
])
def test_lora_flags_are_checked_before_anything_runs(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def test_lora_flags_and_their_defaults(tmp_path):
    cfg = parse_args(["--init", "B", "--lora-rank", "8"])
    assert cfg.lora == lora.LoRAConfig(8, 16.0) and cfg.optim.learning_rate == cfg.optim.min_lr == 2e-4 and cfg.step.grad_accum == 32
    cfg = parse_args(["--init", "B", "--lora-rank", "8", "--learning-rate", "1e-3", "--lora-targets", "c_attn"])
    assert cfg.optim.learning_rate == 1e-3 and cfg.lora.paths == ("attn.c_attn",)
    assert parse_args(["--init", "B"]).optim.learning_rate == 3e-5  # a full fine-tune keeps its own
    proc = run_module("mlx_gpt.train", "--init", "B", "--lora-rank", "0.5", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
    proc = run_module("mlx_gpt.train", "--init", "B", "--lora-targets", "c_fc,x", "--lora-rank", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--lora-targets: unknown layer 'x'")


@pytest.mark.slow  # two processes of MLX start and compile: about 45 s here
def test_two_processes_train_the_adapters_as_one_with_twice_the_batch(tmp_path, text, base_dir):
    """mlx.launch -n 2: the ranks' adapter gradients are averaged as any gradients are; the same
    losses and adapters as one process with both ranks' rows."""
    from test_distributed import cli_args, launch, weights

    common = dict(data=text, data_dir=tmp_path / "data", init=base_dir, lora_rank=4, sampler="sequential",
                  max_iters=4, eval_interval=4, eval_iters=1, log_interval=1, sample_tokens=4, batch_size=2,
                  grad_accum=1, streams=1, learning_rate=3e-3, warmup_iters=1)
    proc = launch(tmp_path, *cli_args({**common, "out": tmp_path / "two"}))
    assert "done: checkpoint" in proc.stderr, proc.stderr[-3000:]
    cfg = parse_args(cli_args({**common, "batch_size": 4, "out": tmp_path / "one"}))
    train(cfg, progress=False)
    a, b = losses_of(tmp_path / "two"), losses_of(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
    ranks = [weights(tmp_path / f"two-rank{r}.safetensors") for r in range(2)]
    two, one = (weights(tmp_path / d / "adapters.safetensors") for d in ("two", "one"))
    for k in one:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])  # every rank applied the same update
        np.testing.assert_array_equal(two[k], ranks[0][k])
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5)
