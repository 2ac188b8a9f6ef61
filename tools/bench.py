"""Benchmark mlx_gpt against what its users would otherwise run, each in a process of its own.

    python tools/bench.py                      # mlx_gpt alone: train A, B, C, decode, startup
    python tools/bench.py --vs-torch           # the honest race: every peer in its own process
    python tools/bench.py --vs-torch --configs A,decode --rounds 2 --json out.json

Every figure comes from a fresh subprocess that loads one framework, warms up, times its work
and prints one JSON object; this process only starts them, alternates them and divides.
``--vs-torch`` races, config by config:

- train (A, B, C; D only when named): mlx_gpt's compiled step against
  tests/reference/torch_gpt.py (the same model, loss, clipping and fused AdamW, in eager
  PyTorch with its own thread pool), on the same weights (exported with ``mlx_gpt.convert --to
  hf``) and batch, in alternating rounds (mlx_gpt, PyTorch, mlx_gpt, ...), each round a new
  process timing ``--steps`` steps after warm-up; the ratio of medians per config. Once, for A,
  the same PyTorch step is also timed in a process that imported mlx_gpt first (OpenBLAS
  loaded globally), which is how the benchmark used to run it and why it must not.
- decode (124M, batch 1, 16-token prompt, 128 new tokens, greedy): ``python -m
  mlx_gpt.generate``'s Decoder against Hugging Face transformers' ``generate`` and mlx-lm's
  generation loop, on exports of the same weights (``--to hf``, ``--to mlx-lm``); the greedy
  tokens must agree. The bound is the bytes one token reads over the matrix-vector bandwidth
  that ``python -m mlx_gpt.info`` measures.
- race: nanoGPT's CPU example end to end (character-level Shakespeare, 4 layers, 4 heads, 128
  wide, block 64, batch 12, 2000 iterations), ``python -m mlx_gpt.train`` against
  tests/reference/nanogpt_train.py, one after the other: wall time and final val loss.
- speedrun: the same race to a target, in ``--rounds`` alternating pairs: each round nanoGPT's
  run gives its final val loss V and wall time, then ``python -m mlx_gpt.train --config
  configs/shakespeare-char-speedrun.toml --stop-at-val-loss V`` (the modern GPT with Muon, about
  as many parameters) runs until an evaluation reaches V; the evaluations' time counts. The
  ratio of the medians, and each pair's. Then the same config runs for nanoGPT's median wall
  time (``--max-seconds``): the val loss it reaches there.
- pydoc: the same on the default run's data, in ``--rounds`` alternating pairs: ``python -m
  mlx_gpt.train --model gpt`` (GPT-2's recipe) gives V and its wall time, then
  ``configs/pydoc-speedrun.toml`` (the default run's settings, written out) runs to V.
- ablation: at a fixed token budget (nanoGPT's example, ``--ablation-iters`` steps), GPT-2's
  recipe (``--model modern --changes none``: GPT-2 exactly), each change of the modern GPT
  alone, all of them, and all with Muon: final val loss and wall time of each process.
- startup: ``python -m mlx_gpt.train --max-iters 1`` wall time, and from the first import to
  the first loss, with MLX's compile cache (and mlx_gpt's) empty and then warm.

The machine's load average is recorded before and after; on a shared machine only ratios
from one run compare. The sgemm peak (for MFU) and the matrix-vector bandwidth (for the decode
bound) are measured before and after, and the higher of each counts: another process can only
lower them, and a low ceiling flatters every figure divided by it. Train FLOPs per token follow
nanoGPT's estimate 6N + 12·L·C·T.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"
FLOP_FORMULA = "6N + 12*L*C*T per token (nanoGPT; N = parameters less position embeddings)"
CEILINGS = ("sgemm_peak_gflops", "matvec_gb_s")  # measured before and after the run; the best counts


@dataclass(frozen=True)
class Shape:
    """A GPT's shape (dropout off): what a benchmark builds and counts FLOPs of."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int


@dataclass(frozen=True)
class TrainBench:
    name: str
    note: str
    shape: Shape
    batch_size: int
    seq_len: int
    steps: int  # timed steps per round
    warmup: int
    chunk: int = 1  # mlx_gpt's steps per timed sample: steps overlap, so short ones are timed a few at a time


@dataclass(frozen=True)
class DecodeBench:
    name: str
    note: str
    shape: Shape
    prompt_len: int
    new_tokens: int


@dataclass(frozen=True)
class RaceBench:
    """nanoGPT's README CPU example (config/train_shakespeare_char.py with its command-line overrides)."""

    name: str = "race"
    note: str = "nanoGPT's CPU example end to end"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta2: float = 0.99
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 1


@dataclass(frozen=True)
class SpeedrunBench:
    """nanoGPT's CPU example's val loss as the target of our best recipe."""

    name: str = "speedrun"
    note: str = "time to nanoGPT's val loss on its CPU example"
    config: str = "configs/shakespeare-char-speedrun.toml"


@dataclass(frozen=True)
class PydocBench:
    """GPT-2's recipe on the default data (the Python manual) sets the target; the modern recipe races it."""

    name: str = "pydoc"
    note: str = "time to GPT-2's recipe's val loss on the Python manual"
    config: str = "configs/pydoc-speedrun.toml"


