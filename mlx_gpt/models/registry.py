"""Model types by name, so a checkpoint's config.json says which class to rebuild."""

from __future__ import annotations

from typing import Any

from ..errors import UserError


def model_types() -> dict[str, tuple[type, type]]:
    """name -> (config class, model class). Imports lazily to keep start-up light."""
    from .feedforward import FeedForwardConfig, FeedForwardLM
    from .gpt import GPT, GPTConfig
    from .modern import ModernConfig, ModernGPT
    from .ngram import NGram, NGramConfig
    from .recurrent import LSTM, ElmanRNN, RecurrentConfig
    from .transformer import GPT1, TransformerLM

    return {"gpt": (GPTConfig, GPT), "ngram": (NGramConfig, NGram), "bengio": (FeedForwardConfig, FeedForwardLM),
            "rnn": (RecurrentConfig, ElmanRNN), "lstm": (RecurrentConfig, LSTM),
            "transformer": (GPTConfig, TransformerLM), "gpt1": (GPTConfig, GPT1),
            "modern": (ModernConfig, ModernGPT)}


def build_model(model_type: str, config: dict) -> Any:
    """An uninitialised model of a type from its config dict, in plain MLX layers."""
    types = model_types()
    if model_type not in types:
        raise UserError(f"unknown model type {model_type!r}; choose from {', '.join(types)}")
    config_cls, model_cls = types[model_type]
    return model_cls(config_cls.from_dict(config))


def model_type_of(model: Any) -> str:
    for name, (_, cls) in model_types().items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a registered model type")
