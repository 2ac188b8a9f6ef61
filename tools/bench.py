"""Benchmark mlx_gpt's train step and decoding, side by side with PyTorch: ``python tools/bench.py``.

For each config it reports the train step's milliseconds, tokens per second, achieved GFLOP/s
and model-FLOPs utilisation against the sgemm peak it measures on this machine, the first step
(which includes tracing, compiling and JIT-building the fused kernels), and peak memory; then
greedy decoding speed against the memory-bandwidth bound. FLOPs per trained token follow
nanoGPT's estimate, 6N + 12·L·C·T, with N the parameters less the position embeddings, L
layers, C the width and T the sequence length.

MLX steps are timed the way ``mlx_gpt.train`` runs them: each launched with ``mx.async_eval``
while the next is being built, in rounds of as many steps as take about half a second.
``--vs-torch`` builds the PyTorch reference of ``tools/torch_gpt.py`` with the same weights and
batch, checks that both compute the same first loss, then alternates one timed round of each
after the warm-up, so that both see the same machine load; the ratio of the medians is
reported per config. On a shared machine only ratios from one run compare (the JSON records
the load average before and after).

    python tools/bench.py                          # configs A, B, C and decode, MLX only
    python tools/bench.py --vs-torch --json out.json
    python tools/bench.py --configs A,B --steps 20 --vs-torch
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx_gpt  # noqa: E402  (loads OpenBLAS before mlx.core)
from mlx_gpt.cpu.blas import blas_status, set_blas_threads  # noqa: E402
from mlx_gpt.errors import UserError, run_cli  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_gpt.cpu import accelerate, ops  # noqa: E402
from mlx_gpt.generate import Decoder, Timing  # noqa: E402
from mlx_gpt.models.gpt import GPTConfig, build  # noqa: E402
from mlx_gpt.cpu.parallel import cpu_cores, split_for  # noqa: E402
from mlx_gpt.sampling import SamplingConfig  # noqa: E402
from mlx_gpt.optim import make_optimizer  # noqa: E402
from mlx_gpt.train import TrainConfig, make_train_step  # noqa: E402

FLOP_FORMULA = "6N + 12*L*C*T per token (nanoGPT; N = parameters less position embeddings)"


@dataclass(frozen=True)
class Shape:
    """A GPT's shape (dropout off): what a benchmark builds and counts FLOPs of."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int

    def model_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=0.0)


@dataclass(frozen=True)
class TrainBench:
    name: str
    note: str
    shape: Shape
    batch_size: int
    seq_len: int


@dataclass(frozen=True)
class DecodeBench:
    name: str
    note: str
    shape: Shape
    prompt_len: int
    new_tokens: int


GPT2_124M = Shape(50257, 12, 12, 768, 1024)
CONFIGS: dict[str, TrainBench | DecodeBench] = {
    "A": TrainBench("A", "nanoGPT's CPU example", Shape(65, 4, 4, 128, 64), 12, 64),
    "B": TrainBench("B", "nanoGPT's shakespeare-char model", Shape(65, 6, 6, 384, 256), 16, 256),
    "C": TrainBench("C", "GPT-2 124M, llm.c's CPU demo", GPT2_124M, 4, 64),
    "decode": DecodeBench("decode", "GPT-2 124M, batch 1, greedy", GPT2_124M, 16, 128),
    # not in the default list: a GPU's config (a step takes tens of seconds on two CPU cores)
    "D": TrainBench("D", "GPT-2 124M, nanoGPT's GPU shapes", GPT2_124M, 12, 1024),
}
DEFAULT_CONFIGS = "A,B,C,decode"


# ---------------------------------------------------------------------------- measurements


def flops_per_token(cfg: GPTConfig, seq_len: int, n_params_non_embedding: int) -> int:
    """nanoGPT's estimate of the FLOPs of one trained token: 6N + 12*L*C*T."""
    return 6 * n_params_non_embedding + 12 * cfg.n_layer * cfg.n_embd * seq_len


def median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def peak_sizes() -> tuple[int, ...]:
    """Square matmul sizes that reach the peak: a GPU needs larger ones than a CPU to fill it."""
    return (2048, 4096, 8192) if mx.default_device().type == mx.DeviceType.gpu else (1024, 2048, 3072)


