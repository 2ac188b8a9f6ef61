"""The two Transformer rungs below GPT-2: both post-LayerNorm with a ReLU MLP, as published.

- ``TransformerLM``: the decoder of Vaswani et al. (2017) used as a language model: sinusoidal
  positions added to embeddings scaled by sqrt(n_embd), and the output layer tied to the
  embedding.
- ``GPT1``: Radford et al. (2018), simplified: learned positions, and a separate output layer.

Post-LN (``x = LN(x + sublayer(x))``) is the one thing GPT-2 changed that matters most for
training deep stacks: GPT-2 normalises before each sublayer and once more at the end.
Both configs are ``GPTConfig``s and the attention is GPT-2's own module, so the three differ
only where the papers do — and in one place they do not: both keep MLX's fan-in-scaled default
initialisation. GPT-1's N(0, 0.02) was sized for 768-wide layers; at width 128 it leaves a
post-LN stack on the unigram plateau for a hundred steps or more, where GPT-2's pre-LN
stack, normalising every branch's input, is off it in a few dozen.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .base import LanguageModel
from .gpt import MLP, CausalSelfAttention, GPTConfig, Packed, run_blocks


def sinusoids(positions: mx.array, dims: int) -> mx.array:
    """Positions (...,) as (..., dims): sin and cos of position / 10000^(2i/dims), interleaved
    (dimension 2i is a sine, 2i+1 its cosine)."""
    freq = mx.exp(-math.log(10000.0) * mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    angles = positions.astype(mx.float32)[..., None] * freq
    return mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1).reshape(*positions.shape, -1)[..., :dims]


class ReLUMLP(MLP):
    """GPT-2's MLP with the papers' ReLU in place of GELU."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.c_proj(nn.relu(self.c_fc(x))))


class PostLNBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = ReLUMLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def __call__(self, x: mx.array, cache: KVCache | None = None, packed: Packed | None = None) -> mx.array:
        x = self.ln_1(x + self.attn(x, cache, packed))
        return self.ln_2(x + self.mlp(x))


class PostLNTransformer(LanguageModel):
    """Token embedding, post-LN blocks, output layer; subclasses choose positions and head."""

    packs = True  # takes packed rows' positions (``gpt.Packed``)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = [PostLNBlock(cfg) for _ in range(cfg.n_layer)]

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def embed(self, idx: mx.array, positions: mx.array) -> mx.array:
        """Token embeddings (B, T, C) with their positions: (T,) for every row, or packed rows' (B, T)."""
        raise NotImplementedError

    def output(self, x: mx.array) -> mx.array:
        raise NotImplementedError

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None, positions: mx.array | None = None
                 ) -> mx.array:
        """Logits (B, T, vocab) for token ids (B, T); with a cache, positions continue after it;
        with ``positions`` (B, T), each row holds several examples (``gpt.Packed``)."""
        offset = cache[0].offset if cache else 0
        if offset + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {offset + idx.shape[1]} tokens exceeds block_size {self.config.block_size}")
        packed = Packed(positions) if positions is not None else None
        at = mx.arange(offset, offset + idx.shape[1]) if positions is None else positions
        x = self.drop(self.embed(idx, at))
        return self.output(run_blocks(self.h, x, cache, packed))


class TransformerLM(PostLNTransformer):
    """Vaswani et al.: fixed sinusoidal positions, embeddings scaled by sqrt(d), tied output.
    MLX's default initialisation keeps the scaled embeddings at unit variance, as in the paper."""

    def embed(self, idx: mx.array, positions: mx.array) -> mx.array:
        d = self.config.n_embd
        return self.wte(idx) * math.sqrt(d) + sinusoids(positions, d)

    def output(self, x: mx.array) -> mx.array:
        return self.wte.as_linear(x)


class GPT1(PostLNTransformer):
    """Radford et al., simplified: learned positions and an output layer of its own."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def embed(self, idx: mx.array, positions: mx.array) -> mx.array:
        return self.wte(idx) + self.wpe(positions)

    def output(self, x: mx.array) -> mx.array:
        return self.head(x)
