"""Quantized checkpoints: every Linear and Embedding of a model in 8 or 4 bits, in groups.

MLX's affine quantization (``mx.quantize``) stores each row of a weight in groups of
``group_size`` values: ``bits``-bit integers packed into uint32, with a float scale and bias per
group. ``nn.quantize`` swaps each ``nn.Linear`` for an ``nn.QuantizedLinear`` and each
``nn.Embedding`` for an ``nn.QuantizedEmbedding``, whose ``as_linear`` is GPT's tied head, so
the head is quantized with the token embedding it shares. Layer norms and biases stay float.

A quantized checkpoint is an ordinary checkpoint directory whose ``model.safetensors`` holds
the packed weights (``weight``, ``scales``, ``biases`` per layer, mlx-lm's names) and whose
config.json has a ``quantization`` section (``{"bits": 8, "group_size": 64}``, as mlx-lm's
config.json has). This module owns that section: it registers the loader that builds the model,
quantizes its layers the same way and then loads the weights strictly, so ``checkpoint.load``
reads quantized checkpoints once this module is imported.

  python tools/convert.py checkpoints/run --quantize 8 --out checkpoints/run-q8
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import backend, checkpoint, rundir
from .errors import UserError
from .models.registry import build_model, model_type_of

SECTION = "quantization"  # of config.json
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def check(model: Any, bits: int, group_size: int) -> None:
    """Refuse settings MLX cannot quantize this model with, as one clear error."""
    if bits not in BITS:
        raise UserError(f"--quantize takes {' or '.join(map(str, BITS))} bits, got {bits}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if is_quantized(model):
        raise UserError("the model is already quantized")
    widths = {m.weight.shape[-1] for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        fits = [str(g) for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        raise UserError(f"--group-size {group_size} must divide every layer's input width; {bad[0]} is not a "
                        "multiple " + (f"(try {', '.join(fits)})" if fits else
                                       f"and no group size MLX takes ({', '.join(map(str, GROUP_SIZES))}) divides all"))


def quantize(model: Any, bits: int = 8, group_size: int = 64) -> Any:
    """Quantize every Linear and Embedding of model in place (the tied head with wte); returns it."""
    check(model, bits, group_size)
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def is_quantized(model: Any) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def settings(path: str | os.PathLike) -> dict | None:
    """A checkpoint's quantization (``{"bits": .., "group_size": ..}``), or None for float weights."""
    return _settings(checkpoint.read_config(path), checkpoint.resolve(path))


def _settings(config: dict, d: Path) -> dict | None:
    q = config.get(SECTION)
    if q is None:
        return None
    if not (isinstance(q, dict) and q.get("bits") in BITS and q.get("group_size") in GROUP_SIZES):
        raise UserError(f"{d / checkpoint.CONFIG}: its {SECTION} must name bits ({' or '.join(map(str, BITS))}) "
                        f"and group_size ({', '.join(map(str, GROUP_SIZES))})")
    return {"bits": q["bits"], "group_size": q["group_size"]}


def _load(d: Path, config: dict, fuse: bool) -> Any:
    """The loader of checkpoints with a quantization section: layers quantized, then the weights."""
    q = _settings(config, d)
    model = backend.layers(build_model(config.get("model_type", "gpt"), config["model"]))
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"])
    checkpoint.load_into(model, checkpoint.load_arrays(d / checkpoint.WEIGHTS), d / checkpoint.WEIGHTS)
    return model


checkpoint.LOADERS[SECTION] = _load
load = checkpoint.load  # with this module's loader registered above: float and quantized checkpoints alike


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, bits: int = 8, group_size: int = 64,
                        overwrite: bool = False) -> Path:
    """Write src's model quantized, with its tokenizer and training settings, as the checkpoint out."""
    src, out = checkpoint.resolve(src), Path(out)
    if settings(src) is not None:
        raise UserError(f"{src} is already quantized")
    lock = rundir.claim_out(out, overwrite=overwrite, inputs={"the checkpoint being quantized": src})
    try:
        model, tokenizer = checkpoint.load(src)
        quantize(model, bits, group_size)
        record = {"bits": bits, "group_size": group_size}

        def add_section(directory: Path) -> None:  # config.json as save wrote it, plus the section
            config = json.loads((directory / checkpoint.CONFIG).read_text())
            (directory / checkpoint.CONFIG).write_text(json.dumps({**config, SECTION: record}, indent=2) + "\n")

        return checkpoint.save(out, model, tokenizer, train_config=checkpoint.read_config(src).get("train"),
                               finish=add_section)
    finally:
        lock.release()


def export_mlx_lm(src: str | os.PathLike, out: str | os.PathLike, *, bits: int = 8, group_size: int = 64,
                  overwrite: bool = False) -> Path:
    """Write src quantized (or as quantized already) as an mlx-lm GPT-2 directory.

    mlx-lm's layout is ours under ``model.`` (see ``formats.mlx_lm``), with each quantized
    layer's ``weight``/``scales``/``biases`` as MLX packs them and ``quantization`` in its
    config.json: mlx-lm quantizes each layer whose scales the file holds, then loads the
    weights as they are.
    """
    from .atomic import replacing_directory
    from .formats import hf_tokenizer, mlx_lm

    out = Path(out)
    rundir.check_claim(out, overwrite=overwrite, inputs={"the checkpoint being exported": checkpoint.resolve(src)},
                       check=rundir.check_export, holds=Path.exists, what="a model")
    q = settings(src)
    model, tokenizer = checkpoint.load(src)
    if q is None:
        quantize(model, bits, group_size)
        q = {"bits": bits, "group_size": group_size}
    elif (q["bits"], q["group_size"]) != (bits, group_size):
        raise UserError(f"{src} is quantized to {q['bits']} bits in groups of {q['group_size']}; ask for those")
    if model_type_of(model) != "gpt" or not model.config.bias:
        raise UserError(f"{src} is not a GPT-2 (with biases), which mlx-lm's gpt2 expects")
    config = {**mlx_lm.config_dict(model.config, tokenizer.eot_id), "quantization": q}
    weights = {mlx_lm.PREFIX + name: a for name, a in tree_flatten(model.parameters())}
    lock = rundir.claim_out(out, overwrite=overwrite, check=rundir.check_export, holds=Path.exists, what="a model")
    try:
        with replacing_directory(out) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            if hf_tokenizer.has_form(tokenizer):
                hf_tokenizer.write_tokenizer(tmp, tokenizer, model.config.block_size)
            rundir.record_written(tmp)
    finally:
        lock.release()
    return out
