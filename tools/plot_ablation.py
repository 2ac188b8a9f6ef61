"""The ablation's picture: each variant's val loss and wall time at the same token budget.

    python tools/bench.py --configs ablation --ablation-iters 500 --json ablation.json
    python tools/plot_ablation.py ablation.json --out docs/recipe-ablation.svg

The input is ``tools/bench.py``'s JSON report (its ``ablation`` part: every variant's
``val_loss`` and ``wall_s``), so the picture always shows figures a benchmark measured; the
figures docs/recipe.md quotes are kept beside it (docs/recipe-ablation.json). Two panels share
the variants: the val loss each reached (the GPT-2 recipe's as a dashed line, so a change that
helps ends left of it), and the wall time its whole process took. SVG keeps its text as text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_gpt.atomic import replacing_file  # noqa: E402
from mlx_gpt.errors import UserError, run_cli  # noqa: E402


def read_variants(path: Path) -> tuple[dict, list[tuple[str, float, float]]]:
    """(the ablation's config, [(variant, val loss, wall s)] in the benchmark's order)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        ablation = report["ablation"]
        rows = [(k, float(e["val_loss"]), float(e["wall_s"])) for k, e in ablation["variants"].items()]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not a tools/bench.py report with an ablation") from None
    if not rows:
        raise UserError(f"{path}'s ablation has no variants")
    return ablation.get("config", {}), rows


def figure(config: dict, rows: list[tuple[str, float, float]]):
    """Two horizontal bar panels, val loss and wall time, one bar per variant (first on top)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, losses, walls = zip(*rows)
    fig = Figure(figsize=(9, 0.32 * len(rows) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, wall_ax = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    y = range(len(rows))
    base = losses[0]  # the first variant is the GPT-2 recipe
    colors = ["#4c72b0" if v < base - 0.01 else "#c44e52" if v > base + 0.01 else "#8c8c8c" for v in losses]
    colors[0] = "#333333"
    loss_ax.barh(y, losses, color=colors)
    loss_ax.axvline(base, color="#333333", linestyle="--", linewidth=1)
    lo = min(losses)
    loss_ax.set_xlim(lo - 0.1, max(losses) + 0.05)
    for i, v in enumerate(losses):
        loss_ax.annotate(f"{v:.3f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    loss_ax.set_xlabel("val loss (nats per byte; lower is better)")
    loss_ax.set_yticks(list(y), labels)
    loss_ax.invert_yaxis()
    wall_ax.barh(y, walls, color="#8c8c8c")
    for i, v in enumerate(walls):
        wall_ax.annotate(f"{v:.1f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    wall_ax.set_xlim(0, max(walls) * 1.15)
    wall_ax.set_xlabel("wall time of the run (s)")
    for ax in (loss_ax, wall_ax):
        ax.grid(axis="x", alpha=0.3)
    steps = config.get("max_iters")
    fig.suptitle("Ablation at a fixed token budget" + (f" ({steps} steps of 12 x 64 bytes)" if steps else ""))
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tools/plot_ablation.py", description=__doc__.split("\n")[0])
    p.add_argument("report", help="tools/bench.py's --json report holding an ablation")
    p.add_argument("--out", default="ablation.svg", help="picture to write, .svg or .png (default: ablation.svg)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.suffix not in (".svg", ".png"):
        raise UserError(f"--out must end in .svg or .png, not {out.name!r}")
    config, rows = read_variants(Path(a.report))
    import matplotlib

    # text stays text (small, searchable) and ids are fixed: the same figures draw the same file
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "mlx_gpt"})
    fig = figure(config, rows)
    with replacing_file(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:], dpi=110,
                    metadata={"Date": None} if out.suffix == ".svg" else {"Software": "mlx_gpt plot_ablation"})
    print(out)


if __name__ == "__main__":
    run_cli(main)
