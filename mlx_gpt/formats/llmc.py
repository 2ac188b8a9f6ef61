"""llm.c's GPT-2 checkpoint (``gpt2_124M.bin``) and tokenizer (``gpt2_tokenizer.bin``) files.

Model file: 256 little-endian int32 (magic 20240326, version, block_size, vocab_size, n_layer,
n_head, n_embd, padded_vocab_size, zeros), then every parameter back to back in one dtype
(version 3: float32, version 5: bfloat16), in this order: wte (padded to Vp rows), wpe, then
each per-layer parameter for all layers in turn (ln_1 weight, ln_1 bias, c_attn weight, ...),
then ln_f. Matrices are (out, in), as MLX's Linear stores them.

Tokenizer file: 256 int32 (magic 20240328, version, vocab size, end-of-text id in version 2),
then for each id a length byte and that many bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UserError
from ..models.gpt import GPTConfig
from .tensors import STORAGE, LazyTensor, file_size, progress_bar, read_at

MODEL_MAGIC = 20240326
TOKENIZER_MAGIC = 20240328
VERSIONS = {3: "float32", 5: "bfloat16"}
HEADER_BYTES = 256 * 4
VOCAB_MULTIPLE = 128  # llm.c pads the vocabulary to a multiple of 128 rows
LAYER_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")


def gpt2_params(vocab: int, block: int, n_layer: int, n_embd: int) -> int:
    """GPT-2's parameter count (with biases), from its sizes alone: what ``layout`` holds."""
    C = n_embd
    return vocab * C + block * C + n_layer * (12 * C * C + 13 * C) + 2 * C


def layout(cfg: GPTConfig, vp: int) -> list[tuple[str, tuple[int, ...]]]:
    """(our parameter name, shape) in file order; wte has its padded Vp rows here."""
    C, L = cfg.n_embd, cfg.n_layer
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
              "mlp.c_proj.bias": (C,)}
    out = [("wte.weight", (vp, C)), ("wpe.weight", (cfg.block_size, C))]
    out += [(f"h.{i}.{p}", shapes[p]) for p in LAYER_PARAMS for i in range(L)]
    return out + [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]


def is_model_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<i", head)[0] == MODEL_MAGIC


def _header(path: Path, magic: int, what: str) -> np.ndarray:
    if file_size(path) < HEADER_BYTES:
        raise UserError(f"{path} is truncated: shorter than llm.c's {HEADER_BYTES}-byte header")
    header = read_at(path, 0, np.dtype("<i4"), (256,))
    if header[0] != magic:
        raise UserError(f"{path} is not an llm.c {what} file (magic {header[0]}, expected {magic})")
    return header


def read_model(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, LazyTensor]]:
    """The config and every parameter of an llm.c GPT-2 checkpoint, read on demand."""
    path = Path(path)
    h = _header(path, MODEL_MAGIC, "GPT-2 checkpoint")
    version = int(h[1])
    if version not in VERSIONS:
        raise UserError(f"{path}: llm.c checkpoint version {version} is not supported "
                        "(3 = float32 or 5 = bfloat16, both with a padded vocabulary)")
    dtype = VERSIONS[version]
    block, vocab, n_layer, n_head, n_embd, vp = (int(x) for x in h[2:8])
    if min(block, vocab, n_layer, n_head, n_embd) < 1 or vp < vocab:
        raise UserError(f"{path} is corrupt: impossible header (block {block}, vocab {vocab}, layers {n_layer}, "
                        f"heads {n_head}, width {n_embd}, padded vocab {vp})")
    item = STORAGE[dtype]
    size, expected = file_size(path), HEADER_BYTES + gpt2_params(vp, block, n_layer, n_embd) * item.itemsize
    if size != expected:  # before anything is built from a header that may be hostile
        state = "truncated" if size < expected else "corrupt"
        raise UserError(f"{path} is {state}: its header (block {block}, vocab {vocab}, layers {n_layer}, heads {n_head}, "
                        f"width {n_embd}, padded vocab {vp}) describes {expected:,} bytes, the file has {size:,}")
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    tensors, offset = {}, HEADER_BYTES
    for name, shape in layout(cfg, vp):  # of wte only the real rows: the padding rows are never looked up
        tensors[name] = _at(path, offset, dtype, (vocab, n_embd) if name == "wte.weight" else shape)
        offset += int(np.prod(shape)) * item.itemsize
    assert offset == size, (offset, size)
    return cfg, tensors


