"""Import GPT-2 checkpoints from Hugging Face and llm.c into mlx_gpt, and export them back.

  python tools/convert.py SRC --out checkpoints/NAME                  import
  python tools/convert.py CHECKPOINT --to hf|llmc|mlx-lm --out PATH   export

An import is checked whole before anything is written: every tensor name must be one of the
model's, every parameter must be there, every shape must fit. Tensors are then read one at a
time (a progress bar per file) into the model, and the result is saved as an ordinary
checkpoint, atomically, so a failure leaves no output behind. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import checkpoint, quantize, rundir  # quantize: quantized checkpoints load, and exports refuse them
from .atomic import replacing_directory, replacing_file
from .errors import UserError, run_cli
from .formats import hf, hf_tokenizer, llmc, mlx_lm
from .formats.tensors import LazyTensor, progress_bar
from .gpt2_tokenizer import GPT2Tokenizer
from .models.gpt import GPT, GPTConfig
from .models.registry import model_type_of
from .tokenizer import META_FILE, Tokenizer, load_tokenizer, with_chat_template

EXPORTS = ("hf", "llmc", "mlx-lm")
LLMC_TOKENIZER = "gpt2_tokenizer.bin"
LLMC_LAYER_NORM_EPS = 1e-5  # llm.c's train_gpt2 hard-codes it


# ---------------------------------------------------------------------------- import


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face GPT-2 directory or an llm.c checkpoint into an mlx_gpt checkpoint."""
    src, out = Path(src), Path(out)
    lock = rundir.claim_out(out, overwrite=overwrite, inputs={"the source being converted": src})
    try:
        return _import(src, out, tokenizer, progress)
    finally:
        lock.release()


def _import(src: Path, out: Path, tokenizer: str | os.PathLike | None, progress: bool) -> Path:
    cfg, weights, head = _open_source(src)
    tok = GPT2Tokenizer.from_path(tokenizer) if tokenizer is not None else _tokenizer_beside(src)
    if tok is None:
        raise UserError(f"{src} comes with no tokenizer; pass --tokenizer (llm.c's {LLMC_TOKENIZER}, Hugging Face's "
                        "tokenizer.json, or a directory with vocab.json + merges.txt or encoder.json + vocab.bpe)")
    beside = Path(tokenizer) if tokenizer is not None else src  # a chat template comes with Hugging Face's files
    if beside.is_dir():
        tok = with_chat_template(tok, hf_tokenizer.read_chat_template(beside))
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size} embeddings")
    check_layer_count(cfg, weights, src)
    check_names_and_shapes(dict(llmc.layout(cfg, cfg.vocab_size)), weights, src)
    if head is not None and head.shape != weights["wte.weight"].shape:
        raise UserError(f"{src}: lm_head.weight is {head.shape}, wte is {weights['wte.weight'].shape}")
    to_read = dict(weights)
    if head is not None and head.where != weights["wte.weight"].where:
        to_read[hf.HEAD] = head
    arrays = read_tensors(to_read, progress)
    if hf.HEAD in arrays and not mx.array_equal(arrays.pop(hf.HEAD), arrays["wte.weight"]).item():
        raise UserError(f"{src}: lm_head.weight differs from wte; mlx_gpt's GPT-2 ties the head to the embedding")
    model = GPT(cfg)  # its initial weights are lazy and never computed: every one is replaced
    model.load_weights(list(arrays.items()), strict=True)
    mx.eval(model.parameters())
    return checkpoint.save(out, model, tok)


def _open_source(src: Path) -> tuple[GPTConfig, dict[str, LazyTensor], LazyTensor | None]:
    """(config, our name -> tensor in MLX's layout, lm_head or None)."""
    if src.is_dir():
        cfg = hf.read_config(src)
        named, head = hf.map_names(hf.read_weights(src), cfg.n_layer, src)
        weights = {n: hf.transposed(t) if hf.is_conv1d(n) else t for n, t in named.items()}
        return cfg, weights, head
    if llmc.is_model_file(src):
        cfg, weights = llmc.read_model(src)
        return cfg, weights, None
    if src.exists():
        raise UserError(f"{src} is neither an llm.c checkpoint nor a Hugging Face model directory "
                        "(for Hugging Face weights, pass the directory that holds config.json)")
    raise UserError(f"{src} not found")


