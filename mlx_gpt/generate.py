"""Sampling from a model with a KV cache."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from .tokenizer import Tokenizer


def generate_ids(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> Iterator[int]:
    """Yield new token ids: one prefill pass over the prompt, then one cached step per token."""
    key = mx.random.key(seed)
    block = model.block_size
    tokens = list(prompt)
    cache = model.make_cache()
    logits = model(mx.array([tokens[-block:]]), cache)[:, -1, :]
    for _ in range(max_new_tokens):
        key, sub = mx.random.split(key)
        if temperature == 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = mx.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
                logits = mx.where(logits < kth, -mx.inf, logits)
            nxt = mx.random.categorical(logits, key=sub)
        tok = nxt.item()
        yield tok
        tokens.append(tok)
        if cache[0].offset >= block:  # window full: re-prefill the last block - 1 tokens
            cache = model.make_cache()
            logits = model(mx.array([tokens[-(block - 1):]]), cache)[:, -1, :]
        else:
            logits = model(mx.array([[tok]]), cache)[:, -1, :]


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> str:
    """The decoded continuation of prompt (prompt not included)."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id if tokenizer.eot_id is not None else 10]
    out = []
    for tok in generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed):
        if tok == tokenizer.eot_id:
            break
        out.append(tok)
    return tokenizer.decode(out)