def _at(path: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> LazyTensor:
    return LazyTensor(shape, dtype, lambda: read_at(path, offset, STORAGE[dtype], shape), path, (offset,))


def write_model(path: str | os.PathLike, cfg: GPTConfig, weights: Mapping[str, LazyTensor], *,
                progress: bool = False) -> None:
    """A version 3 (float32) checkpoint that llm.c's train_gpt2 loads."""
    path = Path(path)
    vp = -(-cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # rounded up
    header = np.zeros(256, dtype="<i4")
    header[:8] = [MODEL_MAGIC, 3, cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, vp]
    entries = layout(cfg, vp)
    total = sum(int(np.prod(s)) * 4 for _, s in entries)
    with open(path, "wb") as f, progress_bar(path, total, progress, "write") as bar:
        f.write(header.tobytes())
        for name, shape in entries:
            a = np.ascontiguousarray(weights[name].read(), dtype="<f4")
            padding = np.zeros((vp - cfg.vocab_size if name == "wte.weight" else 0, *a.shape[1:]), dtype="<f4")
            if (a.shape[0] + padding.shape[0], *a.shape[1:]) != shape:
                raise AssertionError(f"{name}: {a.shape} does not fit {shape}")
            for part in (a, padding):
                f.write(memoryview(part.reshape(-1)).cast("B"))
                bar.update(part.nbytes)


def read_token_list(path: str | os.PathLike) -> tuple[list[bytes], int | None]:
    """Each id's bytes, and the end-of-text id (None where a version 1 file does not record it):
    what ``GPT2Tokenizer.from_llmc`` rebuilds a tokenizer from."""
    path = Path(path)
    h = _header(path, TOKENIZER_MAGIC, "tokenizer")
    version, n = int(h[1]), int(h[2])
    if version not in (1, 2) or n < 256:
        raise UserError(f"{path}: unsupported llm.c tokenizer (version {version}, {n} tokens)")
    data = Path(path).read_bytes()[HEADER_BYTES:]
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise UserError(f"{path} is truncated: token {i} of {n} is cut off")
        length = data[pos]
        tokens.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if pos != len(data):
        raise UserError(f"{path} is corrupt: {len(data) - pos} bytes follow the last token")
    if version == 2:
        eot = int(h[3])
        if not 0 <= eot < n:
            raise UserError(f"{path} is corrupt: end-of-text id {eot} is outside the vocabulary")
        return tokens, eot
    return tokens, None


def tokenizer_bytes(tokenizer) -> bytes:
    """A version 2 tokenizer file of a GPT-2 tokenizer (``GPT2Tokenizer``), as llm.c's train_gpt2
    reads for decoding samples."""
    if tokenizer.eot_id is None:
        raise UserError("llm.c's tokenizer file needs an end-of-text token; this vocabulary has none")
    header = np.zeros(256, dtype="<i4")
    header[:4] = [TOKENIZER_MAGIC, 2, tokenizer.vocab_size, tokenizer.eot_id]
    parts = [header.tobytes()]
    for i, t in enumerate(tokenizer.token_bytes()):
        if not 0 < len(t) < 256:
            raise UserError(f"token {i} is {len(t)} bytes; llm.c's tokenizer file holds 1 to 255")
        parts.append(bytes([len(t)]) + t)
    return b"".join(parts)


def write_tokenizer(path: str | os.PathLike, tokenizer) -> None:
    Path(path).write_bytes(tokenizer_bytes(tokenizer))
