"""Greedy decoding as users of Hugging Face transformers and of mlx-lm run it, one process per peer.

    python tests/reference/generate_peers.py hf --weights HF_DIR --prompt 1,2,3 --new-tokens 128
    python tests/reference/generate_peers.py mlx-lm --weights MLX_LM_DIR --prompt 1,2,3 --new-tokens 128

``hf`` times ``GPT2LMHeadModel.generate`` (KV cache, greedy); ``mlx-lm`` times
``mlx_lm.generate.generate_step``, the loop under mlx-lm's ``generate`` and ``stream_generate``
(prefill, then one cached step per token, the next queued with ``mx.async_eval``), on a model
loaded with ``mlx_lm.utils.load_model``. Each prints one JSON object: the tokens, and per run
the seconds to the first token and for all of them. ``hf`` has no first-token hook, so it
times ``generate`` for one new token as well; decoding speed is (new tokens - 1) / the
difference. Each imports only its own framework.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WARMUP_TOKENS = 8  # one short generation first: loading, first allocations, kernel builds


def run_hf(weights: str, prompt: list[int], new_tokens: int, runs: int, threads: int | None) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    if threads:
        torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(weights, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def generate(n: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, num_beams=1, use_cache=True, pad_token_id=0)
        return out[0, len(prompt):].tolist(), time.perf_counter() - t0

    generate(min(new_tokens, WARMUP_TOKENS))
    first, total = [], []
    for _ in range(runs):
        first.append(generate(1)[1])
        tokens, seconds = generate(new_tokens)
        total.append(seconds)
    return {"impl": "hf", "version": __import__("transformers").__version__, "threads": torch.get_num_threads(),
            "tokens": tokens, "first_token_s": first, "total_s": total}


def run_mlx_lm(weights: str, prompt: list[int], new_tokens: int, runs: int) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(weights))

    def generate(n: int = new_tokens) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        tokens, t_first = [], 0.0
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
            tokens.append(token if isinstance(token, int) else token.item())
            if len(tokens) == 1:
                t_first = time.perf_counter() - t0
        return tokens, t_first, time.perf_counter() - t0

    generate(min(new_tokens, WARMUP_TOKENS))
    first, total = [], []
    for _ in range(runs):
        tokens, f, t = generate()
        first.append(f)
        total.append(t)
    return {"impl": "mlx-lm", "version": mlx_lm.__version__, "tokens": tokens, "first_token_s": first,
            "total_s": total}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tests/reference/generate_peers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("peer", choices=("hf", "mlx-lm"))
    p.add_argument("--weights", required=True, help="the peer's model directory")
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="PyTorch's intra-op threads (hf)")
    a = p.parse_args(argv)
    prompt = [int(t) for t in a.prompt.split(",")]
    if a.peer == "hf":
        result = run_hf(a.weights, prompt, a.new_tokens, a.runs, a.threads)
    else:
        result = run_mlx_lm(a.weights, prompt, a.new_tokens, a.runs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
