"""Quantized checkpoints: written by ``convert --quantize``, loaded by ``quantize.load``, close to the
float model they come from, and served like any other."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import checkpoint, quantize
from mlx_gpt.convert import main as convert
from mlx_gpt.errors import UserError
from mlx_gpt.generate import generate
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.tokenizer import ByteTokenizer

CFG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)


def param_bytes(model) -> int:
    """Bytes the model's parameters take, packed weights as stored."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "float"
    checkpoint.save(path, build(CFG, seed=5), ByteTokenizer())
    return path


@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.2)])
def test_quantized_checkpoint_loads_and_stays_close(float_ckpt, tmp_path, bits, tolerance):
    out = tmp_path / f"q{bits}"
    convert([str(float_ckpt), "--quantize", str(bits), "--group-size", "32", "--out", str(out)])
    model, tok = checkpoint.load(out)  # this module's loader is registered: any caller reads it
    assert quantize.settings(out) == {"bits": bits, "group_size": 32}
    assert checkpoint.read_config(out)["quantization"] == {"bits": bits, "group_size": 32}
    assert isinstance(model.wte, nn.QuantizedEmbedding)  # the tied head is quantized with it
    assert all(isinstance(b.mlp.c_fc, nn.QuantizedLinear) and isinstance(b.attn.c_attn, nn.QuantizedLinear)
               for b in model.h)
    assert model.wte.bits == bits and model.wte.group_size == 32
    reference, _ = checkpoint.load(float_ckpt)
    x = mx.array([tok.encode("The with statement")])
    want, got = np.array(reference(x)), np.array(model(x))
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()
    assert param_bytes(model) < param_bytes(reference) * (0.35 if bits == 8 else 0.22)
    # generation runs on it as on any model
    assert len(generate(model, tok, "Hi", 10, temperature=0).encode("utf-8", "surrogatepass")) > 0


def test_float_checkpoints_load_through_the_same_call(float_ckpt):
    model, _ = quantize.load(float_ckpt)
    assert not quantize.is_quantized(model) and quantize.settings(float_ckpt) is None


def test_refusals_are_user_errors(float_ckpt, tmp_path):
    with pytest.raises(UserError, match="one of 32, 64, 128, got 48"):
        convert([str(float_ckpt), "--quantize", "8", "--group-size", "48", "--out", str(tmp_path / "a")])
    with pytest.raises(UserError, match="group-size 128 must divide every layer's input width; 64"):
        convert([str(float_ckpt), "--quantize", "8", "--group-size", "128", "--out", str(tmp_path / "a")])
    with pytest.raises(UserError, match="hf holds float weights only"):
        convert([str(float_ckpt), "--quantize", "8", "--to", "hf", "--out", str(tmp_path / "b")])
    out = tmp_path / "q"
    convert([str(float_ckpt), "--quantize", "4", "--out", str(out)])
    with pytest.raises(UserError, match="already holds a checkpoint; pass --overwrite"):
        convert([str(float_ckpt), "--quantize", "4", "--out", str(out)])
    with pytest.raises(UserError, match="never writes over what it reads"):
        convert([str(out), "--quantize", "4", "--out", str(out), "--overwrite"])
    with pytest.raises(UserError, match="already quantized"):
        convert([str(out), "--quantize", "8", "--out", str(tmp_path / "qq")])
    convert([str(float_ckpt), "--quantize", "8", "--out", str(out), "--overwrite"])
    assert quantize.settings(out)["bits"] == 8
    with pytest.raises(UserError, match="holds quantized weights"):
        convert([str(out), "--to", "hf", "--out", str(tmp_path / "hf")])
    config = checkpoint.read_config(out)
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"bits": 3, "group_size": 64}}))
    with pytest.raises(UserError, match="its quantization must name bits"):
        checkpoint.load(out)


@pytest.mark.parametrize("bits", [8, 4])
def test_mlx_lm_loads_the_quantized_export_and_computes_the_same(float_ckpt, tmp_path, bits):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    out = tmp_path / "lm"
    convert([str(float_ckpt), "--quantize", str(bits), "--group-size", "32", "--to", "mlx-lm", "--out", str(out)])
    theirs = mlx_lm_utils.load_model(out)[0]
    assert isinstance(theirs.model.h[0].mlp.c_fc, nn.QuantizedLinear)
    assert isinstance(theirs.model.wte, nn.QuantizedEmbedding)
    ours, tok = quantize.load(float_ckpt)
    quantize.quantize(ours, bits, 32)
    x = mx.array([tok.encode("The with statement is used")])
    want, got = ours(x), theirs(x)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
    # greedy tokens: the same continuation
    ids = list(tok.encode("Hi"))
    a, b = list(ids), list(ids)
    for _ in range(12):
        a.append(int(mx.argmax(ours(mx.array([a]))[0, -1])))
        b.append(int(mx.argmax(theirs(mx.array([b]))[0, -1])))
    assert a == b
