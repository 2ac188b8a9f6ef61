"""A run: its data, model, optimizer and samplers, set up (or resumed) in one place, and saved.

``setup`` is final: everything is checked before anything is written, the budget in seconds
is turned into steps before the optimizer exists, and a resumed run's state (optimizer,
step, sampler position, loss scale) is restored here and nowhere else.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import backend, checkpoint, distributed, example_sampler, examples, flags, lora, plot, rundir, tracking
from ..data import Dataset, prepare, tokenizer_digest
from ..sampler import BatchSampler, make_sampler
from ..errors import UserError
from ..generate import generate
from ..limits import check_bytes
from ..memory import MemoryEstimate
from ..models.base import eval_mode
from ..optim import AdamW, make_optimizer
from ..scaler import LossScaler
from ..tokenizer import Tokenizer, load_tokenizer
from . import model as run_model
from .budget import OVERRUN, SLACK, fit_to_seconds
from .config import TrainConfig


@dataclass
class Samplers:
    train: BatchSampler
    val: BatchSampler  # fixed batches of the val split, drawn again at every evaluation
    train_eval: BatchSampler  # the same of the train split


@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    dataset: Dataset
    model: nn.Module
    tokenizer: Tokenizer | None
    optimizer: AdamW
    samplers: Samplers
    start_step: int = 0
    best_val: float = math.inf
    rank: int = 0  # this process's place among ``world`` (mlx.launch); only rank 0 writes
    world: int = 1
    memory: MemoryEstimate | None = None
    train_seconds: float = 0.0  # spent stepping in this call: evaluation, sampling and checkpoints excluded
    scaler: LossScaler | None = None  # float16 runs' loss scale (saved with the checkpoint)
    deadline: float | None = None  # --max-seconds: when (time.perf_counter) the loop must stop at the latest
    locks: list[rundir.RunLock] = field(default_factory=list)  # out's (rank 0), and a LoRA run's pin on its base
    log: rundir.RunLog | None = None
    adapter: dict | None = None  # a LoRA run's: its adapters' settings and base (lora.record)
    trackers: tracking.Trackers | None = None  # rank 0's --report-to, started by the loop


def _dataset(cfg: TrainConfig, tokenizer: Tokenizer | None) -> Dataset:
    """The run's data, encoded with ``tokenizer`` when the model already has one."""
    d = cfg.data
    fields = examples.Fields(d.text_field, d.prompt_field, d.completion_field)
    if examples.is_examples(d.source, d.format, fields):  # prompt/completion or chat examples, one a row
        if cfg.model.rung not in (None, "gpt", "modern"):
            raise UserError(f"--model {cfg.model.rung} trains on running text, not on examples")
        return examples.prepare_examples(d.source, tokenizer or d.tokenizer, fmt=d.format, fields=fields,
                                         data_dir=d.data_dir)
    kw = dict(data_dir=d.data_dir, val_fraction=d.val_fraction, text_field=d.text_field)
    if tokenizer is None:
        return prepare(d.source, d.tokenizer, **kw)
    if not cfg.model.init:  # a resumed run: its own data cache, if it still matches the run's tokenizer
        dataset = prepare(d.source, d.tokenizer, **kw)
        if dataset.tokenizer is None or tokenizer_digest(dataset.tokenizer) == tokenizer_digest(tokenizer):
            return dataset
    return prepare(d.source, tokenizer, **kw)


def _check_resumed(cfg: TrainConfig, out: str) -> None:
    """A resumed run trains what it trained: its saved settings, but those it may change."""
    saved = checkpoint.read_config(out).get("train") or {}
    known = flags.table(TrainConfig)
    for name, value in cfg.flat().items():
        if name in saved and saved[name] != value and not known[name].resumable and \
                name not in ("resume", "overwrite", "out"):
            raise UserError(f"--{name.replace('_', '-')} {value} differs from the run's {saved[name]}; "
                            "a resumed run keeps its model and optimisation settings")


def _starting_point(cfg: TrainConfig, locks: list):
    """(model, tokenizer, adapter record) a run starts from: a resumed run's, --init's, or none yet.
    A LoRA run pins its base (a shared lock, held to the end): the adapters apply only to the
    weights they were trained on, so no trainer may change them meanwhile."""
    if cfg.run.resume:
        _check_resumed(cfg, cfg.run.out)
        out = cfg.run.out
        adapter = checkpoint.read_config(out).get("lora")
        base = adapter.get("base") if isinstance(adapter, dict) else None
        path = base.get("path") if isinstance(base, dict) else None
        if isinstance(path, str) and path and checkpoint.exists(path):
            locks.append(rundir.RunLock(Path(path), shared=True).acquire())
        return checkpoint.load_model(out, fuse=False), load_tokenizer(checkpoint.resolve(out)), adapter
    if cfg.model.init:
        if cfg.lora.rank and "lora" in checkpoint.read_config(cfg.model.init):
            raise UserError(f"--init {cfg.model.init} holds LoRA adapters; fuse them into a checkpoint first "
                            f"(python -m mlx_gpt.fuse --adapter {cfg.model.init} --out DIR) and train new ones on that")
        if cfg.lora.rank:
            locks.append(rundir.RunLock(checkpoint.resolve(cfg.model.init), shared=True).acquire())
        model, tokenizer = run_model.from_init(cfg)
        return model, tokenizer, lora.record(cfg.model.init, cfg.lora) if cfg.lora.rank else None
    return None, None, None


