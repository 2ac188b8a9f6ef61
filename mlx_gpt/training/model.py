"""The model a run trains: built from the config, from ``--init``'s checkpoint, or a resumed run's,
then assembled for training in one order, and its peak memory known before anything is built."""

from __future__ import annotations

from mlx.utils import tree_flatten

from .. import backend, checkpoint, lora, memory
from ..data import Dataset
from ..errors import UserError
from ..limits import check_bytes, check_model
from ..models import modern, rungs
from ..models.gpt import GPT, PRESETS, GPTConfig, build
from ..models.modern import ModernConfig
from ..recompute import recompute_blocks
from .config import TrainConfig


def shaped_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig | ModernConfig:
    """A new GPT's (or modern GPT's) config: the preset's shape, the data's vocabulary, then the
    fields set."""
    if cfg.model.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.model.preset!r}; choose from {', '.join(PRESETS)}")
    preset, overrides = {**PRESETS[cfg.model.preset], "vocab_size": vocab_size}, cfg.model.overrides
    if cfg.model.rung == "gpt":
        config = GPTConfig(**{**preset, **overrides})
    else:  # the preset's shape (what it leaves unset, GPT-2's), with today's changes
        gpt2 = GPTConfig(**preset)
        shape = {k: getattr(gpt2, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout")}
        config = ModernConfig(**rungs.model_config(rungs.parse("modern"), vocab_size, {**shape, **overrides}))
    check_model(config.to_dict(), "this model")
    check_logits(cfg, config.block_size, config.vocab_size)
    return config


def check_logits(cfg: TrainConfig, block_size: int, vocab_size: int) -> None:
    batch = cfg.step.batch_size
    check_bytes(4 * batch * block_size * vocab_size,
                f"a batch's logits (--batch-size {batch} x block {block_size} x vocab {vocab_size})")


def from_init(cfg: TrainConfig):
    """``--init``'s model (dropout and a cropped block size may change) and tokenizer."""
    base, tokenizer = checkpoint.load(cfg.model.init)
    return checkpoint.derive(base, cfg.model.overrides, f"--init {cfg.model.init}"), tokenizer


def new(cfg: TrainConfig, dataset: Dataset):
    """A fresh model: a GPT or modern GPT of the config's shape, or another rung (count rungs are
    fitted here, on the train split)."""
    if cfg.model.rung == "gpt":
        return build(shaped_config(cfg, dataset.vocab_size), seed=cfg.step.seed)
    if cfg.model.rung == "modern":
        return modern.build(shaped_config(cfg, dataset.vocab_size), seed=cfg.step.seed)
    return rungs.build(cfg.model.rung, dataset.vocab_size, tokens=dataset.tokens("train"),
                       overrides=cfg.model.overrides, seed=cfg.step.seed)


def assemble(model, cfg: TrainConfig, fresh_adapters: bool):
    """``model`` ready to train, each class swap in its order: the machine's layers first, LoRA's
    adapters subclass them, and recomputation wraps whole blocks around both."""
    backend.layers(model)
    if cfg.lora.rank and fresh_adapters:
        lora.apply(model, cfg.lora, seed=cfg.step.seed)
    if cfg.lora.rank and cfg.step.dtype != "float32":
        lora.cast_frozen(model, cfg.step.mx_dtype)
    if cfg.step.grad_checkpoint:
        recompute_blocks(model)
    if cfg.step.loss_chunk and not isinstance(model, GPT):
        raise UserError("--loss-chunk applies to GPT models (a head tied to wte)")
    model.train()
    return model


def memory_check(cfg: TrainConfig, model, dataset: Dataset) -> memory.MemoryEstimate | None:
    """The run's estimated peak; a run that cannot fit is refused here, before its model is built.
    (Only transformer-shaped models are estimated: the ladder's small rungs always fit.)"""
    if model is None and cfg.model.rung not in ("gpt", "modern"):
        return None
    config = model.config if model is not None else shaped_config(cfg, dataset.vocab_size)
    if not all(hasattr(config, f) for f in ("n_layer", "n_embd", "block_size", "vocab_size")):
        return None
    # a fresh model's weights are lazy: nothing is allocated
    counted = model if model is not None else (GPT if cfg.model.rung == "gpt" else modern.ModernGPT)(config)
    n_params = sum(v.size for k, v in tree_flatten(counted.parameters()) if not lora.is_adapter(k))
    trainable = lora.count(config, cfg.lora) if cfg.lora.rank else None
    s = cfg.step
    return memory.check_fits(config, n_params + (trainable or 0), s.batch_size, memory.available_memory(),
                             dtype=s.dtype, grad_accum=s.grad_accum, streams=backend.split_for(s.batch_size,
                                                                                               s.streams)[0],
                             grad_checkpoint=s.grad_checkpoint, loss_chunk=s.loss_chunk, trainable=trainable,
                             attention_weights=backend.attention_weights_kept(s.mx_dtype,
                                                                              getattr(config, "dropout", 0.0)))
