"""What a ladder study found: the table of the best rung at each budget, and the picture of val
loss against training seconds and FLOPs where the crossovers between rungs show."""

from __future__ import annotations

import math
from pathlib import Path

from .atomic import replacing_file

UNITS = {"seconds": "s", "tokens": " tokens", "flops": " FLOPs"}  # what a study's budgets count


def label(budget: float, unit: str) -> str:
    """A budget as the table and the folders name it: ``10s``, ``1e+06 tokens``."""
    return f"{budget:g}{UNITS[unit]}"


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
    unit = study["unit"]
    best = best_by_budget(report)
    head = ["rung", "params"] + [label(b, unit) for b in budgets]
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
    rows2 = [[r["rung"], label(p["budget"], unit), str(p["batch_size"]), f"{p['learning_rate']:g}", str(p["steps"]),
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
    budgets = ", ".join(label(b, study["unit"]) for b in sorted(study["budgets"]))
    fig.suptitle(f"The language-model ladder on {Path(report['dataset']).name}: loss against training compute "
                 f"(budgets {budgets} per neural rung)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return fig


def _color(i: int, n: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)
