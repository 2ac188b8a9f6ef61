"""Checkpoint directories: written atomically, read strictly.

A checkpoint is a directory holding
  config.json          model type and config, training config
  model.safetensors    weights, GPT-2 names, MLX layout (Linear weights are (out, in))
  optimizer.safetensors, state.json   only for runs that can be resumed
  tokenizer.json (+ its model file)
  train.toml           the run's settings, every one: ``--config`` reproduces the run
  metrics.jsonl        the run's log, one JSON object a line
  loss.png             the picture of that log (``mlx_gpt.plot``)

A save writes a sibling temp directory, then swaps it in with two renames; if a crash falls
between the two, ``resolve`` finds the previous checkpoint under its ``.old`` name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .atomic import previous_version, replacing_directory
from .errors import UserError
from .models.registry import build_model, model_type_of
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "mlx_gpt"
VERSION = 1
METRICS = "metrics.jsonl"
# what a run writes between checkpoints (its log and the picture of it): each save keeps them
RUN_LOGS = (METRICS, "loss.png")


def resolve(path: str | os.PathLike) -> Path:
    """The directory to read a checkpoint from (recovering from an interrupted swap)."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    if not p.exists() and (previous_version(p) / "config.json").exists():
        return previous_version(p)
    if not p.exists():
        raise UserError(f"checkpoint {p} not found")
    raise UserError(f"{p} is not a checkpoint (no config.json)")


def exists(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() or (previous_version(p) / "config.json").exists()


def save(path: str | os.PathLike, model: Any, tokenizer: Tokenizer | None, *, train_config: dict | None = None,
         optimizer: Any = None, state: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint atomically; the previous one stays readable until the new one is whole.

    ``files``: further text files to write into it, by name (e.g. the run's ``train.toml``).
    """
    path = Path(path)
    config = {"format": FORMAT, "version": VERSION, "model_type": model_type_of(model),
              "model": model.config.to_dict(), "train": train_config}
    with replacing_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        if optimizer is not None:
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for name in RUN_LOGS:
            if (path / name).exists():
                shutil.copy2(path / name, tmp / name)
    return path


def read_config(path: str | os.PathLike) -> dict:
    p = resolve(path) / "config.json"
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise UserError(f"{p} is not an {FORMAT} checkpoint config")
    return config


def _load_arrays(path: Path) -> dict[str, mx.array]:
    try:
        arrays = mx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(arrays, dict):
        raise UserError(f"{path} is not a safetensors file")
    return arrays


def load_model(path: str | os.PathLike) -> Any:
    """Rebuild the model a checkpoint describes and load its weights strictly."""
    d = resolve(path)
    config = read_config(d)
    model = build_model(config.get("model_type", "gpt"), config["model"])
    weights = _load_arrays(d / "model.safetensors")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{d / 'model.safetensors'} does not fit its config: {str(e).splitlines()[0]}") from None
    mx.eval(model.parameters())
    return model


def load(path: str | os.PathLike) -> tuple[Any, Tokenizer]:
    """``model, tokenizer = load("checkpoints/run")``; the model is in eval mode."""
    d = resolve(path)
    model = load_model(d)
    model.eval()
    return model, load_tokenizer(d)


def load_optimizer_state(path: str | os.PathLike) -> dict:
    d = resolve(path)
    return tree_unflatten(list(_load_arrays(d / "optimizer.safetensors").items()))


def load_state(path: str | os.PathLike) -> dict:
    p = resolve(path) / "state.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p} is missing: this checkpoint cannot be resumed") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is corrupt: {e}") from None
