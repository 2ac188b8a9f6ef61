"""Checkpoint directories: written atomically, read strictly.

A checkpoint is a directory holding
  config.json          model type and config, training config
  model.safetensors    weights, GPT-2 names, MLX layout (Linear weights are (out, in))
  optimizer.safetensors, state.json   only for runs that can be resumed
  tokenizer.json (+ its model file)
  train.toml           the run's settings, every one: ``--config`` reproduces the run
  metrics.jsonl        the run's log up to this checkpoint's step, one JSON object a line
  loss.png             the picture of that log (``mlx_gpt.plot``)

A save writes a sibling temp directory, then swaps it in with two renames; if a crash falls
between the two, ``resolve`` finds the previous checkpoint under its ``.old`` name (also when a
log line has been written into a fresh ``NAME/`` since).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .atomic import previous_version, replacing_directory
from .errors import UserError, filesystem_error
from .limits import check_model
from .models.registry import build_model, model_type_of, model_types
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "mlx_gpt"
VERSION = 1
METRICS = "metrics.jsonl"
RUN_LOGS = (METRICS, "loss.png")  # kept from the previous save unless the caller writes the log itself
# what a run writes between checkpoints (its log and the picture of it): each save keeps them


def resolve(path: str | os.PathLike) -> Path:
    """The directory to read a checkpoint from (recovering from an interrupted swap)."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    if (previous_version(p) / "config.json").exists():
        return previous_version(p)
    if not p.exists():
        raise UserError(f"checkpoint {p} not found")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a checkpoint directory")
    raise UserError(f"{p} is not a checkpoint (no config.json)")


def exists(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() or (previous_version(p) / "config.json").exists()


def save(path: str | os.PathLike, model: Any, tokenizer: Tokenizer | None, *, train_config: dict | None = None,
         optimizer: Any = None, state: dict | None = None, files: dict[str, str] | None = None,
         finish: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically; the previous one stays readable until the new one is whole.

    ``files``: further text files to write into it, by name (e.g. the run's ``train.toml`` and
    ``metrics.jsonl``); ``finish(directory)`` adds more (the log's picture) before the swap.
    A file system error (disk full, read-only) is a UserError, and the
    previous checkpoint stays as it was.
    """
    path = Path(path)
    try:
        _check_room(path, model, optimizer)
        _write(path, model, tokenizer, train_config, optimizer, state, files or {}, finish)
    except OSError as e:
        raise filesystem_error(e, f"saving checkpoint {path}") from None
    except RuntimeError as e:  # MLX's writers report a failed write so, without the reason
        raise UserError(f"saving checkpoint {path} failed: {str(e).splitlines()[0]} (is the disk full?)") from None
    return path


def _check_room(path: Path, model: Any, optimizer: Any) -> None:
    """Refuse a save the disk has no room for before writing (MLX's writers cannot say why they fail)."""
    arrays = tree_flatten(model.parameters()) + (tree_flatten(optimizer.state) if optimizer is not None else [])
    need = sum(a.nbytes for _, a in arrays if isinstance(a, mx.array)) + (1 << 20)
    parent = path.parent if path.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"saving checkpoint {path} failed: No space left on device: it needs {need / 2**20:,.1f} MB, "
                        f"the disk holding it has {free / 2**20:,.1f} MB free")


def _write(path: Path, model: Any, tokenizer: Tokenizer | None, train_config: dict | None, optimizer: Any,
           state: dict | None, files: dict[str, str], finish: Callable[[Path], None] | None) -> None:
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
        for name, text in files.items():
            (tmp / name).write_text(text)
        if METRICS not in files:
            for name in RUN_LOGS:
                if (path / name).is_file():
                    shutil.copy2(path / name, tmp / name)
        if finish is not None:
            finish(tmp)


def read_config(path: str | os.PathLike) -> dict:
    p = resolve(path) / "config.json"
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise UserError(f"{p} is not an {FORMAT} checkpoint config")
    _check_model_config(config.get("model_type", "gpt"), config["model"], p)
    return config


def _check_model_config(model_type: str, model: dict, path: Path) -> None:
    """Types as the config class declares them, and a size this machine can hold, before building."""
    from .flags import field_types

    types = model_types()
    if model_type in types:
        for name, kind in field_types(types[model_type][0]).items():
            value = model.get(name)
            if name in model and kind in (int, float, bool, str) and (
                    not isinstance(value, kind) or (kind is int and isinstance(value, bool))) and not (
                    kind is float and isinstance(value, int) and not isinstance(value, bool)):
                raise UserError(f"{path}: model {name} must be {kind.__name__}, got {value!r}")
    check_model(model, f"the model of {path.parent}")


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