def _default_out(cfg: TrainConfig, dataset: Dataset) -> str:
    """checkpoints/<data>-<tokenizer>-modern-<preset> (pydoc-byte-modern-tiny), -<preset> for GPT-2
    (pydoc-byte-tiny), -<rung> for the other rungs, or for a fine-tune checkpoints/<data>-<what it
    fine-tunes> (shakespeare-gpt2)."""
    m = cfg.model
    if m.init:
        return str(Path("checkpoints") / f"{dataset.name}-{Path(m.init).name}")
    name = {"gpt": m.preset, "modern": f"modern-{m.preset}"}.get(m.rung, m.rung.replace(":", ""))
    return str(Path("checkpoints") / f"{dataset.path.name}-{name}")


def setup(cfg: TrainConfig) -> Run:
    """Resolve data, model, optimizer and (when resuming) saved state for a run, and lock its directory."""
    started = time.perf_counter()  # --max-seconds counts the whole run
    cfg = cfg.resolved()
    group = distributed.init()
    backend.configure(cfg.step.batch_size, cfg.step.streams)
    if cfg.run.out is not None:
        rundir.check_out(Path(cfg.run.out))
    locks: list[rundir.RunLock] = []
    try:
        model, tokenizer, adapter = _starting_point(cfg, locks)
        dataset = distributed.rank_zero_first(group, lambda: _dataset(cfg, tokenizer))
        tokenizer = tokenizer or dataset.tokenizer
        peak = run_model.memory_check(cfg, model, dataset)  # before anything is built or deleted
        if cfg.run.out is None:
            cfg = cfg.replace(out=_default_out(cfg, dataset))
        out = Path(cfg.run.out)
        if group.rank() == 0:  # rank 0 writes: from here on, out is ours
            locks.append(_claim(cfg, out, adapter))
        return _ready(cfg, out, group, dataset, model, tokenizer, adapter, peak, locks, started)
    except BaseException:
        release(locks)
        raise


def release(locks: list[rundir.RunLock]) -> None:
    for lock in reversed(locks):
        lock.release()


def _claim(cfg: TrainConfig, out: Path, adapter: dict | None) -> rundir.RunLock:
    """--out for this run: never --init's checkpoint or the adapters' base, a run only with --resume or
    --overwrite (which deletes nothing: the new run's first checkpoint replaces the old one whole)."""
    inputs = {"the base checkpoint of the LoRA adapters": adapter["base"]["path"] if adapter else None,
              "--init's checkpoint": cfg.model.init}
    return rundir.claim_out(out, overwrite=cfg.run.overwrite, resume=cfg.run.resume, inputs=inputs, what="a run",
                            hint="pass --resume to continue it, --overwrite to replace it, or another --out "
                                 "for a new run")


