"""``python -m mlx_gpt.ladder``: which language model wins at which training budget.

Every rung — unigram, bigram, n-gram, Kneser-Ney, Bengio's feed-forward net, Elman RNN, LSTM,
the original Transformer, GPT-1, GPT-2, today's modern GPT — gets the same data and tokenizer. Count rungs are
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import checkpoint, flags, perplexity, rundir
from .atomic import replacing_file
from .data import Dataset, prepare
from .ladder_report import UNITS, label, plot, table
from .limits import check_seed
from .errors import UserError, run_cli
from .flags import setting
from .formats.json_file import read_json
from .generate import generate
from .models.rungs import BLOCK_SIZE, LEARNING_RATE, RUNGS, Rung, flops_per_token, parse
from .models.rungs import build as build_rung
from .train import train
from .training.loop import Diverged
from .training.budget import over_steps
from .training.config import TrainConfig

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
    data: str | None = setting(None, "a text file, a folder of .txt files, a prepared data dir, 'pydoc' or "
                                     "'shakespeare' (required unless --resume)")
    tokenizer: str = setting("byte", "byte, or sp:VOCAB for SentencePiece BPE")
    budgets: tuple[float, ...] = setting((10.0, 60.0, 300.0), "training budgets per neural rung, comma-separated, "
                                                              "in --unit")
    unit: str = setting("seconds", f"what --budgets count: {', '.join(UNITS)} (seconds are noisy on a shared "
                                   "machine; tokens and FLOPs reproduce)")
    rungs: tuple[str, ...] = setting(RUNGS, "rungs to climb, comma- or space-separated; ngram:N and kneser-ney:N set "
                                            "the order n")
    batch_sizes: tuple[int, ...] = setting((12, 16), "batch sizes searched at the smallest budget (12 is nanoGPT's "
                                                     "CPU recipe's)")
    lr_scales: tuple[float, ...] = setting((0.5, 1.0, 2.0), "learning rates searched at the smallest budget, as "
                                                            "multiples of each rung's own; a larger budget tries the "
                                                            "previous winner's and half of it")
    out: str | None = setting(None, "output directory (default: checkpoints/ladder-<data>-<tokenizer>, e.g. "
                                    "checkpoints/ladder-shakespeare-byte)")
    data_dir: str = setting("data", "where prepared datasets live")
    val_fraction: float = setting(0.1, "tail of the text held out for scoring")
    block_size: int = setting(BLOCK_SIZE, "tokens per training sequence, every rung")
    seed: int = setting(1337, "seed of initialisation, batches and samples")
    sample_tokens: int = setting(200, "tokens sampled from each point for ladder.json")
    resume: bool = setting(False, "continue the study in --out where it stopped")

    def __post_init__(self) -> None:
        if self.data is None and not self.resume:
            raise UserError("--data is required (or --resume --out DIR to continue a study)")
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
        return label(budget, self.unit)


# ---------------------------------------------------------------------------- one run of one rung


def train_config(cfg: LadderConfig, rung: Rung, budget: float, batch_size: int, learning_rate: float, out: Path,
                 model_flops: float) -> TrainConfig:
    """How ``mlx_gpt.train`` runs a neural rung for one budget: its schedule laid over the budget.
    Every rung trains with AdamW, whose rate the ladder searches (the modern rung too: the modern
    recipe's Muon is a change of optimizer, which the ladder leaves out to compare models)."""
    tcfg = TrainConfig.of(data=cfg.data, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                          model=rung.spec, block_size=cfg.block_size, batch_size=batch_size, optimizer="adamw",
                          weight_decay=0.1, learning_rate=learning_rate,
                          min_lr=learning_rate * MIN_LR_RATIO, warmup_iters=WARMUP_ITERS, seed=cfg.seed, out=str(out),
                          overwrite=True, eval_interval=10**9, eval_iters=EVAL_ITERS, checkpoint_interval=10**9,
                          log_interval=200, sample_tokens=0)
    if cfg.unit == "seconds":
        return tcfg.replace(max_seconds=budget)
    tokens = budget if cfg.unit == "tokens" else budget / model_flops
    return over_steps(tcfg, max(1, round(tokens / (batch_size * cfg.block_size))))


def run_neural(cfg: LadderConfig, rung: Rung, budget: float, batch_size: int, learning_rate: float, out: Path,
               model_flops: float) -> dict:
    """Train one rung at one budget and setting into ``out``; what it cost, and the trained model."""
    run = train(train_config(cfg, rung, budget, batch_size, learning_rate, out, model_flops), progress=False)
    optim = run.cfg.optim
    tokens = optim.max_iters * batch_size * cfg.block_size
    return dict(budget=budget, batch_size=batch_size, learning_rate=learning_rate, min_lr=optim.min_lr,
                warmup_iters=optim.warmup_iters, steps=optim.max_iters, tokens=tokens,
                seconds=run.train_seconds, flops=tokens * model_flops, load=os.getloadavg()[0],
                checkpoint=str(out), model=run.model)


def score(model, dataset: Dataset, tokens: np.ndarray | None = None) -> perplexity.Score:
    return perplexity.score(model, dataset.tokens("val") if tokens is None else tokens, dataset.tokenizer)


def finish_point(cfg: LadderConfig, record: dict, dataset: Dataset) -> dict:
    """A trained point scored exactly on the whole val split, with a sample; the model dropped."""
    model = record.pop("model", None)
    if model is None:
        model, _ = checkpoint.load(record["checkpoint"])
    val = score(model, dataset)
    sample = generate(model, dataset.tokenizer, "\n", cfg.sample_tokens, temperature=0.8, seed=cfg.seed) \
        if cfg.sample_tokens else ""
    return {**record, "val_loss": val.loss, "val_ppl": val.perplexity, "bits_per_byte": val.bits_per_byte,
            "val_tokens": val.tokens, "val_bytes": val.bytes, "sample": sample}


# ---------------------------------------------------------------------------- one rung


def count_rung(cfg: LadderConfig, rung: Rung, dataset: Dataset, out: Path) -> dict:
    """Fit a count rung by counting the train split; one point, at its cost."""
    train_tokens = dataset.tokens("train")
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
    try:
        t = run_neural(cfg, rung, budget, batch_size, learning_rate, out / "search" / name, record["flops_per_token"])
    except Diverged as e:  # a setting that diverges loses the search; the study goes on
        t = dict(budget=budget, batch_size=batch_size, learning_rate=learning_rate, checkpoint=str(out / "search" / name),
                 search_loss=None, diverged=str(e))
        record["search"].append(t)
        save()
        say(f"{rung.spec}: batch {batch_size}, lr {learning_rate:g} diverged; it loses the search")
        return t
    loss = score(t.pop("model"), dataset, dataset.tokens("val")[: SEARCH_VAL_TOKENS + 1]).loss
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
    n_train, n_val = len(dataset.tokens("train")), len(dataset.tokens("val"))
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
    """The saved study to resume (None for a new one), which must agree with ``cfg``."""
    if not cfg.resume:
        return None
    saved = read_report(out)
    differ = [k for k, v in cfg.study().items() if saved["study"].get(k) != v]
    if differ:
        raise UserError(f"--{differ[0].replace('_', '-')} differs from the study in {out} "
                        f"({saved['study'].get(differ[0])}); a resumed study keeps its settings")
    return saved


def _check_study(out: Path, flag: str) -> None:
    """A study's folder is new, empty, or a study of ours."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file())):
        raise UserError(f"{out} exists and is not a ladder study; choose another --out")


def read_report(out: str | os.PathLike) -> dict:
    if not (Path(out) / REPORT).is_file():
        raise UserError(f"{out} holds no study to resume ({REPORT} is missing)")
    return read_json(Path(out) / REPORT)


def climb(cfg: LadderConfig, *, say: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the study; ladder.json is written after every point, ladder.png at the end."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    ladder = [parse(s) for s in cfg.rungs]
    dataset = prepare(cfg.data, cfg.tokenizer, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction)
    if dataset.tokenizer is None:
        raise UserError(f"{dataset.path} has no tokenizer.json; bits per byte need the tokenizer")
    check_fits(cfg, ladder, dataset)
    out = Path(cfg.out) if cfg.out else Path("checkpoints") / f"ladder-{dataset.path.name}"
    lock = rundir.claim_out(out, resume=cfg.resume, check=_check_study, holds=lambda o: (o / REPORT).exists(),
                            what="a study", hint="pass --resume to continue it, or choose another --out")
    try:
        return _climb(cfg, ladder, dataset, out, say)
    except KeyboardInterrupt:
        say(f"interrupted: the study's finished trials and points are saved; continue with --resume --out {out}")
        raise
    finally:
        lock.release()


def _climb(cfg: LadderConfig, ladder: list[Rung], dataset: Dataset, out: Path, say: Callable[[str], None]) -> dict:
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


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return flags.build(LadderConfig, prog="python -m mlx_gpt.ladder",
                       description="Train every rung of the language-model ladder at several training budgets on the "
                                   "same data and tokenizer, and see which wins where.")


def config_from_args(given: dict) -> LadderConfig:
    """The study's config: the settings given, over the saved study's when resuming (which may
    change none of what defines its results)."""
    if not given.get("resume"):
        return LadderConfig(**given)
    if given.get("out") is None:
        raise UserError("--resume needs --out naming the study to continue")
    saved = read_report(given["out"])["study"]
    return LadderConfig(**flags.merge_resumed(LadderConfig, saved, given, "a resumed study keeps its settings",
                                              where=str(Path(given["out"]) / REPORT)))


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = config_from_args(flags.parse(build_parser(), LadderConfig, argv))
    report = climb(cfg)
    print(table(report))
    return report


if __name__ == "__main__":
    run_cli(main)
