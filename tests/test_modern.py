import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint, lora
from mlx_gpt.decoding import Decoder
from mlx_gpt.errors import UserError
from mlx_gpt.lora import LoRAConfig
from mlx_gpt.models import gpt, modern, rungs
from mlx_gpt.models.cache import FixedKVCache
from mlx_gpt.sampling import SamplingConfig
from mlx_gpt.tokenizer import ByteTokenizer
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig

SHAPE = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=16)


def randomised(model, seed: int = 0):
    """Every weight drawn at random (zero-initialised projections would hide the paths through them)."""
    rng = np.random.default_rng(seed)
    model.load_weights([(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.parameters())])
    return model


def torch_forward(torch, cfg: modern.ModernConfig, weights: dict, idx: np.ndarray) -> np.ndarray:
    """The modern GPT written out in PyTorch from its definitions, every change on."""
    F = torch.nn.functional
    w = {k: torch.tensor(np.array(v)) for k, v in weights.items()}
    B, T = idx.shape
    nh, C = cfg.n_head, cfg.n_embd
    hs = C // nh
    eps = cfg.layer_norm_eps

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]  # (T, hs/2)
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rotate(x):  # halves rotated together (GPT-NeoX's layout, MLX's traditional=False)
        a, b = x[..., :hs // 2], x[..., hs // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    x = w["wte.weight"][torch.tensor(idx)]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        q, k, v = (rms(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].T).split(C, dim=-1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(rms(q, w[p + "attn.q_norm.weight"])), rotate(rms(k, w[p + "attn.k_norm.weight"]))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + y @ w[p + "attn.c_proj.weight"].T
        h = F.relu(rms(x, w[p + "ln_2.weight"]) @ w[p + "mlp.c_fc.weight"].T).square()
        x = x + h @ w[p + "mlp.c_proj.weight"].T
    logits = rms(x, w["ln_f.weight"]) @ w["lm_head.weight"].T
    return (cfg.softcap * torch.tanh(logits / cfg.softcap)).numpy()


def test_forward_equals_a_pytorch_transcription(torch):
    cfg = modern.ModernConfig(**SHAPE)
    model = randomised(modern.build(cfg))
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20))
    got = np.array(model(mx.array(idx)))
    want = torch_forward(torch, cfg, dict(tree_flatten(model.parameters())), idx)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_with_no_changes_it_is_gpt2_weight_for_weight():
    none = modern.build(modern.ModernConfig.with_changes("none", **SHAPE), seed=3)
    g = gpt.build(gpt.GPTConfig(**SHAPE), seed=3)
    assert dict(tree_flatten(none.parameters())).keys() == dict(tree_flatten(g.parameters())).keys()
    idx = mx.array(np.random.default_rng(2).integers(0, 256, (2, 24)))
    np.testing.assert_array_equal(np.array(none(idx)), np.array(g(idx)))


def test_each_change_switches_alone_and_zero_init_starts_from_uniform_logits():
    base = modern.ModernConfig.with_changes("none", **SHAPE).to_dict()
    for change in modern.CHANGES:
        one = modern.ModernConfig.with_changes(change, **SHAPE).to_dict()
        assert {k for k in one if one[k] != base[k]} == {change}
    model = modern.build(modern.ModernConfig(**SHAPE))
    assert not any(k.endswith(".bias") or k == "wpe.weight" for k, _ in tree_flatten(model.parameters()))
    logits = model(mx.array([[1, 2, 3]]))
    np.testing.assert_array_equal(np.array(logits), 0.0)
    with pytest.raises(UserError, match="unknown change"):
        modern.ModernConfig.with_changes("rope,alibi")


