"""LoRA: fine-tune a GPT through low-rank adapters on its projections, its own weights frozen.

A targeted layer computes ``W x + b + (alpha / r) B (A x)`` (Hu et al., 2021): A is (r, in),
drawn uniformly within +-1/sqrt(in) (Kaiming-uniform's bound, as peft and mlx-lm draw it), B is
(out, r) and starts at zero, so the adapted model starts exactly equal to its base. Only A and B
train: the base weights are frozen, so they get no gradients and no optimizer state, which is
where a full fine-tune's memory goes (weights, gradients and AdamW's two moments, 16 bytes a
parameter, against 4 for a frozen weight).

As ``recompute.py`` does for blocks, ``apply`` swaps each targeted layer's class in place for a
subclass of it that adds the adapter: the base weights keep their GPT-2 names (and the CPU's
layers, ``cpu.accelerate``, stay underneath), and the adapters sit beside them as
``h.{i}.attn.c_attn.lora_a`` / ``lora_b``. ``fuse`` folds them back into W.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import checkpoint
from .errors import UserError
from .flags import setting
from .models.base import mix_in

# --lora-targets names: a projection by its own name (c_proj is both attention's and the MLP's),
# or by its path inside a block
TARGETS = {"c_attn": ("attn.c_attn",), "c_proj": ("attn.c_proj", "mlp.c_proj"), "c_fc": ("mlp.c_fc",),
           "attn.c_attn": ("attn.c_attn",), "attn.c_proj": ("attn.c_proj",), "mlp.c_fc": ("mlp.c_fc",),
           "mlp.c_proj": ("mlp.c_proj",)}
DEFAULT_TARGETS = "c_attn,c_proj,c_fc"  # every projection of attention and the MLP
ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoRAConfig:
    """A run's adapters: their rank (0: none, every weight trains), alpha and the layers they adapt."""

    rank: int = setting(0, "fine-tune --init through LoRA adapters of this rank, its own weights frozen; "
                           "checkpoints hold the adapters only (0: off, every weight trains)", flag="lora_rank")
    alpha: float = setting(16.0, "LoRA's alpha: the adapters' output is scaled by alpha / rank", flag="lora_alpha")
    targets: str = setting(DEFAULT_TARGETS, f"layers of each block that get adapters: {', '.join(TARGETS)} (c_proj "
                                            "is both attention's and the MLP's)", flag="lora_targets")

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise UserError(f"--lora-rank must be 0 (off) or at least 1, got {self.rank}")
        if not self.rank:
            if self.alpha != 16.0 or self.targets != DEFAULT_TARGETS:
                raise UserError(f"--lora-{'alpha' if self.alpha != 16.0 else 'targets'} sets up LoRA adapters; "
                                "give --lora-rank R too")
            return
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UserError(f"--lora-alpha must be a positive number, got {self.alpha}")
        self.paths  # every target known

    @property
    def paths(self) -> tuple[str, ...]:
        """The block paths the targets name (``attn.c_attn``, ...), each once, in a fixed order."""
        return parse_targets(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.paths)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        try:
            targets = tuple(d["targets"])
            if any(not isinstance(t, str) or t not in TARGETS for t in targets):
                raise ValueError(targets)
            config = cls(int(d["rank"]), float(d["alpha"]), ",".join(targets))
            if config.rank < 1:
                raise ValueError(config.rank)
            return config
        except (KeyError, TypeError, ValueError, UserError) as e:
            raise UserError(f"the LoRA settings {d!r} are not valid ({e})") from None


def parse_targets(text: str) -> tuple[str, ...]:
    """``"c_attn,c_proj"`` -> the block paths it names, in a fixed order, each once."""
    paths: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name not in TARGETS:
            raise UserError(f"--lora-targets: unknown layer {name!r}; choose from {', '.join(TARGETS)}")
        paths += [p for p in TARGETS[name] if p not in paths]
    if not paths:
        raise UserError("--lora-targets names no layer")
    order = TARGETS["c_attn"] + TARGETS["c_proj"][:1] + TARGETS["c_fc"] + TARGETS["c_proj"][1:]
    return tuple(p for p in order if p in paths)


class _Adapted:
    """A linear layer plus its low-rank adapter: ``W x + b + scale * B (A x)``."""

    lora_scale: float

    def __call__(self, x: mx.array) -> mx.array:
        # (..., in) -> (..., r) -> (..., out): the adapter never forms its (out, in) product
        return super().__call__(x) + self.lora_scale * ((x @ self.lora_a.T) @ self.lora_b.T)


def adapted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if isinstance(m, _Adapted)]


