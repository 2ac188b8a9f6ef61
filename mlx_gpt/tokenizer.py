"""Tokenizers behind one small interface: byte-level, and SentencePiece BPE trained on your text.

Every tokenizer saves itself into a checkpoint directory as ``tokenizer.json`` (its kind and
version) plus whatever model file it needs, and ``load_tokenizer`` reads it back, so a
checkpoint always carries the exact tokenizer it was trained with.

A damaged model file must not load as a different tokenizer: SentencePiece parses a model cut
after any piece as a smaller, valid one (and one missing its normalizer spec as NFKC-normalizing),
and a changed byte as a changed piece. So ``tokenizer.json`` records the model file's SHA-256,
which loading checks, and any model (older checkpoints have no hash) must be whole: as many
pieces as its trainer spec's vocabulary size, and its normalizer spec present.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path
from contextlib import contextmanager
from itertools import takewhile
from typing import Iterable, Iterator, Protocol

from .errors import UserError
from .formats.json_file import read_json

META_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside it: the chat template the tokenizer carries (chat.py)
NOT_IN_A_NAME = re.compile(r"[/\\\x00-\x1f\x7f\ud800-\udfff]")  # separators, control characters, lone surrogates


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None:
        """End-of-text id, written between documents and a stop for generation (None: none)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: lossless for any text, no training, no end-of-text id."""

    kind = "byte"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        write_meta(directory, {"kind": self.kind})


class SentencePieceTokenizer:
    """SentencePiece BPE with byte fallback, so any text, seen or not, round-trips exactly.

    Normalization is off (identity rule, whitespace kept as is) because a tokenizer that
    rewrites its input cannot give back the text it was given.
    """

    kind = "sentencepiece"
    model_file = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eot_id(self) -> int | None:
        i = self._sp.eos_id()
        return None if i < 0 else i

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, self.model_file).write_bytes(self._proto)
        write_meta(directory, {"kind": self.kind, "model_file": self.model_file,
                               "model_sha256": hashlib.sha256(self._proto).hexdigest()})

    @classmethod
    def train(cls, lines: Iterable[str], vocab_size: int, *, max_lines: int = 2_000_000) -> "SentencePieceTokenizer":
        """Train a BPE model on text lines (newlines are a piece of their own)."""
        import io

        import sentencepiece as spm

        if vocab_size < 260:
            raise UserError(f"SentencePiece vocab size must be at least 260 (256 bytes + specials), got {vocab_size}")
        model = io.BytesIO()
        interrupted = []
        try:
            with _interrupt_noted(interrupted):
                spm.SentencePieceTrainer.train(
                    # cut short once a Ctrl-C is noted (raised here, it would surface as a training failure)
                    sentence_iterator=takewhile(lambda _: not interrupted, lines),
                    model_writer=model,
                    model_type="bpe",
                    vocab_size=vocab_size,
                    byte_fallback=True,
                    character_coverage=0.9995,
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    add_dummy_prefix=False,
                    allow_whitespace_only_pieces=True,
                    split_digits=True,
                    user_defined_symbols=["\n", "\t"],
                    unk_id=0,
                    bos_id=-1,
                    eos_id=1,
                    pad_id=-1,
                    input_sentence_size=max_lines,
                    shuffle_input_sentence=True,
                    max_sentence_length=1 << 16,
                    num_threads=os.cpu_count() or 1,
                    minloglevel=2,
                )
        except RuntimeError as e:
            if interrupted:
                raise KeyboardInterrupt from None
            raise UserError(_explain_training_failure(str(e), vocab_size)) from None
        if interrupted:
            raise KeyboardInterrupt
        return cls(model.getvalue())


def _explain_training_failure(message: str, vocab_size: int) -> str:
    """SentencePiece's C++ check failures, as what to do instead."""
    small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        return (f"SentencePiece vocab size {small[1]} is too small for this corpus's characters; "
                f"use at least {small[2]}")
    large = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if large:
        return (f"sp:{vocab_size} is more tokens than this corpus has distinct pieces; use at most "
                f"sp:{large[2]} (or a larger corpus)")
    detail = message.strip().splitlines()[-1] if message.strip() else "no reason given"
    detail = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[[^]]*\] ", "", detail)  # the C++ source location and check
    return f"SentencePiece training failed: {detail}"


