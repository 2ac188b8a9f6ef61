"""A modern GPT: GPT-2 with the changes small-model speedruns (modded-nanogpt, nanochat) settled on.

Rotary positions instead of learned ones, RMSNorm instead of LayerNorm, RMS-normalised queries
and keys (QK-norm), a squared-ReLU MLP, an output head of its own, no biases, logits soft-capped
by ``softcap * tanh(logits / softcap)``, and the output projections of every block (and the
head) initialised to zero, so each block starts as the identity. Each change is a config field
of its own, so any of them can be switched off alone; with all of them off the model is GPT-2,
weight for weight (same names, same init, same logits).

It reuses GPT-2's parts: the attention module (which also does QK-norm and RoPE, ``gpt.py``),
the MLP, the cache and the initialisation, and weights keep GPT-2's names where they
correspond (``wte``, ``h.{i}.ln_1``, ``attn.c_attn``, ``mlp.c_proj``, ``ln_f``); the untied
head is ``lm_head``, as in nanoGPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from .base import LanguageModel, ModelConfig
from .cache import KVCache
from .gpt import MLP, CausalSelfAttention, Packed, init_weights, run_blocks

# the changes from GPT-2, by config field (a ``--changes`` list names them)
CHANGES = ("rope", "rms_norm", "qk_norm", "relu2", "untied", "no_bias", "softcap", "zero_init")
SOFTCAP = 15.0  # nanochat's cap on the logits


@dataclass(frozen=True)
class ModernConfig(ModelConfig):
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    rope: bool = True  # rotary positions (else GPT-2's learned wpe)
    rms_norm: bool = True  # RMSNorm (else LayerNorm)
    qk_norm: bool = True  # each head's queries and keys RMS-normalised before attention
    relu2: bool = True  # relu(x)^2 in the MLP (else tanh GELU)
    untied: bool = True  # an output head of its own (else wte's transpose)
    no_bias: bool = True  # no biases in linear layers and norms
    softcap: float = SOFTCAP  # logits capped smoothly at +-softcap (0: off)
    zero_init: bool = True  # output projections and head start at zero

    def __post_init__(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise UserError(f"rotary positions need an even head size, got {self.n_embd // self.n_head}")
        if not (self.softcap >= 0 and math.isfinite(self.softcap)):
            raise UserError(f"softcap must be 0 (off) or a positive number, got {self.softcap}")
        self.require_dropout()

    @property
    def bias(self) -> bool:
        """GPT-2's ``bias`` field, as the shared layers read it."""
        return not self.no_bias

    @classmethod
    def with_changes(cls, changes: str, **fields) -> "ModernConfig":
        """The config making only the listed changes ("all", "none", or names from CHANGES,
        comma-separated) on top of GPT-2."""
        names = set(CHANGES) if changes.strip() == "all" else {c.strip() for c in changes.split(",") if c.strip()}
        names.discard("none")
        unknown = sorted(names - set(CHANGES))
        if unknown:
            raise UserError(f"unknown change {unknown[0]!r}; choose from all, none, {', '.join(CHANGES)}")
        flags = {c: c in names for c in CHANGES}
        flags["softcap"] = SOFTCAP if flags["softcap"] else 0.0
        return cls(**{**flags, **fields})


class ReLU2MLP(MLP):
    """GPT-2's MLP with relu(x)^2 (So et al., Primer) in place of GELU, written h * relu(h): the
    same values and gradient, and on MLX's CPU backend one fused pass several times faster than
    squaring."""

    def __call__(self, x: mx.array) -> mx.array:
        h = self.c_fc(x)
        return self.dropout(self.c_proj(h * nn.relu(h)))


def norm(cfg: ModernConfig, dims: int) -> nn.Module:
    if cfg.rms_norm:
        return nn.RMSNorm(dims, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(dims, eps=cfg.layer_norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.ln_1 = norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg, cfg.n_embd)
        self.mlp = ReLU2MLP(cfg) if cfg.relu2 else MLP(cfg)

    def __call__(self, x: mx.array, cache: KVCache | None = None, packed: Packed | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache, packed)
        return x + self.mlp(self.ln_2(x))


class ModernGPT(LanguageModel):
    # positions and masks come from the cache, as GPT's: generation may compile its step
    accepts_fixed_cache = True
    packs = True  # takes packed rows' positions (``gpt.Packed``)

    def __init__(self, cfg: ModernConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if not cfg.rope:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = [Block(cfg) for _ in range(cfg.n_layer)]
        self.ln_f = norm(cfg, cfg.n_embd)
        if cfg.untied:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None, positions: mx.array | None = None
                 ) -> mx.array:
        """Logits (B, T, vocab) for token ids (B, T); with a cache, positions continue after it;
        with ``positions`` (B, T), each row holds several examples (``gpt.Packed``)."""
        return self.head(self.features(idx, cache, positions))

    def features(self, idx: mx.array, cache: list[KVCache] | None = None, positions: mx.array | None = None
                 ) -> mx.array:
        """The final hidden states (B, T, C) that ``head`` turns into logits."""
        T = idx.shape[1]
        offset = cache[0].offset if cache else 0  # an int, or an array inside a compiled decode step
        if isinstance(offset, int) and offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if "wpe" in self:
            x = x + self.wpe(offset + mx.arange(T) if positions is None else positions)
        packed = Packed(positions) if positions is not None else None
        return self.ln_f(run_blocks(self.h, self.drop(x), cache, packed))

    def head(self, h: mx.array) -> mx.array:
        """Logits of final hidden states: the output layer (or ``wte``, tied), soft-capped."""
        logits = self.lm_head(h) if "lm_head" in self else self.wte.as_linear(h)
        cap = self.config.softcap
        return cap * mx.tanh(logits / cap) if cap else logits

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]


def build(cfg: ModernConfig, seed: int = 0) -> ModernGPT:
    """GPT-2's initialisation, then (``zero_init``) every block's output projections and the head
    set to zero, as nanochat does: each block starts as the identity and the first logits are
    uniform."""
    model = ModernGPT(cfg)
    init_weights(model, seed)
    if cfg.zero_init:
        for block in model.h:
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
        if "lm_head" in model:
            model.lm_head.weight = mx.zeros_like(model.lm_head.weight)
    mx.eval(model.parameters())
    return model
