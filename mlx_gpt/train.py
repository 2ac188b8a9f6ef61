"""Train a GPT: ``python -m mlx_gpt.train`` (see ``--help``).

The hot path is one ``mx.compile``d step (forward, loss, backward over every micro-batch,
clipping, AdamW) whose model, optimizer and RNG state are captured inputs and outputs.
Everything around it — data, evaluation, logging, checkpoints — is plain Python that
touches values only when it reports them.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import checkpoint, distributed, flags, limits, lora, memory, plot, rundir
from .cpu import accelerate, ops, parallel
from .data import SAMPLERS, BatchSampler, Dataset, make_sampler, prepare, tokenizer_digest
from .errors import UserError, run_cli
from .generate import generate
from .loss import chunked_cross_entropy, cross_entropy
from .models import rungs
from .models.base import eval_mode
from .models.gpt import GPT, PRESETS, GPTConfig, build
from .optim import AdamW, OptimConfig, clip_and_update, compute_in, make_optimizer
from .recompute import recompute_blocks
from .scaler import MIN_SCALE, LossScaler
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str = "pydoc"
    tokenizer: str = "byte"
    data_dir: str = "data"
    val_fraction: float = 0.1
    sampler: str = "random"
    # model: a rung of the ladder (gpt: a preset, any field overridden, or weights from a checkpoint)
    model: str = "gpt"
    preset: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    init: str | None = None
    # LoRA: adapters on --init's projections, its weights frozen (0: off, a full fine-tune)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = lora.DEFAULT_TARGETS
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 600
    max_seconds: float | None = None
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 60
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dtype: str = "float32"
    grad_checkpoint: bool = False
    loss_chunk: int = 0
    seed: int = 1337
    compile: bool = True
    streams: int = 0
    # reporting and checkpoints
    out: str | None = None
    eval_interval: int = 200
    eval_iters: int = 20
    log_interval: int = 10
    sample_interval: int | None = None
    sample_tokens: int = 200
    sample_prompt: str = ""
    checkpoint_interval: int = 200
    rank_timeout: float = 600.0
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                    "checkpoint_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        _check_optim_flags(self)
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise UserError(f"--max-seconds must be a positive number of seconds, got {self.max_seconds}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.rank_timeout < 0:
            raise UserError(f"--rank-timeout must be 0 (none) or more seconds, got {self.rank_timeout}")
        if self.loss_chunk < 0:
            raise UserError(f"--loss-chunk must be 0 (off) or a number of positions, got {self.loss_chunk}")
        if self.streams < 0:
            raise UserError(f"--streams must be 0 (one per core) or more, got {self.streams}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        _check_lora_flags(self)
        check_run_flags(self)

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(learning_rate=self.learning_rate, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                           decay_iters=self.lr_decay_iters or self.max_iters, weight_decay=self.weight_decay,
                           beta1=self.beta1, beta2=self.beta2)

    @property
    def lora(self) -> lora.LoRAConfig | None:
        if not self.lora_rank:
            return None
        return lora.LoRAConfig.from_flags(self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def model_overrides(self) -> dict:
        names = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _check_optim_flags(cfg: TrainConfig) -> None:
    """Numbers the optimizer can use: finite (``--learning-rate nan`` would train to NaN), in range."""
    def need(ok: bool, name: str, what: str) -> None:
        value = getattr(cfg, name)
        if not (ok and math.isfinite(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {value}")

    need(cfg.learning_rate > 0, "learning_rate", "a positive number")
    need(cfg.min_lr >= 0, "min_lr", "zero or a positive number")
    need(cfg.weight_decay >= 0, "weight_decay", "zero or a positive number")
    need(cfg.grad_clip >= 0, "grad_clip", "zero (off) or a positive number")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(cfg, name) < 1, name, "in [0, 1)")


def _check_lora_flags(cfg: TrainConfig) -> None:
    """LoRA fine-tunes a GPT checkpoint: adapters are saved against the base they were trained on."""
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (off) or at least 1, got {cfg.lora_rank}")
    if not cfg.lora_rank:
        for name in ("lora_alpha", "lora_targets"):
            if getattr(cfg, name) != getattr(TrainConfig, name):
                raise UserError(f"--{name.replace('_', '-')} sets up LoRA adapters; give --lora-rank R too")
        return
    lora.LoRAConfig.from_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # a positive alpha, known targets
    if not cfg.init and not cfg.resume:
        raise UserError("--lora-rank fine-tunes a checkpoint: give --init CKPT (the adapters are saved against it)")
    if cfg.model != "gpt":
        raise UserError(f"--lora-rank applies to GPT checkpoints, not --model {cfg.model}")


# Flags a resumed run may change: how long and how often, never what is trained.
RESUMABLE_OVERRIDES = {"max_iters", "eval_interval", "eval_iters", "log_interval", "sample_interval",
                       "sample_tokens", "sample_prompt", "checkpoint_interval", "compile", "data_dir", "streams",
                       "grad_checkpoint", "rank_timeout", "loss_chunk"}


def check_run_flags(cfg: "TrainConfig") -> None:
    """What must hold before a run starts, so no mistake surfaces only after hours of training."""
    limits.check_seed(cfg.seed)
    if cfg.sample_tokens < 0:
        raise UserError(f"--sample-tokens must be 0 or more, got {cfg.sample_tokens}")
    if cfg.sample_interval is not None and cfg.sample_interval < 1:
        raise UserError(f"--sample-interval must be at least 1, got {cfg.sample_interval}")
    for name in ("sample_prompt", "data", "out", "init", "data_dir"):
        value = getattr(cfg, name)
        if isinstance(value, str):
            limits.check_text(value, f"--{name.replace('_', '-')}")


# ---------------------------------------------------------------------------- pure pieces


def loss_fn(model: nn.Module, x: mx.array, y: mx.array, label_smoothing: float = 0.0, loss_chunk: int = 0) -> mx.array:
    """Mean next-token cross-entropy, computed in float32 whatever the model's dtype.

    With ``loss_chunk``, a GPT's logits are computed that many positions at a time from its final
    hidden states and its tied head (``wte``), forward and backward, and never held whole.
    """
    if loss_chunk:
        head = model.wte.weight
        return mx.mean(chunked_cross_entropy(model.features(x), head, y, loss_chunk, label_smoothing,
                                             weight_grad="weight" in model.wte.trainable_parameters()))
    return mx.mean(cross_entropy(model(x), y, label_smoothing=label_smoothing))


def make_train_step(model: nn.Module, optimizer: AdamW, cfg: TrainConfig,
                    group: mx.distributed.Group | None = None, scaler: LossScaler | None = None) -> Callable:
    """step(x, y) -> (loss, grad_norm) over x, y of shape (accum, B, T); updates model and optimizer.

    With several processes (``group``), the loss and gradients are the means over every rank's
    batch, so the norm, the clipping and the update are the same on every rank. A float16 run
    scales its loss with ``scaler`` (a fresh one if none is given) and skips the steps whose
    gradients overflow; their norm is then not finite.
    """
    group = group or distributed.init()
    # on the CPU, each micro-batch is split over the cores, one stream (thread) each
    plan = parallel.plan_for(model, cfg.batch_size, cfg.streams)
    cache_freed_buffers()
    loss = compute_in(DTYPES[cfg.dtype], partial(loss_fn, label_smoothing=cfg.label_smoothing,
                                                  loss_chunk=cfg.loss_chunk))
    clip = partial(clip_and_update, max_norm=cfg.grad_clip)
    scaler_state = []  # what the step reads and writes besides the model and the optimizer
    if cfg.dtype == "float16":
        scaler = scaler or LossScaler()
        loss, clip, scaler_state = scaler.scaled(loss), scaler.guarded(clip), [scaler.state]
    if plan is not None:
        return parallel.make_parallel_step(model, optimizer, loss, clip, plan, compile=cfg.compile,
                                           reduce=partial(distributed.all_mean, group=group), state=scaler_state)
    grad_fn = nn.value_and_grad(model, loss)
    accum = cfg.grad_accum

    def update(loss: mx.array, grads: dict) -> tuple[mx.array, mx.array]:
        loss, grads = distributed.all_mean((loss, grads), group)
        return loss, clip(model, optimizer, grads)

    if accum == 1:  # the whole step as one graph
        def step(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
            return update(*grad_fn(model, x[0], y[0]))

        state = [model.state, optimizer.state, mx.random.state, *scaler_state]
        return mx.compile(step, inputs=state, outputs=state) if cfg.compile else step

    def micro_batch(x: mx.array, y: mx.array, loss: mx.array, grads: dict) -> tuple[mx.array, dict]:
        """The running sums of the loss and gradients, one micro-batch further."""
        loss_i, grads_i = grad_fn(model, x, y)
        return loss + loss_i, tree_map(mx.add, grads, grads_i)

    def finish(loss: mx.array, grads: dict) -> tuple[mx.array, mx.array]:
        return update(loss / accum, tree_map(lambda g: g / accum, grads))

    if cfg.compile:
        # model.state is an output too: value_and_grad leaves its traced parameters in the model
        state = [model.state, mx.random.state]
        micro_batch = mx.compile(micro_batch, inputs=state + scaler_state, outputs=state)
        state = [model.state, optimizer.state, *scaler_state]
        finish = mx.compile(finish, inputs=state, outputs=state)

    def accumulated_step(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        # each micro-batch's gradients are summed and evaluated before the next one starts, so
        # one micro-batch's activations are alive at a time (as one graph, MLX kept about half
        # of every micro-batch's)
        loss = mx.array(0.0)
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
        for i in range(accum):
            loss, grads = micro_batch(x[i], y[i], loss, grads)
            mx.eval(loss, grads)
        return finish(loss, grads)

    return accumulated_step


def make_eval_loss(model: nn.Module, cfg: TrainConfig) -> Callable:
    """eval_loss(x, y) -> the mean loss of a batch (B, T); on the CPU its rows are split over the
    train step's streams, as the step's are."""
    loss = compute_in(DTYPES[cfg.dtype], partial(loss_fn, loss_chunk=cfg.loss_chunk))
    plan = parallel.plan_for(model, cfg.batch_size, cfg.streams)
    if plan is not None:
        return parallel.make_parallel_eval(model, loss, plan, compile=cfg.compile)

    def f(x: mx.array, y: mx.array) -> mx.array:
        return loss(model, x, y)

    return mx.compile(f, inputs=model.state) if cfg.compile else f


def estimate_loss(eval_loss: Callable, sampler: BatchSampler, iters: int, seed: int,
                  group: mx.distributed.Group | None = None) -> float:
    """Mean loss over the same ``iters`` batches every time (a fixed seed), so evals compare;
    with several processes, over every rank's rows of those batches."""
    sampler.set_state(np.random.Generator(np.random.PCG64(seed)).bit_generator.state)
    total = mx.array(0.0)
    for _ in range(iters):
        x, y = sampler.next()
        total = total + eval_loss(mx.array(x[0]), mx.array(y[0]))
    return distributed.all_mean(total / iters, group or distributed.init()).item()


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The global RNG (dropout) is re-seeded from (seed, step) every step: resume is exact.
    Each rank draws its own dropout masks."""
    return (seed * 1_000_003 + step + (rank << 40)) % (1 << 63)


def cache_freed_buffers() -> None:
    """On the CPU, keep freed buffers for reuse up to the memory limit, as MLX does on Metal.

    MLX's CPU allocator caches only 32 MB by default; a train step frees far more than that
    every step, and each buffer it hands back to the OS returns as fresh pages that the kernel
    must fault in and zero again (a tenth of a step's time).
    """
    if mx.default_device().type == mx.DeviceType.cpu:
        mx.set_cache_limit(mx.get_memory_limit())


def set_wired_limit() -> None:
    """On Metal, wire the recommended working set so weights are not paged out (as mlx-lm does)."""
    if mx.metal.is_available():
        mx.set_wired_limit(mx.metal.device_info()["max_recommended_working_set_size"])


# ---------------------------------------------------------------------------- setting up a run


@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    dataset: Dataset
    model: nn.Module
    tokenizer: Tokenizer | None
    optimizer: AdamW
    start_step: int = 0
    best_val: float = math.inf
    train_state: dict | None = None
    rank: int = 0  # this process's place among ``world`` (mlx.launch); only rank 0 writes
    world: int = 1
    memory: memory.MemoryEstimate | None = None
    train_seconds: float = 0.0  # spent stepping in this call: evaluation, sampling and checkpoints excluded
    scaler: LossScaler | None = None  # float16 runs' loss scale (saved with the checkpoint)
    lock: rundir.RunLock | None = None
    log: rundir.RunLog | None = None
    adapter: dict | None = None  # a LoRA run's: its adapters' settings and base (checkpoint.adapter_record)


def _memory_check(cfg: TrainConfig, model: nn.Module | None, dataset: Dataset) -> memory.MemoryEstimate | None:
    """The run's estimated peak; a run that cannot fit is refused here, before its model is built.
    (Only transformer-shaped models are estimated: the ladder's small rungs always fit.)"""
    if model is None and cfg.model != "gpt":
        return None
    config = model.config if model is not None else _model_config(cfg, dataset)
    if not all(hasattr(config, f) for f in ("n_layer", "n_embd", "block_size", "vocab_size")):
        return None
    counted = model if model is not None else GPT(config)  # a fresh GPT's weights are lazy: nothing allocated
    n_params = sum(v.size for k, v in tree_flatten(counted.parameters()) if not lora.is_adapter(k))
    trainable = lora.count(config, cfg.lora) if cfg.lora else None
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    streams = parallel.split_for(cfg.batch_size, cfg.streams)[0] if on_cpu else 1
    return memory.check_fits(config, n_params + (trainable or 0), cfg.batch_size, memory.available_memory(),
                             dtype=cfg.dtype, grad_accum=cfg.grad_accum, streams=streams,
                             grad_checkpoint=cfg.grad_checkpoint, loss_chunk=cfg.loss_chunk, trainable=trainable,
                             attention_weights=ops.attention_weights_kept(DTYPES[cfg.dtype],
                                                                          getattr(config, "dropout", 0.0)))


def _model_config(cfg: TrainConfig, dataset: Dataset) -> GPTConfig:
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    base = dict(PRESETS[cfg.preset])
    base["vocab_size"] = dataset.vocab_size
    config = GPTConfig(**{**base, **cfg.model_overrides})
    limits.check_model(config.to_dict(), "this model")
    _check_logits(cfg, config.block_size, config.vocab_size)
    return config


def _check_logits(cfg: TrainConfig, block_size: int, vocab_size: int) -> None:
    limits.check_bytes(4 * cfg.batch_size * block_size * vocab_size,
                       f"a batch's logits (--batch-size {cfg.batch_size} x block {block_size} x vocab {vocab_size})")


def _init_model(cfg: TrainConfig) -> tuple[nn.Module, Tokenizer]:
    """Weights and tokenizer of --init; dropout may change and block_size may shrink (wpe is cropped)."""
    base, tokenizer = checkpoint.load(cfg.init)
    overrides = cfg.model_overrides
    for name, value in overrides.items():
        if name not in ("block_size", "dropout") and getattr(base.config, name) != value:
            raise UserError(f"--{name.replace('_', '-')} {value} differs from {cfg.init}'s {getattr(base.config, name)}")
    block = overrides.get("block_size", base.block_size)
    if block > base.block_size:
        raise UserError(f"--block-size {block} is beyond {cfg.init}'s {base.block_size} positions")
    new_config = replace(base.config, **{k: v for k, v in overrides.items() if k in ("block_size", "dropout")})
    weights = [(k, v[:block] if k == "wpe.weight" else v) for k, v in tree_flatten(base.parameters())]
    model = type(base)(new_config)
    model.load_weights(weights, strict=True)
    return model, tokenizer


def _dataset(cfg: TrainConfig, tokenizer: Tokenizer | None) -> Dataset:
    """The run's data, encoded with ``tokenizer`` when the model already has one."""
    kw = dict(data_dir=cfg.data_dir, val_fraction=cfg.val_fraction)
    if tokenizer is None:
        return prepare(cfg.data, cfg.tokenizer, **kw)
    if not cfg.init:  # a resumed run: its own data cache, if it still matches the run's tokenizer
        dataset = prepare(cfg.data, cfg.tokenizer, **kw)
        if dataset.tokenizer is None or tokenizer_digest(dataset.tokenizer) == tokenizer_digest(tokenizer):
            return dataset
    return prepare(cfg.data, tokenizer, **kw)


def setup(cfg: TrainConfig, given: Collection[str] | None = None) -> Run:
    """Resolve data, model, optimizer and (when resuming) saved state for a run."""
    group = distributed.init()
    if cfg.out is not None:
        rundir.check_out(Path(cfg.out))
    if cfg.resume:
        if cfg.out is None:
            raise UserError("--resume needs --out naming the run to continue")
        saved = checkpoint.read_config(cfg.out).get("train") or {}
        cfg = _merge_resumed(saved, cfg, _given(cfg) if given is None else given)
        model, tokenizer = checkpoint.load_model(cfg.out, fuse=False), load_tokenizer(checkpoint.resolve(cfg.out))
        adapter = checkpoint.read_config(cfg.out).get("lora")
    elif cfg.init:
        if cfg.lora and "lora" in checkpoint.read_config(cfg.init):
            raise UserError(f"--init {cfg.init} holds LoRA adapters; fuse them into a checkpoint first "
                            f"(python -m mlx_gpt.fuse --adapter {cfg.init} --out DIR) and train new ones on that")
        model, tokenizer = _init_model(cfg)
        adapter = checkpoint.adapter_record(cfg.init, cfg.lora) if cfg.lora else None
    else:
        model, tokenizer, adapter = None, None, None
    dataset = distributed.rank_zero_first(group, lambda: _dataset(cfg, tokenizer))
    if tokenizer is None:
        tokenizer = dataset.tokenizer
    peak = _memory_check(cfg, model, dataset)  # before anything is built or deleted
    if cfg.out is None:
        name = Path(cfg.init).name if cfg.init else cfg.preset if cfg.model == "gpt" else cfg.model.replace(":", "")
        cfg = replace(cfg, out=str(Path("checkpoints") / f"{dataset.path.name}-{name}"))
    out = Path(cfg.out)
    rundir.check_out(out)
    if checkpoint.exists(out) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if adapter is not None and out.resolve() == Path(adapter["base"]["path"]).resolve():
        raise UserError(f"--out {out} is the base checkpoint of the LoRA adapters; they are saved beside it, not "
                        "over it: choose another folder")
    # --overwrite deletes nothing: the new run's first checkpoint replaces the old one whole
    if model is None and cfg.model == "gpt":
        model = build(_model_config(cfg, dataset), seed=cfg.seed)
    elif model is None:  # another rung of the ladder; count rungs are fitted here, on the train split
        model = rungs.build(cfg.model, dataset.vocab_size, tokens=dataset.train_file, overrides=cfg.model_overrides,
                            seed=cfg.seed)
    accelerate(model)
    if cfg.lora and not cfg.resume:  # a resumed run's adapters came with it
        lora.apply(model, cfg.lora, seed=cfg.seed)
    if cfg.lora and cfg.dtype != "float32":
        lora.cast_frozen(model, DTYPES[cfg.dtype])
    if cfg.grad_checkpoint:
        recompute_blocks(model)
    if cfg.loss_chunk and not hasattr(model, "features"):
        raise UserError("--loss-chunk applies to GPT models (a head tied to wte)")
    model.train()
    if model.config.vocab_size < dataset.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the data's "
                        f"({dataset.vocab_size})")
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    run = Run(cfg, out, dataset, model, tokenizer, optimizer, rank=group.rank(), world=group.size(), memory=peak,
              adapter=adapter, scaler=LossScaler() if cfg.dtype == "float16" else None)
    if run.rank == 0:  # the one that writes: everything is checked, from here on the run owns out
        run.lock = rundir.RunLock(out).acquire()
        rundir.clean_up(out)
    if cfg.resume:
        opt_state = checkpoint.load_optimizer_state(out)
        expected = {k: v.shape for k, v in tree_flatten(optimizer.state)}
        if expected != {k: v.shape for k, v in tree_flatten(opt_state)}:
            raise UserError(f"{out}/optimizer.safetensors does not match the model")
        optimizer.state = opt_state
        state = checkpoint.load_state(out)
        distributed.check_world_size(state.get("world_size", 1), group, str(out))
        run.start_step, run.best_val, run.train_state = state["step"], state.get("best_val", math.inf), state
        if run.scaler is not None and "loss_scale" in state:  # else a fresh scale, as at the start
            run.scaler.load_state_dict(state["loss_scale"])
    if run.rank == 0:
        run.log = rundir.RunLog(out, run.start_step if cfg.resume else None)
    return run


def _merge_resumed(saved: dict, cli: TrainConfig, given: Collection[str]) -> TrainConfig:
    """The saved config, with only the settings a resumed run may change taken from ``given``."""
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    changes = {}
    for name in sorted(set(given) - {"resume", "overwrite", "out"}):
        value, saved_value = getattr(cli, name), getattr(base, name)
        if value == saved_value:
            continue
        if name not in RESUMABLE_OVERRIDES:
            raise UserError(f"--{name.replace('_', '-')} {value} differs from the run's {saved_value}; "
                            "a resumed run keeps its model and optimisation settings")
        changes[name] = value
    return replace(base, resume=True, overwrite=False, out=cli.out, **changes)


# ---------------------------------------------------------------------------- the loop


def _given(cfg: TrainConfig) -> set[str]:
    """The settings that differ from the defaults: what an API caller evidently chose."""
    defaults = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def _log(run: Run, record: dict) -> None:
    if run.rank != 0:
        return
    run.log.write(record)


def _draw(run: Run, directory: Path) -> None:
    """loss.png of a checkpoint being written: drawn anew from its metrics when an evaluation came
    since the last save (a picture takes seconds), else the last one; one that cannot be drawn is
    only a warning."""
    if not run.log.evaluated():
        if run.log.owned and (run.out / plot.PICTURE).is_file():
            shutil.copy2(run.out / plot.PICTURE, directory / plot.PICTURE)
        return
    try:
        plot.save([plot.read_run(directory)], directory / plot.PICTURE, title=f"{run.out.name}")
    except (OSError, UserError, ValueError) as e:
        print(f"warning: {run.out / plot.PICTURE} not drawn ({e})", file=sys.stderr)


def _save(run: Run, step: int, sampler_state: dict) -> None:
    """Rank 0 writes the checkpoint, its log and the log's picture, swapped in together (every
    rank holds the same weights and sampler state)."""
    if run.rank != 0:
        return
    state = {"step": step, "sampler": sampler_state, "best_val": run.best_val, "world_size": run.world}
    if run.scaler is not None:
        state["loss_scale"] = run.scaler.state_dict()
    checkpoint.save(run.out, run.model, run.tokenizer, train_config=asdict(run.cfg), optimizer=run.optimizer,
                    files={"train.toml": flags.to_toml(replace(run.cfg, resume=False, overwrite=False)),
                           checkpoint.METRICS: run.log.text()},
                    state=state, finish=partial(_draw, run), adapter=run.adapter)
    run.log.saved()


def _sample(run: Run, step: int) -> str | None:
    if run.tokenizer is None or run.rank != 0:
        return None
    with eval_mode(run.model):
        # no prompt: start a document, from end-of-text (generate's choice) or else a newline
        prompt = run.cfg.sample_prompt or ("" if run.tokenizer.eot_id is not None else "\n")
        return generate(run.model, run.tokenizer, prompt, run.cfg.sample_tokens, temperature=0.8, top_k=50,
                        seed=run.cfg.seed + step)


def fit_to_seconds(run: Run, sampler, group: mx.distributed.Group | None = None) -> TrainConfig:
    """The run's config with ``max_iters`` set so that stepping takes about ``max_seconds``.

    The learning-rate schedule must know the run's length before the first step, so a few steps
    are timed first, on the run's own batches with a throwaway optimizer; the weights and the
    sampler are put back afterwards. The seconds include compiling the step. With several
    processes, every rank takes the mean of their timings, so all fit the same steps.
    """
    cfg, model = run.cfg, run.model
    weights, sampler_state = model.parameters(), sampler.state()  # arrays are immutable: a snapshot
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step_fn = make_train_step(model, optimizer, cfg, group)
    times: list[float] = []  # the first one includes compiling the step
    # every rank times as many steps (each holds collectives), as long as any rank needs more
    while distributed.any_rank(len(times) < 4 or (sum(times[1:]) < min(2.0, cfg.max_seconds / 50)
                                                  and len(times) < 20), group or distributed.init()):
        x, y = sampler.next()
        start = time.perf_counter()
        loss, _ = step_fn(mx.array(x), mx.array(y))
        mx.eval(loss, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    model.update(weights)
    sampler.set_state(sampler_state)
    per_step = statistics.median(times[1:])
    compiling = max(times[0] - per_step, 0.0)  # the run compiles its own step: part of its seconds
    timing = distributed.all_mean({"t": mx.array([per_step, compiling])}, group or distributed.init())["t"]
    per_step, compiling = timing.tolist()
    return over_steps(cfg, max(1, int((cfg.max_seconds - compiling) / per_step)))


def over_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """``cfg`` for a run of ``steps`` steps: the cosine ends there, and warmup takes at most a tenth of it."""
    return replace(cfg, max_seconds=None, max_iters=steps, lr_decay_iters=None,
                   warmup_iters=min(cfg.warmup_iters, steps // 10))


class _TrainClock:
    """Seconds spent stepping; evaluation, sampling and checkpoints run off the clock."""

    def __init__(self) -> None:
        self.start, self.off = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.off

    @contextmanager
    def paused(self, *pending) -> Iterator[None]:
        mx.eval(*pending)  # the steps already queued are training time
        start = time.perf_counter()
        try:
            yield
        finally:
            self.off += time.perf_counter() - start


def train(cfg: TrainConfig, *, given: Collection[str] | None = None, progress: bool | None = None,
          on_step: Callable[[int, float], None] | None = None) -> Run:
    """Run (or resume) training; returns the finished run. ``on_step(step, loss)`` sees every loss.

    ``given``: the settings the user chose (the CLI passes them); a resumed run takes only
    those from ``cfg``. By default, every setting that differs from TrainConfig's default.
    """
    set_wired_limit()
    run = setup(cfg, given)
    try:
        return train_run(run, progress=progress, on_step=on_step)
    finally:
        if run.lock is not None:
            run.lock.release()


def train_run(run: Run, *, progress: bool | None = None, on_step: Callable[[int, float], None] | None = None) -> Run:
    """Train a run that ``setup`` prepared (and locked) to its last step."""
    from tqdm import tqdm

    cfg, model = run.cfg, run.model
    B, T, A = cfg.batch_size, model.config.block_size, cfg.grad_accum
    group, shard = distributed.init(), dict(rank=run.rank, world=run.world)
    train_sampler = make_sampler(cfg.sampler, run.dataset.train_file, B, T, seed=cfg.seed, accum=A, **shard)
    val_sampler = BatchSampler(run.dataset.val_file, B, T, seed=cfg.seed + 1, **shard)
    eval_train_sampler = BatchSampler(run.dataset.train_file, B, T, seed=cfg.seed + 2, **shard)
    if run.train_state is not None:
        train_sampler.set_state(run.train_state["sampler"])

    model.train()
    if cfg.max_seconds is not None and run.start_step == 0 and tree_flatten(model.trainable_parameters()):
        cfg = run.cfg = fit_to_seconds(run, train_sampler, group)
        run.optimizer = make_optimizer(cfg.optim)
        run.optimizer.init(model.trainable_parameters())
        if run.rank == 0:
            print(f"--max-seconds: {cfg.max_iters} steps fit", file=sys.stderr)
    step_fn = make_train_step(model, run.optimizer, cfg, group, run.scaler)
    eval_loss = make_eval_loss(model, cfg)
    sample_interval = cfg.sample_interval or cfg.eval_interval
    tokens_per_step = A * B * T * run.world
    n_params = model.num_params()
    note = (lambda s: print(s, file=sys.stderr)) if run.rank == 0 else (lambda s: None)  # the others stay quiet
    note(f"model: {n_params / 1e6:.2f}M parameters, {model.config}")
    if cfg.lora:
        trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        note(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)}: "
             f"{trained:,} parameters train ({100 * trained / n_params:.2f}%), the rest frozen; "
             f"saved against {run.adapter['base']['path']}")
    if run.memory is not None:
        note(f"memory: estimated peak {run.memory.describe()} of the {memory.available_memory() / memory.GB:.1f} GB "
             "MLX may use here")
    note(f"data: {run.dataset.path} (vocab {run.dataset.vocab_size}); run: {run.out}"
         + (f"; {run.world} processes" if run.world > 1 else ""))

    bar = tqdm(total=cfg.max_iters, initial=run.start_step, disable=progress is False or run.rank != 0 or None,
               dynamic_ncols=True, unit="step")
    if progress is None and run.rank == 0:
        bar.disable = not _bar_fits()
    say = bar.write if not bar.disable else note

    def evaluate(step: int) -> None:
        with eval_mode(model):
            train_loss = estimate_loss(eval_loss, eval_train_sampler, cfg.eval_iters, cfg.seed + 2, group)
            val_loss = estimate_loss(eval_loss, val_sampler, cfg.eval_iters, cfg.seed + 1, group)
        run.best_val = min(run.best_val, val_loss)
        _log(run, {"step": step, "train_loss": train_loss, "val_loss": val_loss})
        say(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    if not tree_flatten(model.trainable_parameters()):  # a count rung, fitted in setup: nothing to step
        if cfg.init:
            raise UserError(f"{cfg.init} holds a count model: fitted, not fine-tuned; use --model on the new data")
        evaluate(run.start_step)
        say(f"--- sample ---\n{cfg.sample_prompt}{_sample(run, run.start_step)}\n---")
        _save(run, run.start_step, train_sampler.state())
        bar.close()
        note(f"done: checkpoint in {run.out} (val loss {run.best_val:.4f})")
        return run
    step = run.start_step
    stop, vote = _StopFlag(), distributed.AnyRank(group)
    watch = _DivergenceWatch(run)
    t_last, tokens_since = time.perf_counter(), 0
    x, y = train_sampler.next()
    clock = _TrainClock()
    with stop, distributed.Watchdog(group, cfg.rank_timeout) as watchdog:
        for step in range(run.start_step + 1, cfg.max_iters + 1):
            mx.random.seed(step_seed(cfg.seed, step, run.rank))
            loss, norm = step_fn(mx.array(x), mx.array(y))
            mx.async_eval(loss, norm, model.parameters())
            watch.add(step, loss, norm)
            sampler_state = train_sampler.state()  # what a resume must draw next from
            x, y = train_sampler.next()  # prepare the next batch while this step runs
            tokens_since += tokens_per_step
            if on_step is not None:
                on_step(step, loss.item())
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                watch.check()
                dt = time.perf_counter() - t_last
                lr = run.optimizer.learning_rate.item()
                grad_norm = norm.item()  # not finite where a float16 step overflowed and was skipped: null
                rec = {"step": step, "loss": loss.item(), "norm": grad_norm if math.isfinite(grad_norm) else None,
                       "lr": lr, "ms": 1000 * dt * tokens_per_step / tokens_since, "tok_s": tokens_since / dt}
                scaling = run.scaler.state_dict() if run.scaler is not None else None
                if scaling is not None:  # float16: the loss scale, and the steps skipped in the run so far
                    rec.update(loss_scale=scaling["scale"], skipped=scaling["skipped"])
                _log(run, rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{rec['tok_s']:.0f}",
                                **({"skipped": rec["skipped"]} if scaling is not None else {}))
                if bar.disable:  # a log (a file, a pipe, a tiny terminal): whole lines, with the way to go
                    eta = (cfg.max_iters - step) * rec["ms"] / 1000
                    scaled = f" | scale {rec['loss_scale']:g} | skipped {rec['skipped']}" if scaling is not None else ""
                    say(f"step {step}/{cfg.max_iters} | loss {rec['loss']:.4f} | norm {grad_norm:.2f} | "
                        f"lr {lr:.2e} | {rec['ms']:.0f} ms | {rec['tok_s']:.0f} tok/s{scaled} | eta {_duration(eta)}")
                t_last, tokens_since = time.perf_counter(), 0
            bar.update(1)
            last = step == cfg.max_iters
            if step % cfg.eval_interval == 0 or last:
                watch.check()
                with clock.paused(model.parameters()):
                    evaluate(step)
            if step % sample_interval == 0 or last:
                with clock.paused(model.parameters()):
                    text = _sample(run, step)
                if text is not None:
                    say(f"--- sample at step {step} ---\n{cfg.sample_prompt}{text}\n---")
            stopping = vote(stop.requested)  # with several processes, all stop at the same step
            if step % cfg.checkpoint_interval == 0 or last or stopping:
                with clock.paused(model.parameters(), run.optimizer.state):
                    watch.check(weights=True)
                    _save(run, step, sampler_state)
                watch.saved = step
            run.train_seconds = clock.seconds
            if stopping:
                bar.close()
                distributed.barrier(group)  # the others wait for rank 0's checkpoint
                say(f"interrupted: saved step {step} in {run.out}; continue with --resume --out {run.out}")
                raise KeyboardInterrupt
            if step % cfg.eval_interval == 0 or step % sample_interval == 0:
                t_last, tokens_since = time.perf_counter(), 0  # eval and sampling are not train time
            watchdog.beat()
        distributed.barrier(group)
    bar.close()
    note(f"done: checkpoint in {run.out} (best val loss {run.best_val:.4f})")
    return run


class _DivergenceWatch:
    """Stops a run whose loss, gradient norm or weights stop being finite, before anything is written.

    The loop hands over each step's loss and norm as unevaluated arrays; ``check`` reads the
    ones gathered since its last call at once, and only where the loop reads values anyway
    (a log line, an evaluation, a save), so no step waits for it. Before a save it also checks
    the weights and the optimizer's moments, so a checkpoint is never replaced by non-finite ones.
    A float16 run's overflowing gradients are its loss scaler's to skip; it has diverged when its
    loss is not finite or the scale has fallen so far that no scale would do.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.pending: list[tuple[int, mx.array, mx.array]] = []
        self.saved: int | None = run.start_step if run.cfg.resume else None

    def add(self, step: int, loss: mx.array, norm: mx.array) -> None:
        self.pending.append((step, loss, norm))

    def check(self, weights: bool = False) -> None:
        if self.pending:
            values = np.array(mx.stack([mx.stack([loss, norm]) for _, loss, norm in self.pending]).astype(mx.float32))
            finite = np.isfinite(values)
            bad = np.flatnonzero(~finite[:, 0] | (~finite[:, 1] & (self.run.scaler is None)))
            if bad.size:
                step = self.pending[bad[0]][0]
                loss, norm = values[bad[0]]
                self.stop(f"at step {step} the loss is {loss:g} and the gradient norm {norm:g}")
            self.pending.clear()
        scaling = self.run.scaler.state_dict() if self.run.scaler is not None else None
        if scaling is not None and scaling["scale"] < MIN_SCALE:
            self.stop(f"the float16 gradients overflow at every loss scale (it fell to {scaling['scale']:g} after "
                      f"{scaling['skipped']} skipped steps); train in bfloat16 or float32")
        if weights and not all_finite(self.run.model.parameters(), self.run.optimizer.state):
            self.stop("the weights or the optimizer's moments are no longer finite")

    def stop(self, what: str) -> None:
        kept = (f"the last good checkpoint (step {self.saved}) is kept in {self.run.out}" if self.saved is not None
                else "no checkpoint was written")
        raise UserError(f"training diverged: {what}; {kept}. Lower --learning-rate "
                        f"({self.run.cfg.learning_rate:g}) or check the data")


def all_finite(*trees) -> bool:
    """Whether every value in the arrays of ``trees`` is finite: one pass over them, one read."""
    flags = [mx.all(mx.isfinite(a)) for tree in trees for _, a in tree_flatten(tree) if mx.issubdtype(a.dtype, mx.inexact)]
    return bool(mx.all(mx.stack(flags)).item()) if flags else True


def _bar_fits() -> bool:
    """A progress bar only where it can be read: a terminal at least 40 columns wide."""
    return sys.stderr.isatty() and shutil.get_terminal_size(fallback=(0, 0)).columns >= 40


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _StopFlag:
    """Turns the first Ctrl-C into a request to stop after the current step (and save);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------- CLI


HELP = {
    "data": "a text file, a folder of .txt files, a prepared data dir (ours or llm.c's), 'pydoc' or 'shakespeare'",
    "tokenizer": "byte, sp:VOCAB for SentencePiece BPE trained on the data, or gpt2[:PATH] for GPT-2's BPE "
                 "from its files (see prepare --help)",
    "data_dir": "where prepared datasets are cached",
    "val_fraction": "tail of each document held out for evaluation",
    "sampler": "training batches: random windows, or sequential (the file in order, as llm.c's DataLoader)",
    "model": f"ladder rung: {', '.join(rungs.RUNGS)}; ngram:N and kneser-ney:N set the order",
    "preset": f"model shape of --model gpt: {', '.join(PRESETS)}",
    "n_layer": "transformer blocks (default: the preset's)",
    "n_head": "attention heads (default: the preset's)",
    "n_embd": "embedding width (default: the preset's)",
    "block_size": "context length in tokens (default: the preset's, or --init's; --init may crop it)",
    "dropout": "dropout on embeddings, attention weights and residuals (default: the preset's, or --init's)",
    "bias": "biases in linear layers and layer norms (default: the preset's)",
    "init": "start from this checkpoint's weights and tokenizer (fine-tuning; see README for its defaults)",
    "lora_rank": "fine-tune --init through LoRA adapters of this rank, its own weights frozen; checkpoints hold "
                 "the adapters only (0: off, every weight trains)",
    "lora_alpha": "LoRA's alpha: the adapters' output is scaled by alpha / rank",
    "lora_targets": f"layers of each block that get adapters: {', '.join(lora.TARGETS)} (c_proj is both "
                    "attention's and the MLP's)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_iters": "optimizer steps in the run",
    "learning_rate": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup",
    "lr_decay_iters": "step where cosine decay reaches min-lr (default: max-iters)",
    "weight_decay": "AdamW's decoupled weight decay, on 2-D weights only",
    "beta1": "AdamW's beta1",
    "beta2": "AdamW's beta2",
    "grad_clip": "clip the gradients' global norm to this (0: off)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "dtype": "compute dtype: float32, or bfloat16 or float16 (mixed precision: float32 master weights, optimizer "
             "state, loss and checkpoints; float16 with dynamic loss scaling, skipping the steps that overflow)",
    "seed": "seed of initialisation, batches, dropout and samples",
    "loss_chunk": "positions per chunk of the loss: the logits (positions x vocabulary) are computed a chunk at "
                  "a time, forward and backward, never whole (0: off; 256 suits GPT-2's vocabulary)",
    "grad_checkpoint": "recompute each transformer block in the backward pass: far less activation memory for "
                       "one more forward pass; same gradients",
    "compile": "compile the train step with mx.compile",
    "streams": "CPU only: threads each micro-batch and evaluation batch is split over (0: one per core; "
               "1: no split, BLAS uses every core, often faster on a quiet machine)",
    "out": "run directory (default: checkpoints/<data>-<preset>, or -<model> for other rungs)",
    "eval_interval": "steps between evaluations of train and val loss",
    "eval_iters": "batches per evaluation",
    "log_interval": "steps between log lines",
    "sample_interval": "steps between printed samples (default: eval-interval)",
    "sample_tokens": "tokens per printed sample",
    "sample_prompt": "prompt of printed samples (default: a new document)",
    "checkpoint_interval": "steps between checkpoints (one is also written at the end and on Ctrl-C)",
    "resume": "continue the run in --out exactly where it stopped",
    "rank_timeout": "with several processes (mlx.launch): seconds a process waits on the others before it gives "
                    "up (0: forever)",
    "overwrite": "replace an existing run in --out",
    "max_seconds": "train for about this many seconds instead of --max-iters: a few steps are timed first and "
                   "the schedule laid over the steps that fit (warmup at most a tenth of them)",
}

# nanoGPT's GPT-2 fine-tune: one sequence a micro-batch, 32 of them a step, a small constant
# learning rate; applied with --init to every one of these the user does not set
FINETUNE_DEFAULTS = dict(batch_size=1, grad_accum=32, learning_rate=3e-5, min_lr=3e-5, warmup_iters=0,
                         max_iters=20, eval_interval=5, checkpoint_interval=10)
# LoRA's adapters start at zero and move only by what they learn: the LoRA paper's GPT-2 rate
LORA_DEFAULTS = dict(learning_rate=2e-4, min_lr=2e-4)


def build_parser() -> argparse.ArgumentParser:
    return flags.build(TrainConfig, HELP, prog="python -m mlx_gpt.train",
                       description="Train a GPT (or any rung of the ladder) on your text with MLX.",
                       epilog="With --init, unset flags take fine-tuning defaults: " +
                              ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in FINETUNE_DEFAULTS.items()) +
                              "; with --lora-rank too: " +
                              ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in LORA_DEFAULTS.items()))


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """The run's config and the names of the settings the user gave (flags or --config file)."""
    given = flags.parse(build_parser(), TrainConfig, argv)
    if given.get("init") and not given.get("resume"):
        given = {**FINETUNE_DEFAULTS, **(LORA_DEFAULTS if given.get("lora_rank") else {}), **given}
    return TrainConfig(**given), frozenset(given)


def main(argv: Sequence[str] | None = None) -> Run:
    cfg, given = parse_args(argv)
    return train(cfg, given=given)


if __name__ == "__main__":
    run_cli(main)
