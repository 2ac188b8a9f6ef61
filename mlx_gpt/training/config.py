"""A training run's settings: one frozen config, nested by concern, each field's help beside it.

``TrainConfig`` holds a section per concern: the data, the model, the step (batches, dtype,
memory), the optimizer and its schedule (``optim.OptimConfig``), LoRA (``lora.LoRAConfig``) and
the run (reporting, checkpoints). Every setting is also a flag and a TOML key of its own name
(``flags``); saved runs hold the same flat names, so a run's ``train.toml`` is a ``--config``.

A few defaults depend on the run: a new model takes its recipe's (today's for the modern GPT,
GPT-2's for the others), fine-tuning (``--init``) nanoGPT's GPT-2 fine-tune settings, LoRA its
own learning rate. Those fields default to None, "the run's default", and ``resolve`` fills them
in; the command line and ``TrainConfig.of(...)`` from Python both go through it, so they train
the same thing. A resumed run is resolved from its saved settings,
taking only the given settings a resumed run may change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import mlx.core as mx

from .. import checkpoint, flags, limits, tracking
from ..sampler import SAMPLERS
from ..errors import UserError
from ..flags import setting
from ..lora import LoRAConfig
from ..models import rungs
from ..models.gpt import PRESETS
from ..optim import OptimConfig

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _at_least(section: Any, names: tuple[str, ...], low: int = 1) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def _texts(section: Any) -> None:
    """Strings a run writes into its files and logs: checked before anything starts."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, str):
            limits.check_text(value, "--" + f.metadata.get("flag", f.name).replace("_", "-"))


def default_model(preset: str | None) -> str:
    """What a new run trains without --model: the modern GPT, or GPT-2 for GPT-2's own shapes."""
    return "gpt" if (preset or "").startswith("gpt2") else "modern"


@dataclass(frozen=True)
class DataConfig:
    source: str = setting("pydoc", "a text file, a folder of .txt files, a prepared data dir (ours or llm.c's), "
                                   "'pydoc' or 'shakespeare'", flag="data")
    tokenizer: str | None = setting(None, "byte (the default), sp:VOCAB for SentencePiece BPE trained on the data, or "
                                          "gpt2[:PATH] for GPT-2's BPE from its files (see prepare --help); with "
                                          "--init, the checkpoint's own")
    data_dir: str = setting("data", "where prepared datasets are cached", resumable=True)
    val_fraction: float = setting(0.1, "tail of each document held out for evaluation")
    sampler: str = setting("random", "training batches: random windows, or sequential (the file in order, as "
                                     "llm.c's DataLoader)")
    # example sets (--data DIR with train.jsonl/valid.jsonl, or FILE.jsonl; see mlx_gpt/examples.py)
    format: str | None = setting(None, "shape of the .jsonl examples: text, completions (prompt/completion) or chat "
                                       "(messages); default: each file's first line says")
    mask_prompt: bool = setting(False, "train (and evaluate) on the completions and assistant turns only, not on "
                                       "the prompts")
    truncate: bool = setting(True, "cut an example longer than the block to fit (counted); --no-truncate refuses it")
    pack: bool = setting(False, "put as many whole examples in each row as fit, each seeing only itself and its "
                                "positions restarting, instead of one example a row and padding (a row then "
                                "holds several examples: a step trains on more of them)")
    text_field: str = setting("text", "the key of a text example's text")
    prompt_field: str = setting("prompt", "the key of a completion example's prompt")
    completion_field: str = setting("completion", "the key of a completion example's completion")

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.format not in (None, "text", "completions", "chat"):
            raise UserError(f"--format must be text, completions or chat, got {self.format!r}")
        _texts(self)


