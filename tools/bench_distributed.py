"""Data-parallel training speed: one process against several on this machine, and the all-reduce.

    python tools/bench_distributed.py                      # GPT-2 124M, 1 vs 2 processes
    python tools/bench_distributed.py --preset tiny --block-size 128 --batch-size 8 --rounds 3

Each process runs ``mlx_gpt.train``'s compiled step on its own batch of ``--batch-size``
sequences (weak scaling: two processes train on twice the tokens a step), so tokens per second
count every rank's tokens. The single process and the ``mlx.launch -n N --backend ring`` run
alternate for ``--rounds`` rounds, so both see the same machine load; medians and their ratio
are reported. In the multi-process run each rank also times the gradients' mean alone
(``distributed.all_mean`` of arrays shaped like the model's parameters, bucketed as the step
does), which is what data parallelism adds to every step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx_gpt  # noqa: E402,F401  (loads OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from mlx_gpt import backend, distributed  # noqa: E402
from mlx_gpt.models.gpt import PRESETS, GPTConfig, build  # noqa: E402
from mlx_gpt.optim import make_optimizer  # noqa: E402
from mlx_gpt.training.config import TrainConfig  # noqa: E402
from mlx_gpt.training.step import make_train_step  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One rank: time the train step and (with several ranks) the all-reduce; rank 0 prints JSON."""
    group = distributed.init()
    rank, world = group.rank(), group.size()
    cfg = TrainConfig.of(model="gpt", batch_size=args.batch_size, streams=args.streams)
    model = build(GPTConfig(**{**PRESETS[args.preset], "vocab_size": 50257, "block_size": args.block_size}), seed=0)
    backend.layers(model)
    backend.configure(args.batch_size, args.streams)  # as a run's setup does
    model.train()
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg, group)
    rng = np.random.default_rng(rank)
    tokens = rng.integers(0, 50257, size=(1, args.batch_size, args.block_size + 1), dtype=np.int32)
    x, y = mx.array(tokens[..., :-1]), mx.array(tokens[..., 1:])

    t0 = time.perf_counter()
    mx.eval(step(x, y), model.parameters())
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, norm = step(x, y)
        mx.eval(loss, norm, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - t0)

    reduce_times = []
    if world > 1:
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
        mx.eval(grads)
        for _ in range(args.steps + 1):
            distributed.barrier(group)
            t0 = time.perf_counter()
            mx.eval(distributed.all_mean(grads, group))
            reduce_times.append(time.perf_counter() - t0)
        reduce_times = reduce_times[1:]
    if rank == 0:
        n_grads = len(tree_flatten(model.trainable_parameters()))
        print(json.dumps({"world": world, "step_s": statistics.median(times), "first_s": first,
                          "tok_s": world * args.batch_size * args.block_size / statistics.median(times),
                          "all_reduce_s": statistics.median(reduce_times) if reduce_times else 0.0,
                          "all_reduces": len(distributed.buckets(tree_flatten(model.trainable_parameters()))),
                          "grads": n_grads, "params": model.num_params()}), flush=True)


def free_port(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65536:
            return p
    raise RuntimeError("no free port")


def run(args: argparse.Namespace, processes: int) -> dict:
    """One measurement in fresh processes; the JSON line rank 0 printed."""
    me = [__file__, "--worker", "--preset", args.preset, "--block-size", str(args.block_size),
          "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--streams", str(args.streams)]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        launcher = Path(sysconfig.get_path("scripts")) / "mlx.launch"
        cmd = [sys.executable, str(launcher), "--python", sys.executable, "-n", str(processes), "--backend", "ring",
               "--starting-port", str(free_port(processes)), "--", *me]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"error: the {processes}-process run printed no result:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per process per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of 1 and N processes")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--streams", type=int, default=0, help="train --streams in every process")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    results: dict[int, list[dict]] = {1: [], args.processes: []}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for n in results:
            results[n].append(run(args, n))
            print(f"round {r + 1}, {n} process{'es' if n > 1 else ''}: {results[n][-1]}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tok_s", "all_reduce_s")}
           for n, rs in results.items()}
    n, info = args.processes, results[args.processes][0]
    print(f"{args.preset} ({info['params'] / 1e6:.0f}M), block {args.block_size}, batch {args.batch_size} a process, "
          f"{os.cpu_count()} cores, load {load[0]:.1f} -> {load[1]:.1f}")
    print(f"  1 process : {med[1]['step_s'] * 1000:8.0f} ms/step {med[1]['tok_s']:9.0f} tok/s")
    print(f"  {n} processes: {med[n]['step_s'] * 1000:8.0f} ms/step {med[n]['tok_s']:9.0f} tok/s "
          f"({med[n]['tok_s'] / med[1]['tok_s']:.2f}x the tokens/s of one)")
    print(f"  all-reduce of the gradients: {med[n]['all_reduce_s'] * 1000:.0f} ms/step "
          f"({info['grads']} arrays in {info['all_reduces']} all-reduces, "
          f"{100 * med[n]['all_reduce_s'] / med[n]['step_s']:.0f}% of the {n}-process step)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