def _tokenizer_beside(src: Path) -> GPT2Tokenizer | None:
    """The tokenizer that comes with a source: its directory's files, or llm.c's file beside it."""
    if src.is_dir():
        return GPT2Tokenizer.from_directory(src) if GPT2Tokenizer.found_in(src) else None
    beside = src.parent / LLMC_TOKENIZER
    return GPT2Tokenizer.from_llmc(beside) if beside.is_file() else None


def check_layer_count(cfg: GPTConfig, weights: Mapping[str, LazyTensor], source: Path) -> None:
    """Refuse a config that describes far more tensors than the files hold before listing them:
    a hostile or broken config.json (n_layer 100000) fails at once, not after gigabytes."""
    need = len(llmc.LAYER_PARAMS) * cfg.n_layer + 4
    if need > 2 * len(weights) + 16:
        raise UserError(f"{source} does not match its GPT-2 config: n_layer {cfg.n_layer} needs {need:,} tensors, "
                        f"the weights hold {len(weights):,}")


def check_names_and_shapes(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, LazyTensor],
                           source: Path) -> None:
    """Every parameter present with its shape, nothing else: a mismatch is an error, never skipped."""
    problems = [f"unknown tensor {n!r}" for n in weights if n not in expected]
    problems += [f"missing {n!r}" for n in expected if n not in weights]
    problems += [f"{n!r} is {tuple(t.shape)}, the model needs {tuple(expected[n])}"
                 for n, t in weights.items() if n in expected and tuple(t.shape) != tuple(expected[n])]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{source} does not match its GPT-2 config: {'; '.join(problems[:3])}{more}")


def read_tensors(tensors: Mapping[str, LazyTensor], progress: bool) -> dict[str, mx.array]:
    """Read each tensor as float32 into MLX, one file (and one progress bar) at a time.

    A tensor passes through numpy on its way into MLX, so for a moment it is held twice; the
    largest go first, while little else is held, which keeps the peak near the model's size.
    """
    by_file: dict[Path | None, list[str]] = {}
    for name, t in tensors.items():
        by_file.setdefault(t.file, []).append(name)
    arrays = {}
    largest_first = sorted(by_file.items(), key=lambda kv: -max(tensors[n].nbytes for n in kv[1]))
    for file, names in largest_first:
        names.sort(key=lambda n: (-tensors[n].nbytes, _position(tensors[n])))
        with progress_bar(file or Path("memory"), sum(tensors[n].nbytes for n in names), progress) as bar:
            for name in names:
                arrays[name] = mx.array(np.ascontiguousarray(tensors[name].read()))
                mx.eval(arrays[name])
                bar.update(tensors[name].nbytes)
    return {name: arrays[name] for name in tensors}


def _position(t: LazyTensor) -> int:
    return t.where[0] if isinstance(t.where, tuple) and t.where else 0