@dataclass(frozen=True)
class AblationBench:
    """Each change of the modern GPT alone at nanoGPT's CPU example's shape and a fixed budget."""

    name: str = "ablation"
    note: str = "GPT-2's recipe, each change alone, all, all + Muon, at a fixed token budget"
    max_iters: int = 1000
    eval_iters: int = 50  # the one evaluation, at the end: 50 batches of 12 x 64
    # every variant trains GPT-2's optimizer settings (the race's AdamW), the last Muon at its 0.02 and 0.95
    base: tuple[str, ...] = ("--optimizer", "adamw", "--weight-decay", "0.1", "--muon-lr", "0.02",
                             "--muon-momentum", "0.95")
    variants: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("GPT-2 recipe", ("--changes", "none")),
        *((f"+ {c}", ("--changes", c)) for c in ("rope", "rms_norm", "qk_norm", "relu2", "untied", "no_bias",
                                                  "softcap", "zero_init")),
        ("all (modern)", ("--changes", "all")),
        ("all + Muon", ("--changes", "all", "--optimizer", "muon")),
    )


GPT2_124M = Shape(50257, 12, 12, 768, 1024)
CONFIGS: dict[str, TrainBench | DecodeBench | RaceBench | SpeedrunBench | PydocBench | AblationBench | None] = {
    "A": TrainBench("A", "nanoGPT's CPU example", Shape(65, 4, 4, 128, 64), 12, 64, steps=40, warmup=10,
                     chunk=5),
    "B": TrainBench("B", "nanoGPT's shakespeare-char model", Shape(65, 6, 6, 384, 256), 16, 256, steps=8, warmup=2),
    "C": TrainBench("C", "GPT-2 124M, llm.c's CPU demo", GPT2_124M, 4, 64, steps=8, warmup=2),
    "decode": DecodeBench("decode", "GPT-2 124M, batch 1, greedy", GPT2_124M, 16, 128),
    "race": RaceBench(),
    "speedrun": SpeedrunBench(),
    "pydoc": PydocBench(),
    "ablation": AblationBench(),
    "startup": None,
    # not in the default list: a GPU's config (a step takes tens of seconds on two CPU cores)
    "D": TrainBench("D", "GPT-2 124M, nanoGPT's GPU shapes", GPT2_124M, 12, 1024, steps=5, warmup=2),
}
DEFAULT_CONFIGS = "A,B,C,decode,race,startup"


