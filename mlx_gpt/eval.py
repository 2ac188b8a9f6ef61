"""``python -m mlx_gpt.eval``: a checkpoint's exact loss, perplexity and bits per byte on any
text, and its accuracy on multiple-choice questions in HellaSwag's format.

  python -m mlx_gpt.eval --checkpoint CKPT --data SRC [--split all|train|val]
  python -m mlx_gpt.eval --checkpoint CKPT --hellaswag hellaswag_val.jsonl

Language modelling: SRC is a text file, a folder of .txt files, ``pydoc``/``shakespeare``
(encoded with the checkpoint's tokenizer, one end-of-text after each document, as prepare
does), or a prepared data directory, ours or llm.c's (its val shards unless --split says
otherwise). Every token after the first is predicted exactly once (perplexity.score).

Multiple choice: one JSON object a line with ``ctx``, ``endings`` and ``label`` (the index of
the right ending), as in HellaSwag's public jsonl files. As llm.c's dev/data/hellaswag.py
does, the context and ``" " + ending`` are encoded apart and joined, and each ending is scored
by the losses of its tokens given the context: ``acc`` counts the examples where the ending
with the lowest total loss is the label, ``acc_norm`` those where the lowest mean loss per
ending token is. A context longer than the model's block keeps its last tokens.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import checkpoint, examples, flags
from .data import encode_documents, is_prepared, load_dataset, split_documents, tokenizer_digest
from .errors import UserError, run_cli
from .limits import check_text
from .loss import cross_entropy
from .models.base import eval_mode
from .perplexity import Score, score
from .sources import jsonl_records, read_source
from .tokenizer import Tokenizer

SPLITS = ("all", "train", "val")


# ---------------------------------------------------------------------------- language modelling


def text_tokens(source: str, tokenizer: Tokenizer, *, split: str | None = None, data_dir: str | os.PathLike = "data",
                val_fraction: float = 0.1) -> tuple[str, np.ndarray]:
    """(what was read, its tokens) for --data: a prepared directory's file, or any text encoded here.

    ``split``: None is val for a prepared directory and the whole text otherwise; train and
    val cut a text as prepare does (the tail ``val_fraction`` of every document is val).
    """
    if split not in (None, *SPLITS):
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    p = Path(source)
    if is_prepared(p):
        ds = load_dataset(p)  # checks every id against the data's vocabulary
        if ds.tokenizer is not None and tokenizer_digest(ds.tokenizer) != tokenizer_digest(tokenizer):
            raise UserError(f"{p} was tokenized with another tokenizer than the checkpoint's")
        if ds.tokenizer is None and (tokenizer.kind != "gpt2" or tokenizer.vocab_size != ds.vocab_size):
            raise UserError(f"{p} holds llm.c's tokens of a {ds.vocab_size}-token vocabulary; the checkpoint's "
                            f"tokenizer is {tokenizer.kind} with {tokenizer.vocab_size}")
        files = {"val": ds.val_files, "train": ds.train_files, "all": ds.train_files + ds.val_files}[split or "val"]
        tokens = ds.tokens(split) if split in ("train", "val") else ds.tokens("val") if split is None else \
            np.concatenate([ds.tokens("train"), ds.tokens("val")])
        return " + ".join(str(f) for f in files), tokens
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    name, docs = read_source(source, data_dir)
    if split in ("train", "val"):
        docs = split_documents(docs, val_fraction)[split == "val"]
    what = f"{source}" + (f" ({split} split, {val_fraction:g} held out)" if split in ("train", "val") else "")
    return what, encode_documents(tokenizer, docs)


def evaluate_text(model: nn.Module, tokenizer: Tokenizer, tokens: np.ndarray, *, batch_size: int = 16) -> Score:
    """Loss, perplexity and bits per byte of a token stream."""
    if len(tokens) < 2:
        raise UserError("the text is shorter than two tokens; there is nothing to predict")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab:
        raise UserError(f"the data holds token id {int(tokens.max())}, outside the model's {vocab}-token vocabulary")
    return score(model, tokens, tokenizer, batch_size=batch_size)


# ---------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class Question:
    context: list[int]
    endings: list[list[int]]
    label: int


@dataclass(frozen=True)
class ChoiceScore:
    examples: int
    correct: int  # lowest total loss of the ending is the label
    correct_norm: int  # lowest mean loss per ending token is the label

    @property
    def acc(self) -> float:
        return self.correct / self.examples

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.examples


def read_questions(path: str | os.PathLike, tokenizer: Tokenizer, *, limit: int | None = None) -> list[Question]:
    """HellaSwag-style questions from a jsonl file, encoded; one line a question, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    questions = []
    for n, item in jsonl_records(path):
        if limit is not None and len(questions) >= limit:
            break
        where = f"{path}:{n}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object with ctx, endings and label")
        ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
        if not isinstance(ctx, str) or not ctx:
            raise UserError(f"{where}: ctx must be a non-empty string")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise UserError(f"{where}: endings must be a list of at least two strings")
        if type(label) is not int or not 0 <= label < len(endings):
            raise UserError(f"{where}: label must be an index into endings (0..{len(endings) - 1}), got {label!r:.40}")
        for text in (ctx, *endings):  # a JSON escape can name half a surrogate pair, which no text holds
            check_text(text, f"{where}: ctx or an ending")
        questions.append(Question(tokenizer.encode(ctx), [tokenizer.encode(" " + e) for e in endings], label))
    if not questions:
        raise UserError(f"{path} holds no questions")
    return questions


