"""Recurrent language models: Elman's RNN (1990) and the LSTM (Hochreiter & Schmidhuber, 1997).

Both read the text one token at a time into a fixed-size state, embed -> n_layer recurrent
layers -> linear head; they differ only in the layer. The state is all they remember, so
unlike a window model their context is unbounded in principle — in practice the Elman RNN's
vanishing gradients keep it short, which is what the LSTM's gated cell was invented to fix.
Training unrolls them over block_size tokens (backpropagation through time); generating
carries the state forward in a cache, one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import LanguageModel, ModelConfig
from .cache import RecurrentState


@dataclass(frozen=True)
class RecurrentConfig(ModelConfig):
    """n_embd is the width of the embeddings and of every layer's state."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_embd: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_embd")
        self.require_dropout()


class RecurrentLM(LanguageModel):
    """Embedding, a stack of recurrent layers, a linear head; subclasses choose the layer."""

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # unit-variance inputs, like char-rnn's one-hot vectors: at MLX's default std
        # 1/sqrt(n_embd) the input barely moves the state and the first hundred steps learn
        # nothing but the unigram
        self.wte.weight = mx.random.normal(self.wte.weight.shape)
        self.layers = [self.make_layer(cfg.n_embd) for _ in range(cfg.n_layer)]
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def make_layer(self, width: int) -> nn.Module:
        raise NotImplementedError

    def run_layer(self, layer: nn.Module, x: mx.array, state: RecurrentState | None) -> mx.array:
        """All hidden states (B, T, n_embd) of one layer, starting from and updating state."""
        raise NotImplementedError

    def make_cache(self) -> list[RecurrentState]:
        return [RecurrentState() for _ in self.layers]

    def __call__(self, idx: mx.array, cache: list[RecurrentState] | None = None) -> mx.array:
        """Logits (B, T, V) for token ids (B, T); with a cache, the state carries on from it."""
        x = self.drop(self.wte(idx))
        for i, layer in enumerate(self.layers):
            state = cache[i] if cache else None
            x = self.drop(self.run_layer(layer, x, state))
            if state is not None:
                state.offset += idx.shape[1]
        return self.head(x)


class ElmanRNN(RecurrentLM):
    """h_t = tanh(W_x x_t + W_h h_{t-1} + b)."""

    def make_layer(self, width: int) -> nn.Module:
        return nn.RNN(width, width)

    def run_layer(self, layer: nn.Module, x: mx.array, state: RecurrentState | None) -> mx.array:
        h = layer(x, hidden=state.hidden if state else None)
        if state is not None:
            state.hidden = h[:, -1]
        return h


class LSTM(RecurrentLM):
    """Gated cell c_t = f * c_{t-1} + i * g, output h_t = o * tanh(c_t); the forget gate's bias
    starts at 1 so the cell remembers by default (Jozefowicz et al., 2015)."""

    def make_layer(self, width: int) -> nn.Module:
        layer = nn.LSTM(width, width)
        # gates are laid out [input, forget, cell, output]
        layer.bias = mx.concatenate([layer.bias[:width], mx.ones((width,)), layer.bias[2 * width:]])
        return layer

    def run_layer(self, layer: nn.Module, x: mx.array, state: RecurrentState | None) -> mx.array:
        h, c = layer(x, hidden=state.hidden if state else None, cell=state.cell if state else None)
        if state is not None:
            state.hidden, state.cell = h[:, -1], c[:, -1]
        return h