# ---------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Export:
    paths: list[Path]  # what was written
    notes: list[str]  # what the other format cannot carry


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, to: str, overwrite: bool = False,
                      progress: bool = True) -> Export:
    """Write an mlx_gpt checkpoint as a Hugging Face or mlx-lm directory or an llm.c file.

    The tokenizer goes along: any kind to Hugging Face and mlx-lm, GPT-2's BPE to llm.c.
    """
    if to not in EXPORTS:
        raise UserError(f"unknown export format {to!r}; choose from {', '.join(EXPORTS)}")
    out = Path(out)
    model = checkpoint.load_model(ckpt)
    if quantize.is_quantized(model):
        raise UserError(f"{ckpt} holds quantized weights, which {to} does not take: export the float checkpoint it "
                        "came from, or write mlx-lm's quantized layout with --quantize BITS --to mlx-lm")
    if model_type_of(model) != "gpt" or not model.config.bias:
        raise UserError(f"{ckpt} is not a GPT-2 (with biases), which {to} expects")
    cfg = model.config
    tok, notes = _exportable_tokenizer(ckpt, to)
    weights = {name: _as_lazy(a) for name, a in tree_flatten(model.parameters())}
    if to == "llmc":
        if cfg.layer_norm_eps != LLMC_LAYER_NORM_EPS:
            notes.append(f"llm.c computes LayerNorm with eps {LLMC_LAYER_NORM_EPS:g}, this model with "
                         f"{cfg.layer_norm_eps:g}: its outputs will differ slightly there")
        return Export(_export_llmc(out, cfg, weights, tok, overwrite, progress), notes)
    write = hf.write_directory if to == "hf" else mlx_lm.write_directory
    lock = rundir.claim_out(out, overwrite=overwrite, check=rundir.check_export, holds=Path.exists, what="a model",
                            inputs={"the checkpoint being exported": checkpoint.resolve(ckpt)})
    try:
        with replacing_directory(out) as tmp:
            write(tmp, cfg, weights, tok, progress=progress)
            rundir.record_written(tmp)
    finally:
        lock.release()
    return Export([out], notes)


def _exportable_tokenizer(ckpt: str | os.PathLike, to: str) -> tuple[Tokenizer | None, list[str]]:
    """The checkpoint's tokenizer if the other format can hold it, and a note if not.

    llm.c's file holds GPT-2's BPE only; Hugging Face and mlx-lm directories hold every kind
    that converts exactly (see formats.hf_tokenizer).
    """
    d = checkpoint.resolve(ckpt)
    if not (d / META_FILE).is_file():
        return None, ["the checkpoint has no tokenizer; only the model was exported"]
    tok = load_tokenizer(d)
    if isinstance(tok, GPT2Tokenizer) or (to != "llmc" and hf_tokenizer.has_form(tok)):
        return tok, []
    return None, [f"the checkpoint's {tok.kind} tokenizer has no {to} form; only the model was exported"]


def _as_lazy(a: mx.array) -> LazyTensor:
    return LazyTensor(tuple(a.shape), "float32", lambda: np.asarray(a.astype(mx.float32)))


