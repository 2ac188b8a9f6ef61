"""The training loop: step, report, evaluate, sample and save, from a set-up run to its last step.

The loop never waits on a step it has queued: each step's loss and norm are read only where a
line is logged (``mx.async_eval`` keeps the next step queued behind the current one), and a
run that stops being finite is caught at those reads, before anything is saved.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import checkpoint, distributed, memory, tracking
from ..errors import UserError
from ..models.base import eval_mode
from ..scaler import MIN_SCALE
from .run import Run, sample, save
from .step import estimate_loss, make_eval_loss, make_train_step, step_seed

# a line at least this often, however long the steps or the evaluation: a run in a pipe or a
# log file never looks stuck (and always a line after its first step)
LINE_SECONDS = 30.0


class Reporter:
    """Where a run's words go: rank 0's progress bar in a terminal, else whole lines on stderr."""

    def __init__(self, run: Run, progress: bool | None) -> None:
        from tqdm import tqdm

        self.quiet = run.rank != 0  # the other ranks stay quiet
        self.bar = tqdm(total=run.cfg.optim.max_iters, initial=run.start_step, dynamic_ncols=True, unit="step",
                        disable=progress is False or self.quiet or None)
        if progress is None and not self.quiet:
            self.bar.disable = not _bar_fits()

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def say(self, text: str) -> None:
        self.bar.write(text) if not self.bar.disable else self.note(text)

    def step(self, rec: dict, run: Run) -> None:
        """A log record's line: the bar's postfix in a terminal, else a line with the way to go."""
        scaled = "loss_scale" in rec
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tok_s']:.0f}",
                             **({"skipped": rec["skipped"]} if scaled else {}))
        if self.bar.disable:  # a log (a file, a pipe, a tiny terminal): whole lines, with the way to go
            total = run.cfg.optim.max_iters
            eta = (total - rec["step"]) * rec["ms"] / 1000
            norm = rec["norm"] if rec["norm"] is not None else math.nan
            extra = f" | scale {rec['loss_scale']:g} | skipped {rec['skipped']}" if scaled else ""
            self.say(f"step {rec['step']}/{total} | loss {rec['loss']:.4f} | norm {norm:.2f} | lr {rec['lr']:.2e} | "
                     f"{rec['ms']:.0f} ms | {rec['tok_s']:.0f} tok/s{extra} | eta {_duration(eta)}")


def _introduce(run: Run, report: Reporter) -> None:
    model, cfg = run.model, run.cfg
    n_params = model.num_params()
    report.note(f"model: {n_params / 1e6:.2f}M parameters, {model.config}")
    if cfg.lora.rank:
        trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        report.note(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.paths)}: "
                    f"{trained:,} parameters train ({100 * trained / n_params:.2f}%), the rest frozen; "
                    f"saved against {run.adapter['base']['path']}")
    if run.memory is not None:
        report.note(f"memory: estimated peak {run.memory.describe()} of the "
                    f"{memory.available_memory() / memory.GB:.1f} GB MLX may use here")
    report.note(f"data: {run.dataset.path} (vocab {run.dataset.vocab_size}); run: {run.out}"
                + (f"; {run.world} processes" if run.world > 1 else ""))


def train_run(run: Run, *, progress: bool | None = None, on_step: Callable[[int, float], None] | None = None) -> Run:
    """Train a run that ``setup`` prepared (and locked) to its last step."""
    cfg, model = run.cfg, run.model
    group = distributed.init()
    report = Reporter(run, progress)
    _introduce(run, report)
    if run.rank == 0:
        run.trackers = tracking.start(cfg.run.report_to, cfg.run.report_dir, run.out.name, cfg.flat())
    eval_loss = make_eval_loss(model, cfg)

    def evaluate(step: int) -> float:
        ticker = Ticker(report, f"step {step}: evaluating", 2 * cfg.run.eval_iters)
        with eval_mode(model):
            losses = [estimate_loss(eval_loss, sampler, cfg.run.eval_iters, cfg.step.seed + k, group, ticker.tick)
                      for k, sampler in ((2, run.samplers.train_eval), (1, run.samplers.val))]
        run.best_val = min(run.best_val, losses[1])
        _log(run, {"step": step, "train_loss": losses[0], "val_loss": losses[1]})
        report.say(f"step {step}: train loss {losses[0]:.4f}, val loss {losses[1]:.4f}")
        return losses[1]

    def show_sample(step: int, label: str) -> None:
        text = sample(run, step)
        if text is not None:
            report.say(f"--- {label} ---\n{cfg.run.sample_prompt}{text}\n---")

    if not tree_flatten(model.trainable_parameters()):  # a count rung, fitted in setup: nothing to step
        if cfg.model.init:
            raise UserError(f"{cfg.model.init} holds a count model: fitted, not fine-tuned; use --model on the new data")
        evaluate(run.start_step)
        show_sample(run.start_step, "sample")
        save(run, run.start_step, run.samplers.train.state())
        report.bar.close()
        report.note(f"done: checkpoint in {run.out} (val loss {run.best_val:.4f})")
        _close(run)
        return run
    if run.start_step == cfg.optim.max_iters:
        report.note(f"{run.out} is already at step {run.start_step} of --max-iters {cfg.optim.max_iters}: nothing to "
                    "train; give a larger --max-iters to train it further")
        return run
    _steps(run, make_train_step(model, run.optimizer, cfg, group, run.scaler), report, evaluate, show_sample, on_step)
    report.bar.close()
    report.note(f"done: checkpoint in {run.out} (best val loss {run.best_val:.4f})")
    _close(run)
    return run


def _steps(run: Run, step_fn, report: Reporter, evaluate, show_sample, on_step) -> None:
    cfg, model, sampler = run.cfg, run.model, run.samplers.train
    r, group = cfg.run, distributed.init()
    sample_interval = r.sample_interval or r.eval_interval
    tokens_per_step = cfg.step.grad_accum * cfg.step.batch_size * model.config.block_size * run.world
    stop, vote, watch, clock = _StopFlag(), distributed.AnyRank(group), _DivergenceWatch(run), _TrainClock()
    t_last, tokens_since = time.perf_counter(), 0
    t_line = t_last
    batch = sampler.next()  # x, y, and packed rows' positions
    with stop, distributed.Watchdog(group, r.rank_timeout) as watchdog:
        for step in range(run.start_step + 1, cfg.optim.max_iters + 1):
            mx.random.seed(step_seed(cfg.step.seed, step, run.rank))
            loss, norm = step_fn(*(mx.array(a) for a in batch))
            mx.async_eval(loss, norm, model.parameters())
            watch.add(step, loss, norm)
            sampler_state = sampler.state()  # what a resume must draw next from
            batch = sampler.next()  # prepare the next batch while this step runs
            tokens_since += tokens_per_step
            if on_step is not None:
                on_step(step, loss.item())
            # alone, a run past its --max-seconds ends here (with several processes, the fitted steps rule:
            # each rank's clock would decide on its own)
            late = run.deadline is not None and run.world == 1 and time.perf_counter() > run.deadline
            last = step == cfg.optim.max_iters or late
            if late:
                report.say(f"--max-seconds: the budget ran out at step {step} of {cfg.optim.max_iters}; "
                           "evaluating and saving there")
            if (step % r.log_interval == 0 or last or step == run.start_step + 1
                    or time.perf_counter() - t_line >= LINE_SECONDS):
                watch.check()
                dt = time.perf_counter() - t_last
                grad_norm = norm.item()  # not finite where a float16 step overflowed and was skipped: null
                rec = {"step": step, "loss": loss.item(), "norm": grad_norm if math.isfinite(grad_norm) else None,
                       "lr": run.optimizer.learning_rate.item(), "ms": 1000 * dt * tokens_per_step / tokens_since,
                       "tok_s": tokens_since / dt}
                if run.scaler is not None:  # float16: the loss scale, and the steps skipped in the run so far
                    scaling = run.scaler.state_dict()
                    rec.update(loss_scale=scaling["scale"], skipped=scaling["skipped"])
                _log(run, rec)
                report.step(rec, run)
                t_last = t_line = time.perf_counter()
                tokens_since = 0
            report.bar.update(1)
            reached = False
            if step % r.eval_interval == 0 or last:
                watch.check()
                with clock.paused(model.parameters()):
                    val = evaluate(step)
                # --stop-at-val-loss: this step becomes the last (every rank has the same val loss)
                reached = r.stop_at_val_loss is not None and val <= r.stop_at_val_loss and not last
                if reached:
                    last = True
                    report.say(f"--stop-at-val-loss: val loss {val:.4f} <= {r.stop_at_val_loss:g} at step {step}; "
                               "saving there")
            if step % sample_interval == 0 or last:
                with clock.paused(model.parameters()):
                    show_sample(step, f"sample at step {step}")
            stopping = vote(stop.requested)  # with several processes, all stop at the same step
            if step % r.checkpoint_interval == 0 or last or stopping:
                with clock.paused(model.parameters(), run.optimizer.state):
                    watch.check(weights=True)
                    save(run, step, sampler_state)
                watch.saved = step
            run.train_seconds = clock.seconds
            if late or reached:
                break
            if stopping:
                report.bar.close()
                distributed.barrier(group)  # the others wait for rank 0's checkpoint
                report.say(f"interrupted: saved step {step} in {run.out}; continue with --resume --out {run.out}")
                raise KeyboardInterrupt
            if step % r.eval_interval == 0 or step % sample_interval == 0:
                t_last, tokens_since = time.perf_counter(), 0  # eval and sampling are not train time
            watchdog.beat()
        distributed.barrier(group)


class Ticker:
    """Says how far a long piece of work (an evaluation) has come, at most every LINE_SECONDS."""

    def __init__(self, report: Reporter, what: str, total: int) -> None:
        self.report, self.what, self.total, self.done = report, what, total, 0
        self.last = time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        if time.perf_counter() - self.last >= LINE_SECONDS and self.done < self.total:
            self.report.say(f"{self.what}: {self.done}/{self.total} batches")
            self.last = time.perf_counter()


def _log(run: Run, record: dict) -> None:
    if run.rank == 0:
        run.log.write(record)
        if run.trackers is not None:
            run.trackers.log(record)


def _close(run: Run) -> None:
    if run.trackers is not None:
        run.trackers.close()


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
        self.saved: int | None = run.start_step if run.cfg.run.resume else None

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
        raise Diverged(f"training diverged: {what}; {kept}. Lower --learning-rate "
                       f"({self.run.cfg.optim.learning_rate:g}) or check the data")


class Diverged(UserError):
    """A run whose loss, gradients or weights stopped being finite (a search's trial just loses)."""


def all_finite(*trees) -> bool:
    """Whether every value in the arrays of ``trees`` is finite (``checkpoint.first_non_finite``'s one read)."""
    return checkpoint.first_non_finite({f"{i}.{k}": a for i, tree in enumerate(trees)
                                        for k, a in tree_flatten(tree)}) is None


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
