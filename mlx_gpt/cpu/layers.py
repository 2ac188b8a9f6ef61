"""``accelerate(model)``: the one place where a model meets the CPU's kernels.

Models are written with MLX's plain layers (``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GELU``, ``nn.Embedding``) and ``mx.fast.scaled_dot_product_attention``, which is what Metal and CUDA
run best. On the CPU, each such layer is given a subclass computed by ``ops`` instead: its class
is swapped in place, so parameters, names and checkpoints stay exactly what they were.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.cache import PrefixMask
from ..models.gpt import CausalSelfAttention, Packed
from . import attention as attn
from . import ops


class Linear(nn.Linear):
    """Weight gradients come out laid out like the weights (see ``ops.linear``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.linear(x, self.weight, self.bias if "bias" in self else None)


class LayerNorm(nn.LayerNorm):
    """Row statistics by BLAS products (see ``ops.layer_norm``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.layer_norm(x, self.weight if "weight" in self else None, self.bias if "bias" in self else None,
                              self.eps)


class RMSNorm(nn.RMSNorm):
    """Row statistics in one vectorized pass (see ``ops.rms_norm``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.rms_norm(x, self.weight, self.eps)


class GELU(nn.GELU):
    """The tanh approximation built from fused, vectorized operations (see ``ops.gelu_approx``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.gelu_approx(x) if self._approx in ("precise", "tanh") else super().__call__(x)


class Embedding(nn.Embedding):
    """A tied head (``as_linear``) through ``ops.linear``."""

    def as_linear(self, x: mx.array) -> mx.array:
        return ops.linear(x, self.weight)


class Attention(CausalSelfAttention):
    """Causal attention computed by ``attention.attention``."""

    def attend(self, q, k, v, scale, mask):
        if isinstance(mask, PrefixMask):  # a fixed-capacity cache: only its written positions count
            return attn.cache_attention(q, k, v, scale, mask)
        dropout = self.attn_dropout if self.training and self.attn_pdrop > 0 else None
        if isinstance(mask, Packed):  # rows of several examples, each seeing only itself (--pack)
            return attn.attention(q, k, v, scale=scale, causal=True, dropout=dropout, packed=mask)
        return attn.attention(q, k, v, scale=scale, causal=mask == "causal", dropout=dropout)


SWAPS = {nn.Linear: Linear, nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.GELU: GELU, nn.Embedding: Embedding,
         CausalSelfAttention: Attention}


def accelerate(model: nn.Module) -> nn.Module:
    """On the CPU, swap each plain layer of ``model`` for its CPU twin (same parameters); returns it."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return model
    for _, module in model.named_modules():
        twin = SWAPS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    return model
