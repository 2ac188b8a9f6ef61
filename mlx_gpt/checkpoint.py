"""Checkpoint directories: written atomically, read strictly.

A checkpoint is a directory holding
  config.json          model type and config, training config
  model.safetensors    weights, GPT-2 names, MLX layout (Linear weights are (out, in))
  adapters.safetensors instead, for a LoRA run: its adapters only (``lora``); config.json's
                       "lora" names their settings and the base checkpoint they apply to
                       (its absolute path and its path from here, and its model.safetensors'
                       size and SHA-256)
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

from . import backend
from .atomic import previous_version, replacing_directory
from .errors import UserError, filesystem_error
from .formats.json_file import read_json
from .limits import check_model
from .models.registry import build_model, model_type_of, model_types
from .native import sha256_of
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "mlx_gpt"
VERSION = 1
CONFIG, METRICS, PICTURE = "config.json", "metrics.jsonl", "loss.png"
WEIGHTS, ADAPTERS = "model.safetensors", "adapters.safetensors"
OPTIMIZER, STATE, SETTINGS = "optimizer.safetensors", "state.json", "train.toml"
ALLOW_NON_FINITE = "MLX_GPT_ALLOW_NON_FINITE"  # set: load weights holding NaN or infinity (forensics)
RUN_LOGS = (METRICS, PICTURE)  # kept from the previous save unless the caller writes the log itself
# every file a checkpoint may hold (the tokenizers' files included)
FILES = frozenset({CONFIG, WEIGHTS, ADAPTERS, OPTIMIZER, STATE, SETTINGS, METRICS, PICTURE, "tokenizer.json",
                   "tokenizer.model", "vocab.json", "merges.txt"})


# config.json sections whose checkpoints load their own way (a LoRA run's adapters on their base):
# section -> loader(directory, config, fuse) -> model; the owner of the section registers it
LOADERS: dict[str, Callable[[Path, dict, bool], Any]] = {}


def resolve(path: str | os.PathLike) -> Path:
    """The directory to read a checkpoint from (recovering from an interrupted swap)."""
    p = Path(path)
    if (p / CONFIG).exists():
        return p
    if (previous_version(p) / CONFIG).exists():
        return previous_version(p)
    if not p.exists():
        raise UserError(f"checkpoint {p} not found")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a checkpoint directory")
    raise UserError(f"{p} is not a checkpoint (no config.json)")


def is_config(path: Path) -> bool:
    """Whether ``path`` is a config.json an mlx_gpt checkpoint holds."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint of ours (or the previous version a crash left): by the
    config we write, never by a file's name (a Hugging Face folder has a config.json too)."""
    p = Path(path)
    return is_config(p / CONFIG) or is_config(previous_version(p) / CONFIG)


