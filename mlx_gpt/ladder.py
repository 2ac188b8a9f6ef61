"""``python -m mlx_gpt.ladder``: which language model wins at which training budget.

Every rung — unigram, bigram, n-gram, Kneser-Ney, Bengio's feed-forward net, Elman RNN, LSTM,
the original Transformer, GPT-1, GPT-2 — gets the same data and tokenizer. Count rungs are
fitted once, by counting the train split: one point each, at its small cost. Neural rungs are
trained at every budget of ``--budgets`` (seconds, tokens or FLOPs of training) by
``mlx_gpt.train`` itself: the same compiled step, AdamW and warmup-plus-cosine schedule, the
schedule laid over the budget. A budget favours different settings for each architecture, so
every point is the best of a small search: at the smallest budget, every batch size and peak
learning rate of a grid; at each larger one, the previous budget's winner and the same at half
its learning rate (ladder.json's "method" says so, and each point names its settings). Every
point is scored exactly, on the whole val split; ladder.json is rewritten as each trial and point
finishes, so an interrupted study continues with ``--resume``; ladder.png draws val loss
against training seconds and FLOPs, where the crossovers between rungs show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import checkpoint, perplexity
from .atomic import replacing_file
from .cpu import accelerate
from .data import Dataset, open_tokens, prepare
from .limits import check_seed
from .errors import UserError, run_cli
from .generate import generate
from .models.rungs import BLOCK_SIZE, LEARNING_RATE, RUNGS, Rung, flops_per_token, parse
from .models.rungs import build as build_rung
from .train import TrainConfig, over_steps, train

UNITS = {"seconds": "s", "tokens": " tokens", "flops": " FLOPs"}
WARMUP_ITERS = 100  # nanoGPT's shakespeare-char warmup; train keeps it under a tenth of a short run
MIN_LR_RATIO = 0.1  # the cosine ends at a tenth of the peak, as nanoGPT's recipes do
SEARCH_VAL_TOKENS = 16_384  # the head of the val split that ranks the search's trials
EVAL_ITERS = 2  # train's own val estimate at the end of each run (the table's figures are exact)
REPORT = "ladder.json"
METHOD = {  # how each neural point was chosen and trained, for the reader of ladder.json
    "search": "at the smallest budget every (batch size, learning rate) of the grid; at each larger budget the "
              "previous budget's winner and the same at half its learning rate; the lowest loss on the first "
              f"{SEARCH_VAL_TOKENS} val tokens wins and is the point, scored again on the whole val split",
    "schedule": f"AdamW; linear warmup over min({WARMUP_ITERS}, steps/10) steps, then cosine to "
                f"{MIN_LR_RATIO:g} x the peak at the last step of the budget",
}


@dataclass(frozen=True)
class LadderConfig:
    data: str
    tokenizer: str = "byte"
    budgets: tuple[float, ...] = (10.0, 60.0, 300.0)
    unit: str = "seconds"
    rungs: tuple[str, ...] = RUNGS
    batch_sizes: tuple[int, ...] = (12, 16)  # searched at the smallest budget; 12 is nanoGPT CPU recipe's
    lr_scales: tuple[float, ...] = (0.5, 1.0, 2.0)  # searched: multiples of the rung's LEARNING_RATE
    out: str | None = None
    data_dir: str = "data"
    val_fraction: float = 0.1
    block_size: int = BLOCK_SIZE
    seed: int = 1337
    sample_tokens: int = 200
    resume: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UserError(f"--unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if not self.budgets:
            raise UserError("--budgets is empty; give at least one")
        for b in self.budgets:
            if not (b > 0 and math.isfinite(b)):
                raise UserError(f"--budgets must be positive numbers of {self.unit}, got {b:g}")
        if len(set(self.budgets)) != len(self.budgets):
            raise UserError(f"a budget is listed twice in --budgets {','.join(f'{b:g}' for b in self.budgets)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("--batch-sizes must be whole numbers of at least 1")
        if not self.lr_scales or not min(self.lr_scales) > 0:
            raise UserError("--lr-scales must be positive numbers")
        if self.block_size < 1:
            raise UserError(f"--block-size must be at least 1, got {self.block_size}")
        if self.sample_tokens < 0:
            raise UserError(f"--sample-tokens must be at least 0, got {self.sample_tokens}")
        check_seed(self.seed)
        if not self.rungs:
            raise UserError("--rungs is empty; name at least one rung")
        specs = [parse(s).spec for s in self.rungs]
        if len(set(specs)) != len(specs):
            raise UserError(f"a rung is listed twice in --rungs {','.join(specs)}")

    def study(self) -> dict:
        """What defines the study's results: a resumed study must agree on all of it."""
        d = asdict(self)
        for name in ("out", "resume"):
            d.pop(name)
        return json.loads(json.dumps(d))  # tuples as lists, as read back from ladder.json

    def label(self, budget: float) -> str:
        return f"{budget:g}{UNITS[self.unit]}"


