"""Corpora in, llm.c token files out (the batches drawn from them are ``sampler.py``'s).

Token file format (llm.c's ``dev/data/data_common.py``): a header of 256 little-endian int32 —
magic, version, token count, then 253 zeros — then the tokens. GPT-2 files are magic 20240520
version 1 with uint16 tokens; LLaMA-3 files are magic 20240801 version 7 with uint32 tokens.
We write the first whenever every id fits in 16 bits (llm.c's C loader reads only those), the
second otherwise. A prepared dataset is a directory ``data/<name>/`` holding each split as shards
(``shards.py``), ``meta.json`` and the tokenizer (earlier versions wrote ``train.bin`` + ``val.bin``,
still read); llm.c's own ``*_train.bin`` / ``*_val.bin`` and shards are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import replacing_file
from .errors import UserError
from .tokenizer import Tokenizer, load_tokenizer

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, and the vocabulary llm.c's files of that kind hold
GPT2_HEADER, LLAMA3_HEADER = (20240520, 1), (20240801, 7)
HEADER_DTYPE = {GPT2_HEADER: np.dtype("<u2"), LLAMA3_HEADER: np.dtype("<u4")}
LLMC_VOCAB = {GPT2_HEADER: 50257, LLAMA3_HEADER: 128256}
MAX_TOKENS = 2**31 - 1  # the count is an int32
SCAN_CHUNK = 1 << 24  # tokens per read when checking ids
ID_MEMO = ".token-ids.json"  # each token file's largest id, beside the files (see check_token_ids)


# ---------------------------------------------------------------------------- token files


def header_for(vocab_size: int) -> tuple[int, int]:
    """(magic, version) of the file llm.c writes for this vocabulary: GPT-2's when ids fit uint16."""
    return GPT2_HEADER if vocab_size <= 1 << 16 else LLAMA3_HEADER


def header_bytes(count: int, vocab_size: int) -> bytes:
    """The 256-int32 header llm.c writes before ``count`` tokens of this vocabulary."""
    if count > MAX_TOKENS:
        raise UserError(f"{count:,} tokens is more than a token file holds ({MAX_TOKENS:,})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (*header_for(vocab_size), count)
    return header.tobytes()


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens as llm.c does: GPT-2's uint16 file when every id fits, else LLaMA-3's uint32."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError("token id outside the vocabulary")
    if tokens.size > MAX_TOKENS:
        raise UserError(f"{path}: {tokens.size:,} tokens is more than a token file holds ({MAX_TOKENS:,})")
    with open(path, "wb") as f:
        f.write(header_bytes(tokens.size, vocab_size))
        f.write(tokens.astype(HEADER_DTYPE[header_for(vocab_size)]).tobytes())


@dataclass(frozen=True)
class TokenFile:
    """What a token file's header says, checked against the file's size."""

    magic: int
    version: int
    count: int

    @property
    def dtype(self) -> np.dtype:
        return HEADER_DTYPE[self.magic, self.version]

    @property
    def llmc_vocab_size(self) -> int:
        """The vocabulary llm.c's files of this kind are tokenized with (GPT-2's or LLaMA-3's)."""
        return LLMC_VOCAB[self.magic, self.version]


def read_header(path: str | os.PathLike) -> TokenFile:
    """The header of a token file, after checking magic, version and size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as e:
        raise UserError(f"cannot read token file {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path} is too short to be a token file")
    magic, version, count = (int(v) for v in np.frombuffer(raw[:12], dtype="<i4"))
    known = " or ".join(f"magic {m} version {v}" for m, v in HEADER_DTYPE)
    if magic not in {m for m, _ in HEADER_DTYPE}:
        raise UserError(f"{path} is not a token file (magic {magic}; llm.c's are {known})")
    if (magic, version) not in HEADER_DTYPE:
        raise UserError(f"{path}: unsupported token file version {version} for magic {magic} "
                        f"(llm.c's are {known}; prepare the data again with --force)")
    info = TokenFile(magic, version, count)
    if count < 0 or size != HEADER_BYTES + count * info.dtype.itemsize:
        raise UserError(f"{path} is truncated or corrupt: header says {count} tokens, size is {size} bytes")
    return info


def open_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file's payload (read once; batches index into it)."""
    info = read_header(path)
    if info.count == 0:
        return np.zeros(0, dtype=info.dtype)
    return np.memmap(path, dtype=info.dtype, mode="r", offset=HEADER_BYTES, shape=(info.count,))


def check_token_ids(files: list[Path], vocab_size: int) -> None:
    """Refuse a token file holding an id the vocabulary lacks (it would index past the embedding).

    Each file is scanned in chunks (never read into memory whole), once: the largest id found is
    kept in a hidden ``.token-ids.json`` in the files' folder (where no reader of shards looks; in
    the user's cache folder when that folder is read-only), under the file's device, inode, size,
    and modification and change times: a file replaced, rewritten or touched since, even to the
    same size and with its modification time put back, does not match and is scanned again. A
    memo that cannot be read or written only means scanning again.
    """
    found: dict[Path, int] = {}
    for folder in dict.fromkeys(Path(f).parent for f in files):
        mine = [Path(f) for f in files if Path(f).parent == folder]
        memo_path = _memo_path(folder)
        memo = json_object(memo_path)
        memo = memo["files"] if memo.get("version") == 1 and isinstance(memo.get("files"), dict) else {}
        fresh = {}
        for f in mine:
            st = os.stat(f)
            identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            entry = memo.get(f.name)
            known = isinstance(entry, list) and entry[:-1] == identity and type(entry[-1]) is int
            found[f] = entry[-1] if known else _largest_id(f)
            fresh[f.name] = [*identity, found[f]]
        if fresh != {k: memo.get(k) for k in fresh}:
            with suppress(OSError), replacing_file(memo_path) as tmp:  # read-only, full: the next process scans again
                tmp.write_text(json.dumps({"version": 1, "files": fresh}) + "\n")
    bad = next((Path(f) for f in files if found[Path(f)] >= vocab_size), None)
    if bad is not None:
        raise UserError(f"{bad} holds token id {found[bad]}, outside the vocabulary of {vocab_size} tokens")


def _memo_path(folder: Path) -> Path:
    if os.access(folder, os.W_OK):
        return folder / ID_MEMO
    from .native import cache_dir

    return cache_dir() / "token-ids" / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]}.json"


