"""Peak memory and step time of fine-tuning GPT-2-sized models, with and without each saving.

    python tools/bench_memory.py                       # every case, 3 steps each
    python tools/bench_memory.py --cases 124M,124M+ckpt --steps 2
    python tools/bench_memory.py --steps 0                # the estimates alone, in seconds

Each case runs in a process of its own (so one case's peak and cached buffers cannot leak into
another's): it builds the model from our own initialisation (no downloads), runs ``--steps``
compiled train steps on random tokens exactly as ``python -m mlx_gpt.train`` would (same step,
optimizer, flags), and prints one JSON line: the peak ``mlx_gpt.memory`` estimates before the
run, MLX's peak memory (``mx.get_peak_memory``) over the whole run and the median time of the
steps after the first (which compiles). A case whose estimate exceeds the memory MLX may use
here is not run, as train would refuse it. Savings: ``ckpt`` (--grad-checkpoint), ``chunk``
(--loss-chunk 256), ``bf16`` (--dtype bfloat16, mixed precision), ``lora`` (--lora-rank 8 on
every projection, the model's own weights frozen). On a shared machine only ratios from one run
compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's mlx_gpt, installed or not

# name -> (preset, batch, block, savings)
CASES = {
    "124M": ("gpt2", 8, 1024, ()),
    "124M+ckpt": ("gpt2", 8, 1024, ("ckpt",)),
    "124M+chunk": ("gpt2", 8, 1024, ("chunk",)),
    "124M+ckpt+chunk": ("gpt2", 8, 1024, ("ckpt", "chunk")),
    "124M+ckpt+chunk+bf16": ("gpt2", 8, 1024, ("ckpt", "chunk", "bf16")),
    "medium": ("gpt2-medium", 1, 1024, ()),
    "medium+ckpt+chunk": ("gpt2-medium", 1, 1024, ("ckpt", "chunk")),
    "xl": ("gpt2-xl", 1, 1024, ()),
    "xl+ckpt+chunk": ("gpt2-xl", 1, 1024, ("ckpt", "chunk")),
    "124M+lora": ("gpt2", 8, 1024, ("lora",)),
    "xl+lora": ("gpt2-xl", 1, 1024, ("lora",)),
    "xl+lora+ckpt+chunk": ("gpt2-xl", 1, 1024, ("lora", "ckpt", "chunk")),
    "xl+lora+ckpt+chunk+bf16": ("gpt2-xl", 1, 1024, ("lora", "ckpt", "chunk", "bf16")),
}


def run_case(name: str, steps: int) -> dict:
    import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gpt import backend, lora, memory
    from mlx_gpt.models.gpt import GPT, PRESETS, GPTConfig, build
    from mlx_gpt.optim import make_optimizer
    from mlx_gpt.training.config import DTYPES, TrainConfig
    from mlx_gpt.training.model import assemble
    from mlx_gpt.training.step import make_train_step

    preset, batch, block, savings = CASES[name]
    cfg = TrainConfig.of(batch_size=batch, block_size=block, max_iters=max(steps, 1), warmup_iters=0,
                         learning_rate=3e-5, grad_checkpoint="ckpt" in savings, loss_chunk=256 if "chunk" in savings else 0,
                         dtype="bfloat16" if "bf16" in savings else "float32",
                         lora_rank=8 if "lora" in savings else 0, init="base" if "lora" in savings else None,
                         model=None if "lora" in savings else "gpt")
    config = GPTConfig(**{**PRESETS[preset], "block_size": block})
    adapters = cfg.lora if cfg.lora.rank else None
    n_params = sum(v.size for _, v in tree_flatten(GPT(config).parameters()))  # lazy: nothing allocated
    trainable = lora.count(config, adapters) if adapters else None
    estimate = memory.estimate_train_peak(config, n_params + (trainable or 0), batch, dtype=cfg.step.dtype,
                                          grad_checkpoint=cfg.step.grad_checkpoint, loss_chunk=cfg.step.loss_chunk,
                                          trainable=trainable,
                                          attention_weights=backend.attention_weights_kept(DTYPES[cfg.step.dtype],
                                                                                             config.dropout))
    result = {"case": name, "params_M": round(n_params / 1e6, 1), "batch": batch, "block": block,
              "trainable_M": round((trainable or n_params) / 1e6, 2), "estimate_GB": round(estimate.total / 1e9, 2)}
    if steps == 0:
        return result
    if estimate.total > memory.available_memory():
        return {**result, "refused": f"needs about {estimate.total / 1e9:.1f} GB, more than the "
                                     f"{memory.available_memory() / 1e9:.1f} GB MLX may use here"}
    model = assemble(build(config, seed=0), cfg, fresh_adapters=True)  # as train sets a run up
    backend.configure(batch, cfg.step.streams)
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg)
    key = mx.random.key(0)
    x = mx.random.randint(0, 50257, (1, batch, block), key=key)
    y = mx.random.randint(0, 50257, (1, batch, block), key=mx.random.split(key)[0])
    mx.eval(x, y)
    mx.synchronize()
    mx.reset_peak_memory()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = step(x, y)
        mx.eval(loss, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {**result, "peak_GB": round(mx.get_peak_memory() / 1e9, 2),
            "step_s": round(statistics.median(times[1:] or times), 2), "losses": [round(v, 4) for v in losses]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=3, help="train steps per case; 0 for the estimates alone")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a case may run")
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 0:
        p.error("--steps must be 0 (the estimates alone) or more")
    if args.run_case:
        print(json.dumps(run_case(args.run_case, args.steps)), flush=True)
        return
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    print(f"{'case':24} {'params':>8} {'trained':>8} {'B x T':>10} {'estimate':>8} {'peak GB':>8} {'step s':>7}  losses")
    for name in names:
        try:
            proc = subprocess.run([sys.executable, __file__, "--run-case", name, "--steps", str(args.steps)],
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name:24} timed out after {args.timeout:.0f} s", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            print(f"{name:24} failed: {why}", flush=True)
            continue
        r = json.loads(lines[-1])
        head = (f"{name:24} {r['params_M']:>7}M {r['trainable_M']:>7}M {r['batch']:>4} x {r['block']:<4} "
                f"{r['estimate_GB']:>8.2f}")
        if "refused" in r:
            print(f"{head}  not run: {r['refused']}", flush=True)
        elif "peak_GB" not in r:
            print(f"{head}  (estimate only)", flush=True)
        else:
            print(f"{head} {r['peak_GB']:>8.2f} {r['step_s']:>7.2f}  {r['losses']}", flush=True)


if __name__ == "__main__":
    main()