# ---------------------------------------------------------------------------- one run of one rung


def train_config(cfg: LadderConfig, rung: Rung, budget: float, batch_size: int, learning_rate: float, out: Path,
                 model_flops: float) -> TrainConfig:
    """How ``mlx_gpt.train`` runs a neural rung for one budget: its schedule laid over the budget."""
    tcfg = TrainConfig(data=cfg.data, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                       model=rung.spec, block_size=cfg.block_size, batch_size=batch_size, learning_rate=learning_rate,
                       min_lr=learning_rate * MIN_LR_RATIO, warmup_iters=WARMUP_ITERS, seed=cfg.seed, out=str(out),
                       overwrite=True, eval_interval=10**9, eval_iters=EVAL_ITERS, checkpoint_interval=10**9,
                       log_interval=200, sample_tokens=0)
    if cfg.unit == "seconds":
        return replace(tcfg, max_seconds=budget)
    tokens = budget if cfg.unit == "tokens" else budget / model_flops
    return over_steps(tcfg, max(1, round(tokens / (batch_size * cfg.block_size))))


def run_neural(cfg: LadderConfig, rung: Rung, budget: float, batch_size: int, learning_rate: float, out: Path,
               model_flops: float) -> dict:
    """Train one rung at one budget and setting into ``out``; what it cost, and the trained model."""
    run = train(train_config(cfg, rung, budget, batch_size, learning_rate, out, model_flops), progress=False)
    tokens = run.cfg.max_iters * batch_size * cfg.block_size
    return dict(budget=budget, batch_size=batch_size, learning_rate=learning_rate, min_lr=run.cfg.min_lr,
                warmup_iters=run.cfg.warmup_iters, steps=run.cfg.max_iters, tokens=tokens,
                seconds=run.train_seconds, flops=tokens * model_flops, load=os.getloadavg()[0],
                checkpoint=str(out), model=run.model)


def score(model, dataset: Dataset, tokens: np.ndarray | None = None) -> perplexity.Score:
    return perplexity.score(model, open_tokens(dataset.val_file) if tokens is None else tokens, dataset.tokenizer)


def finish_point(cfg: LadderConfig, record: dict, dataset: Dataset) -> dict:
    """A trained point scored exactly on the whole val split, with a sample; the model dropped."""
    model = record.pop("model", None)
    if model is None:
        model, _ = checkpoint.load(record["checkpoint"])
        accelerate(model)
    val = score(model, dataset)
    sample = generate(model, dataset.tokenizer, "\n", cfg.sample_tokens, temperature=0.8, seed=cfg.seed) \
        if cfg.sample_tokens else ""
    return {**record, "val_loss": val.loss, "val_ppl": val.perplexity, "bits_per_byte": val.bits_per_byte,
            "val_tokens": val.tokens, "val_bytes": val.bytes, "sample": sample}


# ---------------------------------------------------------------------------- one rung


