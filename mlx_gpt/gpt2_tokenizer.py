"""GPT-2's tokenizer: byte-level BPE run by Hugging Face ``tokenizers``, loaded from GPT-2's own files.

The vocabulary maps byte-level strings to ids (``vocab.json``, OpenAI's ``encoder.json``); the
merges list the pairs to join, best first (``merges.txt``, OpenAI's ``vocab.bpe``). Both pairs of
names hold the same formats. Text is split with GPT-2's pre-tokenization pattern and every byte
is a token of its own, so any text round-trips exactly.

``<|endoftext|>`` (50256) is the end-of-text id. Text that happens to contain the string
``<|endoftext|>`` is encoded as ordinary text: only the data pipeline and generation place the
id, so a document cannot smuggle one in.

Hugging Face repos may ship the tokenizer only as ``tokenizer.json`` (the ``tokenizers``
library's whole pipeline in one file); its BPE model holds the same vocabulary and merges,
which are read from it when its pipeline is GPT-2's (byte-level, no normalizer).

llm.c's tokenizer file lists each id's bytes with no merges; ``from_token_bytes`` recovers the
merges, since in a byte-level BPE vocabulary token ``r`` is the ``r - 256``-th merge.

The two files describe one thing twice, so each is checked against the other before any text is
encoded (``check_bpe``): every merge joins two tokens of the vocabulary into a third, every
longer token is made by a merge, every byte has its token, and a vocabulary that claims to be
GPT-2's (50,257 tokens, end-of-text at 50,256) has GPT-2's layout, merge ``i`` making token
``256 + i``. A file cut short, emptied or edited then fails with one error naming it, where the
``tokenizers`` library would build a different BPE and give different ids without a word.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError
from .formats import gpt2_files, llmc
from .tokenizer import META_FILE, is_plain_file_name, write_meta

EOT = "<|endoftext|>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# (vocab, merges) file names, Hugging Face's first, then OpenAI's originals
FILE_PAIRS = ((VOCAB_FILE, MERGES_FILE), ("encoder.json", "vocab.bpe"))
HF_TOKENIZER_FILE = "tokenizer.json"  # also the name of our own small tokenizer meta file
GPT2_VOCAB, GPT2_MERGES, GPT2_EOT = 50257, 50000, 50256
WHERE = " or ".join([*(f"{v} + {m}" for v, m in FILE_PAIRS), f"Hugging Face's {HF_TOKENIZER_FILE}"])


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, so BPE works on strings.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, ...) take the
    characters from U+0100 on, in byte order (space becomes 'Ġ', newline 'Ċ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def to_unicode(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def to_bytes(token: str) -> bytes:
    """The bytes a vocabulary string stands for (KeyError for a character outside the map)."""
    table = unicode_to_byte()
    return bytes(table[c] for c in token)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (or any vocabulary built the same way), ids equal to tiktoken's."""

    kind = "gpt2"

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 special: Iterable[str] = (), files: tuple[str, str] = ("the vocabulary", "the merges")):
        """``special``: tokens no merge makes (besides end-of-text); ``files``: the (vocab, merges)
        sources named in errors (the same name twice for a single file)."""
        merges = [tuple(m) for m in merges]
        problem = check_bpe(vocab, merges, special={EOT, *special}, files=files)
        if problem:
            raise UserError(problem)
        self._vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        self._merges = merges
        self._tok = _build(self._vocab, self._merges)

    # ------------------------------------------------------------------ the Tokenizer protocol

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eot_id(self) -> int | None:
        return self._vocab.get(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        # invalid UTF-8 (a sequence cut inside a character) decodes to U+FFFD
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and tokenizer.json (which names them) into directory."""
        self.write_files(directory)
        write_meta(directory, {"kind": self.kind, "vocab_file": VOCAB_FILE, "merges_file": MERGES_FILE})

    # ------------------------------------------------------------------ files

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def merges(self) -> list[tuple[str, str]]:
        return list(self._merges)

    def write_files(self, directory: str | os.PathLike) -> None:
        """vocab.json and merges.txt in Hugging Face's layout (also what transformers reads)."""
        d = Path(directory)
        (d / VOCAB_FILE).write_text(json.dumps(self._vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self._merges)]
        (d / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes, in id order (llm.c's tokenizer file); special tokens as their text."""
        out = []
        for token in self._vocab:
            try:
                out.append(to_bytes(token))
            except KeyError:  # a special token written in plain characters, e.g. <|endoftext|>
                out.append(token.encode("utf-8"))
        return out

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> "GPT2Tokenizer":
        return cls(gpt2_files.read_vocab(Path(vocab_path)), gpt2_files.read_merges(Path(merges_path)),
                   files=(str(vocab_path), str(merges_path)))

    @classmethod
    def find_files(cls, directory: str | os.PathLike) -> tuple[Path, Path] | None:
        """The (vocab, merges) pair a directory holds, under either pair of names, else None."""
        for vocab, merges in FILE_PAIRS:
            v, m = Path(directory, vocab), Path(directory, merges)
            if v.is_file() and m.is_file():
                return v, m
        return None

    @classmethod
    def found_in(cls, directory: str | os.PathLike) -> bool:
        """Whether from_directory would find GPT-2 tokenizer files in directory."""
        return cls.find_files(directory) is not None or gpt2_files.is_hf_tokenizer_json(Path(directory, HF_TOKENIZER_FILE))

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "GPT2Tokenizer":
        """From vocab.json + merges.txt, encoder.json + vocab.bpe, or tokenizer.json in directory."""
        found = cls.find_files(directory)
        if found is not None:
            return cls.from_files(*found)
        if gpt2_files.is_hf_tokenizer_json(Path(directory, HF_TOKENIZER_FILE)):
            return cls.from_tokenizer_json(Path(directory, HF_TOKENIZER_FILE))
        raise UserError(f"{directory} has no GPT-2 tokenizer files ({WHERE})")

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "GPT2Tokenizer":
        """From a directory of tokenizer files, one of them named, or llm.c's tokenizer file."""
        p = Path(path)
        if p.is_file() and p.name in {name for pair in FILE_PAIRS for name in pair}:
            p = p.parent  # one of a pair was named: read both
        if p.is_dir():
            return cls.from_directory(p)
        if gpt2_files.is_hf_tokenizer_json(p):
            return cls.from_tokenizer_json(p)
        if p.is_file():
            return cls.from_llmc(p)
        raise UserError(f"tokenizer {p} not found")

    @classmethod
    def from_llmc(cls, path: str | os.PathLike) -> "GPT2Tokenizer":
        """From llm.c's tokenizer file (its list of token bytes)."""
        tokens, eot = llmc.read_token_list(path)
        if eot is None:  # version 1 did not record it; GPT-2's is the token spelled <|endoftext|>
            eot = next((i for i, t in enumerate(tokens) if t == EOT.encode()), None)
        return cls.from_token_bytes(tokens, special=[eot] if eot is not None else [])

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> "GPT2Tokenizer":
        """From Hugging Face's tokenizer.json, when it describes a GPT-2-style byte-level BPE
        (``gpt2_files.read_tokenizer_json``: anything that would change the ids is refused)."""
        vocab, merges, special = gpt2_files.read_tokenizer_json(Path(path))
        return cls(vocab, merges, special=special, files=(str(path), str(path)))

    @classmethod
    def load(cls, directory: str | os.PathLike, meta: dict) -> "GPT2Tokenizer":
        """From a checkpoint directory, whose tokenizer.json (``meta``, as ``load_tokenizer`` read it)
        names the two files."""
        vocab, merges = meta.get("vocab_file", VOCAB_FILE), meta.get("merges_file", MERGES_FILE)
        for name in (vocab, merges):
            if not is_plain_file_name(name):
                raise UserError(f"{Path(directory, META_FILE)}: {name!r:.60} is not the name of a file beside it")
        return cls.from_files(Path(directory, vocab), Path(directory, merges))

    @classmethod
    def from_token_bytes(cls, tokens: Sequence[bytes], special: Iterable[int] = ()) -> "GPT2Tokenizer":
        """Rebuild vocabulary and merges from each id's bytes (llm.c's tokenizer file).

        In a byte-level BPE vocabulary the 256 single bytes come first and every later token
        is one merge of two earlier ones, so merges ranked by the id they produce, best
        first, are the merges. The pair for token ``r`` is what BPE makes of its bytes using
        only tokens below ``r``. ``special`` ids (end-of-text) are kept but never merged to.
        """
        special = set(special)
        ranks: dict[bytes, int] = {}  # the other tokens' ids, in id order
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if i in special:  # kept as its text
                try:
                    vocab[t.decode("utf-8")] = i
                except UnicodeDecodeError:
                    raise UserError(f"special token {i} is not UTF-8 text") from None
                continue
            if not t:
                raise UserError(f"token {i} is empty; not a byte-level BPE vocabulary")
            if t in ranks:
                raise UserError(f"tokens {ranks[t]} and {i} are the same bytes {t!r}")
            ranks[t], vocab[to_unicode(t)] = i, i
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise UserError(f"{len(missing)} single bytes have no token (e.g. byte {missing[0]}); "
                            "not a byte-level BPE vocabulary")
        merges = []
        for t, r in ranks.items():
            if len(t) == 1:
                continue
            parts = _bpe(t, ranks, below=r)
            if len(parts) != 2:
                raise UserError(f"token {r} ({t!r}) is not a merge of two earlier tokens; "
                                "not a byte-level BPE vocabulary")
            merges.append((to_unicode(parts[0]), to_unicode(parts[1])))
        specials = [tokens[i].decode("utf-8") for i in special]
        return cls(vocab, merges, special=specials, files=("the token list", "the token list"))


def check_bpe(vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, special: Iterable[str] = (EOT,),
              files: tuple[str, str] = ("the vocabulary", "the merges")) -> str | None:
    """What makes a byte-level BPE's vocabulary and merges disagree, or None when they agree.

    Ids are 0..n-1, each once; each of the 256 bytes has its token; every merge joins two tokens
    into a third, once; every other token is made by a merge, except ``special`` tokens (such as
    end-of-text), which text never turns into. A vocabulary with GPT-2's size or end-of-text id
    must also have GPT-2's layout: bytes first in GPT-2's order, merge ``i`` making ``256 + i``
    (special tokens a derived vocabulary adds come after GPT-2's 50,257).
    """
    vocab_file, merges_file = files
    both = vocab_file if vocab_file == merges_file else f"{vocab_file} and {merges_file}"
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        gap = next((k for k, i in enumerate(ids) if i != k), len(ids))
        return (f"{vocab_file} is damaged: its ids must be 0..{len(ids) - 1}, each once, but id {gap} is "
                f"{'repeated or missing' if gap < len(ids) else 'missing'}")
    special = set(special)
    byte_chars = list(byte_to_unicode().values())
    lacking = [b for b, c in enumerate(byte_chars) if c not in vocab]
    if lacking:
        return f"{vocab_file} is damaged: byte {lacking[0]} has no token ({len(lacking)} bytes lack one)"
    made: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for rank, (a, b) in enumerate(merges):
        for part in (a, b):
            if part not in vocab:
                return (f"{both} disagree: merge {rank + 1} ({a!r} {b!r}) joins {part!r}, which {vocab_file} lacks; "
                        "one of them is cut short or damaged")
        if a + b not in vocab:
            return (f"{both} disagree: merge {rank + 1} ({a!r} {b!r}) makes {a + b!r}, which {vocab_file} lacks; "
                    "one of them is cut short or damaged")
        if (a, b) in pairs:
            return f"{merges_file} is damaged: merge {rank + 1} ({a!r} {b!r}) appears twice"
        pairs.add((a, b))
        made.add(a + b)
    # a token text can never become: longer than a byte and made by no merge, or a character that is no byte
    unmade = [t for t in vocab if t not in special and (t not in made if len(t) > 1 else t not in unicode_to_byte())]
    if unmade:
        t = min(unmade, key=vocab.__getitem__)
        return (f"{both} disagree: tokens of {vocab_file} that no merge of {merges_file} makes: {len(unmade)} "
                f"(the first: {t!r}, id {vocab[t]}); one of them is cut short or damaged")
    # GPT-2's own tokens: all but the special ones a derived vocabulary adds after them
    own = sum(1 for t in vocab if t not in special or t == EOT)
    if own == GPT2_VOCAB or vocab.get(EOT) == GPT2_EOT:  # it claims to be GPT-2's
        if own != GPT2_VOCAB or len(merges) != GPT2_MERGES or vocab.get(EOT) != GPT2_EOT \
                or any(vocab[t] < GPT2_VOCAB for t in special if t in vocab and t != EOT):
            return (f"{both} claim to be GPT-2's but hold {own:,} tokens and {len(merges):,} merges "
                    f"(GPT-2's: {GPT2_VOCAB:,} and {GPT2_MERGES:,}, end-of-text {GPT2_EOT}); one is cut short or "
                    "damaged")
        moved = next((c for b, c in enumerate(byte_chars) if vocab[c] != b), None)
        if moved is not None:
            return (f"{vocab_file} is damaged: GPT-2's token {moved!r} has id {vocab[moved]}, "
                    f"not {byte_chars.index(moved)}")
        for rank, (a, b) in enumerate(merges):
            if vocab[a + b] != 256 + rank:
                return (f"{both} disagree: GPT-2's merge {rank + 1} ({a!r} {b!r}) makes token {256 + rank}, but "
                        f"{vocab_file} gives {a + b!r} id {vocab[a + b]}; one of them is reordered or damaged")
    return None


def _bpe(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-pair-encode piece, merging the best-ranked adjacent pair first, ranks < below only."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _build(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:  # tokenizers raises its own Exception subclass for bad merges
        raise UserError(f"invalid BPE vocabulary or merges: {str(e).splitlines()[0]}") from None
    # GPT-2's split: contractions, letters, digits, other symbols, each with one leading space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok
