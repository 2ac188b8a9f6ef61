import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_gpt
from mlx_gpt import checkpoint
from mlx_gpt.cpu import accelerate
from mlx_gpt.errors import UserError
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.tokenizer import ByteTokenizer
from mlx.utils import tree_flatten

CFG = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_save_then_load_gives_the_same_model(tmp_path):
    model = accelerate(build(CFG, seed=4))  # as loading gives it
    checkpoint.save(tmp_path / "ck", model, ByteTokenizer(), train_config={"lr": 1})
    loaded, tok = mlx_gpt.load(str(tmp_path / "ck"))
    assert not loaded.training and tok.kind == "byte"
    x = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(loaded(x)), np.array(model(x)))
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "gpt" and config["model"]["n_embd"] == 16 and config["train"] == {"lr": 1}
    names = set(mx.load(str(tmp_path / "ck" / "model.safetensors")))
    assert {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.weight", "h.1.mlp.c_proj.bias",
            "ln_f.bias"} <= names


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    checkpoint.save(tmp_path / "ck", build(CFG), ByteTokenizer())
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["model"]["n_embd"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not fit its config"):
        checkpoint.load(tmp_path / "ck")


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        checkpoint.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"n_embd": 768}')
    with pytest.raises(UserError, match="not an mlx_gpt checkpoint"):
        checkpoint.load(tmp_path / "other")


def test_a_second_save_replaces_the_first_whole(tmp_path):
    a, b = build(CFG, seed=1), build(CFG, seed=2)
    checkpoint.save(tmp_path / "ck", a, ByteTokenizer(), state={"step": 1})
    (tmp_path / "ck" / "metrics.jsonl").write_text('{"step": 1}\n')
    checkpoint.save(tmp_path / "ck", b, ByteTokenizer(), state={"step": 2})
    assert checkpoint.load_state(tmp_path / "ck")["step"] == 2
    assert mx.array_equal(checkpoint.load_model(tmp_path / "ck").wte.weight, b.wte.weight)
    assert (tmp_path / "ck" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the log travels along
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_non_finite_weights_are_never_written_and_loaded_only_when_asked(tmp_path, monkeypatch):
    """A NaN or an infinity in any weight: every save refuses it before writing (the previous
    checkpoint stays), and every load refuses it unless MLX_GPT_ALLOW_NON_FINITE is set."""
    model = build(CFG, seed=4)
    checkpoint.save(tmp_path / "ck", model, ByteTokenizer())
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    for bad in (mx.nan, mx.inf):
        model.h[1].mlp.c_fc.bias = model.h[1].mlp.c_fc.bias.at[3].add(mx.array(bad))
        with pytest.raises(UserError, match="h.1.mlp.c_fc.bias holds NaN or infinite values; nothing was written"):
            checkpoint.save(tmp_path / "ck", model, ByteTokenizer())
        assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
        model = build(CFG, seed=4)
    # a file damaged after it was written
    weights = dict(mx.load(str(tmp_path / "ck" / "model.safetensors")))
    weights["wpe.weight"] = weights["wpe.weight"].at[0, 0].add(mx.array(mx.nan))
    mx.save_safetensors(str(tmp_path / "ck" / "model.safetensors"), weights)
    with pytest.raises(UserError, match="wpe.weight holds NaN or infinite values .* MLX_GPT_ALLOW_NON_FINITE=1"):
        checkpoint.load(tmp_path / "ck")
    monkeypatch.setenv(checkpoint.ALLOW_NON_FINITE, "1")
    loaded, _ = checkpoint.load(tmp_path / "ck")
    assert np.isnan(np.array(loaded.wpe.weight)[0, 0])


def test_generate_on_non_finite_weights_is_one_error_line(tmp_path):
    from conftest import assert_one_line_error, run_module

    weights = dict(tree_flatten(build(CFG, seed=4).parameters()))
    checkpoint.save(tmp_path / "ck", build(CFG, seed=4), ByteTokenizer())
    weights["ln_f.weight"] = weights["ln_f.weight"] * mx.array(mx.inf)
    mx.save_safetensors(str(tmp_path / "ck" / "model.safetensors"), weights)
    proc = run_module("mlx_gpt.generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "a", cwd=tmp_path)
    assert_one_line_error(proc, "ln_f.weight holds NaN or infinite values")
    assert proc.stdout == ""