def count_rung(cfg: LadderConfig, rung: Rung, dataset: Dataset, out: Path) -> dict:
    """Fit a count rung by counting the train split; one point, at its cost."""
    train_tokens = open_tokens(dataset.train_file)
    start = time.perf_counter()
    model = build_rung(rung, dataset.vocab_size, tokens=train_tokens, overrides={"block_size": cfg.block_size})
    seconds = time.perf_counter() - start
    checkpoint.save(out, model, dataset.tokenizer, train_config={"model": rung.spec, "data": cfg.data})
    # counting costs one table update per order per token: operations, not floating-point ones
    point = dict(budget=None, params=model.num_params(), steps=0, tokens=len(train_tokens), seconds=seconds,
                 flops=float(rung.order * len(train_tokens)), load=os.getloadavg()[0], checkpoint=str(out),
                 model=model)
    return finish_point(cfg, point, dataset)


def trial(cfg: LadderConfig, rung: Rung, record: dict, dataset: Dataset, out: Path, budget: float, batch_size: int,
          learning_rate: float, save: Callable[[], None], say: Callable[[str], None]) -> dict:
    """One setting of the rung trained at one budget and ranked by its loss on the head of the
    val split; saved as it finishes, so a resumed study trains each trial once."""
    for t in record["search"]:
        if (t["budget"], t["batch_size"], t["learning_rate"]) == (budget, batch_size, learning_rate):
            return t
    say(f"{rung.spec}: search at {cfg.label(budget)}, batch {batch_size}, learning rate {learning_rate:g}")
    name = f"{cfg.label(budget).replace(' ', '')}-b{batch_size}-lr{learning_rate:g}"
    t = run_neural(cfg, rung, budget, batch_size, learning_rate, out / "search" / name, record["flops_per_token"])
    loss = score(t.pop("model"), dataset, open_tokens(dataset.val_file)[: SEARCH_VAL_TOKENS + 1]).loss
    t["search_loss"] = loss if math.isfinite(loss) else None
    record["search"].append(t)
    save()
    say(f"{rung.spec}: batch {batch_size}, lr {learning_rate:g}: {t['steps']} steps in {t['seconds']:.1f} s, "
        f"val-head loss {loss:.4f}")
    return t


def settings_to_try(cfg: LadderConfig, rung: Rung, record: dict, budget: float) -> list[tuple[int, float]]:
    """The (batch size, learning rate) pairs trained at ``budget``. At the smallest, the whole grid.
    Above it, the previous budget's winner, and the same at half its learning rate: a longer run
    takes more steps, and a rate that wins a short run is often too high for a long one."""
    smaller = [b for b in cfg.budgets if b < budget]
    if not smaller:
        return [(b, LEARNING_RATE[rung.name] * s) for b in cfg.batch_sizes for s in cfg.lr_scales]
    previous = next(p for p in record["points"] if p["budget"] == max(smaller))
    batch_size, learning_rate = previous["batch_size"], previous["learning_rate"]
    return [(batch_size, learning_rate), (batch_size, learning_rate / 2)]


def neural_rung(cfg: LadderConfig, rung: Rung, record: dict, dataset: Dataset, out: Path,
                save: Callable[[], None], say: Callable[[str], None]) -> None:
    """Each budget's point is the best of its trials, scored exactly on the whole val split; the
    losing trials are deleted once the rung is done."""
    for budget in sorted(cfg.budgets):
        if any(p["budget"] == budget for p in record["points"]):
            continue
        tried = settings_to_try(cfg, rung, record, budget)
        trials = [trial(cfg, rung, record, dataset, out, budget, b, lr, save, say) for b, lr in tried]
        best = min(trials, key=lambda t: math.inf if t["search_loss"] is None else t["search_loss"])
        path = out / cfg.label(budget).replace(" ", "")
        if checkpoint.exists(best["checkpoint"]):
            _replace_dir(Path(best["checkpoint"]), path)
        if checkpoint.exists(path):  # moved here now, or by a study interrupted before it saved the point
            point = {k: v for k, v in best.items() if k != "search_loss"} | {"checkpoint": str(path)}
        else:
            say(f"{rung.spec}: training for {cfg.label(budget)}")
            point = run_neural(cfg, rung, budget, best["batch_size"], best["learning_rate"], path,
                               record["flops_per_token"])
        point = finish_point(cfg, point, dataset)
        record["points"].append(point)
        save()
        say(f"{rung.spec} at {cfg.label(budget)}: batch {point['batch_size']}, lr {point['learning_rate']:g}, "
            f"{point['steps']} steps, {point['seconds']:.1f} s, {point['flops']:.2e} FLOPs, "
            f"val loss {point['val_loss']:.4f} ({point['bits_per_byte']:.3f} bits/byte)")
    search_dir = out / "search"
    if search_dir.exists():
        shutil.rmtree(search_dir)  # the losing trials; each winner has moved to its point


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)