def is_adapter(name: str) -> bool:
    """Whether a parameter's name (``h.0.attn.c_attn.lora_a``) is an adapter's."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def _targets(model: nn.Module, config: LoRAConfig) -> list[nn.Linear]:
    from .models.gpt import GPT
    from .models.modern import ModernGPT

    if type(model) not in (GPT, ModernGPT):
        raise UserError(f"LoRA applies to GPT models; this one is a {type(model).__name__}")
    layers = []
    for block in model.h:
        for path in config.paths:
            layer = block
            for part in path.split("."):
                layer = getattr(layer, part)
            layers.append(layer)
    widest = min(min(layer.weight.shape) for layer in layers)
    if config.rank > widest:
        raise UserError(f"--lora-rank {config.rank} is more than the narrowest targeted layer's {widest} "
                        "dimensions: an adapter that wide is a full fine-tune")
    return layers


def apply(model: nn.Module, config: LoRAConfig, seed: int = 0) -> nn.Module:
    """Add adapters to ``model``'s targeted layers and freeze everything else; returns it.

    Call it after ``cpu.accelerate`` (the adapter subclasses the layer's class as it is then).
    """
    layers = _targets(model, config)
    keys = mx.random.split(mx.random.key(seed), len(layers))
    for layer, key in zip(layers, keys):
        out_dim, in_dim = layer.weight.shape
        bound = 1.0 / math.sqrt(in_dim)
        layer.lora_a = mx.random.uniform(-bound, bound, (config.rank, in_dim), key=key)
        layer.lora_b = mx.zeros((out_dim, config.rank))
        layer.lora_scale = config.scale
        mix_in(layer, _Adapted)
    model.freeze()
    for layer in layers:
        layer.unfreeze(keys=list(ADAPTER_NAMES), recurse=False)
    mx.eval(model.parameters())
    return model


def count(model_config, config: LoRAConfig) -> int:
    """The adapters' parameters on a GPT of ``model_config``: r x (in + out) a targeted layer."""
    C = model_config.n_embd
    shapes = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    return model_config.n_layer * sum(config.rank * sum(shapes[t]) for t in config.paths)


def adapters(model: nn.Module) -> dict[str, mx.array]:
    """The adapters' arrays by name: what an adapter checkpoint holds."""
    return {k: v for k, v in tree_flatten(model.parameters()) if is_adapter(k)}


def fuse(model: nn.Module) -> nn.Module:
    """Fold each adapter into its layer (``W + scale * B A``, in W's dtype) and drop it; returns
    the plain model, every weight trainable again."""
    for layer in adapted_layers(model):
        delta = layer.lora_scale * (layer.lora_b.astype(mx.float32) @ layer.lora_a.astype(mx.float32))
        layer.weight = (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)
        for name in ADAPTER_NAMES:
            del layer[name]
        layer.__class__ = next(c for c in type(layer).__mro__[1:] if not issubclass(c, _Adapted))
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def cast_frozen(model: nn.Module, dtype: mx.Dtype) -> None:
    """Hold the frozen weights in ``dtype`` (a bfloat16 run's compute dtype): they never take an
    update, so the float32 master copy a trained weight needs would only cost memory, and each
    step's cast of them would cost time. The adapters stay float32."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    frozen = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters()) if k not in trainable]
    model.load_weights(frozen, strict=False)
    mx.eval(model.parameters())


# ---------------------------------------------------------------------------- checkpoints


def record(base: str | os.PathLike, config: LoRAConfig) -> dict:
    """What a LoRA checkpoint says of its adapters: their settings, and the base checkpoint they
    apply to by absolute path, and by its weights file's size and SHA-256 (a base replaced by
    other weights under the same name is noticed, not silently adapted)."""
    d = checkpoint.resolve(base)
    return {**config.to_dict(), "base": {"path": str(d.absolute()), **checkpoint.fingerprint(d / checkpoint.WEIGHTS)}}


def _load(d: Path, config: dict, fuse_them: bool) -> nn.Module:
    """A LoRA checkpoint: its base's weights (``wpe`` cropped to the run's block size), its
    adapters on them."""
    record = config["lora"]
    base = record.get("base") if isinstance(record, dict) else None
    if not (isinstance(base, dict) and isinstance(base.get("path"), str) and isinstance(base.get("bytes"), int)
            and isinstance(base.get("sha256"), str)):
        raise UserError(f"{d / 'config.json'}: its LoRA record names no base checkpoint")
    settings = LoRAConfig.from_dict(record)
    base_dir = Path(base["path"])
    moved = d / base["relative"] if isinstance(base.get("relative"), str) else None
    if not checkpoint.exists(base_dir) and moved is not None and checkpoint.exists(moved):
        base_dir = moved
    if not checkpoint.exists(base_dir):
        raise UserError(f"the LoRA adapters in {d} apply to the checkpoint {base_dir}, which is gone; "
                        "put it back there, or beside them where it was (adapters are only usable on the weights "
                        "they were trained on)")
    base_dir = checkpoint.resolve(base_dir)
    if "lora" in checkpoint.read_config(base_dir):
        raise UserError(f"{base_dir}, the base of {d}, holds LoRA adapters itself; fuse them first")
    weights_file = base_dir / checkpoint.WEIGHTS
    if not weights_file.is_file() or weights_file.stat().st_size != base["bytes"] or \
            checkpoint.fingerprint(weights_file)["sha256"] != base["sha256"]:
        raise UserError(f"the checkpoint {base_dir} has changed since the LoRA adapters in {d} were trained on it "
                        "(its model.safetensors is not the same file): the adapters apply only to the weights "
                        "they were trained with")
    base_model = checkpoint.load_model(base_dir)
    changes = {k: v for k, v in config["model"].items() if base_model.config.to_dict().get(k) != v}
    try:
        model = checkpoint.derive(base_model, changes, f"their base {base_dir}")
    except UserError as e:
        raise UserError(f"the LoRA adapters in {d} do not fit their base: {e}") from None
    found = checkpoint.load_arrays(d / checkpoint.ADAPTERS)
    strangers = [k for k in found if not is_adapter(k)]
    if strangers:
        raise UserError(f"{d / checkpoint.ADAPTERS} holds weights that are not adapters ({strangers[0]}, ...)")
    apply(model, settings)
    checkpoint.load_into(model, {**dict(tree_flatten(model.parameters())), **found}, d / checkpoint.ADAPTERS)
    return fuse(model) if fuse_them else model


checkpoint.LOADERS["lora"] = _load
