"""Held-out loss, perplexity and bits per byte of a whole token stream, for any model.

Every token but the first is predicted exactly once: the stream is cut into consecutive
windows of the model's block_size, each read from a fresh start, which is how the models are
trained. Bits per byte divide the total nats by ln 2 and by the UTF-8 bytes of the predicted
tokens, so they compare models across tokenizers where loss per token cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .loss import cross_entropy
from .models.base import eval_mode
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Score:
    nats: float  # total negative log-likelihood
    tokens: int  # tokens predicted
    bytes: int  # UTF-8 bytes of those tokens

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes


def utf8_bytes(tokenizer: Tokenizer, ids: np.ndarray) -> int:
    """UTF-8 length of the text the ids spell (a byte token is one byte, even mid-character).

    End-of-text ids stand between documents, not for text: they count no bytes.
    """
    if tokenizer.kind == "byte":
        return len(ids)
    ids = np.asarray(ids)
    if tokenizer.eot_id is not None:
        ids = ids[ids != tokenizer.eot_id]
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


def total_nll(model: nn.Module, tokens: np.ndarray, *, batch_size: int = 16) -> tuple[float, int]:
    """(total nats, predictions) of tokens[1:], each given the tokens before it in its window."""
    T = model.block_size
    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens) - 1
    if n < 1:
        return 0.0, 0

    def nats(x: mx.array, y: mx.array) -> mx.array:
        return mx.sum(cross_entropy(model(x), y))

    compiled = mx.compile(nats, inputs=model.state)
    full = n // T
    windows = np.lib.stride_tricks.sliding_window_view(tokens[: full * T + 1], T + 1)[::T] if full else None
    with eval_mode(model):
        total = 0.0
        for i in range(0, full, batch_size):
            w = windows[i : i + batch_size]
            total += compiled(mx.array(w[:, :-1]), mx.array(w[:, 1:])).item()
        if n > full * T:  # the tail, shorter than a window
            rest = tokens[full * T :]
            total += nats(mx.array(rest[None, :-1]), mx.array(rest[None, 1:])).item()
    return total, n


def score(model: nn.Module, tokens: np.ndarray, tokenizer: Tokenizer, *, batch_size: int = 16) -> Score:
    """Loss, perplexity and bits per byte of a held-out stream (e.g. the val split)."""
    nats, n = total_nll(model, tokens, batch_size=batch_size)
    return Score(nats, n, utf8_bytes(tokenizer, np.asarray(tokens)[1:]))