def _ready(cfg: TrainConfig, out: Path, group, dataset: Dataset, model, tokenizer, adapter, peak, locks,
           started: float) -> Run:
    """The claimed run's model assembled, its samplers, its saved state restored when resuming, its
    budget in steps, and its optimizer."""
    if group.rank() != 0:
        rundir.check_out(out)
    model = run_model.assemble(model if model is not None else run_model.new(cfg, dataset), cfg,
                               fresh_adapters=not cfg.run.resume)
    if model.config.vocab_size < dataset.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the data's "
                        f"({dataset.vocab_size})")
    rank, world = group.rank(), group.size()
    B, T, shard, seed = cfg.step.batch_size, model.config.block_size, dict(rank=rank, world=world), cfg.step.seed
    check_bytes(2 * 8 * cfg.step.grad_accum * B * (T + 1),  # x and y, and the windows they are cut from
                f"a step's batches (--grad-accum {cfg.step.grad_accum} x --batch-size {B} x block {T})")
    check_packing(cfg, dataset, model)
    if isinstance(dataset, examples.ExampleSet):
        samplers = Samplers(*example_sampler.samplers(dataset, B, T, seed, cfg.step.grad_accum, cfg.data, **shard))
    else:
        samplers = Samplers(make_sampler(cfg.data.sampler, dataset.train_files, B, T, seed=seed,
                                         accum=cfg.step.grad_accum, **shard),
                            BatchSampler(dataset.val_files, B, T, seed=seed + 1, **shard),
                            BatchSampler(dataset.train_files, B, T, seed=seed + 2, **shard))
    state = checkpoint.load_state(out) if cfg.run.resume else {}
    if cfg.run.resume:
        distributed.check_world_size(state.get("world_size", 1), group, str(out))
        if "sampler" not in state:
            raise UserError(f"{out}/{checkpoint.STATE} has no sampler position: this checkpoint cannot be resumed")
        samplers.train.set_state(state["sampler"])
        if state["step"] > cfg.optim.max_iters:
            raise UserError(f"{out} is at step {state['step']}, past --max-iters {cfg.optim.max_iters}; give a larger "
                            "--max-iters to train it further")
    trains = bool(tree_flatten(model.trainable_parameters()))  # a count rung is fitted, not stepped
    deadline = None
    if cfg.optim.max_seconds is not None and not cfg.run.resume and trains:
        deadline = started + OVERRUN * cfg.optim.max_seconds + SLACK
        cfg = fit_to_seconds(cfg, model, samplers.train, group, spent=time.perf_counter() - started)
        if rank == 0:
            print(f"--max-seconds: {cfg.optim.max_iters} steps fit, with their evaluations", file=sys.stderr)
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    if cfg.run.resume:
        saved = checkpoint.load_optimizer_state(out)
        if {k: v.shape for k, v in tree_flatten(optimizer.state)} != {k: v.shape for k, v in tree_flatten(saved)}:
            raise UserError(f"{out}/{checkpoint.OPTIMIZER} does not match the model")
        optimizer.state = saved
    scaler = LossScaler() if cfg.step.dtype == "float16" else None
    if scaler is not None and "loss_scale" in state:  # else a fresh scale, as at the start
        scaler.load_state_dict(state["loss_scale"])
    return Run(cfg, out, dataset, model, tokenizer, optimizer, samplers, start_step=state.get("step", 0),
               best_val=state.get("best_val", math.inf), rank=rank, world=world, memory=peak, scaler=scaler,
               locks=locks, adapter=adapter, deadline=deadline,
               log=rundir.RunLog(out, state["step"] if cfg.run.resume else None) if rank == 0 else None)


def _draw(run: Run, directory: Path) -> None:
    """loss.png of a checkpoint being written: drawn anew from its metrics when an evaluation came
    since the last save (a picture takes seconds), else the last one; one that cannot be drawn is
    only a warning."""
    picture = checkpoint.PICTURE
    if not run.log.evaluated():
        if run.log.owned and (run.out / picture).is_file():
            shutil.copy2(run.out / picture, directory / picture)
        return
    try:
        plot.save([plot.read_run(directory)], directory / picture, title=f"{run.out.name}")
    except (OSError, UserError, ValueError) as e:
        print(f"warning: {run.out / picture} not drawn ({e})", file=sys.stderr)


def check_packing(cfg: TrainConfig, dataset: Dataset, model) -> None:
    """--pack's requirements: an example set, and a model whose attention takes packed rows."""
    if not cfg.data.pack:
        return
    if not isinstance(dataset, examples.ExampleSet):
        raise UserError("--pack packs example sets (.jsonl examples); running text already fills every row")
    if not getattr(model, "packs", False):
        raise UserError(f"--pack needs a transformer whose attention takes packed rows (gpt, modern, transformer, "
                        f"gpt1); {type(model).__name__} does not")


def save(run: Run, step: int, sampler_state: dict) -> None:
    """Rank 0 writes the checkpoint, its log and the log's picture, swapped in together (every
    rank holds the same weights and sampler state)."""
    if run.rank != 0:
        return
    state = {"step": step, "sampler": sampler_state, "best_val": run.best_val, "world_size": run.world}
    if run.scaler is not None:
        state["loss_scale"] = run.scaler.state_dict()
    checkpoint.save(run.out, run.model, run.tokenizer, train_config=run.cfg.flat(), optimizer=run.optimizer,
                    files={checkpoint.SETTINGS: flags.to_toml(run.cfg.replace(resume=False, overwrite=False)),
                           checkpoint.METRICS: run.log.text()},
                    state=state, finish=partial(_draw, run), adapter=run.adapter,
                    adapters=lora.adapters(run.model) if run.adapter is not None else None)
    run.log.saved()


def sample(run: Run, step: int) -> str | None:
    """A sample of the model's text at ``step`` (rank 0, a model with a tokenizer)."""
    if run.tokenizer is None or run.rank != 0:
        return None
    r = run.cfg.run
    with eval_mode(run.model):
        # no prompt: start a document, from end-of-text (generate's choice) or else a newline
        prompt = r.sample_prompt or ("" if run.tokenizer.eot_id is not None else "\n")
        return generate(run.model, run.tokenizer, prompt, r.sample_tokens, temperature=0.8, top_k=50,
                        seed=run.cfg.step.seed + step)