def sgemm_peak(reps: int = 5) -> float:
    """Best float32 matmul throughput MLX reaches on this machine, in GFLOP/s."""
    best = 0.0
    for n in peak_sizes():
        a = mx.random.normal((n, n), key=mx.random.key(0))
        b = mx.random.normal((n, n), key=mx.random.key(1))
        mx.eval(a, b)
        mx.eval(a @ b)
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(a @ b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def stream_bandwidth(megabytes: int = 512, reps: int = 5) -> dict[str, float]:
    """Best rates, in GB/s, at which a large float32 matrix streams through a matrix-vector product.

    Decoding one token is made of such products over every weight. numpy's BLAS is measured
    beside MLX so that the bound does not depend on how well MLX itself does it.
    """
    cols = 4096
    rows = megabytes * 2**20 // 4 // cols
    a = mx.random.normal((rows, cols), key=mx.random.key(2))
    v = mx.random.normal((cols,), key=mx.random.key(3))
    mx.eval(a, v)
    na, nv = np.array(a), np.array(v)
    rates = {}
    for name, fn in (("mlx", lambda: mx.eval(a @ v)), ("numpy", lambda: na @ nv)):
        fn()
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
        rates[name] = best
    return rates


def torch_device() -> str:
    """Where the PyTorch reference runs: on the GPU when MLX runs on one (CUDA), else the CPU."""
    import torch

    return "cuda" if mx.default_device().type == mx.DeviceType.gpu and torch.cuda.is_available() else "cpu"


def torch_sgemm_peak(reps: int = 5) -> float:
    import torch

    device = torch_device()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for n in peak_sizes():
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        sync()
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def max_rss_mb() -> float:
    """The process's peak resident memory so far (MLX and PyTorch together), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def alternate(runs: dict[str, Callable[[int], None]], per_round: int, warmup: int, rounds: int,
              pause: float) -> dict[str, list[float]]:
    """Time ``per_round`` steps of each implementation in turn, ``rounds`` times after ``warmup`` rounds.

    Returns the seconds per step of each timed round. Between two implementations it sleeps
    ``pause`` seconds: OpenBLAS's worker threads spin for about 0.1 s after a call and OpenMP's
    for a while too, and a pool still spinning on a core would slow the other framework.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name, run in runs.items():
            if len(runs) > 1:
                time.sleep(pause)
            t0 = time.perf_counter()
            run(per_round)
            dt = (time.perf_counter() - t0) / per_round
            if i >= warmup:
                times[name].append(dt)
    return times


# ---------------------------------------------------------------------------- train steps


def mlx_train_step(bench: TrainBench, x: np.ndarray, y: np.ndarray, native: bool = False, streams: int = 0):
    """(model, run, first-step seconds, first loss) for mlx_gpt's train step on ``bench``.

    ``run(k)`` takes k steps the way ``mlx_gpt.train`` does, each launched with mx.async_eval
    while the next one is being built, and waits for the last. ``native`` traces the step with
    MLX's own kernels instead of ``mlx_gpt.cpu.ops``; ``streams`` is ``mlx_gpt.train``'s --streams.
    """
    model = accelerate(build(bench.shape.model_config(), seed=0))
    model.train()
    tcfg = TrainConfig(batch_size=bench.batch_size, max_iters=1000, warmup_iters=10, streams=streams)
    optimizer = make_optimizer(tcfg.optim)
    optimizer.init(model.trainable_parameters())
    step_fn = make_train_step(model, optimizer, tcfg)
    xs, ys = mx.array(x[None]), mx.array(y[None])
    # the BLAS threads the step was planned with (a process-wide setting another step may change)
    _, threads = split_for(bench.batch_size, streams)

    def run(k: int) -> mx.array:
        set_blas_threads(threads)
        for _ in range(k):
            loss, norm = step_fn(xs, ys)
            mx.async_eval(loss, norm, model.parameters())
        mx.eval(loss, model.parameters(), optimizer.state)
        return loss

    t0 = time.perf_counter()
    if native:
        with ops.native_ops():
            loss = run(1)
    else:
        loss = run(1)
    return model, run, time.perf_counter() - t0, loss.item()


def torch_train_step(mlx_model, x: np.ndarray, y: np.ndarray):
    """(run, first-step seconds, first loss) for the PyTorch reference with ``mlx_model``'s weights."""
    import torch

    from torch_gpt import from_mlx, make_optimizer as torch_optimizer, make_train_step as torch_step

    device = torch_device()
    tmodel = from_mlx(mlx_model, device)
    tmodel.train()
    fn = torch_step(tmodel, torch_optimizer(tmodel), grad_clip=1.0)
    tx, ty = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (x, y))

    def run(k: int) -> float:
        for _ in range(k):
            loss, _ = fn(tx, ty)
        return float(loss)

    t0 = time.perf_counter()
    loss = run(1)
    return run, time.perf_counter() - t0, loss


