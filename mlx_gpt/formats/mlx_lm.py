"""mlx-lm's GPT-2 directory: config.json, model.safetensors, and the tokenizer transformers reads.

mlx-lm's ``models/gpt2.py`` nests GPT-2 under ``model.`` (``model.wte.weight``,
``model.h.0.attn.c_attn.weight``, ...) with Linear weights (out, in), ties the head to wte,
and transposes only weights that arrive without the ``model.`` prefix (Hugging Face's Conv1D
layout). So ours are written prefixed and untransposed, and its ``sanitize`` leaves them be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ..tokenizer import Tokenizer
from ..models.gpt import GPTConfig
from . import hf_tokenizer
from .safetensors_file import write_safetensors
from .tensors import LazyTensor

PREFIX = "model."


def config_dict(cfg: GPTConfig, eot_id: int | None) -> dict:
    """The fields of mlx-lm's gpt2 ModelArgs, plus what its generate reads for stopping."""
    d = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
         "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
         "n_layer": cfg.n_layer, "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": True}
    d["bos_token_id"] = d["eos_token_id"] = eot_id  # null when there is none, never GPT-2's default
    return d


def write_directory(directory: Path, cfg: GPTConfig, weights: Mapping[str, LazyTensor],
                    tokenizer: Tokenizer | None, *, progress: bool = False) -> None:
    """Write an mlx-lm model directory; weights given under our names in MLX's layout."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    (directory / "config.json").write_text(json.dumps(config_dict(cfg, eot), indent=2) + "\n")
    prefixed = {PREFIX + name: t for name, t in weights.items()}
    write_safetensors(directory / "model.safetensors", prefixed, metadata={"format": "mlx"}, progress=progress)
    if tokenizer is not None:
        hf_tokenizer.write_tokenizer(directory, tokenizer, cfg.block_size)
