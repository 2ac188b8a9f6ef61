"""Corpora as users keep them, read as a stream of documents in bounded memory.

A source is a text file, a ``.jsonl`` (``.jsonl.gz``, ``.jsonl.zst``) file of records, a Parquet
file, a folder holding any of these (searched recursively, read in sorted path order), or a
built-in name (``pydoc``, ``shakespeare``). A text file is one document; a record or a row is one.

Big text is handed on in pieces cut just before a space that has non-space characters on both
sides: GPT-2's pre-tokenizer always starts a new piece there, so encoding the pieces one by one
gives the ids of encoding the whole text.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import replacing_file
from .errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTIN_SOURCES = ("pydoc", "shakespeare")
# a corpus file's kind by the end of its name (arrow: Hugging Face datasets' save_to_disk streams)
SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst"), "parquet": (".parquet",), "arrow": (".arrow",),
            "text": (".txt",)}
READ_BLOCK = 1 << 20  # bytes read from a file at a time
PIECE_CHARS = 1 << 20  # a text file is handed on in pieces of about this many characters
MAX_PIECE_CHARS = 1 << 26  # ... or, where no space allows a clean cut, at most this many
MAX_LINE_BYTES = 1 << 27  # a jsonl line (one record) longer than this is refused: memory stays bounded
CLEAN_CUT = re.compile(r"(?<=\S) (?=\S)")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's escapes can spell half a surrogate pair: not text
GOLDEN = 0.6180339887498949  # document i is val when frac(i * GOLDEN) < val fraction: spread evenly


def kind_of(path: Path) -> str | None:
    """'text', 'jsonl', 'parquet' or 'arrow' by the file's name; None for a file no source holds."""
    return next((kind for kind, suffixes in SUFFIXES.items() if path.name.lower().endswith(suffixes)), None)


def source_files(source: str) -> list[Path]:
    """The files a source names: itself, or a folder's corpus files in sorted path order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p) and not p.name.startswith("."))
        if not files:
            raise UserError(f"folder {path} holds no .txt files, nor any other corpus file (.jsonl, .jsonl.gz, "
                            ".jsonl.zst, .parquet, .arrow)")
        return files
    if not path.exists():
        raise UserError(f"corpus {source!r} not found (give a text, .jsonl or .parquet file, a folder of them, "
                        f"or one of {', '.join(BUILTIN_SOURCES)})")
    return [path]


def source_name(source: str) -> str:
    """The dataset's name: the builtin's, the folder's, or the file's without its suffixes."""
    if source in BUILTIN_SOURCES:
        return source
    path = Path(source)
    kind = None if path.is_dir() else kind_of(path)
    if kind is not None:
        suffix = next(s for s in SUFFIXES[kind] if path.name.lower().endswith(s))
        return path.name[: -len(suffix)] or path.name
    return path.stem if path.is_file() else path.name


def part_of(files: list[Path], part: int, parts: int) -> list[Path]:
    """The ``part``-th (1-based) of ``parts`` contiguous slices of files, balanced by size."""
    sizes = [f.stat().st_size for f in files]
    total = max(sum(sizes), 1)  # a file falls in the slice its middle byte falls in
    return [f for f, size, before in zip(files, sizes, accumulate(sizes, initial=0))
            if int((before + size / 2) * parts / total) == part - 1]


# ---------------------------------------------------------------------------- byte streams


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed by its suffix, in blocks; a damaged file is a UserError."""
    name = path.name.lower()
    try:
        with open(path, "rb") as raw:
            if name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw) as f:
                    while block := f.read(READ_BLOCK):
                        yield block
            elif name.endswith(".zst"):
                yield from _zstd_blocks(raw, path)
            else:
                while block := raw.read(READ_BLOCK):
                    yield block
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        raise UserError(f"{path} is truncated or not gzip ({e})") from None