def rung_dir(rung: Rung) -> str:
    return rung.spec.replace(":", "-")


# ---------------------------------------------------------------------------- the study


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


def open_study(cfg: LadderConfig, out: Path) -> dict | None:
    """The saved study to resume (None for a new one); refuses a folder that is not a study of ours."""
    report = out / REPORT
    if cfg.resume:
        saved = read_report(out)
        differ = [k for k, v in cfg.study().items() if saved["study"].get(k) != v]
        if differ:
            raise UserError(f"--{differ[0].replace('_', '-')} differs from the study in {out} "
                            f"({saved['study'].get(differ[0])}); a resumed study keeps its settings")
        return saved
    if report.exists():
        raise UserError(f"{out} already holds a study; pass --resume to continue it, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a ladder study; choose another --out")
    return None


def read_report(out: str | os.PathLike) -> dict:
    if not (Path(out) / REPORT).is_file():
        raise UserError(f"{out} holds no study to resume ({REPORT} is missing)")
    try:
        return json.loads((Path(out) / REPORT).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {Path(out) / REPORT}: {e}") from None


def climb(cfg: LadderConfig, *, say: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the study; ladder.json is written after every point, ladder.png at the end."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    ladder = [parse(s) for s in cfg.rungs]
    dataset = prepare(cfg.data, cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction)
    if dataset.tokenizer is None:
        raise UserError(f"{dataset.path} has no tokenizer.json; bits per byte need the tokenizer")
    check_fits(cfg, ladder, dataset)
    out = Path(cfg.out) if cfg.out else Path("checkpoints") / f"ladder-{dataset.path.name}"
    saved = open_study(cfg, out)
    say(f"study: {out} ({'resumed' if saved else 'new'}); budgets {', '.join(map(cfg.label, cfg.budgets))}")
    records = {r["rung"]: r for r in saved["rungs"]} if saved else {}
    report = {"study": cfg.study(), "method": METHOD, "dataset": str(dataset.path), "vocab_size": dataset.vocab_size,
              "rungs": []}
    for rung in ladder:
        if rung.spec not in records:
            records[rung.spec] = dict(rung=rung.spec, model_type=rung.model_type, counted=rung.counted,
                                      params=None, flops_per_token=None, search=[], points=[])
            if not rung.counted:
                model = build_rung(rung, dataset.vocab_size, overrides={"block_size": cfg.block_size})
                records[rung.spec].update(params=model.num_params(),
                                          flops_per_token=flops_per_token(model, rung.model_type))
        report["rungs"].append(records[rung.spec])

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        with replacing_file(out / REPORT) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")

    save()
    for i, rung in enumerate(ladder, 1):
        record = records[rung.spec]
        say(f"[{i}/{len(ladder)}] {rung.spec}")
        if rung.counted and not record["points"]:
            point = count_rung(cfg, rung, dataset, out / rung_dir(rung))
            record["params"] = point.pop("params")
            record["points"].append(point)
            save()
            p = record["points"][0]
            say(f"{rung.spec}: counted in {p['seconds']:.2f} s, val loss {p['val_loss']:.4f} "
                f"({p['bits_per_byte']:.3f} bits/byte)")
        elif not rung.counted:
            neural_rung(cfg, rung, record, dataset, out / rung_dir(rung), save, say)
    plot(report, out / "ladder.png")
    say(f"wrote {out / REPORT} and {out / 'ladder.png'}")
    return report


# ---------------------------------------------------------------------------- the table


def best_by_budget(report: dict) -> dict[float, tuple[str, dict]]:
    """For each budget, the rung with the lowest exact val loss among those it affords: every
    neural rung's point at that budget, and every count rung whose counting cost no more."""
    cost = report["study"]["unit"]  # a count point's cost in the budgets' unit, under the same key
    best = {}
    for budget in sorted(report["study"]["budgets"]):
        candidates = [(r["rung"], p) for r in report["rungs"] for p in r["points"]
                      if p["budget"] == budget or (r["counted"] and p[cost] <= budget)]
        candidates = [c for c in candidates if math.isfinite(c[1]["val_loss"])]
        if candidates:
            best[budget] = min(candidates, key=lambda c: c[1]["val_loss"])
    return best


def table(report: dict) -> str:
    """Exact val loss (bits per byte) of every rung at every budget, the best of each budget
    starred and named in the last row; then the settings and cost of each neural point."""
    study = report["study"]
    budgets = sorted(study["budgets"])
    label = LadderConfig(data="", unit=study["unit"]).label
    best = best_by_budget(report)
    head = ["rung", "params"] + [label(b) for b in budgets]
    rows = []
    for r in report["rungs"]:
        cells = [r["rung"], _si(r["params"])]
        for b in budgets:
            p = r["points"][0] if r["counted"] and r["points"] else next((p for p in r["points"] if p["budget"] == b),
                                                                          None)
            star = "*" if b in best and best[b][1] is p else ""
            cells.append("-" if p is None else f"{star}{p['val_loss']:.4f} ({p['bits_per_byte']:.3f})")
        rows.append(cells)
    rows.append(["best", ""] + [best[b][0] if b in best else "-" for b in budgets])
    lines = [_markdown([*head], rows)]
    head2 = ["rung", "budget", "batch", "lr", "steps", "tokens", "seconds", "FLOPs", "val loss"]
    rows2 = [[r["rung"], label(p["budget"]), str(p["batch_size"]), f"{p['learning_rate']:g}", str(p["steps"]),
              _si(p["tokens"]), f"{p['seconds']:.1f}", f"{p['flops']:.2e}", f"{p['val_loss']:.4f}"]
             for r in report["rungs"] if not r["counted"] for p in sorted(r["points"], key=lambda p: p["budget"])]
    if rows2:
        lines += ["", _markdown(head2, rows2)]
    return "\n".join(lines)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns aligned: the first left, figures right."""
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows])


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}" if x < 10 * scale else f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


# ---------------------------------------------------------------------------- the picture


def plot(report: dict, path: Path):
    """Exact val loss against training compute, seconds and FLOPs (log scales): count rungs as
    points at their counting cost, neural rungs as curves through their budgets. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2, sharey=True)
    rungs = report["rungs"]
    for i, r in enumerate(rungs):
        points = sorted(r["points"], key=lambda p: -1 if p["budget"] is None else p["budget"])
        if not points:
            continue
        color = _color(i, len(rungs))
        for ax, key in zip(panels, ("seconds", "flops")):
            xs, ys = [p[key] for p in points], [p["val_loss"] for p in points]
            if r["counted"]:
                ax.plot(xs, ys, linestyle="none", marker="s", markersize=7, color=color, label=f"{r['rung']} (counted)")
            else:
                ax.plot(xs, ys, marker="o", markersize=5, linewidth=1.8, color=color, label=r["rung"])
    panels[0].set_xlabel("training time (s), evaluation excluded")
    panels[1].set_xlabel("training FLOPs (6 per weight per token + attention; counting: table updates)")
    panels[0].set_ylabel("val loss, exact on the whole val split (nats per token)")
    for ax in panels:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    first = next((p for r in rungs for p in r["points"]), None)
    if first is not None:
        scale = first["val_tokens"] / first["val_bytes"] / math.log(2)
        panels[1].secondary_yaxis("right", functions=(lambda v: v * scale, lambda b: b / scale)).set_ylabel(
            "bits per byte")
    panels[1].legend(fontsize=8, ncols=2, loc="best")
    study = report["study"]
    budgets = ", ".join(LadderConfig(data="", unit=study["unit"]).label(b) for b in sorted(study["budgets"]))
    fig.suptitle(f"The language-model ladder on {Path(report['dataset']).name}: loss against training compute "
                 f"(budgets {budgets} per neural rung)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return fig


def _color(i: int, n: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)


# ---------------------------------------------------------------------------- CLI


def _numbers(kind: type) -> Callable[[str], tuple]:
    def parse_list(text: str) -> tuple:
        try:
            return tuple(kind(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse_list


def build_parser() -> argparse.ArgumentParser:
    d = LadderConfig(data="")
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.ladder", argument_default=argparse.SUPPRESS,
                                description="Train every rung of the language-model ladder at several training "
                                            "budgets on the same data and tokenizer, and see which wins where.")
    p.add_argument("--data", help="a text file, a folder of .txt files, a prepared data dir, 'pydoc' or "
                                  "'shakespeare' (required unless --resume)")
    p.add_argument("--tokenizer", help=f"byte, or sp:VOCAB for SentencePiece BPE (default {d.tokenizer})")
    p.add_argument("--budgets", type=_numbers(float),
                   help=f"training budgets per neural rung, comma-separated, in --unit "
                        f"(default {','.join(f'{b:g}' for b in d.budgets)})")
    p.add_argument("--unit", choices=list(UNITS),
                   help=f"what --budgets count: seconds of training (noisy on a shared machine), or tokens or "
                        f"FLOPs (reproducible) (default {d.unit})")
    p.add_argument("--rungs", nargs="+",
                   help=f"rungs to climb, comma- or space-separated (default all: {','.join(d.rungs)}); "
                        "ngram:N and kneser-ney:N set the order n")
    p.add_argument("--batch-sizes", type=_numbers(int),
                   help=f"batch sizes searched at the smallest budget (default {','.join(map(str, d.batch_sizes))})")
    p.add_argument("--lr-scales", type=_numbers(float),
                   help="learning rates searched at the smallest budget, as multiples of each rung's own; a "
                        "larger budget tries the previous winner's and half of it "
                        f"(default {','.join(f'{s:g}' for s in d.lr_scales)})")
    p.add_argument("--out", help="output directory (default checkpoints/ladder-<data>-<tokenizer>, e.g. "
                                 "checkpoints/ladder-tinyshakespeare-byte)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out where it stopped")
    p.add_argument("--data-dir", help=f"where prepared datasets live (default {d.data_dir})")
    p.add_argument("--val-fraction", type=float, help=f"tail of the text held out for scoring (default {d.val_fraction})")
    p.add_argument("--block-size", type=int, help=f"tokens per training sequence, every rung (default {d.block_size})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--sample-tokens", type=int,
                   help=f"tokens sampled from each point for ladder.json (default {d.sample_tokens})")
    return p


def config_from_args(args: dict) -> LadderConfig:
    """The study's config: the flags given, over the saved study's settings when resuming."""
    if "rungs" in args:
        args["rungs"] = tuple(s for arg in args["rungs"] for s in arg.split(",") if s.strip())
    if not args.get("resume"):
        if "data" not in args:
            raise UserError("--data is required (or --resume --out DIR to continue a study)")
        return LadderConfig(**args)
    if "out" not in args:
        raise UserError("--resume needs --out naming the study to continue")
    saved = read_report(args["out"])["study"]
    known = {f.name for f in fields(LadderConfig)}
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return LadderConfig(**{**base, **args})


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config_from_args(vars(build_parser().parse_args(argv)))
    try:
        report = climb(cfg)
    except KeyboardInterrupt:
        print("interrupted: finished points are saved; continue with --resume --out DIR", file=sys.stderr)
        raise
    print(table(report))
    return report


if __name__ == "__main__":
    run_cli(main)