def _export_llmc(out: Path, cfg: GPTConfig, weights: dict[str, LazyTensor], tok: GPT2Tokenizer | None,
                 overwrite: bool, progress: bool) -> list[Path]:
    """The model file at out; llm.c's tokenizer file beside it (left as is when identical)."""
    if out.is_dir():
        raise UserError(f"{out} is a directory; --to llmc writes a file (e.g. {out / 'gpt2_124M.bin'})")
    tok_path, tok_bytes = out.parent / LLMC_TOKENIZER, None
    if tok is not None:
        tok_bytes = llmc.tokenizer_bytes(tok)
        if tok_path.is_file() and tok_path.read_bytes() == tok_bytes:
            tok_bytes = None  # already there
        elif tok_path.exists() and not overwrite:
            raise UserError(f"{tok_path} exists and holds another tokenizer; pass --overwrite to replace it")
        elif tok_path.exists():
            rundir.check_export_file(tok_path)
    lock = rundir.claim_out(out, overwrite=overwrite, check=rundir.check_export_file, holds=Path.exists,
                            what="a model")
    written = []
    try:
        with replacing_file(out) as tmp:
            llmc.write_model(tmp, cfg, weights, progress=progress)
            if tok_bytes is not None:
                with replacing_file(tok_path) as tmp_tok:
                    tmp_tok.write_bytes(tok_bytes)
                rundir.record_written_file(tok_path)
                written.append(tok_path)
        rundir.record_written_file(out)
    finally:
        lock.release()
    return [out, *written]


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx-gpt convert",
        description="Import a GPT-2 checkpoint (a Hugging Face directory or llm.c's .bin) as an mlx_gpt "
                    "checkpoint, or export an mlx_gpt checkpoint with --to.")
    p.add_argument("src", help="import: a Hugging Face GPT-2 directory or an llm.c checkpoint file; "
                               "export: an mlx_gpt checkpoint directory")
    p.add_argument("--out", required=True, help="the checkpoint (import), directory (hf, mlx-lm) or .bin file (llmc) "
                                                "to write")
    p.add_argument("--to", choices=EXPORTS, help="export SRC to this format instead of importing")
    p.add_argument("--tokenizer", help=f"import: llm.c's {LLMC_TOKENIZER}, Hugging Face's tokenizer.json, or a "
                                       "directory with vocab.json + merges.txt, encoder.json + vocab.bpe or "
                                       "tokenizer.json; default: the one that comes with SRC")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quantize", type=int, choices=(4, 8), metavar="BITS",
                   help="write the model with its Linear and Embedding weights quantized to 8 or 4 bits "
                        "(SRC: an mlx_gpt checkpoint, or a model to import first; with --to mlx-lm, in mlx-lm's "
                        "quantized layout)")
    p.add_argument("--group-size", type=int, default=64, help="with --quantize: weights per scale and bias")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    a = build_parser().parse_args(argv)
    progress = not a.quiet
    if a.quantize is not None:
        return [_quantize(a, progress)]
    if a.to is None:
        out = import_checkpoint(a.src, a.out, tokenizer=a.tokenizer, overwrite=a.overwrite, progress=progress)
        c = checkpoint.read_config(out)["model"]
        print(f"wrote {out}: GPT-2 with {c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, "
              f"{c['vocab_size']} tokens, {c['block_size']} positions")
        return [out]
    if a.tokenizer is not None:
        raise UserError("--tokenizer is for imports; an export takes the checkpoint's own tokenizer")
    result = export_checkpoint(a.src, a.out, to=a.to, overwrite=a.overwrite, progress=progress)
    for path in result.paths:
        print(f"wrote {path}")
    for note in result.notes:
        print(f"note: {note}")
    return result.paths


def _quantize(a: argparse.Namespace, progress: bool) -> Path:
    """--quantize: SRC's model (an mlx_gpt checkpoint, else imported first) written quantized to --out."""
    if a.to not in (None, "mlx-lm"):
        raise UserError(f"--quantize writes an mlx_gpt checkpoint or, with --to mlx-lm, mlx-lm's layout; {a.to} "
                        "holds float weights only")
    src = Path(a.src)
    if a.to == "mlx-lm":
        if not checkpoint.exists(src):
            raise UserError(f"--quantize --to mlx-lm exports an mlx_gpt checkpoint; import {src} first")
        out = quantize.export_mlx_lm(src, a.out, bits=a.quantize, group_size=a.group_size, overwrite=a.overwrite)
        print(f"wrote {out}: mlx-lm's layout, {a.quantize}-bit weights in groups of {a.group_size}")
        return out
    rundir.check_claim(Path(a.out), overwrite=a.overwrite, inputs={"the source being converted": src})
    if checkpoint.exists(src):
        out = quantize.quantize_checkpoint(src, a.out, bits=a.quantize, group_size=a.group_size, overwrite=a.overwrite)
    else:
        import tempfile

        Path(a.out).absolute().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(a.out).absolute().parent, prefix=".import-") as tmp:
            imported = import_checkpoint(src, Path(tmp) / "float", tokenizer=a.tokenizer, progress=progress)
            out = quantize.quantize_checkpoint(imported, a.out, bits=a.quantize, group_size=a.group_size,
                                               overwrite=a.overwrite)
    print(f"wrote {out}: {a.quantize}-bit weights in groups of {a.group_size}")
    return out


if __name__ == "__main__":
    run_cli(main)
