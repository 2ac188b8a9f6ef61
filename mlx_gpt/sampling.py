"""Choosing the next token from logits: penalties, temperature, truncation, then a draw.

Each processor is a pure function of a (B, vocab) logits array that returns new logits, with
the tokens it rules out set to -inf, so they compose in any order and compile into one graph.
``sample`` applies them in the usual order (repetition penalty, temperature, top-k, top-p,
min-p) and draws with an explicit key, never from MLX's global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token; the defaults draw from the model's distribution unchanged.

    temperature         0 picks the most likely token (greedy); higher flattens the distribution
    top_k               keep only the k most likely tokens (0: all)
    top_p               keep the most likely tokens whose probabilities first add up to top_p
    min_p               keep tokens at least min_p times as likely as the most likely one
    repetition_penalty  divide positive (multiply negative) logits of tokens already in the
                        context by this (1: off; CTRL's penalty, 1.1-1.3 is typical)
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_context(self) -> bool:
        """Whether sampling needs to know which tokens the context holds."""
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Push down the logits of seen tokens: positive ones divided by penalty, negative multiplied.

    seen is a (B, vocab) boolean array. Dividing or multiplying (rather than subtracting)
    always moves a logit toward less likely, whatever its sign.
    """
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the k largest logits of each row (ties at the k-th broken by position)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, drop, mx.array(-mx.inf, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    A token stays when the tokens ranked above it hold less than p in total, so the most
    likely token always stays.
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
    above = mx.cumsum(probs, axis=-1, inclusive=False)
    drop_sorted = above >= p
    drop = mx.put_along_axis(mx.zeros(logits.shape, mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, mx.array(-mx.inf, logits.dtype), logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p)
    floor = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= floor, logits, mx.array(-mx.inf, logits.dtype))


def process_logits(logits: mx.array, cfg: SamplingConfig, seen: mx.array | None = None) -> mx.array:
    """The logits sample draws from: penalty, temperature, then top-k, top-p and min-p."""
    if cfg.uses_context:
        if seen is None:
            raise ValueError("repetition_penalty needs the seen-token mask")
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    logits = apply_top_k(logits, cfg.top_k)
    logits = apply_top_p(logits, cfg.top_p)
    return apply_min_p(logits, cfg.min_p)


def sample(logits: mx.array, cfg: SamplingConfig, key: mx.array | None, seen: mx.array | None = None) -> mx.array:
    """Next token ids (B,) int32 for logits (B, vocab); key is unused when greedy."""
    logits = process_logits(logits.astype(mx.float32), cfg, seen)
    if cfg.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    return mx.random.categorical(logits, key=key).astype(mx.int32)


def mark_seen(seen: mx.array, tokens: mx.array) -> mx.array:
    """seen (B, vocab) with the ids in tokens (B, T) set."""
    return mx.put_along_axis(seen, tokens, mx.array(True), axis=-1)
