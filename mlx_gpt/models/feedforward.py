"""Bengio et al. (2003)'s neural probabilistic language model: a feed-forward net over a fixed
window of the previous ``context`` tokens.

Each token of the window is looked up in a shared feature table C, the features are
concatenated into x, and the next-token logits are b + W x + U tanh(d + H x): a tanh hidden
layer plus, optionally, the paper's direct connections W from the features to the output. It is
an n-gram whose table is replaced by a smooth function of learned word features, which is
why it generalises to contexts it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import LanguageModel, ModelConfig
from .cache import HistoryCache


@dataclass(frozen=True)
class FeedForwardConfig(ModelConfig):
    vocab_size: int = 256
    block_size: int = 128
    context: int = 16
    n_embd: int = 32
    n_hidden: int = 768
    direct: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.require_positive("vocab_size", "block_size", "context", "n_embd", "n_hidden")
        self.require_dropout()


class FeedForwardLM(LanguageModel):
    def __init__(self, cfg: FeedForwardConfig):
        super().__init__()
        self.config = cfg
        # row vocab_size stands for "before the start of the text", so a short window is padded,
        # not filled with a real token
        self.wte = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)
        self.hidden = nn.Linear(cfg.context * cfg.n_embd, cfg.n_hidden)
        self.head = nn.Linear(cfg.n_hidden, cfg.vocab_size)
        if cfg.direct:
            self.direct = nn.Linear(cfg.context * cfg.n_embd, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def make_cache(self) -> list[HistoryCache]:
        """The last context - 1 tokens: all the history the next window needs."""
        return [HistoryCache(self.config.context - 1)]

    def __call__(self, idx: mx.array, cache: list[HistoryCache] | None = None) -> mx.array:
        """Logits (B, T, V) for token ids (B, T); position t sees tokens t-context+1..t."""
        cfg = self.config
        B, T = idx.shape
        seq = cache[0].update_and_fetch(idx) if cache else idx
        pad = cfg.context - 1 - (seq.shape[1] - T)  # window positions before the known history
        if pad > 0:
            seq = mx.concatenate([mx.full((B, pad), cfg.vocab_size, seq.dtype), seq], axis=1)
        e = self.wte(seq[:, seq.shape[1] - T - cfg.context + 1:])  # (B, T + context - 1, n_embd)
        # window of position t = rows t..t+context-1, oldest first: (B, T, context * n_embd)
        x = mx.concatenate([e[:, i:i + T] for i in range(cfg.context)], axis=-1)
        x = self.drop(x)
        logits = self.head(self.drop(mx.tanh(self.hidden(x))))
        return logits + self.direct(x) if cfg.direct else logits
