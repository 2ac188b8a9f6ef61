"""Tokenizers behind one small interface: byte-level, and SentencePiece BPE trained on your text.

Every tokenizer saves itself into a checkpoint directory as ``tokenizer.json`` (its kind and
version) plus whatever model file it needs, and ``load_tokenizer`` reads it back, so a
checkpoint always carries the exact tokenizer it was trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
from contextlib import contextmanager
from typing import Iterable, Iterator, Protocol

from .errors import UserError

META_FILE = "tokenizer.json"


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
        _write_meta(directory, {"kind": self.kind})


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
        _write_meta(directory, {"kind": self.kind, "model_file": self.model_file})

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
                    sentence_iterator=_until(interrupted, lines),
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
    import re

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


def _until(noted: list, lines: Iterable[str]) -> Iterator[str]:
    """The lines, cut short once a Ctrl-C is noted (an exception here would surface from the C++
    side as a training failure)."""
    for line in lines:
        if noted:
            return
        yield line


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


def _write_meta(directory: str | os.PathLike, meta: dict) -> None:
    Path(directory, META_FILE).write_text(json.dumps({"version": 1, **meta}, indent=2) + "\n")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read the tokenizer a checkpoint (or prepared dataset) directory was saved with."""
    meta_path = Path(directory, META_FILE)
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        path = Path(directory, meta.get("model_file", SentencePieceTokenizer.model_file))
        try:
            return SentencePieceTokenizer(path.read_bytes())
        except OSError as e:
            raise UserError(f"cannot read SentencePiece model {path}: {e.strerror}") from None
        except RuntimeError:
            raise UserError(f"{path} is not a valid SentencePiece model") from None
    if kind == "gpt2":
        from .gpt2_tokenizer import GPT2Tokenizer

        return GPT2Tokenizer.load(directory)
    raise UserError(f"{meta_path}: unknown tokenizer kind {kind!r}")
