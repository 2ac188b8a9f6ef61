"""Dynamic loss scaling, which makes float16 mixed precision train (``--dtype float16``).

float16 keeps 10 bits of mantissa and ends at 6e-8: the gradients of a mean loss over a batch
of thousands of positions fall below that on their way back through the network and round to
zero. The backward pass is therefore run on the loss times a scale (2**16 to start), which lifts
the gradients into float16's range; they are divided by it again in float32 before clipping and
AdamW see them. A scale too large makes some gradient overflow instead: that step is skipped
(weights and AdamW's state, its step count included, stay as they were) and the scale halved.
After ``growth_interval`` good steps in a row the scale doubles, to find the largest that
fits. This is the rule of PyTorch's ``torch.amp.GradScaler``, with its defaults.

The whole rule runs inside the compiled step: the scale is state the step reads and writes, as
AdamW's moments are, and a skip is a selection between the old and the new values rather than
a branch, so no step waits on the host. The finite check reads the gradients' global norm,
which clipping computes anyway, after the gradients are averaged over the ranks: every rank
sees the same norm and skips the same steps. (A norm also overflows for a finite unscaled
gradient beyond 1e19, which PyTorch would apply; unscaled float16 gradients never come near.)
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_map

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
# A scale halved this far below 1 means float16 cannot hold the run's gradients at all: a run
# would otherwise go on skipping every step (and, once the scale reaches 0, apply zeros).
MIN_SCALE = 2.0**-16


@mx.custom_function
def _scale_gradient(loss: mx.array, scale: mx.array) -> mx.array:
    """``loss`` itself, whose gradient is multiplied by ``scale`` on its way back."""
    return loss


@_scale_gradient.vjp
def _scale_gradient_vjp(primals, cotangent, output):
    _, scale = primals
    return cotangent * scale.astype(cotangent.dtype), mx.zeros_like(scale)


class LossScaler:
    """The scale of float16 runs' backward passes and its update rule (``torch.amp.GradScaler``'s).

    ``state`` holds arrays the compiled step takes in and gives back: the ``scale``, the good
    steps in a row since it last changed (``good_steps``), and the steps skipped in the whole
    run (``skipped``).
    """

    def __init__(self, init_scale: float = INIT_SCALE, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.growth_interval = growth_interval
        self.state = {"scale": mx.array(init_scale, mx.float32), "good_steps": mx.array(0, mx.int32),
                      "skipped": mx.array(0, mx.int32)}

    def scaled(self, loss: Callable) -> Callable:
        """``loss(model, x, y)``, whose gradients come out multiplied by the scale (its value unchanged)."""
        def f(model, x: mx.array, y: mx.array, **packed) -> mx.array:  # packed rows' positions (training.step)
            return _scale_gradient(loss(model, x, y, **packed), self.state["scale"])

        return f

    def guarded(self, update: Callable) -> Callable:
        """``update(model, optimizer, grads, stream_for=None) -> norm`` (``optim.clip_and_update``) for
        scaled gradients: they are unscaled first, and a step whose gradients are not all finite
        leaves the model and the optimizer as they were. Updates the scale either way."""

        def f(model, optimizer, grads: dict, stream_for: Callable[[mx.array], mx.Stream] | None = None) -> mx.array:
            def place(a: mx.array):  # a parameter's share of the work on its stream (not the step count's)
                return mx.stream(stream_for(a)) if stream_for is not None and a.ndim else nullcontext()

            inverse = mx.reciprocal(self.state["scale"])  # exact: the scale is a power of two

            def unscale(g: mx.array) -> mx.array:
                with place(g):
                    return (g * inverse).astype(g.dtype)

            params, opt_state = model.trainable_parameters(), tree_map(lambda a: a, optimizer.state)
            norm = update(model, optimizer, tree_map(unscale, grads), stream_for=stream_for)
            finite = mx.isfinite(norm)  # a NaN or infinity anywhere makes the sum of squares one

            def keep(new: mx.array, old: mx.array) -> mx.array:
                with place(old):
                    return mx.where(finite, new, old)

            model.update(tree_map(keep, model.trainable_parameters(), params))
            _assign(optimizer.state, tree_map(keep, optimizer.state, opt_state))
            self.state.update(self.next_state(finite))
            return norm

        return f

    def next_state(self, finite: mx.array) -> dict:
        """The state after a step whose gradients were (``finite``) or were not all finite."""
        scale, good, skipped = self.state["scale"], self.state["good_steps"], self.state["skipped"]
        good = mx.where(finite, good + 1, 0)
        grown = scale * GROWTH_FACTOR
        grow = finite & (good >= self.growth_interval) & mx.isfinite(grown)
        scale = mx.where(finite, mx.where(grow, grown, scale), scale * BACKOFF_FACTOR)
        good = mx.where(finite & (good >= self.growth_interval), 0, good)
        return {"scale": scale, "good_steps": good, "skipped": skipped + mx.where(finite, 0, 1)}

    def state_dict(self) -> dict:
        """The state as plain numbers, for a checkpoint's state.json (the scale is a power of two: exact)."""
        return {k: v.item() for k, v in self.state.items()}

    def load_state_dict(self, saved: dict) -> None:
        self.state.update({k: mx.array(saved[k], v.dtype) for k, v in self.state.items()})


def _assign(tree, values) -> None:
    """Write the leaves of ``values`` into ``tree`` (same structure) in place: the compiled step
    captured ``tree``'s containers, not copies of them."""
    keys = range(len(tree)) if isinstance(tree, list) else tree.keys()
    for k in keys:
        if isinstance(tree[k], (dict, list)):
            _assign(tree[k], values[k])
        else:
            tree[k] = values[k]