def _largest_id(path: Path) -> int:
    tokens = open_tokens(path)
    largest = -1
    for i in range(0, len(tokens), SCAN_CHUNK):
        largest = max(largest, int(tokens[i : i + SCAN_CHUNK].max()))
    return largest


# ---------------------------------------------------------------------------- preparing


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: where its token files (one per split, or shards) are and how to read them."""

    path: Path
    train_files: tuple[Path, ...]
    val_files: tuple[Path, ...]
    vocab_size: int
    tokenizer: Tokenizer | None

    @property
    def train_file(self) -> Path:
        """The first train shard (the whole split when it is one file)."""
        return self.train_files[0]

    @property
    def val_file(self) -> Path:
        """The first val shard (the whole split when it is one file)."""
        return self.val_files[0]

    def tokens(self, split: str) -> np.ndarray:
        """A split's tokens: memory-mapped when one file, else its shards read into one array."""
        files = self.train_files if split == "train" else self.val_files
        parts = [open_tokens(f) for f in files]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def name(self) -> str:
        """The text's own name (meta.json's, without the tokenizer's label), else the folder's."""
        name = read_meta(self.path).get("name")
        return name if isinstance(name, str) and name else self.path.name


def read_meta(directory: str | os.PathLike) -> dict:
    """The meta.json a prepared folder (token shards or examples) holds; {} when none is readable."""
    return json_object(Path(directory, "meta.json"))


