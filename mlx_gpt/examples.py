"""Example datasets: prompt/completion pairs and chat transcripts, one example a line of JSON.

``--data DIR`` holds ``train.jsonl`` and ``valid.jsonl`` (``test.jsonl`` optional), as mlx-lm's
users keep them, or ``--data FILE.jsonl`` is one file whose every ``VAL_EVERY``-th example is
held out. Each file holds one shape, detected from its first example or named by ``--format``:

- ``{"text": ...}``: running text, every token trained on;
- ``{"prompt": ..., "completion": ...}``: the prompt's tokens, then the completion's (through
  the tokenizer's chat template as a user/assistant pair when it carries one);
- ``{"messages": [{"role", "content"}, ...]}``: the conversation through the chat template
  (``chat.py``), each assistant turn tokenized on its own so that its tokens are known.

Every example ends with end-of-text when the tokenizer has one. The lines are read one at a
time and tokenized once, into ``data/<name>-<tokenizer>-examples/``: per split, the token ids
(``.tokens``, uint16 or uint32), a mask per token (``.mask``, 1 where it belongs to a completion
or an assistant turn), each example's start (``.offsets``, int64, one more than the examples)
and its line in the source (``.lines``), all memory-mapped, so a million examples never sit in
Python lists. ``--mask-prompt`` is applied when batches are drawn (``example_sampler.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from . import chat
from .atomic import replacing_directory
from .data import gpt2_tokenizer, parse_tokenizer_spec, read_meta, tokenizer_digest
from .errors import UserError
from .rundir import RunLock
from .sources import jsonl_records
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

SHAPES = ("text", "completions", "chat")
FILES = {"train": "train.jsonl", "val": "valid.jsonl", "test": "test.jsonl"}
COMPRESSED = ("", ".gz", ".zst")  # train.jsonl, train.jsonl.gz, train.jsonl.zst (sources.jsonl_records reads them)
VAL_EVERY = 10  # one .jsonl: every tenth example is held out for evaluation
ARRAYS = {"tokens": None, "mask": "u1", "offsets": "<i8", "lines": "<i8"}  # each file's dtype (tokens: by vocabulary)
KIND = "examples"


@dataclass(frozen=True)
class Fields:
    """The keys a line's fields are read under (``--text-field``, ``--prompt-field``, ``--completion-field``)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def is_examples(source: str, fmt: str | None = None, fields: Fields = Fields()) -> bool:
    """Whether ``--data`` names an example set: a folder holding train.jsonl (mlx-lm's layout) or
    one prepared here, or a .jsonl file of prompt/completion or chat examples. A .jsonl file of
    text records is a corpus of documents (``prepare``), unless ``fmt`` is "text"."""
    p = Path(source)
    if p.is_dir():
        return _file(p, FILES["train"]) is not None or read_meta(p).get("kind") == KIND
    if not (p.is_file() and any(p.name.endswith(".jsonl" + c) for c in COMPRESSED)):
        return False
    if fmt is not None:
        return True
    try:
        first = next(read_lines(p), (0, {}))[1]
    except UserError:  # a bad first line: said as an example file says it
        return True
    return shape_of(first, fields) != "text"


def _file(folder: Path, name: str) -> Path | None:
    """``folder/name``, or its .gz or .zst, whichever is there."""
    return next((folder / (name + c) for c in COMPRESSED if (folder / (name + c)).is_file()), None)


# ---------------------------------------------------------------------------- one example


def shape_of(record: dict, fields: Fields) -> str | None:
    """The shape a line's fields say it has (None: none of the three)."""
    if fields.messages in record:
        return "chat"
    if fields.prompt in record or fields.completion in record:
        return "completions"
    return "text" if fields.text in record else None


def _field(record: dict, name: str, empty_ok: bool = True) -> str:
    if name not in record:
        raise ValueError(f"no {name!r} field")
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{name!r} is not a string")
    if not value and not empty_ok:
        raise ValueError(f"{name!r} is empty")
    return value


