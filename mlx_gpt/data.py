"""Corpora in, llm.c token files out (the batches drawn from them are ``sampler.py``'s).

Token file format (llm.c's ``dev/data/data_common.py``): a header of 256 little-endian int32 —
magic, version, token count, then 253 zeros — then the tokens. GPT-2 files are magic 20240520
version 1 with uint16 tokens; LLaMA-3 files are magic 20240801 version 7 with uint32 tokens.
We write the first whenever every id fits in 16 bits (llm.c's C loader reads only those), the
second otherwise. A prepared dataset is a directory ``data/<name>/`` holding ``train.bin``, ``val.bin``,
``meta.json`` and the tokenizer; llm.c's own ``*_train.bin`` / ``*_val.bin`` are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .atomic import replacing_directory
from .errors import UserError
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, and the vocabulary llm.c's files of that kind hold
GPT2_HEADER, LLAMA3_HEADER = (20240520, 1), (20240801, 7)
HEADER_DTYPE = {GPT2_HEADER: np.dtype("<u2"), LLAMA3_HEADER: np.dtype("<u4")}
LLMC_VOCAB = {GPT2_HEADER: 50257, LLAMA3_HEADER: 128256}
MAGIC = GPT2_HEADER[0]
MAX_TOKENS = 2**31 - 1  # the count is an int32
SCAN_CHUNK = 1 << 24  # tokens per read when checking ids

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTIN_SOURCES = ("pydoc", "shakespeare")


# ---------------------------------------------------------------------------- token files


def header_for(vocab_size: int) -> tuple[int, int]:
    """(magic, version) of the file llm.c writes for this vocabulary: GPT-2's when ids fit uint16."""
    return GPT2_HEADER if vocab_size <= 1 << 16 else LLAMA3_HEADER


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens as llm.c does: GPT-2's uint16 file when every id fits, else LLaMA-3's uint32."""
    magic, version = header_for(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError("token id outside the vocabulary")
    if tokens.size > MAX_TOKENS:
        raise UserError(f"{path}: {tokens.size:,} tokens is more than a token file holds ({MAX_TOKENS:,})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(HEADER_DTYPE[magic, version]).tobytes())


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


def check_token_ids(path: str | os.PathLike, vocab_size: int) -> None:
    """Refuse a token file holding an id the vocabulary lacks (it would index past the embedding).

    The file is scanned once per process (remembered by path, size and modification time), in
    chunks, so a large file is never read into memory whole.
    """
    st = os.stat(path)
    largest = _largest_id(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if largest >= vocab_size:
        raise UserError(f"{path} holds token id {largest}, outside the vocabulary of {vocab_size} tokens")


@lru_cache(maxsize=64)
def _largest_id(path: str, size: int, mtime_ns: int) -> int:
    tokens = open_tokens(path)
    largest = -1
    for i in range(0, len(tokens), SCAN_CHUNK):
        largest = max(largest, int(tokens[i : i + SCAN_CHUNK].max()))
    return largest


# ---------------------------------------------------------------------------- sources


def read_source(source: str, cache_dir: str | os.PathLike = "data") -> tuple[str, list[str]]:
    """Resolve a source to (dataset name, list of documents).

    A source is a text file, a folder of .txt files (one document each), ``pydoc`` (the
    Python reference manual that CPython ships, so a first run needs no download) or
    ``shakespeare`` (tiny-shakespeare, downloaded once and checked by SHA-256).
    """
    if source == "pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return "pydoc", [topics[k] for k in sorted(topics)]
    if source == "shakespeare":
        path = Path(cache_dir, "downloads", "tinyshakespeare.txt")
        if not path.exists():
            download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
        return "shakespeare", [_read_text(path)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files")
        docs = [_read_text(p) for p in files]
        docs = [d for d in docs if d]
        if not docs:
            raise UserError(f"every .txt file in {path} is empty")
        return path.name, docs
    if not path.exists():
        raise UserError(f"corpus {source!r} not found (give a text file, a folder of .txt files, or one of {', '.join(BUILTIN_SOURCES)})")
    text = _read_text(path)
    if not text:
        raise UserError(f"corpus {path} is empty")
    return path.stem, [text]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch url to dest with a progress bar; keep it only if the checksum matches."""
    import urllib.request  # imported here: the network stack costs every run's startup otherwise

    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"download of {url} failed: {e}; offline, put the file at {dest} yourself") from None
    if digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"download of {url} has the wrong checksum; try again")
    tmp.replace(dest)


