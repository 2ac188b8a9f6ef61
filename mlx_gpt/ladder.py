"""``python -m mlx_gpt.ladder``: climb the language-model ladder on one corpus and see what
each rung buys.

Every rung — unigram, bigram, n-gram, Kneser-Ney, Bengio's feed-forward net, Elman RNN, LSTM,
the original Transformer, GPT-1, GPT-2 — gets the same data, the same tokenizer and the same
wall-clock budget. Count rungs are fitted by counting (seconds); neural rungs train with
``train.py``'s compiled step and AdamW until the budget runs out, their learning rate warmed up
and then decayed on a cosine over the budget's time rather than over a step count. All are
scored on the whole validation split in bits per byte, and compared in a table, ladder.json and
ladder.png; each rung's checkpoint is kept in ``OUT/<rung>/`` for ``mlx_gpt.generate``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from . import checkpoint, perplexity
from .data import BatchSampler, Dataset, open_tokens, prepare
from .errors import UserError, run_cli
from .generate import generate
from .models.rungs import BLOCK_SIZE, LEARNING_RATE, RUNGS, Rung, parse
from .models.rungs import build as build_rung
from .optim import AdamW
from .train import TrainConfig, estimate_loss, make_eval_loss, make_train_step, step_seed

WARMUP_STEPS = 100
EVAL_BATCH = 32  # sequences per val-curve batch, whatever the training batch
WARMUP_FRACTION = 0.1  # of the budget: warmup ends at whichever comes first
MIN_LR_RATIO = 0.1


@dataclass(frozen=True)
class LadderConfig:
    data: str
    tokenizer: str = "byte"
    budget: float = 60.0  # seconds of training per rung
    rungs: tuple[str, ...] = RUNGS
    out: str | None = None
    data_dir: str = "data"
    val_fraction: float = 0.1
    block_size: int = BLOCK_SIZE
    batch_size: int = 8  # small: on a budget of minutes, more updates beat bigger ones
    seed: int = 1337
    eval_points: int = 8  # val-loss points on each neural rung's curve
    eval_iters: int = 2  # batches of EVAL_BATCH sequences per curve point
    sample_tokens: int = 200

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise UserError(f"--budget must be a positive number of seconds, got {self.budget}")
        for name in ("block_size", "batch_size", "eval_points", "eval_iters"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise UserError(f"--sample-tokens must be at least 0, got {self.sample_tokens}")
        if not self.rungs:
            raise UserError("--rungs is empty; name at least one rung")
        specs = [parse(s).spec for s in self.rungs]
        if len(set(specs)) != len(specs):
            raise UserError(f"a rung is listed twice in --rungs {','.join(specs)}")


@dataclass
class RungResult:
    rung: str
    model_type: str
    params: int
    train_time: float  # seconds spent fitting or training, evaluation excluded
    tokens: int  # training tokens processed
    steps: int  # optimizer steps (0 for count rungs)
    val: perplexity.Score
    curve: list[tuple[float, float]]  # (train seconds, val loss estimate)
    sample: str
    checkpoint: str
    config: dict = field(default_factory=dict)
    diverged: bool = False

    @property
    def counted(self) -> bool:
        return self.model_type == "ngram"

    @property
    def tok_s(self) -> float:
        return self.tokens / self.train_time if self.train_time > 0 else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("val")
        d.update(tok_s=self.tok_s, val_loss=self.val.loss, val_ppl=self.val.perplexity,
                 bits_per_byte=self.val.bits_per_byte, val_tokens=self.val.tokens, val_bytes=self.val.bytes)
        return d


# ---------------------------------------------------------------------------- one rung


def lr_at(peak: float, step: int, progress: float) -> float:
    """Learning rate at a step, `progress` being the fraction of the time budget spent: linear
    warmup (over WARMUP_STEPS or WARMUP_FRACTION of the budget, whichever ends first), then
    cosine decay to MIN_LR_RATIO * peak as the budget runs out."""
    warm = min(1.0, max((step + 1) / WARMUP_STEPS, progress / WARMUP_FRACTION))
    decay = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * decay)


def _train_config(cfg: LadderConfig, rung: Rung) -> TrainConfig:
    lr = LEARNING_RATE.get(rung.name, 1e-3)
    return TrainConfig(data=cfg.data, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                       block_size=cfg.block_size, batch_size=cfg.batch_size, learning_rate=lr,
                       min_lr=lr * MIN_LR_RATIO, warmup_iters=WARMUP_STEPS, seed=cfg.seed)


def val_estimator(model, tcfg: TrainConfig, val: BatchSampler, iters: int) -> Callable[[], float]:
    """A function giving the mean loss over the same `iters` val batches at every call."""
    eval_loss = make_eval_loss(model, tcfg)

    def estimate() -> float:
        was_training = model.training
        model.eval()
        try:
            return estimate_loss(eval_loss, val, iters, tcfg.seed + 1)
        finally:
            model.train(was_training)

    return estimate


def train_for(model, tcfg: TrainConfig, budget: float, train: BatchSampler, val: BatchSampler, *, eval_points: int,
              eval_iters: int) -> tuple[float, int, list[tuple[float, float]], bool]:
    """Train until `budget` seconds of stepping are spent (evaluation is not counted).

    Returns (train seconds, steps, curve of (seconds, val loss), diverged)."""
    optimizer = AdamW(learning_rate=tcfg.learning_rate, betas=[tcfg.beta1, tcfg.beta2], eps=1e-8, bias_correction=True,
                      weight_decay=tcfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    model.train()
    step_fn = make_train_step(model, optimizer, tcfg)
    val_loss = val_estimator(model, tcfg, val, eval_iters)
    curve = [(0.0, val_loss())]
    elapsed, step, next_eval, diverged = 0.0, 0, budget / eval_points, False
    x, y = train.next()
    while elapsed < budget:
        start = time.perf_counter()
        optimizer.learning_rate = lr_at(tcfg.learning_rate, step, elapsed / budget)
        mx.random.seed(step_seed(tcfg.seed, step))
        loss, _ = step_fn(mx.array(x), mx.array(y))
        mx.async_eval(loss, model.parameters(), optimizer.state)
        x, y = train.next()  # while the step runs
        loss = loss.item()
        mx.eval(model.parameters(), optimizer.state)
        elapsed += time.perf_counter() - start
        step += 1
        if not math.isfinite(loss):
            diverged = True
            break
        if elapsed >= next_eval or elapsed >= budget:
            curve.append((elapsed, val_loss()))
            next_eval += budget / eval_points
    model.eval()
    return elapsed, step, curve, diverged


def climb_rung(cfg: LadderConfig, rung: Rung, dataset: Dataset, out: Path,
               say: Callable[[str], None]) -> RungResult:
    """Fit or train one rung, score it on the whole val split, sample it, save it."""
    tcfg = _train_config(cfg, rung)
    train_tokens = open_tokens(dataset.train_file)
    val_sampler = BatchSampler(dataset.val_file, EVAL_BATCH, cfg.block_size, seed=cfg.seed + 1)
    overrides = {"block_size": cfg.block_size}
    diverged = False
    if rung.counted:
        say(f"{rung.spec}: counting {len(train_tokens):,} tokens")
        start = time.perf_counter()
        model = build_rung(rung, dataset.vocab_size, tokens=train_tokens, overrides=overrides)
        train_time, steps, tokens = time.perf_counter() - start, 0, len(train_tokens)
        curve = [(train_time, val_estimator(model, tcfg, val_sampler, cfg.eval_iters)())]
    else:
        model = build_rung(rung, dataset.vocab_size, overrides=overrides, seed=cfg.seed)
        say(f"{rung.spec}: {model.num_params() / 1e6:.2f}M parameters, training for {cfg.budget:g} s "
            f"(lr {tcfg.learning_rate:g})")
        train_sampler = BatchSampler(dataset.train_file, cfg.batch_size, cfg.block_size, seed=cfg.seed)
        train_time, steps, curve, diverged = train_for(model, tcfg, cfg.budget, train_sampler, val_sampler,
                                                       eval_points=cfg.eval_points, eval_iters=cfg.eval_iters)
        tokens = steps * cfg.batch_size * cfg.block_size
        if diverged:
            say(f"{rung.spec}: the loss diverged at step {steps}; stopped there")
    val = perplexity.score(model, open_tokens(dataset.val_file), dataset.tokenizer)
    sample = generate(model, dataset.tokenizer, "\n", cfg.sample_tokens, temperature=0.8, seed=cfg.seed) \
        if cfg.sample_tokens else ""
    path = out / rung_dir(rung)
    checkpoint.save(path, model, dataset.tokenizer, train_config={**asdict(tcfg), "model": rung.spec,
                                                                  "budget": cfg.budget})
    say(f"{rung.spec}: {train_time:.1f} s, val loss {val.loss:.4f}, {val.bits_per_byte:.3f} bits/byte")
    return RungResult(rung.spec, rung.model_type, model.num_params(), train_time, tokens, steps, val, curve, sample,
                      str(path), model.config.to_dict(), diverged)


def rung_dir(rung: Rung) -> str:
    return rung.spec.replace(":", "-")


# ---------------------------------------------------------------------------- the whole ladder


def check_fits(cfg: LadderConfig, ladder: list[Rung], dataset: Dataset) -> None:
    """Refuse, before training anything, a rung whose context is longer than the data."""
    n_train, n_val = len(open_tokens(dataset.train_file)), len(open_tokens(dataset.val_file))
    if n_val < 2:
        raise UserError(f"the val split of {dataset.path} holds {n_val} tokens; it needs at least 2")
    for rung in ladder:
        if rung.counted and rung.order > n_train:
            raise UserError(f"rung {rung.spec}'s context of {rung.order - 1} tokens is longer than the data "
                            f"({n_train} train tokens)")
        if not rung.counted and cfg.block_size + 1 > min(n_train, n_val):
            raise UserError(f"rung {rung.spec}'s context of {cfg.block_size} tokens is longer than the data "
                            f"({n_train} train, {n_val} val tokens); use a smaller --block-size")


def climb(cfg: LadderConfig, *, say: Callable[[str], None] | None = None) -> list[RungResult]:
    """Train every rung, then write ladder.json and ladder.png into the output directory."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    ladder = [parse(s) for s in cfg.rungs]
    dataset = prepare(cfg.data, cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction)
    if dataset.tokenizer is None:
        raise UserError(f"{dataset.path} has no tokenizer.json; bits per byte need the tokenizer")
    check_fits(cfg, ladder, dataset)
    out = Path(cfg.out) if cfg.out else Path("checkpoints") / f"ladder-{dataset.path.name}"
    for rung in ladder:
        path = out / rung_dir(rung)
        if path.exists() and not checkpoint.exists(path):
            raise UserError(f"{path} exists and is not a checkpoint; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, rung in enumerate(ladder, 1):
        say(f"[{i}/{len(ladder)}] {rung.spec}")
        results.append(climb_rung(cfg, rung, dataset, out, say))
    report = {"data": cfg.data, "dataset": str(dataset.path), "tokenizer": cfg.tokenizer,
              "vocab_size": dataset.vocab_size, "budget": cfg.budget, "block_size": cfg.block_size,
              "batch_size": cfg.batch_size, "seed": cfg.seed, "rungs": [r.to_dict() for r in results]}
    (out / "ladder.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "ladder.png", title=f"{dataset.path.name}, {cfg.budget:g} s per rung")
    return results


def table(results: list[RungResult]) -> str:
    """The results as a Markdown table, columns aligned."""
    head = ["rung", "params", "train time", "tok/s", "val loss", "val ppl", "bits per byte"]
    rows = [[r.rung + (" (diverged)" if r.diverged else ""), _si(r.params),
             f"{r.train_time:.{2 if r.train_time < 10 else 1}f} s", _si(r.tok_s),
             f"{r.val.loss:.4f}", f"{r.val.perplexity:.2f}", f"{r.val.bits_per_byte:.3f}"] for r in results]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # the rung name left-aligned, figures right-aligned
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows])


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}" if x < 10 * scale else f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