def pieces(record: dict, shape: str, fields: Fields, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, trained) pieces in order: trained pieces are the completion or the
    assistant turns, the rest is prompt."""
    if shape == "text":
        return [(_field(record, fields.text, empty_ok=False), True)]
    if shape == "completions":
        prompt, completion = _field(record, fields.prompt), _field(record, fields.completion, empty_ok=False)
        if getattr(tokenizer, "chat_template", None) is None:
            return [(prompt, False), (completion, True)]
        record = {fields.messages: [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    messages = record.get(fields.messages)
    problem = chat.check_roles(messages)
    if problem:
        raise ValueError(problem)
    return chat_pieces(messages, chat.template_of(tokenizer), chat.special_tokens(tokenizer))


def chat_pieces(messages: list[dict], template: str, tokens: dict) -> list[tuple[str, bool]]:
    """A conversation's rendered text cut at each assistant turn: the text up to its generation
    prompt is prompt, the turn itself (its end-of-turn marker included) is trained."""
    out, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat.render(template, messages[:k], add_generation_prompt=True, **tokens)
        upto = chat.render(template, messages[: k + 1], **tokens)
        if not (before.startswith(done) and upto.startswith(before)):
            raise ValueError("the chat template renders a conversation's start differently once it goes on, so its "
                             "assistant turns cannot be found")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    rest = chat.render(template, messages, **tokens)[len(done):]
    return out + [(rest, False)] if rest else out


def encode(parts: list[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, mask): each piece tokenized on its own, then end-of-text (trained when the
    example ends with trained text)."""
    ids, mask = [], []
    for text, trained in parts:
        piece = chat.encode(tokenizer, text) if text else []
        ids += piece
        mask += [int(trained)] * len(piece)
    if tokenizer.eot_id is not None:
        ids.append(tokenizer.eot_id)
        mask.append(int(bool(parts) and parts[-1][1]))
    return ids, mask


# ---------------------------------------------------------------------------- reading files