def json_object(path: str | os.PathLike) -> dict:
    """A JSON object this package wrote (a meta.json, a memo, a journal), or {} when it is missing,
    damaged or not an object: the caller then does the work the file would have saved."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


GPT2_TOKENIZER_DIR = ("tokenizers", "gpt2")  # under --data-dir: where `--tokenizer gpt2` looks


def parse_tokenizer_spec(spec: str) -> tuple[str, int | str | None]:
    """``byte``; ``sp`` / ``sp:VOCAB`` (SentencePiece, default 4096); ``gpt2`` / ``gpt2:PATH``.

    Returns (kind, argument): the vocabulary size for sp, the path (or None) for gpt2.
    """
    kind, _, arg = spec.partition(":")
    if kind == "byte" and not arg:
        return "byte", 256
    if kind == "sp":
        try:
            return "sp", int(arg or 4096)
        except ValueError:
            pass
    if kind == "gpt2":
        return "gpt2", arg or None
    raise UserError(f"unknown tokenizer {spec!r}; use byte, sp, sp:VOCAB (e.g. sp:4096), gpt2 or gpt2:PATH")


def gpt2_tokenizer(path: str | None, data_dir: str | os.PathLike = "data") -> Tokenizer:
    """GPT-2's BPE from PATH, or from <data-dir>/tokenizers/gpt2/ when no path is given.

    Nothing is downloaded: the files are OpenAI's encoder.json + vocab.bpe, Hugging Face's
    vocab.json + merges.txt or tokenizer.json, or llm.c's gpt2_tokenizer.bin.
    """
    from .gpt2_tokenizer import WHERE, GPT2Tokenizer

    if path is not None:
        return GPT2Tokenizer.from_path(path)
    default = Path(data_dir, *GPT2_TOKENIZER_DIR)
    if not GPT2Tokenizer.found_in(default):
        raise UserError(f"--tokenizer gpt2 reads GPT-2's tokenizer files from {default}/ ({WHERE}), which has none; "
                        "put them there or pass --tokenizer gpt2:PATH")
    return GPT2Tokenizer.from_directory(default)


def prepare(source: str, tokenizer: str | Tokenizer = "byte", **settings) -> Dataset:
    """Tokenize a source into data/<name>-<tokenizer>/ (reused when already prepared): see
    ``mlx_gpt.prepare.prepare_dataset``, where the streaming pipeline lives."""
    from .prepare import prepare_dataset

    return prepare_dataset(source, tokenizer, **settings)


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): the tail of every document is held out, so val is unseen text even for one document."""
    cuts = [int(len(d) * (1 - val_fraction)) for d in docs]
    return [d[:c] for d, c in zip(docs, cuts)], [d[c:] for d, c in zip(docs, cuts)]


def tokenizer_digest(tok: Tokenizer) -> str:
    """SHA-256 of a tokenizer's saved files: two tokenizers with the same digest encode alike."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        h = hashlib.sha256()
        for f in sorted(Path(d).iterdir()):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Tokens of every document, each followed by end-of-text when the tokenizer has one."""
    parts = []
    for d in docs:
        ids = tok.encode(d)
        if tok.eot_id is not None:
            ids.append(tok.eot_id)
        parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_listed(directory: Path, files: list[Path]) -> None:
    """Our meta.json lists every shard and its count: one missing (the last, which numbering alone
    cannot tell) or of another length is refused."""
    listed = read_meta(directory).get("shards")
    if not isinstance(listed, dict):
        return
    found = {f.name: f for f in files}
    for split in ("train", "val"):
        for name, count in listed.get(split, ()):
            if name not in found:
                raise UserError(f"shard {directory / name} is missing (meta.json lists it)")
            if read_header(found[name]).count != count:
                raise UserError(f"{found[name]} holds {read_header(found[name]).count} tokens; meta.json says {count}")


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether a path is a prepared folder (ours or llm.c's): token files, not a corpus."""
    from .shards import find_splits

    p = Path(path)
    return p.is_dir() and find_splits(p) is not None


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Open a prepared folder: ours (shards or train.bin + val.bin, meta.json and the tokenizer) or
    llm.c's (``*_train.bin`` + ``*_val.bin``, or FineWeb-style shards), every id checked once."""
    from .shards import check_series, find_splits

    p = Path(path)
    splits = find_splits(p)
    if splits is None:
        raise UserError(f"{p} holds no token files (train.bin, *_train.bin or NAME_train_000001.bin ...)")
    train, val = splits
    if not val:
        raise UserError(f"{p} has train shards but no val shard (NAME_val_000000.bin)")
    missing = next((f for f in train + val if not f.exists()), None)
    if missing is not None:
        raise UserError(f"{missing} is missing")
    check_series(train + val)
    _check_listed(p, train + val)
    tokenizer = load_tokenizer(p) if (p / "tokenizer.json").exists() else None
    # llm.c's files say by their header whether they hold GPT-2's or LLaMA-3's tokens
    vocab = tokenizer.vocab_size if tokenizer is not None else read_header(train[0]).llmc_vocab_size
    check_token_ids(train + val, vocab)
    return Dataset(p, tuple(train), tuple(val), vocab, tokenizer)