# ---------------------------------------------------------------------------- the picture


def plot(results: list[RungResult], path: Path, *, title: str) -> None:
    """Bits per byte per rung (bars), and val loss against training time (curves)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    bars, curves = fig.subplots(1, 2, width_ratios=[1, 1.3])
    colors = [_color(i, len(results)) for i in range(len(results))]
    names = [r.rung for r in results]
    bpb = [r.val.bits_per_byte for r in results]
    y = np.arange(len(results))
    bars.barh(y, bpb, color=colors)
    bars.set_yticks(y, names)
    bars.invert_yaxis()  # the ladder reads top to bottom, oldest first
    for yi, v in zip(y, bpb):
        bars.text(v, yi, f" {v:.2f}", va="center", fontsize=9)
    bars.set_xlim(0, max([v for v in bpb if math.isfinite(v)] + [1]) * 1.15)
    bars.set_xlabel("bits per byte on the val split (lower is better)")
    bars.set_title("What each rung buys")
    bars.grid(axis="x", alpha=0.3)

    budget = max([r.train_time for r in results] + [1e-9])
    for r, c in zip(results, colors):
        t, loss = zip(*r.curve)
        if r.counted:
            curves.hlines(loss[-1], 0, budget, colors=[c], linestyles="--", linewidth=1.2, label=f"{r.rung} (counted)")
        else:
            curves.plot(t, loss, color=c, marker="o", markersize=3, linewidth=1.6, label=r.rung)
    curves.set_xlabel("training time (s)")
    curves.set_ylabel("val loss (nats per token)")
    curves.set_title("Val loss while training")
    curves.grid(alpha=0.3)
    finite = [v for r in results for _, v in r.curve if math.isfinite(v)]
    if finite:
        neural_end = [r.curve[-1][1] for r in results if not r.counted and math.isfinite(r.curve[-1][1])]
        top = max([v for r in results if r.counted for _, v in r.curve] + neural_end + [min(finite)])
        curves.set_ylim(min(finite) * 0.95, max(top * 1.15, min(finite) * 1.2))
    scale = results[0].val.tokens / results[0].val.bytes / math.log(2) if results else 1.0
    curves.secondary_yaxis("right", functions=(lambda v: v * scale, lambda b: b / scale)).set_ylabel("bits per byte")
    curves.legend(fontsize=8, ncols=2, loc="upper right")
    fig.suptitle(f"The language-model ladder: {title}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _color(i: int, n: int) -> tuple:
    """A qualitative colour per rung, the same in both panels."""
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = LadderConfig(data="")
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.ladder",
                                description="Train every rung of the language-model ladder on the same data, "
                                            "tokenizer and time budget, and compare them.")
    p.add_argument("--data", required=True, help="a text file, a folder of .txt files, a prepared data dir, "
                                                 "'pydoc' or 'shakespeare'")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte (default), or sp:VOCAB for SentencePiece BPE")
    p.add_argument("--budget", type=float, default=d.budget,
                   help=f"seconds of training per rung (default {d.budget:g})")
    p.add_argument("--rungs", nargs="+", default=None,
                   help=f"rungs to climb, comma- or space-separated (default all: {','.join(d.rungs)}); "
                        "ngram:N and kneser-ney:N set the order n")
    p.add_argument("--out", default=None, help="output directory (default checkpoints/ladder-<dataset>)")
    p.add_argument("--data-dir", default=d.data_dir, help=f"where prepared datasets live (default {d.data_dir})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"tail of the text held out for scoring (default {d.val_fraction})")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help=f"tokens per training sequence, every rung (default {d.block_size})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences per step, every neural rung (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                   help=f"tokens sampled from each rung for ladder.json (default {d.sample_tokens})")
    return p


def main(argv: Sequence[str] | None = None) -> list[RungResult]:
    args = vars(build_parser().parse_args(argv))
    if args["rungs"] is None:
        del args["rungs"]
    else:
        args["rungs"] = tuple(s for arg in args["rungs"] for s in arg.split(",") if s.strip())
    results = climb(LadderConfig(**args))
    print(table(results))
    return results


if __name__ == "__main__":
    run_cli(main)