def _zstd_blocks(raw, path: Path) -> Iterator[bytes]:
    """Every frame of a zstd file; one cut short is an error (zstandard's reader would stop quietly)."""
    import zstandard

    d, pending = zstandard.ZstdDecompressor().decompressobj(), False
    try:
        while chunk := raw.read(READ_BLOCK):
            while chunk:
                out = d.decompress(chunk)
                pending = True
                if out:
                    yield out
                chunk = d.unused_data if d.eof else b""
                if d.eof:
                    d, pending = zstandard.ZstdDecompressor().decompressobj(), bool(chunk)
    except zstandard.ZstdError as e:
        raise UserError(f"{path} is not valid zstd ({e})") from None
    if pending and not d.eof:
        raise UserError(f"{path} is truncated (its last zstd frame is cut short)")


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes (newline kept), read block by block; a line longer than
    MAX_LINE_BYTES (a binary file, a hole of zeros) is an error, not a buffer that grows without end."""
    rest, count = b"", 0
    for block in _blocks(path):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        rest = block[cut:]
        lines = block[:cut].splitlines(keepends=True)
        count += len(lines)
        yield from lines
        if len(rest) > MAX_LINE_BYTES:
            raise UserError(f"{path}:{count + 1}: a line longer than {MAX_LINE_BYTES >> 20} MB; "
                            "not JSON lines (a binary file, or one damaged?)")
    if rest:
        yield rest


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line of a .jsonl / .jsonl.gz / .jsonl.zst file.

    A line that is not UTF-8 or not JSON is a UserError naming the file and the line.
    """
    path = Path(path)
    for number, raw in enumerate(_lines(path), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors save, is not part of it
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not JSON ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: not JSON (nested too deeply)") from None
        yield number, record


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for number, record in jsonl_records(path):
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            what = "no" if not isinstance(record, dict) or field not in record else "a non-string"
            raise UserError(f"{path}:{number}: {what} {field!r} field (choose the field with --text-field)")
        if not text.isascii() and LONE_SURROGATE.search(text):
            raise UserError(f"{path}:{number}: the {field!r} field is not text: it holds a lone surrogate "
                            "(a \\ud800-\\udfff escape without its pair)")
        yield text


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of a Parquet file or an Arrow stream (a saved Hugging Face dataset's
    files), batch by batch."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'mlx_gpt[data]'") from None
    row, what = 0, "Parquet" if kind_of(path) == "parquet" else "Arrow"
    try:
        if what == "Parquet":
            f = pq.ParquetFile(path)
            names, batches = f.schema_arrow.names, lambda: f.iter_batches(columns=[field], batch_size=1024)
        else:
            f = pyarrow.ipc.open_stream(pyarrow.memory_map(str(path)))
            names, batches = f.schema.names, lambda: (b.select([field]) for b in f)
        if field not in names:
            raise UserError(f"{path} has no {field!r} column (it has {', '.join(names)}; "
                            "choose one with --text-field)")
        for batch in batches():
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    raise UserError(f"{path}: row {row}: {field!r} is not a string")
                yield text
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: row {row + 1}: cannot read {what} ({str(e).splitlines()[0]})") from None


def _text_blocks(path: Path, start: int, end: int) -> Iterator[str]:
    """The UTF-8 text of bytes [start, end) of a file, in blocks; bad UTF-8 names the line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(READ_BLOCK, left))
                if not block:
                    break
                left -= len(block)
                try:
                    yield decoder.decode(block, final=left <= 0)
                except UnicodeDecodeError as e:  # the line: one more than the newlines before the bad byte
                    where = 1 + _newlines_before(path, end - left - len(block) + max(e.start, 0))
                    raise UserError(f"{path}:{where}: not UTF-8 ({e.reason})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _newlines_before(path: Path, end: int) -> int:
    with open(path, "rb") as f:
        return sum(f.read(min(READ_BLOCK, end - at)).count(b"\n") for at in range(0, end, READ_BLOCK))


def text_pieces(blocks: Iterable[str]) -> Iterator[str]:
    """Text cut into pieces of about PIECE_CHARS at clean cuts (before a space between non-spaces)."""
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) >= PIECE_CHARS:
            tail = buf[PIECE_CHARS // 2:]
            cuts = [m.start() for m in CLEAN_CUT.finditer(tail, max(0, len(tail) - (1 << 16)))] or \
                   [m.start() for m in CLEAN_CUT.finditer(tail)]
            if not cuts and len(buf) < MAX_PIECE_CHARS:
                break
            cut = PIECE_CHARS // 2 + cuts[-1] if cuts else len(buf)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def val_cut(path: Path, val_fraction: float) -> int:
    """Where a text file's held-out tail starts: the byte at 1 - val_fraction, moved onto a character."""
    size = path.stat().st_size
    cut = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(cut)
        follow = f.read(4)
    return cut + next((i for i, b in enumerate(follow) if b & 0xC0 != 0x80), len(follow))


