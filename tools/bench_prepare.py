"""Benchmark ``python -m mlx_gpt.prepare`` against what llm.c's ``dev/data/fineweb.py`` does.

    python tools/bench_prepare.py --mb 100 --workers 2
    python tools/bench_prepare.py --mb 1000 --files 5 --ours-only    # 5 GB: ours alone, its memory

A seeded .jsonl corpus of ``--mb`` megabytes is generated (documents of words drawn from the
test texts), or a folder of ``--files`` such files (seeds one after another). Each side runs in its
own process under ``/usr/bin/time -v`` (wall time, peak RSS):

- ours: ``python -m mlx_gpt.prepare CORPUS --tokenizer gpt2:tests/data/gpt2 --workers N``;
- the reference: tiktoken's GPT-2 ``encode_ordinary`` on ``multiprocessing.Pool(N).imap(...,
  chunksize=16)`` over the documents, each followed by end-of-text, into a preallocated uint16
  shard buffer, as fineweb.py does.

Then the ids are checked: the reference's stream, cut at end-of-text into documents and each
document sent to the split ours puts it in, must equal our train and val shards token for token.
Prints a Markdown table. tiktoken is a test dependency (the dev extra); the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "tests" / "data" / "gpt2"
EOT = 50256

REFERENCE = r'''
import json, multiprocessing as mp, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[4])
from test_gpt2_tokenizer import tiktoken_gpt2

enc = tiktoken_gpt2(Path(sys.argv[3]))

def tokenize(line):
    return np.array(enc.encode_ordinary(json.loads(line)["text"]) + [50256], dtype=np.uint16)

if __name__ == "__main__":
    shard_size, count, index = 100_000_000, 0, 0
    buf = np.empty(shard_size, dtype=np.uint16)
    def flush(n):
        global index
        with open(f"{sys.argv[2]}/ref_{index:06d}.bin", "wb") as f:
            header = np.zeros(256, dtype=np.int32); header[:3] = (20240520, 1, n)
            f.write(header.tobytes()); f.write(buf[:n].tobytes())
        index += 1
    source = Path(sys.argv[1])
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    lines = (line for f in files for line in open(f))
    with mp.Pool(int(sys.argv[5])) as pool:
        for tokens in pool.imap(tokenize, lines, chunksize=16):
            while len(tokens):
                take = min(len(tokens), shard_size - count)
                buf[count:count + take] = tokens[:take]; count += take; tokens = tokens[take:]
                if count == shard_size:
                    flush(count); count = 0
    if count:
        flush(count)
'''


def make_corpus(path: Path, mb: int, seed: int) -> int:
    """A .jsonl of documents of 100-1500 words drawn from the test texts; returns its document count."""
    words = re.findall(r"\S+", (ROOT / "tests/data/tinyshakespeare.txt").read_text() +
                       (ROOT / "tests/data/the-verdict.txt").read_text())
    rng, size, docs = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < mb * 1_000_000:
            n = rng.randint(100, 1500)
            text = " ".join(rng.choices(words, k=n))
            text = re.sub(r"([.!?]) ", lambda m: m[1] + ("\n\n" if rng.random() < 0.2 else " "), text)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size, docs = size + len(line), docs + 1
    return docs


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    return wall, rss / 1024


def tokens_of(files: list[Path]) -> np.ndarray:
    return np.concatenate([np.fromfile(f, dtype=np.uint16, offset=1024) for f in files])


def same_ids(ours: Path, ref: Path, val_fraction: float) -> bool:
    """Whether our shards hold the reference's documents, each in the split ours assigns it."""
    sys.path.insert(0, str(ROOT))
    from mlx_gpt.data import load_dataset

    ds = load_dataset(ours)
    stream = tokens_of(sorted(ref.glob("ref_*.bin")))
    ends = stream == EOT
    doc = np.cumsum(ends, dtype=np.int32) - ends  # the document each token belongs to
    val = ((np.arange(int(ends.sum()) + 1) * 0.6180339887498949) % 1.0 < val_fraction)[doc]  # sources.is_val
    return np.array_equal(stream[~val], tokens_of(list(ds.train_files))) and \
        np.array_equal(stream[val], tokens_of(list(ds.val_files)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=100, help="corpus size in megabytes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating")
    p.add_argument("--sp", action="store_true", help="also time ours with SentencePiece (sp:4096, trained here)")
    p.add_argument("--files", type=int, default=1, help="a folder of this many corpora of --mb each")
    p.add_argument("--ours-only", action="store_true", help="time ours alone (no reference, no check of the ids)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        if a.files > 1:
            corpus = tmp / "corpus"
            corpus.mkdir()
        docs = sum(make_corpus(corpus / f"part{i}.jsonl" if a.files > 1 else corpus, a.mb, a.seed + i)
                   for i in range(a.files))
        (tmp / "ref").mkdir()
        (tmp / "reference.py").write_text(REFERENCE)
        rows = []
        ours_cmd = [sys.executable, "-m", "mlx_gpt.prepare", str(corpus), "--tokenizer", f"gpt2:{GPT2}",
                    "--workers", str(a.workers), "--data-dir", str(tmp / "data")]
        ref_cmd = [sys.executable, str(tmp / "reference.py"), str(corpus), str(tmp / "ref"), str(GPT2),
                   str(ROOT / "tests"), str(a.workers)]
        sides = (("mlx_gpt prepare", [*ours_cmd, "--force"]), ("reference (tiktoken + Pool)", ref_cmd))
        for _ in range(a.repeat):
            for name, cmd in sides[:1] if a.ours_only else sides:
                wall, rss = timed(cmd, ROOT)
                rows.append((name, wall, rss))
        ours_dir = tmp / "data" / "corpus-gpt2"
        n = sum(int(np.fromfile(f, dtype=np.int32, count=3)[2]) for f in ours_dir.glob("*.bin"))
        ok = None if a.ours_only else same_ids(ours_dir, tmp / "ref", 0.1)
        wall, rss = timed([*ours_cmd[:5], "byte", *ours_cmd[6:]], ROOT)
        n_bytes = sum(f.stat().st_size for f in ([corpus] if corpus.is_file() else corpus.iterdir()))
        if a.sp:  # SentencePiece: trained on a 10 MB sample, then the corpus encoded (both timed)
            sp_wall, sp_rss = timed([*ours_cmd[:5], "sp:4096", *ours_cmd[6:], "--sp-sample-bytes", "10000000"], ROOT)
            sp_tokens = sum(int(np.fromfile(f, dtype=np.int32, count=3)[2])
                            for f in (tmp / "data" / "corpus-sp4096").glob("*.bin"))
        print(f"corpus: {a.files} x {a.mb} MB .jsonl, {docs:,} documents, {n:,} GPT-2 tokens, {a.workers} workers; "
              f"ids identical to tiktoken's: {'not checked' if ok is None else ok}\n")
        print("| side | tokenizer | wall s | tokens/s | peak RSS MB |\n|---|---|---:|---:|---:|")
        for name, w, r in rows:
            print(f"| {name} | gpt2 | {w:.1f} | {n / w:,.0f} | {r:,.0f} |")
        print(f"| mlx_gpt prepare | byte | {wall:.1f} | {n_bytes / wall:,.0f} | {rss:,.0f} |")
        if a.sp:
            print(f"| mlx_gpt prepare | sp:4096 | {sp_wall:.1f} | {sp_tokens / sp_wall:,.0f} | {sp_rss:,.0f} |")
        if ok is False:
            sys.exit("the ids differ")


if __name__ == "__main__":
    main()
