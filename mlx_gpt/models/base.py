"""What the ladder's language models share, so that training, evaluation, checkpoints and
generation treat every one of them alike: a frozen config that round-trips through
config.json, and the ``block_size`` and ``num_params`` those callers read."""

from __future__ import annotations

import types
import typing
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import asdict, fields
from typing import Iterator

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError


class ModelConfig:
    """Base of a model's frozen dataclass config."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def check_types(cls, d: dict) -> None:
        """Each value as the config declares it (read from a file, it may be anything)."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in d:
                continue
            kind, value = hints[f.name], d[f.name]
            if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if kind not in (int, float, bool, str):
                continue
            number = kind is float and isinstance(value, int) and not isinstance(value, bool)
            if not (number or isinstance(value, kind)) or (kind is int and isinstance(value, bool)):
                raise UserError(f"model {f.name} must be {kind.__name__}, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        cls.check_types(d)
        return cls(**d)

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    def require_dropout(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


class LanguageModel(nn.Module):
    """Base of a model whose ``__call__(idx, cache=None)`` returns next-token logits (B, T, V)."""

    config: ModelConfig

    @property
    def block_size(self) -> int:
        """The longest sequence the model is trained on and reads at once."""
        return self.config.block_size

    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))


def mix_in(module: nn.Module, mixin: type) -> None:
    """Put ``mixin``'s methods in front of ``module``'s own by swapping its class in place for a
    subclass of both, under the same name: its parameters, their names and its checkpoints stay
    what they were (LoRA's adapted layers, recomputed blocks). A module that has it already keeps it."""
    if not isinstance(module, mixin):
        module.__class__ = _mixed(mixin, type(module))


@lru_cache(maxsize=None)
def _mixed(mixin: type, cls: type) -> type:
    return type(cls.__name__, (mixin, cls), {})


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off inside the block (evaluating, sampling); the model's mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
