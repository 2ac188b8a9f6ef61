"""Load on the server: 1, 4, 8 and 16 concurrent clients, each streaming completions of 128 tokens.

  python tools/bench_serve.py                                  # GPT-2 124M's shape, random weights
  python tools/bench_serve.py --checkpoint checkpoints/run --clients 1,8

Starts ``python -m mlx_gpt.serve`` on a free loopback port, warms it up (a few tokens at each
concurrency, so each batch size's step is traced before it is timed), then for each
concurrency runs that many client threads, each sending ``--requests`` greedy streaming requests
one after another (prompts taken in turn from a fixed list). Reports requests/s, completion
tokens/s, and the median and 95th percentile of the time to the first token and of the time per
token after it. Every answer is checked against the same prompt's answer with one client, so a
request lost or mixed up in the batch shows as an error rather than as speed. Bounded: at most
``--max-seconds`` in all, each request at most ``--request-timeout``.

Without ``--checkpoint`` it builds a model of a preset's shape with random weights (their values
do not change the cost of a step) and GPT-2's tokenizer from tests/data; the end-of-text token is
biased away so every request runs its 128 tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["The meaning of life is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "The capital of France is", "import numpy as np\n", "In 1905, Albert Einstein published",
           "To be, or not to be:", "The quick brown fox", "SELECT name FROM users WHERE",
           "Dear Sir or Madam,", "The recipe calls for", "Chapter 1\n\nIt was a dark and stormy night;",
           "The function returns", "My favourite colour is", "Breaking news:", "Q: What is 2 + 2?\nA:"]


@dataclass
class Result:
    prompt: str
    text: str
    tokens: int
    ttft: float  # seconds to the first token
    per_token: float  # seconds per token after the first
    error: str | None = None


def build_checkpoint(directory: Path, preset: str, block_size: int) -> Path:
    """A model of the preset's shape with random weights, and GPT-2's tokenizer."""
    import mlx_gpt  # noqa: F401
    from mlx_gpt import checkpoint
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
    from mlx_gpt.models.gpt import build, preset as preset_config

    tokenizer = GPT2Tokenizer.from_directory(ROOT / "tests" / "data" / "gpt2")
    model = build(preset_config(preset, vocab_size=tokenizer.vocab_size, block_size=block_size))
    return checkpoint.save(directory / preset, model, tokenizer)


def start_server(ckpt: Path, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gpt.serve", "--checkpoint", str(ckpt), "--port", "0",
                             "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                            env=env, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its stderr drained
    return proc, int(m.group(1))


def request(port: int, model: str, prompt: str, new_tokens: int, bias: dict, timeout: float) -> Result:
    """One greedy streaming completion, timed as a client sees it."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    first = last = None
    text, tokens = "", 0
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return Result(prompt, "", 0, 0, 0, f"HTTP {r.status}: {r.read()[:200]!r}")
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Result(prompt, text, tokens, 0, 0, chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                text += c["text"]
    except (OSError, http.client.HTTPException) as e:
        return Result(prompt, text, tokens, 0, 0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    if first is None:
        return Result(prompt, text, tokens, 0, 0, "no tokens")
    return Result(prompt, text, tokens, first - start, (last - first) / max(tokens - 1, 1))


def run_clients(port: int, model: str, clients: int, requests: int, new_tokens: int, bias: dict,
                timeout: float) -> tuple[list[Result], float]:
    """clients threads, each sending requests one after another; all results and the wall time."""
    results: list[Result] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            res = request(port, model, PROMPTS[(c * requests + r) % len(PROMPTS)], new_tokens, bias, timeout)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint to serve (default: --preset's shape, random weights)")
    p.add_argument("--preset", default="gpt2", help="shape of the random model without --checkpoint")
    p.add_argument("--block-size", type=int, default=256, help="positions of the random model")
    p.add_argument("--clients", default="1,4,8,16", help="concurrencies to run, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens each request asks for")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--max-seconds", type=float, default=900, help="stop starting new runs after this long")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    a = p.parse_args(argv)
    concurrencies = [int(c) for c in a.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.checkpoint) if a.checkpoint else build_checkpoint(Path(tmp), a.preset, a.block_size)
        model = ckpt.resolve().name
        config = json.loads((ckpt / "config.json").read_text())["model"]
        vocab = config.get("vocab_size", 0)
        bias = {"50256": -100} if vocab == 50257 else {}  # GPT-2's end-of-text: every request runs its length
        proc, port = start_server(ckpt, a.max_batch, max(64, max(concurrencies)))
        began = time.monotonic()
        try:
            # warm up: the step is traced once per batch size, and BLAS threads are chosen per size
            for clients in concurrencies:
                run_clients(port, model, clients, 1, 16, bias, a.request_timeout)
            expected: dict[str, str] = {}
            rows, base = [], None
            for clients in concurrencies:
                if time.monotonic() - began > a.max_seconds:
                    print(f"stopping: over --max-seconds {a.max_seconds:g}", file=sys.stderr)
                    break
                results, wall = run_clients(port, model, clients, a.requests, a.new_tokens, bias, a.request_timeout)
                errors = [r.error for r in results if r.error]
                for r in results:
                    if r.error is None and expected.setdefault(r.prompt, r.text) != r.text:
                        errors.append(f"answer to {r.prompt!r} differs from its answer at lower concurrency")
                tokens = sum(r.tokens for r in results)
                tps = tokens / wall
                base = tps if base is None else base
                good = [r for r in results if r.error is None]
                rows.append((clients, len(results), len(errors), len(results) / wall, tps, tps / base,
                             percentile([r.ttft for r in good], 0.5), percentile([r.ttft for r in good], 0.95),
                             percentile([r.per_token for r in good], 0.5),
                             percentile([r.per_token for r in good], 0.95)))
                print(f"{clients} clients: {len(results)} requests, {tokens} tokens in {wall:.1f} s"
                      + (f", {len(errors)} errors: {errors[0]}" if errors else ""), file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    print(f"\nmodel: {model} ({config.get('n_layer')} layers, width {config.get('n_embd')}, vocab {vocab}); "
          f"{a.new_tokens} new tokens a request, {a.requests} requests a client, greedy, --max-batch {a.max_batch}\n")
    print("| clients | requests | errors | requests/s | tokens/s | vs 1 client | TTFT p50 | TTFT p95 "
          "| per token p50 | per token p95 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, n, e, rps, tps, speedup, t50, t95, p50, p95 in rows:
        print(f"| {c} | {n} | {e} | {rps:.2f} | {tps:.1f} | {speedup:.2f}x | {t50 * 1e3:.0f} ms | {t95 * 1e3:.0f} ms "
              f"| {p50 * 1e3:.1f} ms | {p95 * 1e3:.1f} ms |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