def bench_train(bench: TrainBench, args: argparse.Namespace, peak: float) -> dict:
    rng = np.random.default_rng(0)
    x = rng.integers(0, bench.shape.vocab_size, (bench.batch_size, bench.seq_len), dtype=np.int32)
    y = rng.integers(0, bench.shape.vocab_size, (bench.batch_size, bench.seq_len), dtype=np.int32)
    mx.reset_peak_memory()
    model, mlx_run, mlx_first, mlx_loss = mlx_train_step(bench, x, y, streams=args.streams[0])
    fpt = flops_per_token(model.config, bench.seq_len, model.num_params(non_embedding=True))
    tokens = bench.batch_size * bench.seq_len
    runs = {"mlx": mlx_run}
    first = {"mlx": mlx_first}
    result = {"config": asdict(bench), "params": model.num_params(), "tokens_per_step": tokens,
              "flops_per_token": fpt}
    if args.vs_torch:
        # the same initial weights as the MLX model had before its first step
        torch_run, first["torch"], torch_loss = torch_train_step(build(bench.shape.model_config(), seed=0), x, y)
        result["first_loss"] = {"mlx": mlx_loss, "torch": torch_loss}
        runs["torch"] = torch_run
    if args.native:
        _, runs["mlx_native"], first["mlx_native"], _ = mlx_train_step(bench, x, y, native=True,
                                                                       streams=args.streams[0])
    for n in args.streams[1:]:
        _, runs[f"mlx_streams{n}"], first[f"mlx_streams{n}"], _ = mlx_train_step(bench, x, y, streams=n)
    gc.collect()
    # steps per round: enough for about half a second, so a pipelined MLX loop is measured as such
    t0 = time.perf_counter()
    mlx_run(1)
    per_round = max(1, min(10, int(0.5 / max(time.perf_counter() - t0, 1e-3))))
    times = alternate(runs, per_round, args.warmup, args.steps, args.pause)
    for name, ts in times.items():
        ms = median_ms(ts)
        gflops = fpt * tokens / (ms / 1000) / 1e9
        result[name] = {"ms_per_step": ms, "tok_per_s": tokens / (ms / 1000), "gflops": gflops, "mfu": gflops / peak,
                        "first_step_s": first[name], "rounds_ms": [round(1000 * t, 2) for t in ts]}
    result["steps_per_round"] = per_round
    result["mlx"]["peak_memory_mb"] = mx.get_peak_memory() / 2**20
    if args.vs_torch:
        for name in runs:
            if name.startswith("mlx"):
                result[name]["vs_torch"] = result[name]["tok_per_s"] / result["torch"]["tok_per_s"]
        result["mlx_vs_torch"] = result["mlx"]["vs_torch"]
    if args.native:
        result["fast_vs_native"] = result["mlx"]["tok_per_s"] / result["mlx_native"]["tok_per_s"]
    result["max_rss_mb"] = max_rss_mb()
    return result


# ---------------------------------------------------------------------------- decoding