# ---------------------------------------------------------------------------- preparing


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: where its token files are and how to read them."""

    path: Path
    train_file: Path
    val_file: Path
    vocab_size: int
    tokenizer: Tokenizer | None

    @property
    def name(self) -> str:
        """The text's own name (meta.json's, without the tokenizer's label), else the folder's."""
        try:
            name = json.loads((self.path / "meta.json").read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        return name if isinstance(name, str) and name else self.path.name


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


def prepare(source: str, tokenizer: str | Tokenizer = "byte", *, data_dir: str | os.PathLike = "data",
            val_fraction: float = 0.1, force: bool = False) -> Dataset:
    """Tokenize a source into data/<name>-<tokenizer>/ (reused when already prepared).

    ``tokenizer`` is a spec (``byte``; ``sp:4096``, trained here on the train split; ``gpt2`` or
    ``gpt2:PATH``, GPT-2's BPE read from files) or an existing Tokenizer (fine-tuning a
    checkpoint encodes new text with its own tokenizer).
    """
    existing = _as_prepared(source)
    if existing is not None:
        if isinstance(tokenizer, str) or existing.tokenizer is None or tokenizer_digest(existing.tokenizer) == tokenizer_digest(tokenizer):
            return existing
        raise UserError(f"{source} was tokenized with another tokenizer than the checkpoint's")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be in (0, 1), got {val_fraction}")
    name, docs = read_source(source, data_dir)
    label = None  # the output's suffix when the tokenizer is named by a spec
    if isinstance(tokenizer, str):
        kind, arg = parse_tokenizer_spec(tokenizer)
        label = {"byte": "byte", "sp": f"sp{arg}", "gpt2": "gpt2"}[kind]
        if kind == "gpt2":  # GPT-2's BPE is not trained here: read its files, then as any given tokenizer
            tokenizer = gpt2_tokenizer(arg, data_dir)
    if isinstance(tokenizer, str):
        out = Path(data_dir, f"{name}-{label}")
        fingerprint = _fingerprint(docs, tokenizer, val_fraction)
    else:
        # a tokenizer given whole (a checkpoint's): the text may be prepared already, under any
        # name (``prepare SOURCE --tokenizer gpt2`` made data/NAME-gpt2); else a name a person reads
        digest = tokenizer_digest(tokenizer)
        fingerprint = _fingerprint(docs, digest, val_fraction)
        found = None if force else next((d for d in sorted(Path(data_dir).glob(f"{name}-*"))
                                         if _fingerprint_of(d) == fingerprint), None)
        if found is not None:
            return load_dataset(found)
        label = label or {"byte": "byte", "sentencepiece": f"sp{tokenizer.vocab_size}"}.get(tokenizer.kind,
                                                                                              tokenizer.kind)
        out = Path(data_dir, f"{name}-{label}")
        if _fingerprint_of(out) not in (None, fingerprint):  # that name holds this text under another tokenizer
            out = Path(data_dir, f"{name}-{label}-{digest[:8]}")
    if not force and _fingerprint_of(out) == fingerprint:
        return load_dataset(out)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if not isinstance(tokenizer, str):
        tok: Tokenizer = tokenizer
    elif kind == "byte":
        tok = ByteTokenizer()
    else:
        lines = (line for d in train_docs for line in d.splitlines(keepends=True))
        tok = SentencePieceTokenizer.train(lines, arg)
    with replacing_directory(out) as tmp:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            write_tokens(tmp / f"{split}.bin", encode_documents(tok, split_docs), tok.vocab_size)
        tok.save(tmp)
        meta = {"source": source, "name": name, "tokenizer": tokenizer if isinstance(tokenizer, str) else tok.kind,
                "vocab_size": tok.vocab_size, "val_fraction": val_fraction, "fingerprint": fingerprint,
                "documents": len(docs)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load_dataset(out)


def _fingerprint_of(directory: Path) -> str | None:
    """The fingerprint a prepared dataset's meta.json records (None: none readable)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("fingerprint") if isinstance(meta, dict) else None


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


def _fingerprint(docs: list[str], tokenizer: str, val_fraction: float) -> str:
    h = hashlib.sha256(f"{tokenizer}|{val_fraction}|{len(docs)}".encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
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


def _as_prepared(source: str) -> Dataset | None:
    """A source that already is a prepared directory (ours or llm.c's), else None."""
    p = Path(source)
    if not p.is_dir():
        return None
    if (p / "train.bin").exists() or any(p.glob("*_train.bin")):
        return load_dataset(p)
    return None


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Open a prepared directory: ours (train.bin, val.bin, meta.json) or llm.c's (*_train.bin)."""
    p = Path(path)
    if (p / "train.bin").exists():
        train, val = p / "train.bin", p / "val.bin"
    else:
        trains, vals = sorted(p.glob("*_train.bin")), sorted(p.glob("*_val.bin"))
        if len(trains) != 1 or len(vals) != 1:
            raise UserError(f"{p} must hold one *_train.bin and one *_val.bin token file")
        train, val = trains[0], vals[0]
    if not val.exists():
        raise UserError(f"{val} is missing")
    tokenizer = load_tokenizer(p) if (p / "tokenizer.json").exists() else None
    # llm.c's files say by their header whether they hold GPT-2's or LLaMA-3's tokens
    vocab = tokenizer.vocab_size if tokenizer is not None else read_header(train).llmc_vocab_size
    for f in (train, val):
        check_token_ids(f, vocab)
    return Dataset(p, train, val, vocab, tokenizer)
