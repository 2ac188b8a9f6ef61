"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the blocks' 2-D weights.

A hidden weight's update is its Nesterov momentum with every singular value pushed to about
one (Jordan et al., "Muon: an optimizer for hidden layers"), so no direction of the matrix
dominates the step; the embeddings, the head, norms, biases and scalars keep AdamW, as the
references prescribe. The rule is ``torch.optim.Muon``'s, step for step: the momentum an
exponential average (``buf += (1 - mu) (g - buf)``), the Nesterov blend ``g + mu (buf - g)``,
five quintic iterations (in bfloat16 as the references, or float32 on the CPU:
``backend.orthogonalise_dtype``) on the matrix scaled to unit Frobenius norm (its wide
orientation), weight decay ``lr * wd`` and the step scaled by sqrt(max(1, rows / cols)).

Which parameters Muon takes is decided once, by name, when the state is made: theirs holds a
momentum buffer ``b``, everyone else's AdamW's ``m`` and ``v``. So the saved state says which
is which, a resumed run continues each exactly, and ``apply_single`` reads the kind from it;
the step, clipping, accumulation and streams are AdamW's own (``optim``).
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten

from . import backend
from .optim import AdamW

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c), as torch.optim.Muon
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalise(g: mx.array, dtype: mx.Dtype = mx.bfloat16, steps: int = NS_STEPS) -> mx.array:
    """About U V^T of g = U S V^T (singular values land in roughly [0.5, 1.5]), computed in ``dtype``
    (bfloat16 as the references: the iteration needs no more)."""
    a, b, c = NS_COEFFICIENTS
    x = g.astype(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)))).astype(dtype)
    x = x / mx.maximum(norm, NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = mx.addmm(x, mx.addmm(gram, gram, gram, alpha=c, beta=b), x, alpha=1.0, beta=a)
    return x.T if tall else x


def takes_muon(name: str, p: mx.array) -> bool:
    """A transformer block's 2-D weight (``h.{i}...weight``), LoRA's adapters aside."""
    return p.ndim == 2 and name.startswith("h.") and name.endswith(".weight")


class Muon(AdamW):
    """Muon for the blocks' 2-D weights, bias-corrected AdamW (``optim.AdamW``) for the rest.

    ``lr_ratio`` scales the shared schedule for Muon's weights (its peak over AdamW's), so
    one schedule drives both and the whole update stays inside the compiled step.
    """

    def __init__(self, *args, lr_ratio: float, momentum: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lr_ratio, self.momentum = lr_ratio, momentum
        self.ns_dtype = backend.orthogonalise_dtype()  # the Newton-Schulz iteration's

    def init(self, parameters: dict) -> None:
        """AdamW's state for every parameter, then a momentum buffer in place of it for Muon's; a
        state already there (a resumed run's, set before the first step) is kept."""
        super().init(parameters)
        for name, p in tree_flatten(parameters):
            if takes_muon(name, p):
                *path, leaf = name.split(".")
                node = self.state
                for part in path:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                if "b" not in node[leaf]:
                    node[leaf] = {"b": mx.zeros_like(p)}

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if "b" not in state:
            return super().apply_single(gradient, parameter, state)
        mu = self.momentum
        state["b"] = state["b"] + (1 - mu) * (gradient - state["b"])
        nesterov = state["b"] - (state["b"] - gradient) * (1 - mu)
        update = orthogonalise(nesterov, self.ns_dtype).astype(parameter.dtype)
        lr = self.learning_rate.astype(parameter.dtype) * self.lr_ratio
        rows, cols = parameter.shape
        return parameter * (1 - lr * self.weight_decay) - (lr * math.sqrt(max(1.0, rows / cols))) * update
