"""Training tokens per second with --pack against one example a row (padding), on an instruction-like mix.

    python tools/bench_packing.py --out bench-packing          # the table in docs/finetuning.md

A seeded set of prompt/completion examples whose lengths are drawn as an instruction set's are
(log-normal: many short, a long tail, a few longer than the block and cut) is trained on with the
same model, block and batch, packed and padded, each run in a process of its own, alternating,
several rounds. Only trained targets count as tokens: a padded row's padding is not work done.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEDIAN_TOKENS, SIGMA = 120, 0.9  # an example's bytes: log-normal around the median, a long tail
PROMPT_SHARE = 0.3


def write_set(folder: Path, n: int, seed: int) -> list[int]:
    """train.jsonl and valid.jsonl of random-letter examples; returns the train lengths in bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, n), 16, 4096).astype(int)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz    "))
    lines = []
    for length in lengths:
        text = "".join(rng.choice(letters, size=int(length)))
        cut = max(1, int(length * PROMPT_SHARE))
        lines.append(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")
    (folder / "train.jsonl").write_text("".join(lines[n // 10:]))
    (folder / "valid.jsonl").write_text("".join(lines[: n // 10]))
    return lengths[n // 10:].tolist()


def trained_examples(y: np.ndarray, positions: np.ndarray) -> int:
    """The examples in packed rows (runs of positions from 0) with a trained target; padding has none."""
    from mlx_gpt.loss import IGNORE

    count = 0
    for row_y, row_p in zip(y.reshape(-1, y.shape[-1]), positions.reshape(-1, y.shape[-1])):
        count += sum(bool((run != IGNORE).any()) for run in np.split(row_y, np.flatnonzero(row_p == 0)[1:]))
    return count


def measure(data: Path, pack: bool, block: int, batch: int, steps: int, warmup: int) -> dict:
    """One process's run: trained targets per second over ``steps`` timed steps."""
    from mlx_gpt import backend, example_sampler, examples  # first: it loads OpenBLAS before mlx.core
    import mlx.core as mx
    from mlx_gpt.loss import IGNORE
    from mlx_gpt.models.gpt import build, preset
    from mlx_gpt.optim import make_optimizer
    from mlx_gpt.training.config import TrainConfig
    from mlx_gpt.training.step import make_train_step

    split = examples.prepare_examples(str(data), data_dir=data / "prepared").splits["train"]
    cfg = TrainConfig.of(model="gpt", batch_size=batch, block_size=block, max_iters=steps + warmup, mask_prompt=True)
    backend.configure(batch, cfg.step.streams)
    model = backend.layers(build(preset("tiny", vocab_size=257, block_size=block), seed=0))
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg)
    sampler = example_sampler.ExampleSampler(split, batch, block, seed=0, mask_prompt=True, pack=pack)
    tokens, examples_seen, start = 0, 0, 0.0
    for i in range(warmup + steps):
        batch_arrays = sampler.next()
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            tokens += int((batch_arrays[1] != IGNORE).sum())
            examples_seen += trained_examples(*batch_arrays[1:]) if pack else batch
        loss, _ = step(*(mx.array(a) for a in batch_arrays))
        mx.eval(loss, model.parameters())
    seconds = time.perf_counter() - start
    return {"pack": pack, "tok_s": tokens / seconds, "step_ms": 1000 * seconds / steps,
            "tokens_per_step": tokens / steps, "examples_per_step": examples_seen / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the generated set and results.jsonl")
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="packed and padded runs each, alternating")
    p.add_argument("--child", choices=("pack", "pad"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.out / "set", a.child == "pack", a.block_size, a.batch_size, a.steps, a.warmup)))
        return
    lengths = write_set(a.out / "set", a.examples, seed=0)
    print(f"{len(lengths)} examples: median {int(np.median(lengths))} tokens, 90th percentile "
          f"{int(np.percentile(lengths, 90))}, {np.mean(np.array(lengths) > a.block_size + 1):.1%} longer than "
          f"the block of {a.block_size}", file=sys.stderr)
    results = []
    for _ in range(a.rounds):
        for mode in ("pad", "pack"):
            args = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
            out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(results[-1], file=sys.stderr)
    (a.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    rows = {m: [r for r in results if r["pack"] == (m == "pack")] for m in ("pad", "pack")}
    print("| rows | trained tokens / step | examples / step | ms / step | trained tokens / s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for m, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "pack"}
        name = "packed (--pack)" if m == "pack" else "one example a row, padded"
        print(f"| {name} | {med['tokens_per_step']:.0f} | {med['examples_per_step']:.1f} | {med['step_ms']:.0f} | "
              f"{med['tok_s']:.0f} | {med['peak_rss_mb']:.0f} MB |")
    gain = statistics.median(r["tok_s"] for r in rows["pack"]) / statistics.median(r["tok_s"] for r in rows["pad"])
    print(f"\npacking: {gain:.2f}x the trained tokens per second of padding")


if __name__ == "__main__":
    main()
