"""mlx-lm's GPT-2 directory: config.json, model.safetensors, and the tokenizer transformers reads.

mlx-lm's ``models/gpt2.py`` nests GPT-2 under ``model.`` (``model.wte.weight``,
``model.h.0.attn.c_attn.weight``, ...) with Linear weights (out, in), ties the head to wte,
and transposes only weights that arrive without the ``model.`` prefix (Hugging Face's Conv1D
layout). So ours are written prefixed and untransposed, and its ``sanitize`` leaves them be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..tokenizer import Tokenizer
from ..models.gpt import GPTConfig
from . import hf
from .tensors import LazyTensor

PREFIX = "model."


# mlx-lm reads GPT-2's config.json as transformers writes it: its gpt2 ModelArgs takes the fields it
# knows, and its generate stops at the end-of-text id (null when there is none, never GPT-2's default)
config_dict = hf.config_dict


def write_directory(directory: Path, cfg: GPTConfig, weights: Mapping[str, LazyTensor],
                    tokenizer: Tokenizer | None, *, progress: bool = False) -> None:
    """Write an mlx-lm model directory; weights given under our names in MLX's layout."""
    hf.write_files(directory, cfg, {PREFIX + name: t for name, t in weights.items()}, "mlx", tokenizer, progress)
