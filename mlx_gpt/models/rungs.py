"""The rungs of the language-model ladder, in the order the field climbed them, and how to
build each one.

A rung spec is a name — unigram, bigram, ngram, kneser-ney, bengio, rnn, lstm, transformer,
gpt1, gpt, modern — and, for ``ngram`` and ``kneser-ney``, optionally the order n: ``ngram:4``,
``kneser-ney:6``. Count rungs are fitted on the training tokens when built; neural rungs come
back initialised, to be trained by ``train.py``'s compiled step. The neural defaults (0.3-0.9M
parameters) are sized to take a few optimizer steps a second on two CPU cores at the ladder's
batch, so a one-minute budget shows each of them learning; the recurrent ones are narrower
because they step through the block one token at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import UserError

# name -> (smoothing, default order); unigram and bigram are add-k n-grams of a fixed order
COUNT = {"unigram": ("add-k", 1), "bigram": ("add-k", 2), "ngram": ("add-k", 3), "kneser-ney": ("kneser-ney", 5)}
# name -> (registered model type, config fields beyond vocab_size and block_size)
NEURAL = {
    "bengio": ("bengio", dict(context=16, n_embd=32, n_hidden=768)),
    "rnn": ("rnn", dict(n_layer=2, n_embd=256)),
    "lstm": ("lstm", dict(n_layer=2, n_embd=128)),
    "transformer": ("transformer", dict(n_layer=4, n_head=4, n_embd=128)),
    "gpt1": ("gpt1", dict(n_layer=4, n_head=4, n_embd=128)),
    "gpt": ("gpt", dict(n_layer=4, n_head=4, n_embd=128)),  # the "tiny" preset
    "modern": ("modern", dict(n_layer=4, n_head=4, n_embd=128)),  # the same shape, today's recipe
}
RUNGS = tuple(COUNT) + tuple(NEURAL)
# the centre of the ladder's learning-rate search for each neural rung (AdamW, warmup, cosine decay)
LEARNING_RATE = {"bengio": 2e-3, "rnn": 3e-3, "lstm": 5e-3, "transformer": 1e-3, "gpt1": 1e-3, "gpt": 2e-3,
                 "modern": 2e-3}
BLOCK_SIZE = 64  # nanoGPT's CPU recipe's context: on two cores a longer one costs the attention rungs steps
ADD_K = 0.01
TIED_HEAD = {"gpt", "transformer"}  # model types whose output layer is wte itself


@dataclass(frozen=True)
class Rung:
    spec: str  # as written: "ngram:4"
    name: str  # "ngram"
    order: int | None = None  # n of the n-gram rungs

    @property
    def counted(self) -> bool:
        return self.name in COUNT

    @property
    def model_type(self) -> str:
        return "ngram" if self.counted else NEURAL[self.name][0]


def parse(spec: str) -> Rung:
    """A rung from its spec; an unknown name, a stray order or n < 1 is a UserError."""
    name, sep, n = spec.strip().partition(":")
    if name not in COUNT and name not in NEURAL:
        raise UserError(f"unknown rung {name!r}; choose from {', '.join(RUNGS)}")
    if not sep:
        return Rung(spec, name, COUNT[name][1] if name in COUNT else None)
    if name not in ("ngram", "kneser-ney"):
        raise UserError(f"rung {name!r} takes no order; only ngram:N and kneser-ney:N do")
    try:
        order = int(n)
    except ValueError:
        raise UserError(f"rung {spec!r}: the order must be a whole number, got {n!r}") from None
    if order < 1:
        raise UserError(f"rung {spec!r}: n must be at least 1, got {order}")
    return Rung(spec, name, order)


def model_config(rung: Rung, vocab_size: int, overrides: dict | None = None) -> dict:
    """The config dict of a rung's model: its defaults, the vocabulary, then overrides
    (``block_size``, ``n_layer``, ...); one that the rung's model does not have is an error."""
    from .registry import model_types

    if rung.counted:
        smoothing, _ = COUNT[rung.name]
        base = dict(order=rung.order, smoothing=smoothing, k=ADD_K)
    else:
        base = dict(NEURAL[rung.name][1])
    config = {**base, "vocab_size": vocab_size, "block_size": BLOCK_SIZE}
    overrides = dict(overrides or {})
    if rung.model_type == "modern" and overrides.get("changes") is not None:  # the switches, by name
        from .modern import CHANGES, ModernConfig

        switches = ModernConfig.with_changes(overrides.pop("changes")).to_dict()
        config.update({k: switches[k] for k in CHANGES})
    known = {f.name for f in fields(model_types()[rung.model_type][0])}
    for key, value in overrides.items():
        if key not in known or key in ("sizes", "fanout"):
            raise UserError(f"--{key.replace('_', '-')} does not apply to the {rung.name} rung")
        config[key] = value
    return config


def build(rung: Rung | str, vocab_size: int, *, tokens: np.ndarray | str | os.PathLike | None = None,
          overrides: dict | None = None, seed: int = 0) -> Any:
    """The rung's model: fitted on the training ``tokens`` (or the token file holding them) for
    count rungs, freshly initialised otherwise."""
    from . import ngram
    from ..data import open_tokens
    from . import gpt, modern
    from .registry import build_model

    rung = parse(rung) if isinstance(rung, str) else rung
    config = model_config(rung, vocab_size, overrides)
    if rung.counted:
        if tokens is None:
            raise ValueError("a count rung is built by fitting: pass the training tokens")
        if not isinstance(tokens, np.ndarray):
            tokens = open_tokens(tokens)
        return ngram.fit(tokens, ngram.NGramConfig(**config))
    if rung.model_type == "gpt":
        return gpt.build(gpt.GPTConfig(**config), seed=seed)
    if rung.model_type == "modern":
        return modern.build(modern.ModernConfig(**config), seed=seed)
    mx.random.seed(seed)  # MLX's default initialisers draw from the global generator
    model = build_model(rung.model_type, config)
    mx.eval(model.parameters())
    return model


def flops_per_token(model: Any, model_type: str) -> float:
    """Training FLOPs per token, as nanoGPT and the PaLM paper count them: 6 per weight a token
    passes through (2 forward, 4 backward), plus 12·n_layer·n_embd·block_size for attention.
    Embedding lookups cost nothing, but a head tied to wte costs its matmul."""
    params = dict(tree_flatten(model.parameters()))
    lookups = sum(params[k].size for k in ("wte.weight", "wpe.weight") if k in params)
    if model_type in TIED_HEAD:
        lookups -= params["wte.weight"].size
    c = model.config
    attention = 12 * c.n_layer * c.n_embd * c.block_size if hasattr(c, "n_head") else 0
    return 6.0 * (sum(v.size for v in params.values()) - lookups) + attention
