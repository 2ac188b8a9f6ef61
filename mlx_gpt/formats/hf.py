"""Hugging Face transformers' GPT-2 directories: config.json, weights, tokenizer files.

Weights come as model.safetensors, sharded safetensors with model.safetensors.index.json,
pytorch_model.bin, or sharded .bin files with pytorch_model.bin.index.json; safetensors wins
when both are there. Names are ours with a ``transformer.`` prefix; the four projections are
Conv1D layers whose weights are stored (in, out), the transpose of MLX's Linear; the head is
tied to wte (lm_head.weight, when present, must equal it); the attention-mask buffers
``attn.bias`` / ``attn.masked_bias`` of older files are not weights and are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..tokenizer import Tokenizer, is_plain_file_name
from . import hf_tokenizer
from .json_file import read_json
from ..models.gpt import GPTConfig
from .safetensors_file import read_safetensors, write_safetensors
from .tensors import LazyTensor
from .torch_pickle import read_torch

PREFIX = "transformer."
HEAD = "lm_head.weight"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFER = re.compile(r"h\.(\d+)\.attn\.(bias|masked_bias)")
# the tanh approximation of GELU under its names in transformers; "gelu" (erf) is another function
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# GPT2Config's defaults, which a config.json may leave out
DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
WEIGHT_FILES = (("model.safetensors.index.json", read_safetensors), ("model.safetensors", read_safetensors),
                ("pytorch_model.bin.index.json", read_torch), ("pytorch_model.bin", read_torch))


def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def read_config(directory: Path) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json, refusing settings our model does not compute."""
    path = directory / "config.json"
    raw = read_json(path, missing=": a Hugging Face model directory needs its config.json")
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object")
    if raw.get("format") == "mlx_gpt":
        raise UserError(f"{directory} is already an mlx_gpt checkpoint; pass --to hf, llmc or mlx-lm to export it")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type {raw.get('model_type')!r} is not GPT-2")
    c = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    if c["activation_function"] not in TANH_GELU:
        raise UserError(f"{path}: activation {c['activation_function']!r} is not GPT-2's tanh GELU "
                        f"({', '.join(TANH_GELU)})")
    unsupported = {"n_inner": lambda v: v == 4 * c["n_embd"], "scale_attn_weights": lambda v: v is True,
                   "scale_attn_by_inverse_layer_idx": lambda v: v is False,
                   "add_cross_attention": lambda v: v is False, "tie_word_embeddings": lambda v: v is True}
    for key, ok in unsupported.items():
        if key in c and not ok(c[key]):
            raise UserError(f"{path}: {key}={c[key]!r} is not supported by mlx_gpt's GPT-2")
    for key in SIZES:  # whole numbers, never truncated (8.7 is a corrupt file, not a width of 8)
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
            raise UserError(f"{path}: {key} must be a whole number of at least 1, got {c[key]!r}")
    eps = c["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise UserError(f"{path}: layer_norm_epsilon must be a small positive number, got {eps!r}")
    return GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
                     n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0, bias=True, layer_norm_eps=float(eps))


def config_dict(cfg: GPTConfig, eot_id: int | None) -> dict:
    """config.json for GPT2LMHeadModel (dropout as GPT-2 trained with; inference ignores it)."""
    d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
         "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
         "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
         "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
         "attn_pdrop": cfg.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
         "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
         "use_cache": True, "torch_dtype": "float32"}
    # always written: left out, transformers would take GPT-2's 50256 even for a 256-token model
    d["bos_token_id"] = d["eos_token_id"] = eot_id
    return d


def read_weights(directory: Path) -> dict[str, LazyTensor]:
    """Every tensor of the directory's weight files, under the names the files use."""
    for name, reader in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _read_sharded(path, reader) if name.endswith(".index.json") else reader(path)
    raise UserError(f"{directory} has no weights ({', '.join(n for n, _ in WEIGHT_FILES)})")


def _read_sharded(index_path: Path, reader) -> dict[str, LazyTensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path} is not a valid shard index: its weight_map must map names to file names")
    tensors: dict[str, LazyTensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not is_plain_file_name(shard):
            raise UserError(f"{index_path}: shard {shard!r:.60} is not a file name in the directory")
        for name, t in reader(shard_path).items():
            if name in tensors:
                raise UserError(f"{index_path}: tensor {name!r} is in two shards")
            tensors[name] = t
    stray = sorted(n for n in weight_map if n not in tensors)
    if stray:
        raise UserError(f"{index_path} lists {len(stray)} tensors its shards lack, e.g. {stray[0]!r}")
    return tensors


def map_names(tensors: Mapping[str, LazyTensor], n_layer: int, source: Path
              ) -> tuple[dict[str, LazyTensor], LazyTensor | None]:
    """(our name -> tensor in the file's layout, lm_head or None), buffers dropped.

    Names are only renamed here; the caller checks them against the model, so an unknown
    name is an error there, never skipped.
    """
    ours, head = {}, None
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        buffer = BUFFER.fullmatch(name)
        if key == HEAD:
            head = t
        elif buffer and int(buffer.group(1)) < n_layer:
            continue
        elif name in ours:
            raise UserError(f"{source}: {name!r} appears twice (with and without {PREFIX!r})")
        else:
            ours[name] = t
    return ours, head


def write_directory(directory: Path, cfg: GPTConfig, weights: Mapping[str, LazyTensor],
                    tokenizer: Tokenizer | None, *, progress: bool = False) -> None:
    """A directory GPT2LMHeadModel.from_pretrained loads; weights given in MLX's layout."""
    hf = {PREFIX + name: transposed(t) if is_conv1d(name) else t for name, t in weights.items()}
    write_files(directory, cfg, hf, "pt", tokenizer, progress)


def write_files(directory: Path, cfg: GPTConfig, tensors: Mapping[str, LazyTensor], fmt: str,
                tokenizer: Tokenizer | None, progress: bool) -> None:
    """config.json, model.safetensors (``tensors`` as its reader names and lays them out) and the tokenizer."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    (directory / "config.json").write_text(json.dumps(config_dict(cfg, eot), indent=2) + "\n")
    write_safetensors(directory / "model.safetensors", tensors, metadata={"format": fmt}, progress=progress)
    if tokenizer is not None:
        hf_tokenizer.write_tokenizer(directory, tokenizer, cfg.block_size)


def transposed(t: LazyTensor) -> LazyTensor:
    """A Conv1D weight seen as a Linear one (or back): the same bytes, read transposed."""
    return LazyTensor(t.shape[::-1], t.dtype, lambda: t.load().T, t.file, t.where)