# ---------------------------------------------------------------------------- running workers


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def run_json(cmd: Sequence[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 3600
             ) -> tuple[dict, float]:
    """Run a worker; return the JSON object on the last line of its output and its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {proc.returncode}):\n{tail}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), wall


def worker(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "worker", *args]


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pause(seconds: float) -> None:
    """Let the previous process's thread pools and page cache settle before the next one starts."""
    time.sleep(seconds)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------- configs


def bench_train(bench: TrainBench, args: argparse.Namespace, work: Path, machine: dict) -> dict:
    import numpy as np

    d = work / bench.name
    export, _ = run_json(worker("export", "--shape", json.dumps(asdict(bench.shape)), "--out", str(d),
                                *(["--hf"] if args.vs_torch else [])))
    rng = np.random.default_rng(0)
    shape = (bench.batch_size, bench.seq_len)
    np.savez(d / "batch.npz", x=rng.integers(0, bench.shape.vocab_size, shape, dtype=np.int32),
             y=rng.integers(0, bench.shape.vocab_size, shape, dtype=np.int32))
    steps = args.steps or bench.steps
    common = ["--batch", str(d / "batch.npz"), "--steps", str(steps), "--warmup", str(bench.warmup)]
    runs: dict[str, list[dict]] = {"mlx": []}
    cmds = {"mlx": worker("train", "--checkpoint", str(d / "checkpoint"), "--streams", str(args.streams),
                          "--chunk", str(min(bench.chunk, steps)), *common)}
    if args.vs_torch:
        runs["torch"] = []
        cmds["torch"] = [sys.executable, str(REFERENCE / "torch_gpt.py"), "train", "--weights", str(d / "hf"),
                         "--threads", str(args.torch_threads or cores()), "--device", machine["torch_device"],
                         *(["--tf32"] if args.torch_tf32 else []), *common]
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            pause(args.pause)
            runs[name].append(run_json(cmd)[0])
        print(f"  [{bench.name}] " + ", ".join(f"{n} {1000 * median(r[-1]['step_s']):.1f} ms" for n, r in runs.items()),
              file=sys.stderr, flush=True)
    tokens = bench.batch_size * bench.seq_len
    fpt = export["flops_per_token"]
    result = {"config": asdict(bench), "params": export["params"], "tokens_per_step": tokens, "flops_per_token": fpt}
    for name, rs in runs.items():
        round_ms = [1000 * median(r["step_s"]) for r in rs]
        ms = median(round_ms)
        gflops = fpt * tokens / (ms / 1000) / 1e9
        result[name] = {"ms_per_step": ms, "tok_per_s": tokens / (ms / 1000), "gflops": gflops,
                        "rounds_ms": [round(x, 2) for x in round_ms],
                        "best_step_ms": 1000 * min(min(r["step_s"]) for r in rs),
                        "steps_ms": [[round(1000 * s, 1) for s in r["step_s"]] for r in rs],
                        "first_step_s": median([r["first_step_s"] for r in rs]),
                        "first_loss": rs[0]["first_loss"]}
        if "peak_memory_mb" in rs[0]:
            result[name]["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rs)
    if args.vs_torch:
        result["mlx_vs_torch"] = result["torch"]["ms_per_step"] / result["mlx"]["ms_per_step"]
        result["same_first_loss"] = abs(result["mlx"]["first_loss"] - result["torch"]["first_loss"]) < 1e-4
        if bench.name == "A" and args.in_process:
            pause(args.pause)
            inproc, _ = run_json(worker("torch-in-process", "--weights", str(d / "hf"), "--threads",
                                        str(args.torch_threads or cores()), *common))
            result["torch_in_process"] = {"ms_per_step": 1000 * median(inproc["step_s"]),
                                          "standalone_ms_per_step": result["torch"]["ms_per_step"]}
    return result


def bench_decode(bench: DecodeBench, args: argparse.Namespace, work: Path) -> dict:
    import numpy as np

    d = work / bench.name
    export, _ = run_json(worker("export", "--shape", json.dumps(asdict(bench.shape)), "--out", str(d),
                                *(["--hf", "--mlx-lm"] if args.vs_torch else [])))
    if args.decode_tokens:
        bench = replace(bench, new_tokens=args.decode_tokens)
    prompt = ",".join(str(t) for t in np.random.default_rng(1).integers(0, bench.shape.vocab_size, bench.prompt_len))
    common = ["--prompt", prompt, "--new-tokens", str(bench.new_tokens), "--runs", str(args.decode_runs)]
    cmds = {"mlx": worker("decode", "--checkpoint", str(d / "checkpoint"), *common)}
    if args.vs_torch:
        peers = [sys.executable, str(REFERENCE / "generate_peers.py")]
        cmds["hf"] = [*peers, "hf", "--weights", str(d / "hf"), "--threads", str(args.torch_threads or cores()),
                      *common]
        cmds["mlx_lm"] = [*peers, "mlx-lm", "--weights", str(d / "mlx-lm"), *common]
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(args.decode_rounds):
        for name, cmd in cmds.items():
            pause(args.pause)
            runs[name].append(run_json(cmd)[0])
        print("  [decode] " + ", ".join(f"{n} {bench.new_tokens / median(r[-1]['total_s']):.1f} tok/s"
                                         for n, r in runs.items()), file=sys.stderr, flush=True)
    # each new token reads every weight once (of wpe one row; the head is tied to wte) and, on
    # average, the keys and values of the prompt and of half the new tokens
    s = bench.shape
    avg_ctx = bench.prompt_len + bench.new_tokens / 2
    bytes_per_token = 4 * (export["params"] - s.block_size * s.n_embd + s.n_embd) + 4 * 2 * s.n_layer * s.n_embd * avg_ctx
    result = {"config": asdict(bench), "params": export["params"], "bytes_per_token": bytes_per_token}
    for name, rs in runs.items():
        total = [t for r in rs for t in r["total_s"]]
        first = [t for r in rs for t in r["first_token_s"]]
        e = {"tok_per_s": bench.new_tokens / median(total),
             "decode_tok_per_s": (bench.new_tokens - 1) / (median(total) - median(first)),
             "first_token_ms": 1000 * median(first), "runs_tok_per_s": [round(bench.new_tokens / t, 2) for t in total]}
        for key in ("version", "threads", "blas_threads", "peak_memory_mb"):
            if key in rs[0]:
                e[key] = rs[0][key]
        result[name] = e
    if args.vs_torch:
        result["mlx_vs_hf"] = result["mlx"]["tok_per_s"] / result["hf"]["tok_per_s"]
        result["mlx_vs_mlx_lm"] = result["mlx"]["tok_per_s"] / result["mlx_lm"]["tok_per_s"]
        ours = runs["mlx"][0]["tokens"]
        result["same_tokens"] = {name: rs[0]["tokens"] == ours for name, rs in runs.items() if name != "mlx"}
    return result


def race_text(args: argparse.Namespace) -> Path:
    candidates = [Path(args.race_text)] if args.race_text else [
        ROOT / "data" / "downloads" / "tinyshakespeare.txt", ROOT / "tests" / "data" / "tinyshakespeare.txt"]
    for p in candidates:
        if p.is_file():
            return p
    raise SystemExit("error: the race needs tiny-shakespeare: pass --race-text PATH, or run "
                     "`python -m mlx_gpt.prepare shakespeare` once to download it into data/downloads")


def race_setup(bench: RaceBench, args: argparse.Namespace, work: Path, iters: int
               ) -> tuple[RaceBench, Path, Path, list[str], dict]:
    """(the race as run for ``iters`` steps, its folder, the text, the flags both sides take, nanoGPT's
    data); both sides' data are prepared first, untimed: characters for nanoGPT, bytes (the same ids'
    worth) for mlx_gpt."""
    d = work / "race"
    d.mkdir(parents=True, exist_ok=True)
    text = race_text(args)
    # a shorter race keeps the schedule's proportions (nanoGPT's cosine needs warm-up < decay steps)
    bench = replace(bench, max_iters=iters, eval_interval=min(bench.eval_interval, iters),
                    warmup_iters=min(bench.warmup_iters, iters // 20))
    prep, _ = run_json([sys.executable, str(REFERENCE / "nanogpt_train.py"), "prepare", "--input", str(text),
                        "--out", str(d / "nanogpt-data")])
    subprocess.run([sys.executable, "-m", "mlx_gpt.prepare", str(text), "--data-dir", str(d / "data")], cwd=d,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    shared = {"n-layer": bench.n_layer, "n-head": bench.n_head, "n-embd": bench.n_embd,
              "block-size": bench.block_size, "batch-size": bench.batch_size, "max-iters": iters,
              "lr-decay-iters": iters, "learning-rate": bench.learning_rate, "min-lr": bench.min_lr,
              "warmup-iters": bench.warmup_iters, "beta2": bench.beta2, "eval-interval": bench.eval_interval,
              "eval-iters": bench.eval_iters, "log-interval": bench.log_interval}
    return bench, d, text, [x for k, v in shared.items() for x in (f"--{k}", str(v))], prep


def run_nanogpt(d: Path, flags: list[str], args: argparse.Namespace) -> dict:
    """nanoGPT's train.py (tests/reference/nanogpt_train.py) on the race, in its own process."""
    cmd = [sys.executable, str(REFERENCE / "nanogpt_train.py"), "train", "--data", str(d / "nanogpt-data"),
           "--out", str(d / "torch-run"), "--threads", str(args.torch_threads or cores()), *flags]
    pause(args.pause)
    out, wall = run_json(cmd, cwd=d)
    print(f"  [race] nanoGPT (PyTorch) {wall:.1f} s, val loss {out['val_loss']:.4f}", file=sys.stderr, flush=True)
    return {"wall_s": wall, "steps": out["steps"], "train_loss": out["train_loss"], "val_loss": out["val_loss"],
            "loop_s": out["loop_s"], "threads": out["threads"]}


def run_train(args: argparse.Namespace, d: Path, *flags: str) -> dict:
    """``python -m mlx_gpt.train`` in its own process: wall time, and its last evaluation."""
    pause(args.pause)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.train", "--sample-tokens", "0", "--overwrite", *flags],
                          cwd=d, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mlx_gpt.train failed:\n{proc.stderr[-2000:]}")
    vals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stderr)
    return {"wall_s": wall, "steps": int(vals[-1][0]), "train_loss": float(vals[-1][1]), "val_loss": float(vals[-1][2])}


def bench_race(bench: RaceBench, args: argparse.Namespace, work: Path) -> dict:
    bench, d, text, flags, prep = race_setup(bench, args, work, args.race_iters or bench.max_iters)
    result: dict = {"config": asdict(bench), "vocab": {"nanogpt": prep["vocab_size"], "mlx": 256}}
    result["mlx"] = run_train(args, d, "--data", str(text), "--data-dir", str(d / "data"), "--tokenizer", "byte",
                              "--model", "gpt", "--no-bias", "--dropout", "0", "--weight-decay", "0.1", "--grad-clip", "1.0",
                              "--checkpoint-interval", str(bench.eval_interval), "--out", str(d / "mlx-run"), *flags)
    print(f"  [race] mlx_gpt {result['mlx']['wall_s']:.1f} s, val loss {result['mlx']['val_loss']:.4f}",
          file=sys.stderr, flush=True)
    if args.vs_torch:
        result["torch"] = run_nanogpt(d, flags, args)
        result["mlx_vs_torch"] = result["torch"]["wall_s"] / result["mlx"]["wall_s"]
    return result


def race_to(target: Callable[[int], dict], ours: Callable[[int, float], dict], rounds: int) -> dict:
    """``rounds`` alternating pairs: ``target(i)`` runs the reference (its wall time and final val
    loss V), then ``ours(i, V)`` runs to V; each pair's ratio of wall times, and the medians'."""
    pairs = []
    for i in range(rounds):
        t = target(i)
        m = ours(i, t["val_loss"])
        pairs.append({"target": t, "mlx": m, "speedup": t["wall_s"] / m["wall_s"], "load_avg": load_avg()})
        print(f"  [{i + 1}/{rounds}] reference {t['wall_s']:.1f} s to val {t['val_loss']:.4f}; ours {m['wall_s']:.1f} s "
              f"to val {m['val_loss']:.4f} at step {m['steps']}: {pairs[-1]['speedup']:.2f}x", file=sys.stderr, flush=True)
    walls = {side: median([p[side]["wall_s"] for p in pairs]) for side in ("target", "mlx")}
    return {"pairs": pairs, "median_wall_s": walls, "speedup": walls["target"] / walls["mlx"]}


def bench_speedrun(bench: SpeedrunBench, args: argparse.Namespace, work: Path) -> dict:
    """nanoGPT's run sets the target V and the time, the recipe runs to V, in alternating rounds;
    then the recipe runs for nanoGPT's median time."""
    race = CONFIGS["race"]
    race, d, text, flags, prep = race_setup(race, args, work, args.race_iters or race.max_iters)
    ours = ("--config", str(ROOT / bench.config), "--data", str(text), "--data-dir", str(d / "data"))
    result: dict = {"config": {**asdict(bench), "race": asdict(race)}}
    result.update(race_to(lambda i: run_nanogpt(d, flags, args),
                          lambda i, v: run_train(args, d, *ours, "--stop-at-val-loss", f"{v:.4f}",
                                                 "--out", str(d / "speedrun")), args.rounds))
    budget = result["median_wall_s"]["target"]
    result["mlx_in_torch_time"] = run_train(args, d, *ours, "--max-seconds", f"{budget:.1f}",
                                            "--out", str(d / "speedrun-timed"))
    return result


def bench_pydoc(bench: PydocBench, args: argparse.Namespace, work: Path) -> dict:
    """GPT-2's recipe on the default data (``python -m mlx_gpt.train --model gpt``) sets V; the modern
    config runs to V, in alternating rounds. The data is prepared once first, untimed, for both."""
    d = work / "pydoc"
    d.mkdir(parents=True, exist_ok=True)
    data = ("--data", "pydoc", "--data-dir", str(d / "data"))
    subprocess.run([sys.executable, "-m", "mlx_gpt.prepare", "pydoc", "--data-dir", str(d / "data")], cwd=d,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    result: dict = {"config": asdict(bench)}
    result.update(race_to(lambda i: run_train(args, d, *data, "--model", "gpt", "--out", str(d / "default")),
                          lambda i, v: run_train(args, d, "--config", str(ROOT / bench.config), *data,
                                                 "--stop-at-val-loss", f"{v:.4f}", "--out", str(d / "modern")),
                          args.rounds))
    return result


def bench_ablation(bench: AblationBench, args: argparse.Namespace, work: Path) -> dict:
    """Each variant in its own process, one after the other, on nanoGPT's example's shape and data."""
    iters = args.ablation_iters or bench.max_iters
    race, d, text, flags, _ = race_setup(replace(CONFIGS["race"], eval_interval=iters, eval_iters=bench.eval_iters),
                                         args, work, iters)
    result: dict = {"config": {**asdict(bench), "max_iters": iters, "race": asdict(race)}, "variants": {}}
    for label, extra in bench.variants:
        result["variants"][label] = e = run_train(args, d, "--data", str(text), "--data-dir", str(d / "data"),
                                                  "--model", "modern", "--checkpoint-interval", str(iters),
                                                  "--out", str(d / "ablation"), *flags, *bench.base, *extra)
        print(f"  [ablation] {label}: val {e['val_loss']:.4f} in {e['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return result


def bench_startup(args: argparse.Namespace, work: Path) -> dict:
    """``python -m mlx_gpt.train --max-iters 1`` (its defaults, the same ``train`` call) in a fresh
    folder: with MLX's compile cache, mlx_gpt's cache and the prepared data all absent, then warm."""
    d = work / "startup"
    caches = d / "caches"
    env = {"PYTHONPATH": str(ROOT), "TMPDIR": str(caches / "tmp"), "XDG_CACHE_HOME": str(caches / "xdg")}
    shutil.rmtree(d, ignore_errors=True)
    result: dict = {}
    for label in ("cold", "warm"):
        (caches / "tmp").mkdir(parents=True, exist_ok=True)
        pause(args.pause)
        phases, wall = run_json(worker("startup", "--out", str(d / "run")), cwd=d, env=env)
        result[label] = {"wall_s": wall, **phases}
        print(f"  [startup] {label}: {wall:.1f} s wall, first loss {phases['first_loss_s']:.1f} s after start",
              file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------- report


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def measure_ceilings(report: dict) -> None:
    """Measure the sgemm peak and the matrix-vector bandwidth once more, then ``apply_ceilings``."""
    try:
        again, _ = run_json(worker("machine"))
        report["machine"].setdefault("measured", []).append({k: again[k] for k in CEILINGS})
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        report.setdefault("errors", {})["machine"] = str(e)  # the first measurement still stands
    apply_ceilings(report)


def apply_ceilings(report: dict) -> None:
    """Set the machine's ceilings to the best of their measurements (another process can only
    lower them), and MFU and the decode bound from those."""
    m = report["machine"]
    for key in CEILINGS:
        m[key] = max(x[key] for x in m.get("measured", [m]))
    for result in report["train"].values():
        for side in ("mlx", "torch"):
            if side in result:
                result[side]["mfu"] = result[side]["gflops"] / m["sgemm_peak_gflops"]
    d = report.get("decode")
    if d:
        d["bandwidth_gb_s"] = m["matvec_gb_s"]
        d["bound_tok_per_s"] = m["matvec_gb_s"] * 1e9 / d["bytes_per_token"]
        for e in d.values():
            if isinstance(e, dict) and "decode_tok_per_s" in e:
                e["fraction_of_bound"] = e["decode_tok_per_s"] / d["bound_tok_per_s"]


def format_table(report: dict) -> str:
    m = report["machine"]
    load = lambda key: "/".join(f"{x:.1f}" for x in (report.get(key) or ()))  # noqa: E731
    lines = [f"mlx_gpt {m['mlx_gpt']} (commit {report['commit']}), MLX {m['mlx']} on {m['device']}, {m['cores']} cores, "
             f"{m['blas']}; load average {load('load_avg_before')} -> {load('load_avg_after')}",
             f"sgemm peak {m['sgemm_peak_gflops']:.0f} GFLOP/s; matrix-vector bandwidth {m['matvec_gb_s']:.1f} GB/s "
             f"(the best of {len(m.get('measured', [m]))} measurements: "
             + ", ".join(f"{x['sgemm_peak_gflops']:.0f} and {x['matvec_gb_s']:.1f}" for x in m.get("measured", [m]))
             + f"); FLOPs: {FLOP_FORMULA}"]
    if report["train"]:
        lines += ["", "train: median ms/step of each process's steps, then the median over rounds "
                      "(each round a new process per side, sides alternating)"]
        head = f"{'config':<8}{'impl':<8}{'ms/step':>10}{'best':>9}{'tok/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'first':>8}{'peak MB':>9}"
        lines += [head, "-" * len(head)]
        for name, r in report["train"].items():
            for impl in ("mlx", "torch"):
                if impl not in r:
                    continue
                e = r[impl]
                peak_mb = f"{e['peak_memory_mb']:.0f}" if "peak_memory_mb" in e else ""
                lines.append(f"{name:<8}{impl:<8}{e['ms_per_step']:>10.1f}{e['best_step_ms']:>9.1f}{e['tok_per_s']:>10.0f}"
                             f"{e['gflops']:>9.1f}{100 * e['mfu']:>6.1f}%{e['first_step_s']:>7.1f}s{peak_mb:>9}")
            if "mlx_vs_torch" in r:
                lines.append(f"{'':<8}mlx_gpt / PyTorch: {r['mlx_vs_torch']:.2f}x   (first loss {r['mlx']['first_loss']:.5f}"
                             f" vs {r['torch']['first_loss']:.5f})")
            if "torch_in_process" in r:
                t = r["torch_in_process"]
                lines.append(f"{'':<8}PyTorch in a process that imported mlx_gpt first: {t['ms_per_step']:.1f} ms/step, "
                             f"alone: {t['standalone_ms_per_step']:.1f} ({t['ms_per_step'] / t['standalone_ms_per_step']:.2f}x"
                             " slower: OpenBLAS loaded globally)")
    if "decode" in report:
        d = report["decode"]
        c = d["config"]
        lines += ["", f"decode ({c['note']}, {c['prompt_len']}-token prompt, {c['new_tokens']} new): bound "
                      f"{d['bound_tok_per_s']:.1f} tok/s ({d['bytes_per_token'] / 1e6:.0f} MB/token at "
                      f"{d['bandwidth_gb_s']:.1f} GB/s)"]
        names = {"mlx": "mlx_gpt", "hf": "HF generate", "mlx_lm": "mlx-lm"}
        for impl, label in names.items():
            if impl in d:
                e = d[impl]
                lines.append(f"{'':<4}{label:<13}{e['tok_per_s']:>7.1f} tok/s end to end, {e['decode_tok_per_s']:>6.1f} "
                             f"decoding ({100 * e['fraction_of_bound']:.0f}% of bound), first token "
                             f"{e['first_token_ms']:.0f} ms" + (f", BLAS threads {e['blas_threads']}" if "blas_threads" in e else ""))
        if "mlx_vs_hf" in d:
            lines.append(f"{'':<4}mlx_gpt / HF generate {d['mlx_vs_hf']:.2f}x, mlx_gpt / mlx-lm {d['mlx_vs_mlx_lm']:.2f}x; "
                         f"same greedy tokens: {d['same_tokens']}")
    if "race" in report:
        r = report["race"]
        lines += ["", f"race ({r['config']['note']}, {r['config']['max_iters']} iterations), wall time of the whole process:"]
        for impl, label in (("mlx", "mlx_gpt"), ("torch", "nanoGPT's train.py (PyTorch)")):
            if impl in r:
                e = r[impl]
                lines.append(f"{'':<4}{label:<30}{e['wall_s']:>7.1f} s   val loss {e['val_loss']:.4f}")
        if "mlx_vs_torch" in r:
            lines.append(f"{'':<4}mlx_gpt / nanoGPT: {r['mlx_vs_torch']:.2f}x")
    lines += recipe_lines(report)
    if "startup" in report:
        lines += ["", "startup: python -m mlx_gpt.train --max-iters 1"]
        for label, e in report["startup"].items():
            lines.append(f"{'':<4}{label:<6} caches: {e['wall_s']:>6.1f} s wall; import {e['import_s']:.2f} s, "
                         f"first loss {e['first_loss_s']:.2f} s after start, end of run {e['done_s']:.2f} s")
    for name, error in report.get("errors", {}).items():
        lines += ["", f"{name} failed: {error.splitlines()[0]}"]
    return "\n".join(lines)


def recipe_lines(report: dict) -> list[str]:
    """The speedrun's and the ablation's tables."""
    lines = []
    for name, reference in (("speedrun", "nanoGPT train.py"), ("pydoc", "python -m mlx_gpt.train --model gpt")):
        if name not in report:
            continue
        r = report[name]
        lines += ["", f"{name} ({r['config']['note']}): wall time of the whole process, pairs in turn",
                  f"{'':<4}{'round':<7}{reference:>34}{'val':>8}   {r['config']['config']:<40}{'val':>8}{'step':>6}"]
        for i, p in enumerate(r["pairs"], 1):
            t, m = p["target"], p["mlx"]
            lines.append(f"{'':<4}{i:<7}{t['wall_s']:>32.1f} s{t['val_loss']:>8.4f}   {m['wall_s']:>38.1f} s"
                         f"{m['val_loss']:>8.4f}{m['steps']:>6}   {p['speedup']:.2f}x")
        w = r["median_wall_s"]
        lines.append(f"{'':<4}{'median':<7}{w['target']:>32.1f} s{'':>8}   {w['mlx']:>38.1f} s{'':>14}   "
                     f"{r['speedup']:.2f}x less time")
        if "mlx_in_torch_time" in r:
            timed = r["mlx_in_torch_time"]
            lines.append(f"{'':<4}the same config for the reference's median time: {timed['wall_s']:.1f} s, val loss "
                         f"{timed['val_loss']:.4f} at step {timed['steps']}")
    if "ablation" in report:
        r = report["ablation"]
        lines += ["", f"ablation ({r['config']['note']}: {r['config']['max_iters']} steps of 12 x 64 tokens)",
                  f"{'':<4}{'variant':<16}{'val loss':>9}{'wall s':>9}"]
        lines += [f"{'':<4}{k:<16}{e['val_loss']:>9.4f}{e['wall_s']:>9.1f}" for k, e in r["variants"].items()]
    return lines


# ---------------------------------------------------------------------------- workers (one framework each)


def worker_main(argv: Sequence[str]) -> None:
    """``bench.py worker KIND ...``: one measurement in this process, printed as one JSON line."""
    started = time.perf_counter()
    p = argparse.ArgumentParser(prog="python tools/bench.py worker")
    sub = p.add_subparsers(dest="kind", required=True)
    sub.add_parser("machine")
    e = sub.add_parser("export")
    e.add_argument("--shape", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--hf", action="store_true")
    e.add_argument("--mlx-lm", action="store_true")
    for kind in ("train", "torch-in-process"):
        t = sub.add_parser(kind)
        t.add_argument("--checkpoint")
        t.add_argument("--weights")
        t.add_argument("--batch", required=True)
        t.add_argument("--steps", type=int, required=True)
        t.add_argument("--warmup", type=int, required=True)
        t.add_argument("--streams", type=int, default=0)
        t.add_argument("--chunk", type=int, default=1, help="steps per timed sample (mlx_gpt's steps overlap)")
        t.add_argument("--threads", type=int)
    g = sub.add_parser("decode")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--new-tokens", type=int, required=True)
    g.add_argument("--runs", type=int, required=True)
    s = sub.add_parser("startup")
    s.add_argument("--out", required=True)
    a = p.parse_args(argv)

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's mlx_gpt, installed or not
    import mlx_gpt  # loads OpenBLAS before mlx.core
    import_s = time.perf_counter() - started
    import mlx.core as mx

    if a.kind == "machine":
        from mlx_gpt import info
        from mlx_gpt.cpu.blas import blas_status

        out = {"mlx": mx.__version__, "mlx_gpt": mlx_gpt.__version__, "device": str(mx.default_device()),
               "gpu": mx.default_device().type == mx.DeviceType.gpu, "blas": blas_status(), "cores": cores(),
               "sgemm_peak_gflops": info.sgemm_peak(), "matvec_gb_s": info.matvec_bandwidth()}
    elif a.kind == "export":
        out = worker_export(a)
    elif a.kind == "train":
        out = worker_train(a)
    elif a.kind == "torch-in-process":
        import numpy as np

        sys.path.insert(0, str(REFERENCE))
        import torch
        import torch_gpt

        torch.set_num_threads(a.threads)
        batch = np.load(a.batch)
        out = torch_gpt.time_train(torch_gpt.from_hf_dir(a.weights), batch["x"], batch["y"], a.steps, a.warmup)
    elif a.kind == "decode":
        out = worker_decode(a)
    else:
        out = worker_startup(a, started, import_s)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(user_s=usage.ru_utime, system_s=usage.ru_stime, minor_faults=usage.ru_minflt,
               involuntary_switches=usage.ru_nivcsw)
    print(json.dumps(out))


def worker_export(a: argparse.Namespace) -> dict:
    """A GPT of the given shape (seed 0) saved as an mlx_gpt checkpoint, and exported as asked."""
    from mlx_gpt import checkpoint
    from mlx_gpt.convert import export_checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build

    shape = json.loads(a.shape)
    cfg = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                    n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0)
    model = build(cfg, seed=0)
    out = Path(a.out)
    checkpoint.save(out / "checkpoint", model, None)
    for flag, fmt in ((a.hf, "hf"), (a.mlx_lm, "mlx-lm")):
        if flag:
            export_checkpoint(out / "checkpoint", out / fmt, to=fmt, overwrite=True, progress=False)
    n = model.num_params(non_embedding=True)
    return {"params": model.num_params(), "flops_per_token": 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size}


def worker_train(a: argparse.Namespace) -> dict:
    """mlx_gpt's train step as ``mlx_gpt.train`` runs it: each step launched with mx.async_eval
    while the next is being built. Steps overlap, so they are timed in chunks of ``--chunk``
    (each chunk's seconds over its steps, as many samples as chunks)."""
    import mlx.core as mx
    import numpy as np

    from mlx_gpt import backend, checkpoint
    from mlx_gpt.optim import make_optimizer
    from mlx_gpt.training.config import TrainConfig
    from mlx_gpt.training.step import make_train_step

    batch = np.load(a.batch)
    model = checkpoint.load_model(a.checkpoint)
    model.train()
    tcfg = TrainConfig.of(model="gpt", batch_size=batch["x"].shape[0], max_iters=1000, warmup_iters=10,
                          streams=a.streams)
    backend.configure(tcfg.step.batch_size, tcfg.step.streams)  # as a run's setup does
    optimizer = make_optimizer(tcfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, tcfg)
    xs, ys = mx.array(batch["x"][None]), mx.array(batch["y"][None])
    mx.reset_peak_memory()

    def run(k: int) -> mx.array | None:
        loss = None
        for _ in range(k):
            loss, norm = step(xs, ys)
            mx.async_eval(loss, norm, model.parameters())
        mx.eval(model.parameters(), optimizer.state)
        return loss

    t0 = time.perf_counter()
    first_loss = run(1).item()
    first_s = time.perf_counter() - t0
    run(a.warmup)
    times = []
    for _ in range(max(1, a.steps // a.chunk)):
        t0 = time.perf_counter()
        run(a.chunk)
        times.append((time.perf_counter() - t0) / a.chunk)
    return {"impl": "mlx", "first_loss": first_loss, "first_step_s": first_s, "step_s": times,
            "peak_memory_mb": mx.get_peak_memory() / 2**20}


def worker_decode(a: argparse.Namespace) -> dict:
    """Greedy decoding as ``python -m mlx_gpt.generate`` runs it (mlx_gpt.decoding.Decoder)."""
    import mlx.core as mx

    from mlx_gpt import checkpoint
    from mlx_gpt.decoding import Decoder, Timing
    from mlx_gpt.sampling import SamplingConfig

    model = checkpoint.load_model(a.checkpoint)
    model.eval()
    prompt = [int(t) for t in a.prompt.split(",")]
    decoder = Decoder(model, SamplingConfig(temperature=0))
    mx.reset_peak_memory()

    def generate(n: int = a.new_tokens) -> tuple[list[int], Timing]:
        timing = Timing()
        tokens = [row[0] for row in decoder.tokens(prompt, n, timing=timing)]
        return tokens, timing

    generate(min(a.new_tokens, 8))  # warm-up: traces and compiles the step (the same cache capacity)
    first, total = [], []
    for _ in range(a.runs):
        tokens, timing = generate()
        first.append(timing.prompt_seconds)
        total.append(timing.prompt_seconds + timing.generation_seconds)
    return {"impl": "mlx", "tokens": tokens, "first_token_s": first, "total_s": total,
            "blas_threads": decoder.blas_threads, "peak_memory_mb": mx.get_peak_memory() / 2**20}


def worker_startup(a: argparse.Namespace, started: float, import_s: float) -> dict:
    """The phases of ``python -m mlx_gpt.train --max-iters 1``, timed from this process's first import:
    imports, the first loss (data prepared, model built, step traced and compiled), the end of the run
    (its evaluation, sample and checkpoint)."""
    import mlx_gpt.train as train_mod

    imported = time.perf_counter() - started
    first: list[float] = []
    cfg = train_mod.TrainConfig.of(max_iters=1, out=a.out, overwrite=True)
    train_mod.train(cfg, progress=False, on_step=lambda step, loss: first.append(time.perf_counter() - started))
    return {"import_mlx_gpt_s": import_s, "import_s": imported, "first_loss_s": first[0],
            "done_s": time.perf_counter() - started}


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--vs-torch", action="store_true",
                   help="race PyTorch, HF transformers, mlx-lm and nanoGPT, each in its own process")
    p.add_argument("--rounds", type=int, default=3, help="train, speedrun, pydoc: processes per side, sides alternating")
    p.add_argument("--steps", type=int, default=None, help="train: timed steps per process (default: per config)")
    p.add_argument("--decode-rounds", type=int, default=2, help="decode: processes per implementation")
    p.add_argument("--decode-runs", type=int, default=2, help="decode: timed generations per process")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode: new tokens (default: 128)")
    p.add_argument("--race-iters", type=int, default=None, help="race: iterations (default: nanoGPT's 2000)")
    p.add_argument("--race-text", default=None, help="race, speedrun, ablation: tiny-shakespeare's text file")
    p.add_argument("--ablation-iters", type=int, default=None, help="ablation: steps of every variant (default: 1000)")
    p.add_argument("--streams", type=int, default=0, help="mlx_gpt.train's --streams for the train configs")
    p.add_argument("--torch-threads", type=int, default=None, help="PyTorch's intra-op threads (default: one per core)")
    p.add_argument("--torch-tf32", action="store_true",
                   help="let PyTorch multiply float32 on a GPU's TF32 tensor cores (nanoGPT turns this on)")
    p.add_argument("--no-in-process", dest="in_process", action="store_false",
                   help="skip timing PyTorch inside a process that imported mlx_gpt (config A), which runs unless "
                        "this is given%(default).0s")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between two processes, so thread pools settle")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep the exports there (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return {}
    p = build_parser()
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"unknown config {', '.join(unknown) or '(none)'}; choose from {', '.join(CONFIGS)}")
    given = lambda value, default: default if value is None else value  # noqa: E731
    if min(args.rounds, args.decode_rounds, args.decode_runs, given(args.steps, 1), given(args.race_iters, 1),
           given(args.ablation_iters, 1), given(args.decode_tokens, 2)) < 1 or (args.decode_tokens or 2) < 2:
        p.error("--rounds, --steps, --decode-rounds, --decode-runs, --race-iters and --ablation-iters must be at "
                "least 1, --decode-tokens at least 2")
    if "speedrun" in names and not _importable("torch"):
        p.error("the speedrun's target comes from nanoGPT's train.py, which needs torch: pip install -e '.[dev]'")
    if args.streams < 0:
        p.error("--streams must be 0 (one per core) or more")
    if args.vs_torch:
        missing = [m for m in ("torch", "transformers", "mlx_lm", "safetensors") if not _importable(m)]
        if missing:
            p.error(f"--vs-torch needs {', '.join(missing)}: pip install -e '.[dev]'")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mlx_gpt_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"commit": git_commit(), "load_avg_before": load_avg(), "platform": platform.platform(),
                    "python": platform.python_version(), "flop_formula": FLOP_FORMULA, "train": {}}
    try:
        report["machine"], _ = run_json(worker("machine"))
        report["machine"]["torch_device"] = "cuda" if report["machine"]["gpu"] else "cpu"
        report["machine"]["measured"] = [{k: report["machine"][k] for k in CEILINGS}]
        if args.vs_torch:
            report["versions"] = _versions()
        for name in names:
            bench = CONFIGS[name]
            print(f"[{name}]", file=sys.stderr, flush=True)
            try:
                if isinstance(bench, TrainBench):
                    report["train"][name] = bench_train(bench, args, work, report["machine"])
                elif isinstance(bench, DecodeBench):
                    report["decode"] = bench_decode(bench, args, work)
                elif isinstance(bench, RaceBench):
                    report["race"] = bench_race(bench, args, work)
                elif isinstance(bench, SpeedrunBench):
                    report["speedrun"] = bench_speedrun(bench, args, work)
                elif isinstance(bench, PydocBench):
                    report["pydoc"] = bench_pydoc(bench, args, work)
                elif isinstance(bench, AblationBench):
                    report["ablation"] = bench_ablation(bench, args, work)
                else:
                    report["startup"] = bench_startup(args, work)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
                report.setdefault("errors", {})[name] = str(e)  # the other configs still report
                print(f"  [{name}] failed: {e}", file=sys.stderr, flush=True)
            if args.json and args.json != "-":  # what is done so far, in case a later config hangs
                Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        measure_ceilings(report)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["load_avg_after"] = load_avg()
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _versions() -> dict:
    code = "import torch, transformers, mlx_lm; print(torch.__version__, transformers.__version__, mlx_lm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    return dict(zip(("torch", "transformers", "mlx_lm"), out))


if __name__ == "__main__":
    main()