def save(path: str | os.PathLike, model: Any, tokenizer: Tokenizer | None, *, train_config: dict | None = None,
         optimizer: Any = None, state: dict | None = None, files: dict[str, str] | None = None,
         finish: Callable[[Path], None] | None = None, adapter: dict | None = None,
         adapters: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; the previous one stays readable until the new one is whole.

    ``adapter`` and ``adapters`` (a LoRA run): the record of the adapters' settings and base
    checkpoint (``lora.record``), and the adapters' arrays, which are written instead of the
    model's weights.

    ``files``: further text files to write into it, by name (e.g. the run's ``train.toml`` and
    ``metrics.jsonl``); ``finish(directory)`` adds more (the log's picture) before the swap.
    A file system error (disk full, read-only) is a UserError, and the
    previous checkpoint stays as it was.
    """
    path = Path(path)
    try:
        assert (adapter is None) == (adapters is None), "adapters are saved with their record, and only then"
        weights = adapters if adapters is not None else dict(tree_flatten(model.parameters()))
        bad = first_non_finite(weights)
        if bad is not None:
            raise UserError(f"saving checkpoint {path}: {bad} holds NaN or infinite values; nothing was written "
                            "(the weights came from a run that diverged, or from a damaged source)")
        _check_room(path, weights, optimizer)
        _write(path, model, weights, adapter, tokenizer, train_config, optimizer, state, files or {}, finish)
    except OSError as e:
        raise filesystem_error(e, f"saving checkpoint {path}") from None
    except RuntimeError as e:  # MLX's writers report a failed write so, without the reason
        raise UserError(f"saving checkpoint {path} failed: {str(e).splitlines()[0]} (is the disk full?)") from None
    return path


def _check_room(path: Path, weights: dict[str, mx.array], optimizer: Any) -> None:
    """Refuse a save the disk has no room for before writing (MLX's writers cannot say why they fail)."""
    arrays = list(weights.items()) + (tree_flatten(optimizer.state) if optimizer is not None else [])
    need = sum(a.nbytes for _, a in arrays if isinstance(a, mx.array)) + (1 << 20)
    parent = path.parent if path.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"saving checkpoint {path} failed: No space left on device: it needs {need / 2**20:,.1f} MB, "
                        f"the disk holding it has {free / 2**20:,.1f} MB free")


def _write(path: Path, model: Any, weights: dict[str, mx.array], adapter: dict | None, tokenizer: Tokenizer | None,
           train_config: dict | None, optimizer: Any, state: dict | None, files: dict[str, str],
           finish: Callable[[Path], None] | None) -> None:
    config = {"format": FORMAT, "version": VERSION, "model_type": model_type_of(model),
              "model": model.config.to_dict(), "train": train_config}
    if adapter is not None:
        # the base also by its place relative to this checkpoint: the two may move together
        relative = os.path.relpath(adapter["base"]["path"], path.absolute())
        config["lora"] = {**adapter, "base": {**adapter["base"], "relative": relative}}
    with replacing_directory(path) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        mx.save_safetensors(str(tmp / (ADAPTERS if adapter else WEIGHTS)), weights, metadata={"format": "mlx"})
        if optimizer is not None:
            mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
        if state is not None:
            (tmp / STATE).write_text(json.dumps(state) + "\n")
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
    p = resolve(path) / CONFIG
    config = read_json(p)
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise UserError(f"{p} is not an {FORMAT} checkpoint config")
    _check_model_config(config.get("model_type", "gpt"), config["model"], p)
    return config


def _check_model_config(model_type: str, model: dict, path: Path) -> None:
    """Types as the config class declares them, and a size this machine can hold, before building."""
    types = model_types()
    if model_type in types:
        try:
            types[model_type][0].check_types(model)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    check_model(model, f"the model of {path.parent}")


def load_arrays(path: Path) -> dict[str, mx.array]:
    try:
        arrays = mx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(arrays, dict):
        raise UserError(f"{path} is not a safetensors file")
    return arrays


def load_model(path: str | os.PathLike, fuse: bool = True) -> Any:
    """Rebuild the model a checkpoint describes and load its weights strictly.

    A LoRA run's checkpoint is loaded onto its base (checked to be the one it was trained on);
    ``fuse`` folds the adapters in, as generation and export want, else they stay apart and
    trainable on the frozen base (a resumed run)."""
    d = resolve(path)
    config = read_config(d)
    for section, loader in LOADERS.items():
        if section in config:
            return loader(d, config, fuse)
    model = _build(config.get("model_type", "gpt"), config["model"])
    load_into(model, load_arrays(d / WEIGHTS), d / WEIGHTS)
    return model


def _build(model_type: str, config: dict) -> Any:
    """An uninitialised model of a checkpoint's type and config, with this machine's layers."""
    return backend.layers(build_model(model_type, config))


def derive(base: Any, changes: dict, source: str) -> Any:
    """A model of ``base``'s type and weights in which only ``block_size`` (``wpe`` cropped to its
    first rows) and ``dropout`` may differ: what fine-tuning a checkpoint, or adapting it, may
    change without changing what its weights compute."""
    config = base.config.to_dict()
    for name, value in changes.items():
        if name not in ("block_size", "dropout") and config.get(name) != value:
            raise UserError(f"--{name.replace('_', '-')} {value} differs from {source}'s {config.get(name)}")
    block = changes.get("block_size", base.block_size)
    if block > base.block_size:
        raise UserError(f"--block-size {block} is beyond {source}'s {base.block_size} positions")
    model = _build(model_type_of(base), {**config, **{k: changes[k] for k in ("block_size", "dropout") if k in changes}})
    weights = [(k, v[:block] if k == "wpe.weight" else v) for k, v in tree_flatten(base.parameters())]
    model.load_weights(weights, strict=True)
    return model


def load_into(model: Any, weights: dict[str, mx.array], path: Path) -> None:
    """Load ``weights`` strictly, refusing non-finite ones unless ALLOW_NON_FINITE is set (to
    look at a damaged checkpoint): a model holding a NaN would generate garbage, or nothing."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{path} does not fit its config: {str(e).splitlines()[0]}") from None
    mx.eval(model.parameters())
    bad = None if os.environ.get(ALLOW_NON_FINITE) else first_non_finite(weights)
    if bad is not None:
        raise UserError(f"{path}: {bad} holds NaN or infinite values (a run that diverged, or a damaged file); "
                        f"set {ALLOW_NON_FINITE}=1 to load it anyway")


def first_non_finite(arrays: dict[str, Any]) -> str | None:
    """The name of the first floating-point array holding a NaN or an infinity, else None (one read)."""
    names = [k for k, a in arrays.items() if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.inexact)]
    if not names:
        return None
    finite = mx.stack([mx.all(mx.isfinite(arrays[k])) for k in names]).tolist()
    return next((k for k, ok in zip(names, finite) if not ok), None)


def fingerprint(weights: Path) -> dict:
    """A weights file's size and SHA-256: what a checkpoint that builds on it (a LoRA run's) records."""
    try:
        return {"bytes": weights.stat().st_size, "sha256": sha256_of(weights)}
    except OSError as e:
        raise filesystem_error(e, f"reading {weights}") from None


def load(path: str | os.PathLike) -> tuple[Any, Tokenizer]:
    """``model, tokenizer = load("checkpoints/run")``; the model is in eval mode (a LoRA run's
    is its base with the adapters fused in)."""
    d = resolve(path)
    model = load_model(d)
    model.eval()
    return model, load_tokenizer(d)


def load_optimizer_state(path: str | os.PathLike) -> dict:
    d = resolve(path)
    return tree_unflatten(list(load_arrays(d / OPTIMIZER).items()))


def load_state(path: str | os.PathLike) -> dict:
    """state.json: where a run stopped (step, best val loss, the number of processes, the
    sampler's position, float16's loss scale), each value checked before a resume trusts it."""
    p = resolve(path) / STATE
    state = read_json(p, missing=": this checkpoint cannot be resumed")
    if not isinstance(state, dict):
        raise UserError(f"{p} is corrupt: not a table")

    def whole(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    scale = state.get("loss_scale", {})
    fine = {"step": whole(state.get("step"), 0), "world_size": whole(state.get("world_size", 1), 1),
            "best_val": number(state.get("best_val", 0.0)), "sampler": isinstance(state.get("sampler", {}), dict),
            "loss_scale": isinstance(scale, dict) and all(number(scale.get(k, 0))
                                                          for k in ("scale", "good_steps", "skipped"))}
    wrong = [key for key, ok in fine.items() if not ok]
    if wrong:
        raise UserError(f"{p} is corrupt: its {wrong[0]} is {state.get(wrong[0])!r}")
    return state