def mlx_decode(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decoding as ``python -m mlx_gpt.generate`` runs it: ``mlx_gpt.generate.Decoder``
    (prefill, then one step per token, compiled over fixed-capacity caches on the CPU, each
    queued with mx.async_eval before the previous token is read back).

    Returns (tokens, seconds to the first token, seconds for the rest).
    """
    timing = Timing()
    tokens = [row[0] for row in Decoder(model, SamplingConfig(temperature=0)).tokens(prompt, new_tokens, timing=timing)]
    return tokens, timing.prompt_seconds, timing.generation_seconds


def mlx_decode_eager(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decoding in a plain loop: the model's growing caches, no compiled step, async_eval."""
    t0 = time.perf_counter()
    cache = model.make_cache()
    tok = mx.argmax(model(mx.array([prompt]), cache)[:, -1, :], axis=-1)
    mx.eval(tok)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = mx.argmax(model(tok[:, None], cache)[:, -1, :], axis=-1)
        mx.async_eval(tok)
        out.append(tok)
    tokens = [t.item() for t in out]
    return tokens, t1 - t0, time.perf_counter() - t1


def bench_decode(bench: DecodeBench, args: argparse.Namespace, rates: dict[str, float]) -> dict:
    model = accelerate(build(bench.shape.model_config(), seed=0))
    model.eval()
    prompt = np.random.default_rng(1).integers(0, bench.shape.vocab_size, bench.prompt_len).tolist()
    n_params = model.num_params()
    # each new token reads every weight once (the tied head once) and, on average, the keys and
    # values of the prompt and half the generated tokens
    avg_ctx = bench.prompt_len + bench.new_tokens / 2
    bytes_per_token = 4 * n_params + 4 * 2 * bench.shape.n_layer * bench.shape.n_embd * avg_ctx
    bandwidth = max(rates.values())
    bound = bandwidth * 1e9 / bytes_per_token
    mx.reset_peak_memory()
    decoders: dict[str, Callable] = {"mlx": lambda: mlx_decode(model, prompt, bench.new_tokens),
                                     "mlx_eager": lambda: mlx_decode_eager(model, prompt, bench.new_tokens)}
    if args.vs_torch:
        from torch_gpt import decode as torch_decode, from_mlx

        tmodel = from_mlx(model, torch_device()).eval()
        decoders["torch"] = lambda: torch_decode(tmodel, prompt, bench.new_tokens)
    for fn in decoders.values():  # warm-up
        fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in decoders}
    tokens = {}
    for _ in range(args.decode_runs):
        for name, fn in decoders.items():
            time.sleep(args.pause)
            tokens[name], pre, dec = fn()
            runs[name].append((pre, dec))
    result = {"config": asdict(bench), "params": n_params, "bytes_per_token": bytes_per_token,
              "bandwidth_gb_s": bandwidth, "bandwidth_by": rates, "bound_tok_per_s": bound}
    for name, rs in runs.items():
        tps = (bench.new_tokens - 1) / statistics.median(d for _, d in rs)
        result[name] = {"tok_per_s": tps, "prefill_ms": 1000 * statistics.median(p for p, _ in rs),
                        "fraction_of_bound": tps / bound}
    result["mlx"]["peak_memory_mb"] = mx.get_peak_memory() / 2**20
    if args.vs_torch:
        result["mlx_vs_torch"] = result["mlx"]["tok_per_s"] / result["torch"]["tok_per_s"]
        result["same_tokens"] = tokens["mlx"] == tokens["torch"] == tokens["mlx_eager"]
    result["max_rss_mb"] = max_rss_mb()
    return result


# ---------------------------------------------------------------------------- report