def continuation_scores(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (context, continuation), its tokens' losses (nats) given the context and whether
    each is the model's most likely there, in one batch.

    A row is context + continuation, cut to the model's block from the left; rows are padded on
    the right, which a causal model never sees from earlier positions.
    """
    T = model.block_size
    rows = [(c + k)[-(T + 1):] for c, k in pairs]
    width = max(len(r) for r in rows) - 1
    x = np.zeros((len(rows), width), dtype=np.int32)
    y = np.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1], y[i, : len(r) - 1] = r[:-1], r[1:]
    logits = model(mx.array(x))
    losses, best = np.array(cross_entropy(logits, mx.array(y))), np.array(mx.argmax(logits, axis=-1))
    spans = [slice(len(r) - 1 - min(len(k), len(r) - 1), len(r) - 1) for r, (_, k) in zip(rows, pairs)]
    return [(losses[i, span], best[i, span] == y[i, span]) for i, span in enumerate(spans)]


def ending_losses(model: nn.Module, questions: Sequence[Question]) -> list[list[np.ndarray]]:
    """For each question, each ending's per-token losses (nats) given the context, in one batch."""
    longest = max(len(e) for q in questions for e in q.endings)
    if longest > model.block_size:
        raise UserError(f"an ending of {longest} tokens is longer than the model's block of {model.block_size}")
    scores = iter(continuation_scores(model, [(q.context, e) for q in questions for e in q.endings]))
    return [[next(scores)[0] for _ in q.endings] for q in questions]


def evaluate_choices(model: nn.Module, questions: Sequence[Question], *, batch_size: int = 8,
                     progress: bool = False) -> ChoiceScore:
    """acc and acc_norm over the questions (see the module's docstring)."""
    from tqdm import tqdm

    correct = correct_norm = 0
    bar = tqdm(total=len(questions), unit="q", disable=None if progress else True, desc="multiple choice")
    with eval_mode(model), bar:
        for batch in (questions[i : i + batch_size] for i in range(0, len(questions), batch_size)):
            for q, losses in zip(batch, ending_losses(model, batch)):
                total = [float(np.sum(l, dtype=np.float64)) for l in losses]
                correct += int(np.argmin(total)) == q.label
                correct_norm += int(np.argmin([t / len(l) for t, l in zip(total, losses)])) == q.label
            bar.update(len(batch))
    return ChoiceScore(len(questions), correct, correct_norm)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.eval", formatter_class=flags.DefaultsShown,
                                description="Loss, perplexity and bits per byte of a checkpoint on any text, and "
                                            "multiple-choice accuracy in HellaSwag's format.")
    p.add_argument("--checkpoint", required=True, help="the checkpoint (run directory) to evaluate")
    p.add_argument("--data", help="a text file, a folder of .txt files, 'pydoc', 'shakespeare', or a prepared data "
                                  "directory (ours or llm.c's)")
    p.add_argument("--split", choices=(*SPLITS, "test"), help="part of --data to score (default: val of a prepared "
                                                              "directory or an example set, all of a text)")
    p.add_argument("--mask-prompt", action="store_true", help="an example set's loss on the answers only")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out tail of each document for --split of a text")
    p.add_argument("--data-dir", default="data", help="where 'shakespeare' is downloaded")
    p.add_argument("--hellaswag", help="a jsonl file of questions (ctx, endings, label), e.g. hellaswag_val.jsonl")
    p.add_argument("--limit", type=int, help="score only the first N questions")
    p.add_argument("--batch-size", type=int, default=16, help="windows (text) or questions (multiple choice) at once")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.data is None and a.hellaswag is None:
        raise UserError("nothing to evaluate: pass --data SRC, --hellaswag FILE.jsonl, or both")
    if a.batch_size < 1 or (a.limit is not None and a.limit < 1):
        raise UserError("--batch-size and --limit must be at least 1")
    model, tokenizer = checkpoint.load(a.checkpoint)
    results: dict = {"checkpoint": str(a.checkpoint)}
    if a.data is not None and examples.is_examples(a.data):  # train.jsonl/valid.jsonl/test.jsonl, or FILE.jsonl
        a.data, results["loss"] = None, _evaluate_examples(model, tokenizer, a)
    if a.data is not None:
        what, tokens = text_tokens(a.data, tokenizer, split=a.split, data_dir=a.data_dir, val_fraction=a.val_fraction)
        s = evaluate_text(model, tokenizer, tokens, batch_size=a.batch_size)
        print(f"loss {s.loss:.4f} | perplexity {s.perplexity:.3f} | bits/byte {s.bits_per_byte:.4f} "
              f"({s.tokens:,} tokens, {s.bytes:,} bytes of {what})")
        results.update(loss=s.loss, perplexity=s.perplexity, bits_per_byte=s.bits_per_byte, tokens=s.tokens,
                       bytes=s.bytes)
    if a.hellaswag is not None:
        questions = read_questions(a.hellaswag, tokenizer, limit=a.limit)
        c = evaluate_choices(model, questions, batch_size=a.batch_size, progress=True)
        print(f"multiple choice: acc {c.acc:.4f} | acc_norm {c.acc_norm:.4f} ({c.correct}/{c.examples} and "
              f"{c.correct_norm}/{c.examples} of {a.hellaswag})")
        results.update(acc=c.acc, acc_norm=c.acc_norm, examples=c.examples)
    return results


def _evaluate_examples(model, tokenizer: Tokenizer, a: argparse.Namespace) -> float:
    """An example set's mean loss per scored token (mlx_gpt/examples.py), as a run's evaluation computes it."""
    split = a.split or "val"
    dataset = examples.prepare_examples(a.data, tokenizer, data_dir=a.data_dir)
    if split not in dataset.splits:
        raise UserError(f"{a.data} has no {split} split (example sets have train, val and, with test.jsonl, test)")
    loss, count = examples.evaluate(model, dataset.splits[split], a.mask_prompt, a.batch_size)
    print(f"loss {loss:.4f} ({count:,} {'answer ' if a.mask_prompt else ''}tokens of the {split} examples of {a.data})")
    return loss


if __name__ == "__main__":
    run_cli(main)
