"""What the ladder's language models share, so that training, evaluation, checkpoints and
generation treat every one of them alike: a frozen config that round-trips through
config.json, and the ``block_size`` and ``num_params`` those callers read."""

from __future__ import annotations

from contextlib import contextmanager
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
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off inside the block (evaluating, sampling); the model's mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