# ---------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Piece:
    """Text to encode, its split, whether end-of-text follows it (a document's last piece), and
    whether it opens one of the corpus's documents (counted in the report)."""

    text: str
    val: bool
    last: bool
    opens: bool = False


def is_val(index: int, val_fraction: float, val_documents: int | None) -> bool:
    """The split of a corpus's ``index``-th document: deterministic, spread through the corpus."""
    if val_documents is not None:
        return index < val_documents
    return (index * GOLDEN) % 1.0 < val_fraction


def pieces(files: list[Path], *, text_field: str = "text", val_fraction: float = 0.1,
           val_documents: int | None = None) -> Iterator[Piece]:
    """Every document of the files as pieces, each marked train or val.

    Records (jsonl, Parquet) are whole documents, a deterministic share of them val. A text file
    (often one long work) gives both splits: its tail ``val_fraction`` is val; with
    ``val_documents``, the first that many files are val whole.
    """
    index = 0
    for path in files:
        kind = kind_of(path) or "text"
        if kind == "text":
            yield from _text_file_pieces(path, index, val_fraction, val_documents)
            index += 1
        else:
            texts = _jsonl_texts(path, text_field) if kind == "jsonl" else _parquet_texts(path, text_field)
            for text in texts:
                if text:
                    parts = text_pieces([text]) if len(text) > PIECE_CHARS else [text]
                    yield from _document(parts, is_val(index, val_fraction, val_documents))
                    index += 1


def _document(texts: Iterable[str], val: bool, opens: bool = True) -> Iterator[Piece]:
    """The texts of a document (or of a text file's split) as pieces: the last one ends it, and
    the first opens it unless ``opens`` is off (a text file's val tail, which its train part opened)."""
    texts = iter(texts)
    previous = next(texts, None)
    for text in texts:
        yield Piece(previous, val, False, opens)
        previous, opens = text, False
    if previous is not None:
        yield Piece(previous, val, True, opens)


def _text_file_pieces(path: Path, index: int, val_fraction: float, val_documents: int | None) -> Iterator[Piece]:
    size = path.stat().st_size
    if val_documents is not None:
        spans = [(0, size, index < val_documents)]
    else:
        cut = val_cut(path, val_fraction)
        spans = [(0, cut, False), (cut, size, True)]
    for start, end, val in spans:  # a span from byte 0 opens the file's document (empty, it yields nothing)
        yield from _document(text_pieces(_text_blocks(path, start, end)), val, opens=start == 0)


def builtin_documents(source: str, cache_dir: str | os.PathLike = "data") -> list[str]:
    """The documents of a built-in source: CPython's reference manual, or tiny-shakespeare."""
    if source == "pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return [topics[k] for k in sorted(topics)]
    path = Path(cache_dir, "downloads", "tinyshakespeare.txt")
    if not path.exists():
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    return [read_text(path)]


def read_text(path: Path) -> str:
    """A whole (small) text file; a file that is not UTF-8 is a UserError."""
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

    digest = hashlib.sha256()
    try:
        with replacing_file(dest) as tmp:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                    while chunk := r.read(1 << 16):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise UserError(f"download of {url} has the wrong checksum; try again")
    except OSError as e:
        raise UserError(f"download of {url} failed: {e}; offline, put the file at {dest} yourself") from None


def builtin_pieces(docs: list[str], val_fraction: float) -> Iterator[Piece]:
    """Small in-memory documents, each with its tail ``val_fraction`` held out (both end in end-of-text)."""
    for d in docs:
        cut = int(len(d) * (1 - val_fraction))
        yield Piece(d[:cut], False, True, True)
        yield Piece(d[cut:], True, True)


def read_source(source: str, cache_dir: str | os.PathLike = "data", text_field: str = "text") -> tuple[str, list[str]]:
    """(name, documents) of a small source, read whole into memory (evaluating a text, not preparing one)."""
    if source in BUILTIN_SOURCES:
        return source, builtin_documents(source, cache_dir)
    docs: list[str] = []
    for path in source_files(source):
        kind = kind_of(path) or "text"
        if kind == "text":
            docs.append(read_text(path))
        else:
            docs.extend(_jsonl_texts(path, text_field) if kind == "jsonl" else _parquet_texts(path, text_field))
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"corpus {source} is empty")
    return source_name(source), docs