def read_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line, read one at a time (``sources.jsonl_records``)."""
    for number, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        yield number, record


def examples_of(path: Path, tokenizer: Tokenizer, fmt: str | None, fields: Fields) -> Iterator[tuple[int, list, list]]:
    """(line, ids, mask) of every example in a file of one shape (``fmt``, else the first line's)."""
    shape, first = fmt, None
    for number, record in read_lines(path):
        found = shape_of(record, fields)
        if shape is None:
            if found is None:
                raise UserError(f"{path}:{number}: no {fields.text!r}, {fields.prompt!r}/{fields.completion!r} or "
                                f"{fields.messages!r} field (rename fields with --text-field, --prompt-field, "
                                "--completion-field)")
            shape, first = found, number
        elif first is not None and found != shape:
            raise UserError(f"{path}:{number}: a {found or 'shapeless'} example in a file of {shape} examples "
                            f"(line {first}); one shape per file")
        try:
            ids, mask = encode(pieces(record, shape, fields, tokenizer), tokenizer)
        except (ValueError, UserError) as e:
            raise UserError(f"{path}:{number}: {e}") from None
        yield number, ids, mask


class _SplitWriter:
    """Appends examples to a split's four files as they come."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.files: dict[str, BinaryIO] = {a: open(directory / f"{split}.{a}", "wb") for a in ARRAYS}
        self.dtypes, self.count, self.examples = {**ARRAYS, "tokens": dtype}, 0, 0
        self._put(offsets=[0])

    def add(self, line: int, ids: list[int], mask: list[int]) -> None:
        self.count += len(ids)
        self.examples += 1
        self._put(tokens=ids, mask=mask, offsets=[self.count], lines=[line])

    def _put(self, **arrays) -> None:
        for name, values in arrays.items():
            self.files[name].write(np.asarray(values, self.dtypes[name]).tobytes())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# ---------------------------------------------------------------------------- preparing


def sources(source: str) -> dict[str, Path]:
    """split -> the .jsonl it is read from (one file: train, its held-out part val)."""
    p = Path(source)
    if p.is_file():
        return {"train": p}
    found = {split: _file(p, name) for split, name in FILES.items() if _file(p, name) is not None}
    for split in ("train", "val"):
        if split not in found:
            raise UserError(f"{p} has no {FILES[split]} (an example folder holds train.jsonl and valid.jsonl, "
                            "test.jsonl optional)")
    return found


def tokenizer_for(spec: str | Tokenizer | None, data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer examples are encoded with: a checkpoint's, or byte / GPT-2's BPE by name (a
    SentencePiece model is trained on running text: prepare one there, or fine-tune a checkpoint)."""
    if not isinstance(spec, str):
        return spec or ByteTokenizer()
    kind, arg = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer(arg, data_dir)
    raise UserError(f"--tokenizer {spec} is trained on running text; example sets use byte, gpt2, or --init's")


def _fingerprint(files: dict[str, Path], digest: str, fmt: str | None, fields: Fields) -> str:
    h = hashlib.sha256(f"{KIND}|{digest}|{fmt}|{fields}|{VAL_EVERY}".encode())
    for split, path in sorted(files.items()):
        h.update(split.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def prepare_examples(source: str, tokenizer: str | Tokenizer | None = None, *, fmt: str | None = None,
                     fields: Fields = Fields(), data_dir: str | os.PathLike = "data") -> "ExampleSet":
    """Tokenize an example set into data/<name>-<tokenizer>-examples/ (reused while its files,
    tokenizer and settings are unchanged)."""
    if fmt is not None and fmt not in SHAPES:
        raise UserError(f"--format must be one of {', '.join(SHAPES)}, got {fmt!r}")
    p = Path(source)
    if p.is_dir() and read_meta(p).get("kind") == KIND:
        return load_examples(p)
    tok = tokenizer_for(tokenizer, data_dir)
    files = sources(source)
    fingerprint = _fingerprint(files, tokenizer_digest(tok), fmt, fields)
    label = tok.kind if tok.kind != "sentencepiece" else f"sp{tok.vocab_size}"
    out = Path(data_dir, f"{p.name.split('.jsonl')[0] if p.is_file() else p.name}-{label}-{KIND}")
    if read_meta(out).get("fingerprint") == fingerprint:
        return load_examples(out)
    if out.exists() and read_meta(out).get("kind") != KIND:  # a folder of that name we did not write
        raise UserError(f"{out} exists and is not an example set prepared here; move it, or give another --data-dir")
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    with RunLock(out, hint="wait for it to finish"), replacing_directory(out) as tmp:
        splits = _write_splits(tmp, files, tok, fmt, fields, dtype)
        tok.save(tmp)
        meta = {"kind": KIND, "name": out.name, "source": source, "fingerprint": fingerprint, "dtype": dtype.str,
                "vocab_size": tok.vocab_size, "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load_examples(out)


def _write_splits(tmp: Path, files: dict[str, Path], tok: Tokenizer, fmt: str | None, fields: Fields,
                  dtype: np.dtype) -> dict:
    """Each split's examples written as they are read; one .jsonl gives val every VAL_EVERY-th."""
    writers = {split: _SplitWriter(tmp, split, dtype) for split in (*files, "val")}
    sources_of = {split: files.get(split, files["train"]) for split in writers}
    try:
        for split, path in files.items():
            for k, (line, ids, mask) in enumerate(examples_of(path, tok, fmt, fields)):
                held_out = split == "train" and "val" not in files and k % VAL_EVERY == VAL_EVERY - 1
                writers["val" if held_out else split].add(line, ids, mask)
    finally:
        for w in writers.values():
            w.close()
    for split, w in writers.items():
        if not w.examples:
            raise UserError(f"{sources_of[split]} holds no examples" +
                            (f" for {split} (one file holds back every {VAL_EVERY}th: give at least {VAL_EVERY})"
                             if split == "val" and "val" not in files else ""))
    return {split: {"file": str(sources_of[split]), "examples": w.examples, "tokens": w.count}
            for split, w in writers.items()}


# ---------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class ExampleSplit:
    """One split's examples, memory-mapped: ``example(i)`` is (ids, mask) of example i."""

    source: str  # the .jsonl it came from, named in errors with a line
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.lines)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]


def _open_split(directory: Path, split: str, meta: dict) -> ExampleSplit:
    info = meta["splits"][split]
    arrays = {}
    for name, dtype in {**ARRAYS, "tokens": meta["dtype"]}.items():
        path = directory / f"{split}.{name}"
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
    n, count = len(arrays["lines"]), len(arrays["tokens"])
    offsets = arrays["offsets"]
    if (n != info["examples"] or count != info["tokens"] or len(arrays["mask"]) != count or len(offsets) != n + 1
            or offsets[0] != 0 or offsets[-1] != count or (np.diff(offsets) < 0).any()):
        raise UserError(f"{directory}: the {split} split's files are damaged; delete the folder to prepare it again")
    return ExampleSplit(info["file"], **arrays)


@dataclass(frozen=True)
class ExampleSet:
    """A prepared example set; the attributes a run reads of a ``data.Dataset`` have the same names."""

    path: Path
    splits: dict[str, ExampleSplit]
    vocab_size: int
    tokenizer: Tokenizer

    @property
    def name(self) -> str:
        return self.path.name


def load_examples(directory: str | os.PathLike) -> ExampleSet:
    """Open an example set ``prepare_examples`` wrote."""
    p = Path(directory)
    meta = read_meta(p)
    try:
        splits = {s: _open_split(p, s, meta) for s in meta["splits"]}
        vocab = int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise UserError(f"{p} is not a whole prepared example set ({str(e)[:80]}); delete it to prepare it "
                        "again") from None
    return ExampleSet(p, splits, vocab, load_tokenizer(p))


def evaluate(model, split: ExampleSplit, mask_prompt: bool, batch_size: int = 16) -> tuple[float, int]:
    """(mean loss, tokens counted) over every example of ``split``, one a row cut to the model's block:
    the loss of a run's evaluation, over the whole split, answers only with ``mask_prompt``."""
    import mlx.core as mx

    from .example_sampler import rows
    from .loss import IGNORE, cross_entropy
    from .models.base import eval_mode

    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(split), batch_size):
            x, y = rows(split, np.arange(start, min(start + batch_size, len(split))), model.block_size, mask_prompt)
            kept = int((y != IGNORE).sum())
            total += mx.mean(cross_entropy(model(mx.array(x)), mx.array(y))).item() * kept  # the batch's masked mean
            count += kept
    if not count:
        raise UserError(f"{split.source}: no token to score (every answer falls outside the block)")
    return total / count, count
