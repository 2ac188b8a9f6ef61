"""Decode speed at batch 1 against the machine's memory-bandwidth bound.

    python tools/bench_decode.py [--preset gpt2] [--prompt-tokens 16] [--new-tokens 128] [--reps 5]

At batch 1 every new token reads every weight once (the head is tied to wte, whose rows the
embedding lookup barely touches; of wpe one row is read), so tokens/s can be at most
copy bandwidth / bytes of weights. Copy bandwidth is measured here as (bytes read + bytes
written) / seconds of a large array copy, STREAM's convention.

Variants run round-robin, ``--reps`` times each, and the best and median of each are shown,
because a shared machine is noisy: compare them within one run only.
  decoder       mlx_gpt.generate.Decoder: prefill, compiled step, fixed caches, async_eval
  decoder-eager the same loop with the model's own growing caches and no compiled step
  minimal-mlx   a plain loop: growing caches, no compile, a sync every token
  transformers  GPT2LMHeadModel.generate with its KV cache (torch CPU), if installed
End-to-end tok/s is new tokens / (prefill + decode) seconds; decode tok/s leaves out the prefill
and the first token (not available for transformers, whose generate is one call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_gpt  # noqa: E402,F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_gpt.cpu import accelerate  # noqa: E402
from mlx_gpt.generate import Decoder, Timing  # noqa: E402
from mlx_gpt.models.gpt import GPT, build, preset  # noqa: E402
from mlx_gpt.sampling import SamplingConfig  # noqa: E402


def copy_bandwidth(n_bytes: int = 512 * 2**20, reps: int = 7) -> float:
    """Bytes moved per second (read + write) copying an array far larger than the caches."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one batch-1 decode step reads: all but the position table (one row)."""
    n = model.num_params(non_embedding=True) + model.config.n_embd
    return n * model.wte.weight.dtype.size


class EagerGPT(GPT):
    accepts_fixed_cache = False


def run_decoder(model, prompt: list[int], n: int) -> tuple[float, float]:
    timing = Timing()
    t = time.perf_counter()
    for _ in Decoder(model, SamplingConfig(temperature=0)).tokens(prompt, n, timing=timing):
        pass
    return time.perf_counter() - t, timing.generation_tps


def run_minimal(model, prompt: list[int], n: int) -> tuple[float, float]:
    t = time.perf_counter()
    cache = model.make_cache()
    y = mx.argmax(model(mx.array([prompt]), cache)[:, -1, :], axis=-1)
    y.item()
    t_first = time.perf_counter()
    for _ in range(n - 1):
        y = mx.argmax(model(y[:, None], cache)[:, -1, :], axis=-1)
        y.item()
    end = time.perf_counter()
    return end - t, (n - 1) / (end - t_first)


def transformers_runner(cfg, prompt: list[int], n: int):
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head)).eval()
    ids = torch.tensor([prompt])

    def run(*_):
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - t, float("nan")

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default="decoder,decoder-eager,minimal-mlx,transformers")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    model = accelerate(build(cfg, seed=0))
    model.eval()
    eager = EagerGPT(cfg)
    eager.update(model.parameters())
    eager.eval()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_tokens).tolist()
    n = args.new_tokens

    runners = {"decoder": lambda: run_decoder(model, prompt, n), "decoder-eager": lambda: run_decoder(eager, prompt, n),
               "minimal-mlx": lambda: run_minimal(model, prompt, n)}
    wanted = args.variants.split(",")
    if "transformers" in wanted:
        hf = transformers_runner(cfg, prompt, n)
        if hf is not None:
            runners["transformers"] = hf
    runners = {k: v for k, v in runners.items() if k in wanted}

    bandwidth = copy_bandwidth()
    per_token = weight_bytes_per_token(model)
    bound = bandwidth / per_token
    for f in runners.values():  # warm up: first traces, allocations
        f()
    results = {k: [] for k in runners}
    for _ in range(args.reps):
        for k, f in runners.items():
            seconds, decode_tps = f()
            results[k].append((n / seconds, decode_tps))
            print(f"  {k}: {n / seconds:.1f} tok/s end-to-end, {decode_tps:.1f} decode", file=sys.stderr, flush=True)
    bandwidth_after = copy_bandwidth()

    print(f"{args.preset}: batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy, float32; "
          f"{args.reps} runs each, round-robin")
    print(f"weights read per token: {per_token / 1e6:.1f} MB; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(after the runs: {bandwidth_after / 1e9:.1f}) -> bound {bound:.1f} tok/s")
    print(f"{'variant':14s} {'end-to-end tok/s':>22s} {'decode tok/s':>20s} {'of bound':>9s}")
    for k, rs in results.items():
        e2e = [r[0] for r in rs]
        dec = [r[1] for r in rs]
        dec_text = "-" if np.isnan(dec).all() else f"{max(dec):7.1f} (med {statistics.median(dec):5.1f})"
        best = max(dec) if not np.isnan(dec).all() else max(e2e)
        print(f"{k:14s} {max(e2e):9.1f} (med {statistics.median(e2e):5.1f}) {dec_text:>20s} {best / bound:8.0%}")


if __name__ == "__main__":
    main()