@contextmanager
def _interrupt_noted(noted: list) -> Iterator[None]:
    """A Ctrl-C during SentencePiece's C++ training is noted and raised after it returns (as
    KeyboardInterrupt, not as the failure the cut-short training reports)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    """A tokenizer's tokenizer.json: its kind and what else loading it needs."""
    Path(directory, META_FILE).write_text(json.dumps({"version": 1, **meta}, indent=2) + "\n")


def is_plain_file_name(name: object) -> bool:
    """Whether a name read from a file names a file in the same folder (never one elsewhere, and
    never text no file system takes: a NUL, or a lone surrogate a JSON escape can spell; nor a
    control character such as a newline, which no saved name holds and which would break the
    one-line error that names it)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not NOT_IN_A_NAME.search(name)


def with_chat_template(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    """``tokenizer`` carrying a chat template (``chat.py``): saved beside its files as
    chat_template.jinja (Hugging Face's name for it) and read back with it by ``load_tokenizer``."""
    if not template:
        return tokenizer
    save = type(tokenizer).save

    def save_with_template(directory: str | os.PathLike) -> None:
        save(tokenizer, directory)
        Path(directory, CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")

    tokenizer.chat_template, tokenizer.save = template, save_with_template
    return tokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read the tokenizer a checkpoint (or prepared dataset) directory was saved with, and its chat template."""
    tokenizer = _load_tokenizer(directory)
    path = Path(directory, CHAT_TEMPLATE_FILE)
    try:
        template = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {str(e)[:100]}") from None
    return with_chat_template(tokenizer, template)


def _load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    meta_path = Path(directory, META_FILE)
    meta = read_json(meta_path)
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str):
        raise UserError(f"{meta_path} is unreadable: not an object with a tokenizer kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        name, digest = meta.get("model_file", SentencePieceTokenizer.model_file), meta.get("model_sha256")
        if not is_plain_file_name(name):
            raise UserError(f"{meta_path}: model_file {name!r:.60} is not the name of a file beside it")
        if digest is not None and not isinstance(digest, str):
            raise UserError(f"{meta_path}: model_sha256 must be a string")
        path = Path(directory, name)
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read SentencePiece model {path}: {e.strerror}") from None
        if digest is not None and hashlib.sha256(proto).hexdigest() != digest:
            raise UserError(f"{path} is damaged or replaced: its SHA-256 is not the one {meta_path} records")
        problem = sentencepiece_problem(proto)
        if problem:
            raise UserError(f"{path} is not a valid SentencePiece model (cut short or damaged: {problem})")
        try:
            return SentencePieceTokenizer(proto)
        except RuntimeError:
            raise UserError(f"{path} is not a valid SentencePiece model") from None
    if kind == "gpt2":
        from .gpt2_tokenizer import GPT2Tokenizer

        return GPT2Tokenizer.load(directory, meta)
    raise UserError(f"{meta_path}: unknown tokenizer kind {kind!r:.40}")


def sentencepiece_problem(proto: bytes) -> str | None:
    """What shows a SentencePiece model to be cut short or broken, or None.

    The model is a protobuf ``ModelProto``: its pieces (field 1, one record each) first, then its
    trainer spec (field 2, whose field 4 is the vocabulary size) and normalizer spec (field 3).
    A model cut after a piece still parses, so the pieces are counted against the vocabulary size
    the trainer wrote, and the normalizer spec must be there (without it, text would be normalized).
    """
    try:
        fields = _protobuf_fields(proto)
        pieces = sum(1 for number, _ in fields if number == 1)
        trainer = [value for number, value in fields if number == 2]
        if not trainer or not isinstance(trainer[-1], bytes):
            return "it has no trainer spec"
        sizes = [value for number, value in _protobuf_fields(trainer[-1]) if number == 4]
    except ValueError as e:
        return str(e)
    if not any(number == 3 for number, _ in fields):
        return "it has no normalizer spec"
    if sizes and sizes[-1] != pieces:
        return f"it holds {pieces} pieces, its trainer spec says {sizes[-1]}"
    return None


def _protobuf_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of each top-level field of a protobuf message: an int for varints
    and fixed-size fields, the bytes of a length-delimited field. ValueError when malformed."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("a protobuf number runs past its end")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(data):
                raise ValueError("a protobuf field runs past its end")
            out.append((number, int.from_bytes(data[pos : pos + width], "little")))
            pos += width
        elif wire == 2:
            n = varint()
            if pos + n > len(data):
                raise ValueError("a protobuf field runs past its end")
            out.append((number, data[pos : pos + n]))
            pos += n
        else:
            raise ValueError(f"protobuf wire type {wire} is not one a model holds")
    return out
