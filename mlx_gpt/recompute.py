"""Gradient checkpointing: recompute each transformer block in the backward pass instead of
keeping its activations (``python -m mlx_gpt.train --grad-checkpoint``).

The model file stays plain: ``recompute_blocks`` gives each block of ``model.h`` a subclass whose
call goes through ``mx.checkpoint``, with the same parameters and names.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .models.base import mix_in
from .models.gpt import Packed


class _Recomputed:
    """A transformer block whose activations are recomputed in the backward pass instead of kept.

    Only the block's input survives the forward pass (``mx.checkpoint``); the backward pass runs
    the block again to rebuild what its gradient needs, so the same gradients cost one more
    forward pass and a block's activations instead of all of them.
    """

    def __call__(self, x: mx.array, cache=None, packed: Packed | None = None) -> mx.array:
        if cache is not None:  # generation: nothing is differentiated
            return super().__call__(x, cache)
        outer = self.trainable_parameters()
        rows = [] if packed is None else [packed.positions]  # packed rows' positions, an input like x

        def forward(params: dict, x: mx.array, *rows: mx.array) -> mx.array:
            # the recomputation must not leave its copies in the model: it runs in the backward
            # pass, when the model may hold other arrays than in the forward pass (mixed precision
            # has put its float32 master weights back in place of the cast ones)
            held = self.trainable_parameters()
            self.update(params)
            y = super(_Recomputed, self).__call__(x, *((None, Packed(rows[0])) if rows else ()))
            self.update(held)
            return y

        return mx.checkpoint(forward)(outer, x, *rows)


def recompute_blocks(model: nn.Module) -> nn.Module:
    """Give each block of ``model.h`` the recomputing ``__call__`` (same parameters); returns it."""
    if not hasattr(model, "h"):
        raise UserError("--grad-checkpoint applies to transformer models (those with blocks)")
    if model.config.dropout > 0:
        raise UserError("--grad-checkpoint needs --dropout 0: a recomputed block would draw new dropout masks "
                        "and its gradients would not be those of the forward pass")
    for block in model.h:
        mix_in(block, _Recomputed)
    return model