def machine_info(args: argparse.Namespace) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "mlx_gpt": mlx_gpt.__version__,
            "device": str(mx.default_device()), "blas": blas_status(), "fast_ops": ops.fast_ops_enabled(),
            "cores": cpu_cores()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        info["commit"] += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    if args.vs_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_device"] = torch_device()
        info["torch_tf32"] = args.torch_tf32
        if info["torch_device"] == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def format_table(report: dict) -> str:
    m = report["machine"]
    load = "/".join(f"{x:.1f}" for x in m.get("load_avg", ())) + " -> " + "/".join(
        f"{x:.1f}" for x in m.get("load_avg_after", ()))
    lines = [f"mlx_gpt {m['mlx_gpt']} (commit {m.get('commit')}), MLX {m['mlx']} on {m['device']}, "
             f"{m['cores']} cores, {m['blas']}" + (f"; PyTorch {m['torch']} on {m['torch_device']} ({m['torch_threads']} threads)"
                                                   if "torch" in m else "") + f"; load average {load}",
             f"sgemm peak {report['sgemm_peak_gflops']:.0f} GFLOP/s (MLX)"
             + (f", {report['torch_sgemm_peak_gflops']:.0f} GFLOP/s (PyTorch)" if "torch_sgemm_peak_gflops" in report
                else "") + f"; FLOPs: {FLOP_FORMULA}", ""]
    head = f"{'config':<8}{'impl':<14}{'ms/step':>10}{'tok/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'first':>8}{'peak MB':>9}"
    lines += [head, "-" * len(head)]
    for name, r in report["train"].items():
        for impl in [k for k, v in r.items() if isinstance(v, dict) and "ms_per_step" in v]:
            e = r[impl]
            peak_mb = f"{e['peak_memory_mb']:.0f}" if "peak_memory_mb" in e else ""
            lines.append(f"{name:<8}{impl:<14}{e['ms_per_step']:>10.1f}{e['tok_per_s']:>10.0f}{e['gflops']:>9.1f}"
                         f"{100 * e['mfu']:>6.1f}%{e['first_step_s']:>7.1f}s{peak_mb:>9}")
        if "mlx_vs_torch" in r:
            fl = r["first_loss"]
            lines.append(f"{'':<8}mlx/torch {r['mlx_vs_torch']:.2f}x   (first loss {fl['mlx']:.5f} vs {fl['torch']:.5f})")
            for impl in [k for k in r if k.startswith("mlx_streams")]:
                lines.append(f"{'':<8}{impl}/torch {r[impl]['vs_torch']:.2f}x")
        if "fast_vs_native" in r:
            lines.append(f"{'':<8}fast/native ops {r['fast_vs_native']:.2f}x")
    if report.get("decode"):
        d = report["decode"]
        lines += ["", f"decode ({d['config']['note']}, {d['config']['prompt_len']}-token prompt, "
                  f"{d['config']['new_tokens']} new): bound {d['bound_tok_per_s']:.1f} tok/s "
                  f"({d['bytes_per_token'] / 1e6:.0f} MB/token at {d['bandwidth_gb_s']:.1f} GB/s)"]
        for impl in ("mlx", "mlx_eager", "torch"):
            if impl in d:
                e = d[impl]
                lines.append(f"{'':<8}{impl:<12}{e['tok_per_s']:>8.1f} tok/s  {100 * e['fraction_of_bound']:>5.1f}% of bound"
                             f"  prefill {e['prefill_ms']:.0f} ms")
        if "mlx_vs_torch" in d:
            lines.append(f"{'':<8}mlx/torch {d['mlx_vs_torch']:.2f}x  (same tokens: {d['same_tokens']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=10, help="timed rounds of train steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first step")
    p.add_argument("--pause", type=float, default=0.3,
                   help="seconds to sleep between implementations, so thread pools settle")
    p.add_argument("--decode-runs", type=int, default=3, help="timed decoding runs per implementation")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="BLAS threads while decoding (default: one per core; 1 holds up better on a busy machine)")
    p.add_argument("--vs-torch", action="store_true", help="race the PyTorch reference of tools/torch_gpt.py")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch's intra-op threads (default: PyTorch's own choice, one per core)")
    p.add_argument("--torch-tf32", action="store_true",
                   help="let PyTorch multiply float32 on a GPU's TF32 tensor cores (nanoGPT turns this on)")
    p.add_argument("--native", action="store_true",
                   help="also time mlx_gpt with MLX's native GELU/softmax/attention (what Metal and CUDA use)")
    p.add_argument("--streams", default="0",
                   help="mlx_gpt.train's --streams for the MLX step (0: one per core, 1: no split); "
                        "a list such as 0,1 times each, the first as 'mlx'")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise UserError(f"unknown config {', '.join(unknown) or '(none)'}; choose from {', '.join(CONFIGS)}")
    try:
        args.streams = [int(n) for n in args.streams.split(",")]
    except ValueError:
        raise UserError(f"--streams takes comma-separated integers, got {args.streams!r}") from None
    if any(n < 0 for n in args.streams):
        raise UserError("--streams values must be 0 (one per core) or more")
    if args.steps < 1 or args.warmup < 0 or args.decode_runs < 1 or (args.decode_threads or 1) < 1:
        raise UserError("--steps, --decode-runs and --decode-threads must be at least 1 and --warmup at least 0")
    if args.vs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError("--vs-torch needs PyTorch: pip install torch") from None
        if args.torch_threads is not None:
            if args.torch_threads < 1:
                raise UserError("--torch-threads must be at least 1")
            torch.set_num_threads(args.torch_threads)
        torch.backends.cuda.matmul.allow_tf32 = args.torch_tf32
        torch.backends.cudnn.allow_tf32 = args.torch_tf32
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    report: dict = {"machine": machine_info(args), "flop_formula": FLOP_FORMULA}
    report["sgemm_peak_gflops"] = sgemm_peak()
    if args.vs_torch:
        report["torch_sgemm_peak_gflops"] = torch_sgemm_peak()
    report["train"] = {}
    for name in names:
        bench = CONFIGS[name]
        if isinstance(bench, TrainBench):
            report["train"][name] = bench_train(bench, args, report["sgemm_peak_gflops"])
            print(f"[{name} done]", file=sys.stderr)
        else:
            # a train step may have left one BLAS thread per stream
            set_blas_threads(args.decode_threads or cpu_cores())
            report["decode"] = bench_decode(bench, args, stream_bandwidth())
        gc.collect()
        mx.clear_cache()
    # the peak again at the end: on a shared machine either measurement may be depressed
    set_blas_threads(cpu_cores())
    report["sgemm_peak_gflops"] = max(report["sgemm_peak_gflops"], sgemm_peak())
    for r in report["train"].values():
        for e in r.values():
            if isinstance(e, dict) and "gflops" in e:
                e["mfu"] = e["gflops"] / report["sgemm_peak_gflops"]
    try:
        report["machine"]["load_avg_after"] = os.getloadavg()
    except OSError:
        pass
    table = format_table(report)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    run_cli(main)
