"""GPT-2, exactly: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, head tied to wte.

Parameters carry GPT-2's own names (``wte``, ``wpe``, ``h.{i}.ln_1``, ``attn.c_attn``, ...), so
an imported GPT-2 checkpoint is a transpose of the Conv1D weights and nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from .base import LanguageModel, ModelConfig
from .cache import KVCache, PrefixMask

ROPE_BASE = 10000.0  # rotary positions' base wavelength (Su et al.; nanochat and Llama use it too)


@dataclass(frozen=True)
class GPTConfig(ModelConfig):
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.require_dropout()


# GPT-2's four released shapes, plus two that train on a laptop CPU. The tiny and baby presets
# leave vocab_size to the tokenizer (train.py sets it); 50257 is only their placeholder.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # byte-level, a few minutes on two CPU cores
    "tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare-char model
    "baby": dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
}


class Packed:
    """Rows that hold several examples each (``--pack``): ``positions`` (B, T) int32 restart at 0 where
    an example starts and count up by one within it. A token's position (``wpe``, RoPE) is its
    place in its own example, and it attends only to its own example's tokens up to itself, so
    each example computes what it would alone in a row."""

    def __init__(self, positions: mx.array):
        self.positions = positions

    def starts(self) -> mx.array:
        """(B, T) int32: each token's example's first index in the row."""
        return mx.arange(self.positions.shape[-1], dtype=mx.int32) - self.positions

    def as_array(self) -> mx.array:
        """(B, 1, T, T) bool: query i sees key j of its own example at or before it."""
        j = mx.arange(self.positions.shape[-1], dtype=mx.int32)
        return ((j[None, None] <= j[None, :, None]) & (j[None, None] >= self.starts()[..., None]))[:, None]


def rope_at(x: mx.array, positions: mx.array) -> mx.array:
    """``mx.fast.rope``'s rotation (not traditional, base ``ROPE_BASE``) of x (B, nh, T, hs) with
    each token at its own position (B, T), which ``mx.fast.rope``'s offsets (one per row) cannot say."""
    half = x.shape[-1] // 2
    freqs = ROPE_BASE ** (-mx.arange(half, dtype=mx.float32) / half)
    angles = positions[:, None, :, None].astype(mx.float32) * freqs  # (B, 1, T, hs / 2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def preset(name: str, **overrides) -> GPTConfig:
    """A preset's config with any field overridden (``preset("tiny", vocab_size=4096)``)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    """GPT-2's attention. A config with ``qk_norm`` or ``rope`` set (``modern.ModernConfig``) also
    RMS-normalises each head's queries and keys, then rotates them by their positions: the one
    attention module serves both models, and every backend's version of it."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_pdrop = cfg.dropout
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rope = getattr(cfg, "rope", False)
        if getattr(cfg, "qk_norm", False):
            self.q_norm = nn.RMSNorm(cfg.n_embd // cfg.n_head, eps=cfg.layer_norm_eps)
            self.k_norm = nn.RMSNorm(cfg.n_embd // cfg.n_head, eps=cfg.layer_norm_eps)

    def position(self, q: mx.array, k: mx.array, offset: int | mx.array | Packed) -> tuple[mx.array, mx.array]:
        """Queries and keys (B, nh, T, hs) normalised and rotated where the config says so; the
        first of the T is at position ``offset`` (an int, or an array: one, or one per row), or
        each token at its own (``Packed``)."""
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope and isinstance(offset, Packed):
            q, k = rope_at(q, offset.positions), rope_at(k, offset.positions)
        elif self.rope:
            if isinstance(offset, mx.array) and offset.ndim:
                offset = offset.reshape(-1)  # (B, 1) -> (B,): each row's own position
            hs = q.shape[-1]
            q = mx.fast.rope(q, hs, traditional=False, base=ROPE_BASE, scale=1.0, offset=offset)
            k = mx.fast.rope(k, hs, traditional=False, base=ROPE_BASE, scale=1.0, offset=offset)
        return q, k

    def __call__(self, x: mx.array, cache: KVCache | None = None, packed: Packed | None = None) -> mx.array:
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if self.rope or "q_norm" in self:
            q, k = self.position(q, k, packed or (cache.offset if cache is not None else 0))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            mask = cache.attention_mask(T)
        else:
            mask = packed or ("causal" if T > 1 else None)
        y = self.attend(q, k, v, scale=1.0 / math.sqrt(C // self.n_head), mask=mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float,
               mask: str | PrefixMask | Packed | None) -> mx.array:
        """softmax(q k^T * scale, masked) v; "causal" is aligned to the last query, which is what a
        prefill after cached positions needs. With dropout (training only), the attention
        weights are dropped as in GPT-2 and nanoGPT, which needs them written out."""
        if isinstance(mask, (PrefixMask, Packed)):
            mask = mask.as_array()
        if self.training and self.attn_pdrop > 0:  # training has no cache: mask is "causal" or packed rows'
            scores = (q * scale) @ k.swapaxes(-1, -2)
            if isinstance(mask, mx.array):
                scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
            elif mask is not None:
                T, S = q.shape[2], k.shape[2]
                scores = scores + nn.MultiHeadAttention.create_additive_causal_mask(S)[S - T:].astype(scores.dtype)
            return self.attn_dropout(mx.softmax(scores, axis=-1, precise=True)) @ v
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approx="tanh")  # GPT-2's tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array, cache: KVCache | None = None, packed: Packed | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache, packed)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: list, x: mx.array, cache: list[KVCache] | None, packed: Packed | None) -> mx.array:
    """x through the blocks, each with its layer's cache, or with the packed rows' positions."""
    for i, block in enumerate(blocks):
        x = block(x, cache[i] if cache else None) if packed is None else block(x, None, packed)
    return x


class GPT(LanguageModel):
    # positions and attention masks come from the cache, so generation may hand it
    # fixed-capacity caches (cache.FixedKVCache) and compile its one-token step
    accepts_fixed_cache = True
    packs = True  # takes packed rows' positions (``Packed``)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = [Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None, positions: mx.array | None = None
                 ) -> mx.array:
        """Logits (B, T, vocab) for token ids (B, T); with a cache, positions continue after it;
        with ``positions`` (B, T), each row holds several examples (``Packed``)."""
        return self.head(self.features(idx, cache, positions))

    def head(self, h: mx.array) -> mx.array:
        """Logits of final hidden states: the head, tied to ``wte``."""
        return self.wte.as_linear(h)

    def features(self, idx: mx.array, cache: list[KVCache] | None = None, positions: mx.array | None = None
                 ) -> mx.array:
        """The final hidden states (B, T, C) that the head (``wte`` as a linear map) turns into logits."""
        B, T = idx.shape
        offset = cache[0].offset if cache else 0  # an int, or an array inside a compiled decode step
        if isinstance(offset, int) and offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.config.block_size}")
        packed = Packed(positions) if positions is not None else None
        x = self.drop(self.wte(idx) + self.wpe(offset + mx.arange(T) if packed is None else positions))
        return self.ln_f(run_blocks(self.h, x, cache, packed))

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count with the tied head counted once (GPT-2 124M: 124,439,808)."""
        n = super().num_params()
        return n - self.wpe.weight.size if non_embedding else n


def init_weights(model: GPT, seed: int) -> None:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    key = mx.random.key(seed)
    resid_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    params = nn.utils.tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if _is_norm(name) or name.endswith(".bias"):
            new.append((name, mx.ones_like(p) if name.endswith("weight") and _is_norm(name) else mx.zeros_like(p)))
        else:
            std = resid_std if name.endswith("c_proj.weight") else 0.02
            new.append((name, std * mx.random.normal(p.shape, key=k)))
    model.load_weights(new)


def _is_norm(name: str) -> bool:
    """Whether a parameter belongs to a norm (``ln_1``, ``ln_f``, ``attn.q_norm``)."""
    return name.startswith("ln") or ".ln_" in name or "_norm." in name


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    model = GPT(cfg)
    init_weights(model, seed)
    mx.eval(model.parameters())
    return model
