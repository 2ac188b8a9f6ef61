"""The loss, defined once for training, evaluation and perplexity: next-token cross-entropy in float32."""

from __future__ import annotations

import mlx.core as mx

from .cpu import ops


def cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-position cross-entropy (...,) of ``logits`` (..., V) against ``targets`` (...), in float32
    whatever the model's dtype; ``nn.losses.cross_entropy``'s values, faster on the CPU."""
    return ops.cross_entropy(logits.astype(mx.float32), targets, label_smoothing=label_smoothing)
