"""Fine-tune on a generated instruction set, with and without --mask-prompt, and score the answers.

    python tools/finetune_demo.py --out demo            # the table in docs/finetuning.md
    python tools/finetune_demo.py --out demo --init checkpoints/pydoc-byte-modern-tiny

Three tasks, seeded: reformat a date (2021-03-14 -> 14/03/2021, the easy one), reverse a word,
add two numbers. Each example is a prompt ("Reformat the date 2021-03-14:\\n") and a completion
("14/03/2021\\n"); train.jsonl and valid.jsonl mix the tasks, test.jsonl holds prompts no run
trains on. A model (a fresh tiny GPT-2, or --init's) is fine-tuned twice on the same
batches, once on every token and once with --mask-prompt, and each held-out prompt's greedy
answer (up to its newline) is scored by exact match, before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("apple river stone cloud table window garden pencil silver orange planet forest candle bridge "
         "mirror dragon rocket violin castle meadow thunder harbor lantern puzzle").split()


def date_task(rng: np.random.Generator) -> tuple[str, str]:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365 * 100)))
    return f"Reformat the date {day.isoformat()}:\n", f"{day.day:02d}/{day.month:02d}/{day.year}\n"


def reverse_task(rng: np.random.Generator) -> tuple[str, str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = "".join(rng.choice(list(letters), size=int(rng.integers(3, 7))))
    return f"Reverse the word {word}:\n", f"{word[::-1]}\n"


def add_task(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 100, 2))
    return f"Add {a} and {b}:\n", f"{a + b}\n"


TASKS = {"date": date_task, "reverse": reverse_task, "add": add_task}


def write_sets(directory: Path, n_train: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """train.jsonl, valid.jsonl and test.jsonl of every task mixed; returns the test examples by task.
    A held-out prompt never appears in train or valid."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tests = {}
    seen = set()
    for name, make in TASKS.items():
        tests[name] = []
        while len(tests[name]) < n_test:
            p, c = make(rng)
            if p not in seen:
                seen.add(p)
                tests[name].append({"prompt": p, "completion": c})
    splits = {"train": [], "valid": []}
    for split, n in (("train", n_train), ("valid", max(n_train // 20, 30))):
        while len(splits[split]) < n * len(TASKS):
            name = list(TASKS)[len(splits[split]) % len(TASKS)]
            p, c = TASKS[name](rng)
            if p not in seen:
                splits[split].append({"prompt": p, "completion": c})
    for split, rows in {**splits, "test": [r for rows in tests.values() for r in rows]}.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tests


def exact_match(model, tokenizer, examples: list[dict]) -> float:
    """The share of prompts whose greedy answer, up to its newline, is the completion."""
    from mlx_gpt.generate import generate
    from mlx_gpt.models.base import eval_mode

    right = 0
    with eval_mode(model):
        for ex in examples:
            answer = generate(model, tokenizer, ex["prompt"], len(ex["completion"]) + 4, temperature=0, stop=["\n"])
            right += answer + "\n" == ex["completion"]
    return right / len(examples)


def scores(model, tokenizer, tests: dict[str, list[dict]]) -> dict[str, float]:
    return {name: exact_match(model, tokenizer, rows) for name, rows in tests.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="folder for the data, the runs and the table")
    p.add_argument("--init", help="fine-tune this checkpoint (default: a fresh tiny GPT-2, byte tokenizer)")
    p.add_argument("--examples", type=int, default=3000, help="training examples per task")
    p.add_argument("--test", type=int, default=100, help="held-out prompts per task")
    p.add_argument("--max-iters", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--block-size", type=int, default=48, help="a row: the longest example is 41 bytes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import PRESETS, GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer
    from mlx_gpt.train import train
    from mlx_gpt.training.config import TrainConfig

    out = Path(a.out)
    tests = write_sets(out / "data", a.examples, a.test, a.seed)
    if a.init:
        model, tok = checkpoint.load(a.init)
        shape = {}
    else:  # the fresh model both runs start from: the same seed, the same weights
        shape = dict(model="gpt", preset="tiny", block_size=a.block_size)
        config = GPTConfig(**{**PRESETS["tiny"], "block_size": a.block_size})
        model, tok = build(config, a.seed), ByteTokenizer()
    rows = [("before", scores(model, tok, tests), 0.0)]
    for mask in (False, True):
        started = time.perf_counter()
        run = train(TrainConfig.of(data=str(out / "data"), data_dir=str(out / "prepared"), init=a.init,
                                   out=str(out / ("masked" if mask else "unmasked")), overwrite=True, mask_prompt=mask,
                                   max_iters=a.max_iters, batch_size=a.batch_size, grad_accum=1,
                                   learning_rate=a.learning_rate, min_lr=a.learning_rate / 10,
                                   warmup_iters=a.max_iters // 20, eval_interval=a.max_iters, eval_iters=5,
                                   checkpoint_interval=a.max_iters, sample_tokens=0, seed=a.seed, **shape),
                    progress=False)
        rows.append(("--mask-prompt" if mask else "every token", scores(run.model, run.tokenizer, tests),
                     time.perf_counter() - started))
    table = ["| fine-tuned on | " + " | ".join(TASKS) + " | minutes |", "|---" * (len(TASKS) + 2) + "|"]
    for label, s, seconds in rows:
        table.append(f"| {label} | " + " | ".join(f"{100 * s[t]:.0f}%" for t in TASKS) + f" | {seconds / 60:.1f} |")
    text = "\n".join(table)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
