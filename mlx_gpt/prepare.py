"""``python -m mlx_gpt.prepare SOURCE``: tokenize a corpus of any size into llm.c token shards.

The corpus is read as a stream (``sources.py``), tokenized by a pool of worker processes
(``workers.py``) and written shard by shard (``shards.py``), so memory stays flat whatever its
size. The work happens in a hidden ``.NAME.partial`` folder beside the output with a journal of
the shards finished and where the next begins in the stream: an interrupted prepare, run again,
keeps those shards and goes on from there; the finished folder replaces the output in one swap.
A repeated prepare whose source files (paths, sizes, modification times) and settings match the
output's fingerprint does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from . import flags
from .atomic import replacing_directory, replacing_file
from .data import (HEADER_DTYPE, Dataset, gpt2_tokenizer, header_for, is_prepared, json_object, load_dataset,
                   parse_tokenizer_spec, read_header, read_meta, tokenizer_digest)
from .errors import UserError, run_cli
from .rundir import RunLock
from .shards import ShardWriter
from .sources import (BUILTIN_SOURCES, Piece, builtin_documents, builtin_pieces, part_of, pieces, source_files,
                      source_name)
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from .workers import encoded

FORMAT = "shards-1"  # changes when the same settings would write different shards
JOURNAL = "prepare.json"
TASK_CHARS = 1 << 20  # text per task handed to a worker
SPLITS = ("train", "val")
REPORT_EVERY = 10.0  # seconds between progress lines when the output is not a terminal


def prepare_dataset(source: str, tokenizer: str | Tokenizer = "byte", *, data_dir: str | os.PathLike = "data",
                    val_fraction: float = 0.1, val_documents: int | None = None, text_field: str = "text",
                    shard_tokens: int = 100_000_000, workers: int | None = None, part: tuple[int, int] | None = None,
                    sp_sample_bytes: int = 100_000_000, seed: int = 0, force: bool = False) -> Dataset:
    """Tokenize a source into data/<name>-<tokenizer>/ (reused when already prepared).

    ``tokenizer`` is a spec (``byte``; ``sp:4096``, trained here on a seeded sample of at most
    ``sp_sample_bytes`` of the train split; ``gpt2`` or ``gpt2:PATH``, GPT-2's BPE read from files)
    or an existing Tokenizer (fine-tuning a checkpoint encodes new text with its own tokenizer).
    ``part`` (I, N) prepares only the I-th of N slices of the source's files.
    """
    if is_prepared(source):
        existing = load_dataset(source)
        if isinstance(tokenizer, str) or existing.tokenizer is None or \
                tokenizer_digest(existing.tokenizer) == tokenizer_digest(tokenizer):
            return existing
        raise UserError(f"{source} was tokenized with another tokenizer than the checkpoint's")
    _check_settings(val_fraction, val_documents, shard_tokens, part, sp_sample_bytes)
    name = source_name(source)
    files = None if source in BUILTIN_SOURCES else source_files(source)
    if part is not None:
        files = part_of(files or [], *part)
        if not files:
            raise UserError(f"part {part[0]}/{part[1]} of {source} holds no files (it has fewer files than parts)")
    spec = tokenizer if isinstance(tokenizer, str) else None  # else a tokenizer given whole
    if spec is not None:
        kind, arg = parse_tokenizer_spec(spec)
        if kind == "sp" and part is not None:
            raise UserError("--part needs one tokenizer for all parts: use byte or gpt2 (a SentencePiece model "
                            "trained on each part would differ)")
        tokenizer = ByteTokenizer() if kind == "byte" else gpt2_tokenizer(arg, data_dir) if kind == "gpt2" else arg
    settings = dict(source=source, val_fraction=val_fraction, val_documents=val_documents, text_field=text_field,
                    shard_tokens=shard_tokens, part=part, seed=seed,
                    sp_sample_bytes=sp_sample_bytes if isinstance(tokenizer, int) else None)
    identity = f"sp:{tokenizer}" if isinstance(tokenizer, int) else tokenizer_digest(tokenizer)
    fingerprint = _fingerprint(files, source, data_dir, identity, settings)
    suffix = f"-p{part[0]:03d}of{part[1]:03d}" if part else ""
    if spec is None:
        # a tokenizer given whole (a checkpoint's): the text may be prepared already, under any
        # name (``prepare SOURCE --tokenizer gpt2`` made data/NAME-gpt2); else a name a person reads
        found = None if force else next((d for d in sorted(Path(data_dir).glob(f"{name}-*"))
                                         if fingerprint_of(d) == fingerprint), None)
        if found is not None:
            return load_dataset(found)
    label = f"sp{tokenizer}" if isinstance(tokenizer, int) else \
        {"sentencepiece": f"sp{tokenizer.vocab_size}"}.get(tokenizer.kind, tokenizer.kind)  # byte, gpt2, sp4096
    out = Path(data_dir, f"{name}-{label}{suffix}")
    if spec is None and fingerprint_of(out) not in (None, fingerprint):  # that name holds another tokenizer's
        out = Path(data_dir, f"{name}-{label}-{identity[:8]}{suffix}")
    if not force and fingerprint_of(out) == fingerprint:
        return load_dataset(out)
    stream = (lambda: builtin_pieces(builtin_documents(source, data_dir), val_fraction)) if files is None else \
        (lambda: pieces(files, text_field=text_field, val_fraction=val_fraction, val_documents=val_documents))
    with RunLock(out, hint="wait for it to finish"):  # a second prepare of it is refused, not interleaved
        _write(out, name, stream, tokenizer, fingerprint, settings, workers or os.cpu_count() or 1, force,
               total_bytes=_plain_size(files),
               label=spec if isinstance(tokenizer, int) or spec == "byte" else tokenizer.kind)
    return load_dataset(out)


def _plain_size(files: list[Path] | None) -> int | None:
    """The source's size, which the characters read approach, for the ETA: only of plain files
    (a compressed or columnar file's size says little of its text)."""
    plain = files and all(f.name.lower().endswith((".txt", ".jsonl")) for f in files)
    return sum(f.stat().st_size for f in files) if plain else None


def _check_settings(val_fraction, val_documents, shard_tokens, part, sp_sample_bytes) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be in (0, 1), got {val_fraction}")
    if val_documents is not None and val_documents < 1:
        raise UserError(f"--val-documents must be at least 1, got {val_documents}")
    if not 1 <= shard_tokens <= 2**31 - 1:
        raise UserError(f"--shard-tokens must be between 1 and {2**31 - 1:,} (what a token file holds)")
    if part is not None and not 1 <= part[0] <= part[1]:
        raise UserError(f"--part I/N needs 1 <= I <= N, got {part[0]}/{part[1]}")
    if sp_sample_bytes < 1:
        raise UserError(f"--sp-sample-bytes must be positive, got {sp_sample_bytes}")


def _fingerprint(files: list[Path] | None, source: str, data_dir, tokenizer: str, settings: dict) -> str:
    """What the output depends on: the settings, the tokenizer, and each file's path, size and time
    (a built-in source's text itself)."""
    h = hashlib.sha256(json.dumps([FORMAT, tokenizer, settings], sort_keys=True, default=str).encode())
    if files is None:
        for d in builtin_documents(source, data_dir):
            h.update(hashlib.sha256(d.encode()).digest())
    for f in files or ():
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint_of(directory: Path) -> str | None:
    """The fingerprint a prepared dataset's meta.json records (None: none readable)."""
    return read_meta(directory).get("fingerprint")


# ---------------------------------------------------------------------------- writing


def _write(out: Path, name: str, stream, tokenizer, fingerprint: str, settings: dict, workers: int, force: bool,
           total_bytes: int | None, label: str) -> None:
    """Tokenize the stream into ``out``'s shards, going on from an interrupted run's journal."""
    if out.exists() and fingerprint_of(out) is None:  # a folder of the same name that prepare did not write
        raise UserError(f"{out} exists and is not a dataset prepared here; move it, or give another --data-dir")
    work = out.with_name(f".{out.name}.partial")
    journal = _journal(work, fingerprint, force)
    if journal is None:
        tok = tokenizer
        if isinstance(tokenizer, int):  # SentencePiece, trained on a seeded sample of the train split's lines
            lines = sample_lines((p.text for p in stream() if not p.val), settings["sp_sample_bytes"], settings["seed"])
            tok = SentencePieceTokenizer.train(lines, tokenizer)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        tok.save(work)
        journal = {"fingerprint": fingerprint, **{s: {"shards": [], "task": 0, "skip": 0} for s in SPLITS}}
        _save_journal(work, journal)
    for stale in work.glob(".*.partial"):
        stale.unlink()
    tok = load_tokenizer(work) if isinstance(tokenizer, int) else tokenizer  # SentencePiece: trained, saved, read
    writers = {s: ShardWriter(work, name, s, tok.vocab_size, settings["shard_tokens"], settings["part"],
                              done=len(journal[s]["shards"])) for s in SPLITS}
    try:
        _run(stream, work, journal, writers, tok, workers, total_bytes)
    except BaseException:
        for w in writers.values():
            w.abandon()
        if not any(journal[s]["shards"] for s in SPLITS):  # nothing worth going on from
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not journal["documents"]:
        raise UserError(f"corpus {settings['source']} is empty")
    for s in SPLITS:
        if not journal[s]["shards"]:
            raise UserError(f"the source gives no {s} text (too few documents for --val-fraction / --val-documents?)")
    meta = {"source": settings["source"], "name": name, "tokenizer": label, "vocab_size": tok.vocab_size,
            "fingerprint": fingerprint, "documents": journal["documents"],
            **{k: settings[k] for k in ("val_fraction", "val_documents", "text_field", "shard_tokens", "part")},
            "shards": {s: journal[s]["shards"] for s in SPLITS}}
    with replacing_directory(out) as tmp:
        for f in work.iterdir():
            if f.name != JOURNAL:
                f.rename(tmp / f.name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def _journal(work: Path, fingerprint: str, force: bool) -> dict | None:
    """An interrupted run's journal to go on from (None: start afresh)."""
    journal = json_object(work / JOURNAL)
    ok = journal.get("fingerprint") == fingerprint and not force
    return journal if ok and (work / "tokenizer.json").exists() else None


def _save_journal(work: Path, journal: dict) -> None:
    with replacing_file(work / JOURNAL) as tmp:
        tmp.write_text(json.dumps(journal) + "\n")


def _tasks(stream: Iterable[Piece], start: int, sizes: list) -> Iterator[list | None]:
    """The stream in tasks of about TASK_CHARS; those before ``start`` (done) as None. ``sizes``
    gets each task's (documents, characters) for the progress report."""
    task, chars, docs, index = [], 0, 0, 0
    for p in stream:
        task.append((p.text, p.val, p.last))
        chars, docs = chars + len(p.text), docs + p.opens
        if chars >= TASK_CHARS:
            sizes.append((docs, chars))
            yield task if index >= start else None
            task, chars, docs, index = [], 0, 0, index + 1
    if task:
        sizes.append((docs, chars))
        yield task if index >= start else None


def _run(stream, work: Path, journal: dict, writers: dict, tok: Tokenizer, workers: int,
         total_bytes: int | None) -> None:
    """Feed the tokens of each task to its split's writer, less what finished shards hold already."""
    start = min(journal[s]["task"] for s in SPLITS)
    sizes: list = []
    dtype = HEADER_DTYPE[header_for(tok.vocab_size)]
    progress = Progress(total_bytes)
    journal["documents"] = 0
    for index, result in enumerate(encoded(_tasks(stream(), start, sizes), str(work), dtype, workers, tok)):
        docs, chars = sizes.pop(0)
        journal["documents"] += docs
        if result is None:
            continue
        for s, tokens in zip(SPLITS, result):
            state = journal[s]
            skip = state["skip"] if index == state["task"] else 0 if index > state["task"] else len(tokens)
            for path, count, at in writers[s].write(tokens[skip:]):
                state["shards"].append([path.name, count])
                state["task"], state["skip"] = index, skip + at
                _save_journal(work, journal)
            progress.update(docs if s == "train" else 0, len(tokens) - skip, chars if s == "train" else 0)
    progress.close()
    for s in SPLITS:
        finished = writers[s].close()
        if finished is not None:
            journal[s]["shards"].append([finished[0].name, finished[1]])


def sample_lines(texts: Iterable[str], budget: int, seed: int) -> list[str]:
    """A uniform random sample of the texts' lines, at most ``budget`` characters, the same for a seed.

    Each line gets a random key; the lines with the smallest keys that fit are kept (a heap of
    at most the budget, whatever the corpus's size).
    """
    rng, heap, size = random.Random(seed), [], 0
    for text in texts:
        for line in text.splitlines(keepends=True):
            key = rng.random()
            if size + len(line) <= budget or (heap and key < -heap[0][0]):
                heapq.heappush(heap, (-key, line))
                size += len(line)
                while size > budget:
                    size -= len(heapq.heappop(heap)[1])
    return [line for _, line in sorted(heap, reverse=True)]


class Progress:
    """Documents, tokens, tokens/s and ETA: a bar in a terminal, a line every few seconds elsewhere."""

    def __init__(self, total_bytes: int | None):
        self.docs = self.tokens = self.chars = 0
        self.total, self.started = total_bytes, time.perf_counter()
        self.said, self.bar = self.started, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)

    def update(self, docs: int, tokens: int, chars: int) -> None:
        self.docs, self.tokens, self.chars = self.docs + docs, self.tokens + tokens, self.chars + chars
        now = time.perf_counter()
        rate = self.tokens / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(chars)
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s")
        elif now - self.said >= REPORT_EVERY:
            self.said, eta = now, ""
            if self.total and self.chars:
                left = max(self.total - self.chars, 0) * (now - self.started) / self.chars
                eta = f", {min(self.chars / self.total, 1):.0%} of the source, ETA {left:,.0f} s"
            print(f"prepare: {self.docs:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s{eta}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def merge_parts(out: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> Dataset:
    """One folder serving the shards of all N parts of a corpus prepared with ``--part I/N``.

    Every part must be there once, all with the same tokenizer; the shards are hard-linked
    (copied across file systems) beside one copy of the tokenizer and a meta.json listing them all.
    """
    sets = [load_dataset(p) for p in parts]
    metas = [read_meta(d.path) for d in sets]
    slices = [tuple(m.get("part") or ()) for m in metas]
    whole = next((d for d, s in zip(sets, slices) if len(s) != 2), None)
    if whole is not None:
        raise UserError(f"{whole.path} is not a part (prepare it with --part I/N)")
    n = slices[0][1]
    if sorted(slices) != [(i, n) for i in range(1, n + 1)]:
        missing = sorted({(i, n) for i in range(1, n + 1)} - set(slices))
        raise UserError(f"the parts given are {', '.join(f'{i}/{m}' for i, m in slices)}: "
                        + (f"part {missing[0][0]}/{n} is missing" if missing else "each part is needed exactly once"))
    digests = [tokenizer_digest(d.tokenizer) for d in sets]
    other = next((d for d, g in zip(sets, digests) if g != digests[0]), None)
    if other is not None:
        raise UserError(f"{other.path} was tokenized with another tokenizer than {sets[0].path}")
    order = sorted(range(n), key=lambda k: slices[k])
    with replacing_directory(out) as tmp:
        for d in sets:
            for f in d.train_files + d.val_files:
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        sets[0].tokenizer.save(tmp)
        meta = {**{k: metas[0][k] for k in ("source", "name", "tokenizer", "vocab_size") if k in metas[0]},
                "part": None, "parts": n, "documents": sum(m.get("documents", 0) for m in metas),
                "fingerprint": hashlib.sha256("".join(str(metas[k].get("fingerprint")) for k in order).encode()).hexdigest(),
                "shards": {s: [x for k in order for x in metas[k]["shards"][s]] for s in SPLITS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load_dataset(out)


# ---------------------------------------------------------------------------- the command


def parse_part(text: str) -> tuple[int, int]:
    """``I/N`` as (I, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N (e.g. 2/8), got {text!r}") from None
    return i, n


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.prepare",
                                description="Tokenize a corpus into llm.c token shards under data/.",
                                formatter_class=flags.DefaultsShown)
    p.add_argument("source", nargs="+", help="a text, .jsonl(.gz/.zst) or .parquet file, a folder of them, 'pydoc' "
                                             "or 'shakespeare' (with --merge: the parts' folders)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte; sp:VOCAB for SentencePiece BPE trained on the data; gpt2:PATH for GPT-2's BPE from a "
                        "directory with encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json "
                        "(gpt2 alone: from DATA_DIR/tokenizers/gpt2/)")
    p.add_argument("--data-dir", default="data", help="where prepared datasets are kept")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of documents held out for evaluation (of a text file: its tail)")
    p.add_argument("--val-documents", type=int, default=None, help="hold out the first N documents instead")
    p.add_argument("--text-field", default="text", help="the field of a .jsonl record / column of a Parquet file")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (the last is shorter)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per core)")
    p.add_argument("--part", type=parse_part, default=None,
                   help="I/N: prepare only the I-th of N slices of the source's files (one machine's share)")
    p.add_argument("--sp-sample-bytes", type=int, default=100_000_000,
                   help="sp: train SentencePiece on a seeded sample of at most this much text")
    p.add_argument("--force", action="store_true", help="prepare again even if a matching dataset exists")
    p.add_argument("--merge", metavar="OUT", default=None,
                   help="serve the parts (folders made with --part I/N, given as sources) as one dataset in OUT")
    a = p.parse_args(argv)
    if a.merge is None and len(a.source) > 1:
        p.error("give one source (several only with --merge OUT)")
    if a.merge is not None:
        ds = merge_parts(a.merge, a.source)
    else:
        ds = prepare_dataset(a.source[0], a.tokenizer, data_dir=a.data_dir, val_fraction=a.val_fraction,
                             val_documents=a.val_documents, text_field=a.text_field, shard_tokens=a.shard_tokens,
                             workers=a.workers, part=a.part, sp_sample_bytes=a.sp_sample_bytes, force=a.force)
    counts = {s: sum(read_header(f).count for f in files) for s, files in (("train", ds.train_files),
                                                                           ("val", ds.val_files))}
    print(f"{ds.path}: {counts['train']:,} train and {counts['val']:,} val tokens in "
          f"{len(ds.train_files) + len(ds.val_files)} shards, vocab {ds.vocab_size}")


if __name__ == "__main__":
    run_cli(main)