@dataclass(frozen=True)
class ModelSpec:
    """Which model trains: a rung of the ladder, for GPT a preset with any field overridden, or
    the weights of a checkpoint (fine-tuning)."""

    rung: str | None = setting(None, f"ladder rung: {', '.join(rungs.RUNGS)} (default: modern, the GPT of "
                                     "today's recipe; gpt, GPT-2, with --preset gpt2*; with --init, the "
                                     "checkpoint's); ngram:N and kneser-ney:N set the order", flag="model")
    preset: str | None = setting(None, f"model shape of --model modern or gpt: {', '.join(PRESETS)} (default: tiny)")
    n_layer: int | None = setting(None, "transformer blocks (default: the preset's)")
    n_head: int | None = setting(None, "attention heads (default: the preset's)")
    n_embd: int | None = setting(None, "embedding width (default: the preset's)")
    block_size: int | None = setting(None, "context length in tokens (default: the preset's, or --init's; --init may "
                                           "crop it)")
    dropout: float | None = setting(None, "dropout on embeddings, attention weights and residuals (default: the "
                                          "preset's, or --init's)")
    bias: bool | None = setting(None, "biases in linear layers and layer norms (default: the preset's)")
    init: str | None = setting(None, "start from this checkpoint's weights and tokenizer (fine-tuning; unset "
                                     "settings then take its defaults, see the end of --help)")
    changes: str | None = setting(None, "--model modern's changes from GPT-2, comma-separated: rope, rms_norm, "
                                        "qk_norm, relu2, untied, no_bias, softcap, zero_init (default: all; none "
                                        "is GPT-2)")

    def __post_init__(self) -> None:
        _texts(self)
        if self.changes is not None and (self.init or (self.rung or default_model(self.preset)) != "modern"):
            raise UserError("--changes applies to a new --model modern")

    @property
    def overrides(self) -> dict:
        """The model fields set here, over the preset's (or --init's)."""
        names = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "changes")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class StepConfig:
    """What one step computes, and how: its batches, its dtype, and what it trades for memory."""

    batch_size: int | None = setting(None, "sequences per micro-batch (default: 32; 1 with --init)")
    grad_accum: int | None = setting(None, "micro-batches per optimizer step (default: 1; 32 with --init)")
    dtype: str = setting("float32", "compute dtype: float32, or bfloat16 or float16 (mixed precision: float32 master "
                                    "weights, optimizer state, loss and checkpoints; float16 with dynamic loss "
                                    "scaling, skipping the steps that overflow)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    loss_chunk: int = setting(0, "positions per chunk of the loss: the logits (positions x vocabulary) are computed "
                                 "a chunk at a time, forward and backward, never whole (0: off; 256 suits GPT-2's "
                                 "vocabulary)", resumable=True)
    grad_checkpoint: bool = setting(False, "recompute each transformer block in the backward pass: far less "
                                           "activation memory for one more forward pass; same gradients",
                                    resumable=True)
    compile: bool = setting(True, "compile the train step with mx.compile", resumable=True)
    streams: int = setting(0, "CPU only: threads each micro-batch and evaluation batch is split over (0: one per "
                              "core; 1: no split, BLAS uses every core, often faster on a quiet machine)",
                           resumable=True)
    seed: int = setting(1337, "seed of initialisation, batches, dropout and samples")

    def __post_init__(self) -> None:
        _at_least(self, ("batch_size", "grad_accum"))
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.loss_chunk < 0:
            raise UserError(f"--loss-chunk must be 0 (off) or a number of positions, got {self.loss_chunk}")
        if self.streams < 0:
            raise UserError(f"--streams must be 0 (one per core) or more, got {self.streams}")
        limits.check_seed(self.seed)

    @property
    def mx_dtype(self) -> mx.Dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives, and how often it reports and saves."""

    out: str | None = setting(None, "run directory (default: checkpoints/<data>-<tokenizer>-modern-<preset>, "
                                    "-<preset> for GPT-2, -<model> for other rungs)")
    eval_interval: int | None = setting(None, "steps between evaluations of train and val loss (default: 25; 200 "
                                              "for GPT-2; 5 with --init)", resumable=True)
    eval_iters: int = setting(20, "batches per evaluation", resumable=True)
    log_interval: int = setting(10, "steps between log lines", resumable=True)
    sample_interval: int | None = setting(None, "steps between printed samples (default: eval-interval)",
                                          resumable=True)
    sample_tokens: int = setting(200, "tokens per printed sample", resumable=True)
    sample_prompt: str = setting("", "prompt of printed samples (default: a new document)", resumable=True)
    checkpoint_interval: int | None = setting(None, "steps between checkpoints, one also at the end and on Ctrl-C "
                                                    "(default: 200; 10 with --init)", resumable=True)
    rank_timeout: float = setting(600.0, "with several processes (mlx.launch): seconds a process waits on the others "
                                         "before it gives up (0: forever)", resumable=True)
    stop_at_val_loss: float | None = setting(None, "end the run at its first evaluation whose val loss is at or "
                                                   "below this (evaluated and saved as at its last step)",
                                             resumable=True)
    report_to: str = setting("", "also log metrics.jsonl's records and the settings to these trackers, comma-"
                                 "separated: tensorboard, wandb, trackio (the track extra)", resumable=True)
    report_dir: str = setting("runs", "where --report-to's tensorboard and wandb write, a folder a run",
                              resumable=True)
    resume: bool = setting(False, "continue the run in --out exactly where it stopped")
    overwrite: bool = setting(False, "replace an existing run in --out")

    def __post_init__(self) -> None:
        _at_least(self, ("eval_interval", "eval_iters", "log_interval", "checkpoint_interval", "sample_interval"))
        _at_least(self, ("sample_tokens",), 0)
        if self.rank_timeout < 0:
            raise UserError(f"--rank-timeout must be 0 (none) or more seconds, got {self.rank_timeout}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        tracking.parse(self.report_to)
        _texts(self)


# The run's defaults of the fields that default to None: the recipe of the model it trains. A new
# model is the modern GPT, trained with today's recipe (docs/recipe.md: Muon for the blocks' matrices,
# AdamW ten times faster for the rest, no weight decay, a third of the steps, evaluated often enough
# to stop at a target); GPT-2's presets, --model gpt, the ladder's other rungs, fine-tunes and runs
# saved before there was a choice train with GPT-2's. Warmup is a tenth of the run, at most WARMUP.
GPT2_RECIPE = dict(batch_size=32, grad_accum=1, max_iters=600, learning_rate=2e-3, min_lr=2e-4, eval_interval=200,
                   checkpoint_interval=200, optimizer="adamw", weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95)
MODERN_RECIPE = {**GPT2_RECIPE, "max_iters": 200, "learning_rate": 2e-2, "min_lr": 2e-3, "eval_interval": 25,
                 "optimizer": "muon", "weight_decay": 0.0, "muon_lr": 0.015, "muon_momentum": 0.85}
WARMUP = {"gpt2": 60, "modern": 5}
# what a run without --init starts from (with --init, the checkpoint's model and tokenizer)
STARTS = dict(tokenizer="byte", preset="tiny")
# nanoGPT's GPT-2 fine-tune: one sequence a micro-batch, 32 of them a step, a small constant
# learning rate; applied with --init to every one of these the user does not set
FINETUNE_DEFAULTS = dict(batch_size=1, grad_accum=32, learning_rate=3e-5, min_lr=3e-5, warmup_iters=0,
                         max_iters=20, eval_interval=5, checkpoint_interval=10)
# LoRA's adapters start at zero and move only by what they learn: the LoRA paper's GPT-2 rate
LORA_DEFAULTS = dict(learning_rate=2e-4, min_lr=2e-4)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    step: StepConfig = field(default_factory=StepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.lora.rank:
            if not self.model.init and not self.run.resume:
                raise UserError("--lora-rank fine-tunes a checkpoint: give --init CKPT (the adapters are saved "
                                "against it)")
            if self.model.rung not in (None, "gpt"):
                raise UserError(f"--lora-rank applies to GPT checkpoints, not --model {self.model.rung}")

    @classmethod
    def of(cls, **given: Any) -> "TrainConfig":
        """The config of the settings ``given`` by their flat names, resolved as the command line's."""
        return resolve(given)

    def flat(self) -> dict[str, Any]:
        return flags.to_flat(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """This config with settings changed by their flat names."""
        return flags.from_flat(TrainConfig, {**self.flat(), **changes})

    @property
    def fine_tuning(self) -> bool:
        return self.model.init is not None and not self.run.resume

    @property
    def recipe(self) -> str:
        """Which recipe fills the unset settings (see MODERN_RECIPE): "modern" or "gpt2"."""
        new = self.model.init is None and not self.run.resume
        rung = self.model.rung or default_model(self.model.preset)
        return "modern" if new and rung == "modern" else "gpt2"

    def resolved(self) -> "TrainConfig":
        """Every field that defaults to None ("the run's default") given its value for this run."""
        defaults = {**(MODERN_RECIPE if self.recipe == "modern" else GPT2_RECIPE),
                    **(FINETUNE_DEFAULTS if self.fine_tuning else {}),
                    **(LORA_DEFAULTS if self.fine_tuning and self.lora.rank else {})}
        flat = self.flat()
        if self.model.init is None:  # what a new model is and how the data is read
            defaults.update(STARTS, model="gpt" if self.run.resume else default_model(flat["preset"]))
        elif self.fine_tuning:  # --init brings its own
            given = [name for name in (*STARTS, "model") if flat[name] is not None]
            if given:
                raise UserError(f"--{given[0]} does not apply with --init: the checkpoint's own "
                                f"{'tokenizer' if given[0] == 'tokenizer' else 'model'} is used")
        unset = {k: v for k, v in defaults.items() if flat[k] is None}
        if flat["warmup_iters"] is None and "warmup_iters" not in unset:  # a short run still reaches its peak
            unset["warmup_iters"] = min(WARMUP[self.recipe], (flat["max_iters"] or defaults["max_iters"]) // 10)
        return self.replace(**unset) if unset else self


def resolve(given: Mapping[str, Any]) -> TrainConfig:
    """The run's config from the settings the user gave (flags, a TOML file, or keywords)."""
    known = flags.table(TrainConfig)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}")
    if given.get("resume"):
        return _resumed(given)
    return flags.from_flat(TrainConfig, dict(given)).resolved()


def _resumed(given: Mapping[str, Any]) -> TrainConfig:
    """The saved run's config, with only the settings a resumed run may change taken from ``given``."""
    if given.get("out") is None:
        raise UserError("--resume needs --out naming the run to continue")
    if given.get("overwrite"):
        raise UserError("--resume and --overwrite contradict each other; pick one")
    saved = checkpoint.read_config(given["out"]).get("train") or {}
    merged = flags.merge_resumed(TrainConfig, saved, dict(given), "a resumed run keeps its model and optimisation "
                                 "settings", keep=("resume", "overwrite", "out"),
                                 where=f"{given['out']}/{checkpoint.CONFIG}")
    return flags.from_flat(TrainConfig, merged).resolved()