def test_cached_decoding_equals_the_full_forward_with_rotary_offsets():
    model = randomised(modern.build(modern.ModernConfig(**SHAPE)), seed=4)
    x = mx.array(np.random.default_rng(3).integers(0, 256, (2, 24)))
    full = np.array(model(x))
    cache = model.make_cache()
    parts = [model(x[:, :10], cache)] + [model(x[:, i:i + 1], cache) for i in range(10, 24)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), full, rtol=1e-4, atol=1e-4)
    fixed = [FixedKVCache(32) for _ in model.h]  # the compiled decoder's caches: offset is an array
    parts = [model(x[:, :7], fixed)] + [model(x[:, i:i + 1], fixed) for i in range(7, 24)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_follows_the_full_forward():
    model = randomised(modern.build(modern.ModernConfig(**SHAPE)), seed=5)
    prompt = [3, 14, 15, 9, 26]
    got = [t[0] for t in Decoder(model, SamplingConfig(temperature=0.0)).tokens(prompt, 12)]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert got == seq[len(prompt):]


def test_saved_and_loaded_by_name_with_lora_on_top(tmp_path):
    model = randomised(modern.build(modern.ModernConfig.with_changes("rope,relu2,softcap", **SHAPE)), seed=6)
    checkpoint.save(tmp_path / "m", model, ByteTokenizer())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "modern"
    loaded, _ = checkpoint.load(tmp_path / "m")
    idx = mx.array([[1, 5, 9, 2]])
    np.testing.assert_allclose(np.array(loaded(idx)), np.array(model(idx)), rtol=1e-5, atol=1e-6)  # CPU layers
    lora.apply(loaded, LoRAConfig(rank=2))  # adapters start at zero: the model is unchanged
    trainable = {k for k, _ in tree_flatten(loaded.trainable_parameters())}
    assert trainable and all(lora.is_adapter(k) for k in trainable)
    np.testing.assert_allclose(np.array(loaded(idx)), np.array(model(idx)), rtol=1e-5, atol=1e-6)


def test_the_modern_rung_tops_the_ladder_and_counts_its_untied_head():
    assert rungs.RUNGS[-1] == "modern"
    model = rungs.build("modern", 256, overrides={"changes": "rope,untied", "n_layer": 2})
    assert model.config.rope and model.config.untied and not model.config.rms_norm and model.config.n_layer == 2
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    c = model.config
    assert rungs.flops_per_token(model, "modern") == 6.0 * (n - 256 * 128) + 12 * 2 * 128 * c.block_size


def test_train_stops_at_its_first_evaluation_at_the_target(tmp_path, shakespeare):
    kw = dict(data=str(shakespeare), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), model="modern",
              n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2, log_interval=5,
              sample_tokens=4, max_iters=60, eval_interval=10, stop_at_val_loss=4.0, optimizer="adamw",
              learning_rate=2e-3)  # slow enough to evaluate above the target first
    train(TrainConfig.of(**kw), progress=False)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert evals[-1]["val_loss"] <= 4.0 < min(r["val_loss"] for r in evals[:-1])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == evals[-1]["step"] < 60 and math.isclose(state["best_val"], evals[-1]["val_loss"])
    assert checkpoint.load(tmp_path / "run")[0].config.n_layer == 2


def test_the_default_model_trains_on_packed_masked_examples(tmp_path):
    """The default run's model takes an example set as GPT-2 does: packed rows, the prompts masked,
    the loss falling from its first evaluation to its last."""
    rng = np.random.default_rng(0)
    d = tmp_path / "sums"
    d.mkdir()
    for split, n in (("train", 400), ("valid", 40)):
        pairs = rng.integers(0, 50, (n, 2))
        d.joinpath(f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n" for a, b in pairs))
    run = train(TrainConfig.of(data=str(d), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), n_layer=2,
                               n_head=2, n_embd=32, block_size=64, batch_size=8, mask_prompt=True, pack=True,
                               max_iters=40, eval_interval=10, eval_iters=4, sample_tokens=0), progress=False)
    assert run.cfg.model.rung == "modern" and run.cfg.optim.optimizer == "muon"
    evals = [r["val_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert len(evals) == 4 and all(map(math.isfinite, evals)) and evals == sorted(evals, reverse=True), evals
    assert evals[-1] < evals[0] - 0.2, evals
    assert type(checkpoint.load(tmp_path / "run")[0]) is modern.ModernGPT


def test_changes_belong_to_the_modern_model(tmp_path):
    proc = run_module("mlx_gpt.train", "--model", "gpt", "--changes", "rope", "--out", str(tmp_path / "r"),
                      cwd=tmp_path)
    assert_one_line_error(proc, "--changes applies to a new --model modern")
    assert TrainConfig.of(changes="rope").model.rung == "modern"  # the default model takes them


def test_the_speedrun_config_trains_nanogpts_example_shape_within_a_tenth_of_its_parameters():
    from conftest import ROOT
    from mlx_gpt import flags

    given = flags.read_toml(ROOT / "configs" / "shakespeare-char-speedrun.toml", TrainConfig)
    cfg = TrainConfig.of(**given)
    assert cfg.model.rung == "modern" and cfg.optim.optimizer == "muon"
    ours = rungs.build("modern", 65, overrides=cfg.model.overrides).num_params()  # 65: its characters
    c = gpt.GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    theirs = gpt.GPT(c).num_params()  # nanoGPT's model: no biases, tied head
    assert abs(ours / theirs - 1) < 0.1, (ours, theirs)
