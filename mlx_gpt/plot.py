"""Pictures of training runs: ``loss.png`` in each run directory, and ``python -m mlx_gpt.plot RUN ...``.

A run's ``metrics.jsonl`` holds a line per log step (``loss``, ``lr``) and per evaluation
(``train_loss``, ``val_loss``). The picture has two panels sharing the step axis: losses on top
(the logged training loss thin, the evaluations as markers, the best val loss starred and
labelled, tokens seen on a second axis), the learning rate below. Several runs overlay, one
colour each, to compare learning rates, sizes or rungs.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .atomic import replacing_file
from . import rundir
from .checkpoint import CONFIG, METRICS
from .errors import UserError, run_cli


@dataclass
class Curves:
    """The series of one run that the picture draws."""

    name: str
    tokens_per_step: int | None = None
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, logged training loss)
    lr: list[tuple[int, float]] = field(default_factory=list)
    eval_train: list[tuple[int, float]] = field(default_factory=list)
    eval_val: list[tuple[int, float]] = field(default_factory=list)

    @property
    def best_val(self) -> tuple[int, float] | None:
        finite = [p for p in self.eval_val if math.isfinite(p[1])]
        return min(finite, key=lambda p: p[1]) if finite else None


def read_run(path: str | Path) -> Curves:
    """A run's curves from its metrics.jsonl (and its batch shape from config.json, when present).

    Each line is an object with an integer ``step`` and numbers for the series it reports
    (non-finite ones included: a diverged run logs them); any other line is one error naming it.
    """
    path = Path(path)
    metrics = path / METRICS if path.is_dir() else path
    try:
        # lines end at "\n" only: JSON strings may hold U+2028 and other breaks splitlines() would cut at
        lines = metrics.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"{path} has no metrics.jsonl: not a training run") from None
    except OSError as e:
        raise UserError(f"cannot read {metrics}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{metrics} is not UTF-8 text (at byte {e.start})") from None
    curves = Curves(path.name if path.is_dir() else path.parent.name)
    series = {"loss": curves.train, "lr": curves.lr, "val_loss": curves.eval_val, "train_loss": curves.eval_train}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{metrics}:{n} is not a metrics line (not JSON)") from None
        step = rec.get("step") if isinstance(rec, dict) else None
        if type(step) is not int or step < 0:
            raise UserError(f"{metrics}:{n} is not a metrics line (no whole step number)")
        for key, points in series.items():
            if key in rec:
                value = rec[key]
                if type(value) not in (int, float):
                    raise UserError(f"{metrics}:{n}: {key} must be a number, got {value!r:.40}")
                points.append((step, float(value)))
    curves.tokens_per_step = _tokens_per_step(path) if path.is_dir() else None
    return curves


def _tokens_per_step(run: Path) -> int | None:
    try:
        config = json.loads((run / CONFIG).read_text(encoding="utf-8"))
        train, model = config.get("train") or {}, config["model"]
        sizes = (train["batch_size"], train.get("grad_accum", 1), train.get("block_size") or model["block_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # the picture then counts steps, not tokens
    if not all(type(n) is int and n > 0 for n in sizes):
        return None
    return sizes[0] * sizes[1] * sizes[2]


# the loss panel's series: a Curves field, its line's style, and its legend label after a run's
# name (several runs) or alone
LOSS_SERIES = (("train", {"linewidth": 1, "alpha": 0.6}, "train (logged)", "train loss (logged)"),
               ("eval_train", {"marker": "s", "markersize": 4, "linestyle": ":", "linewidth": 1}, "train (eval)",
                "train loss (eval)"),
               ("eval_val", {"marker": "o", "markersize": 4, "linewidth": 1.8}, "val", "val loss"))


def figure(runs: list[Curves], title: str | None = None):
    """The picture of ``runs`` as a matplotlib Figure (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    colors = [_color(i) for i in range(len(runs))]
    losses = []
    for run, c in zip(runs, colors):
        label = run.name if len(runs) > 1 else None
        for series, style, after_name, alone in LOSS_SERIES:
            if getattr(run, series):
                s, v = zip(*getattr(run, series))
                loss_ax.plot(s, v, color=c, label=f"{label}: {after_name}" if label else alone, **style)
                losses += v
        best = run.best_val
        if best is not None:
            loss_ax.plot(*best, marker="*", markersize=14, color=c, markeredgecolor="black", zorder=5)
            loss_ax.annotate(f"best val {best[1]:.4f} @ {best[0]}", best, textcoords="offset points",
                             xytext=(6, 8), fontsize=9)
        if run.lr:
            s, v = zip(*run.lr)
            lr_ax.plot(s, v, color=c, linewidth=1.5, label=label)
    finite = [v for v in losses if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 3:  # a long run spans orders of loss: log scale shows both ends
        from matplotlib.ticker import FuncFormatter

        loss_ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 0.5 rather than 2x10^0, 5x10^-1
        loss_ax.yaxis.set_major_formatter(plain)
        loss_ax.yaxis.set_minor_formatter(plain)
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.grid(alpha=0.3, which="both")
    if finite:
        loss_ax.legend(fontsize=8, loc="upper right")
    tps = {r.tokens_per_step for r in runs}
    if len(tps) == 1 and None not in tps:  # one batch shape: steps convert to tokens
        t = tps.pop()
        loss_ax.secondary_xaxis("top", functions=(lambda s: s * t, lambda n: n / t)).set_xlabel("tokens seen")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(title or ", ".join(r.name for r in runs))
    return fig


SOFTWARE = "mlx_gpt plot"  # written into each picture: how a later plot knows the file is its own


def save(runs: list[Curves], out: str | Path, title: str | None = None) -> Path:
    """Write the picture of ``runs`` to ``out`` (PNG) atomically."""
    out = Path(out)
    fig = figure(runs, title)
    with replacing_file(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": SOFTWARE})
    return out


def drawn_here(path: Path) -> bool:
    """Whether ``path`` is a picture this module drew (its PNG names us as its software)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + SOFTWARE.encode() in head


def _color(i: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.plot",
                                description="Overlay the loss and learning-rate curves of training runs.")
    p.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl files)")
    p.add_argument("--out", default="runs.png", help="PNG file to write (default: runs.png)")
    p.add_argument("--title", default=None, help="title (default: the runs' names)")
    a = p.parse_args(argv)
    rundir.check_file_out(Path(a.out), drawn_here)
    runs = [read_run(r) for r in a.runs]
    if not any(r.train or r.eval_val for r in runs):
        raise UserError("the runs have no logged steps yet")
    print(save(runs, a.out, a.title))


if __name__ == "__main__":
    run_cli(main)
