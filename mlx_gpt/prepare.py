"""``python -m mlx_gpt.prepare SOURCE``: tokenize a corpus into llm.c token files under data/."""

from __future__ import annotations

import argparse
from typing import Sequence

from .data import prepare, read_header
from .errors import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.prepare",
                                description="Tokenize a corpus into llm.c token files under data/.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a text file, a folder of .txt files, 'pydoc' or 'shakespeare'")
    p.add_argument("--tokenizer", default="byte",
                   help="byte; sp:VOCAB for SentencePiece BPE trained on the data; gpt2:PATH for GPT-2's BPE from a "
                        "directory with encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json "
                        "(gpt2 alone: from DATA_DIR/tokenizers/gpt2/)")
    p.add_argument("--data-dir", default="data", help="where prepared datasets are kept")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each document held out for evaluation")
    p.add_argument("--force", action="store_true", help="prepare again even if a matching dataset exists")
    a = p.parse_args(argv)
    ds = prepare(a.source, a.tokenizer, data_dir=a.data_dir, val_fraction=a.val_fraction, force=a.force)
    n_train, n_val = read_header(ds.train_file).count, read_header(ds.val_file).count
    print(f"{ds.path}: {n_train:,} train and {n_val:,} val tokens, vocab {ds.vocab_size}")


if __name__ == "__main__":
    run_cli(main)
