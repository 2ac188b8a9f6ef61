"""mlx_gpt.eval: text scores and HellaSwag-style multiple choice, against direct loss computations."""

import json
import math
import random

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint
from mlx_gpt.data import prepare
from mlx_gpt.eval import Question, evaluate_choices, main, read_questions
from mlx_gpt.models import rungs
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.perplexity import score
from mlx_gpt.tokenizer import ByteTokenizer

SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "birds fly over the sea.",
             "she reads a book at night.", "we eat bread with jam."]
# (context, endings, label): the first ending is the one the corpus makes likely; the last two
# questions deliberately name another, so the known answer is acc = acc_norm = 4/6
QUESTIONS = [
    ("the cat sat on the", ["mat.", "sea.", "jam.", "park."], 0),
    ("a dog ran in the", ["park.", "book at night.", "mat.", "sea."], 0),
    ("birds fly over the", ["sea.", "mat.", "park.", "jam."], 0),
    ("we eat bread with", ["jam.", "the sea.", "a cat.", "night."], 0),
    ("she reads a book at", ["night.", "the mat.", "sea.", "park."], 2),
    ("the cat sat on the", ["mat.", "sea.", "jam.", "park."], 3),
]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def direct_choice(model, context: list[int], endings: list[list[int]]) -> tuple[int, int]:
    """(argmin of total ending loss, argmin of mean ending loss), one unpadded row at a time."""
    totals, means = [], []
    for e in endings:
        row = (context + e)[-(model.block_size + 1):]
        lp = log_softmax(np.array(model(mx.array([row[:-1]])))[0])
        targets = np.arange(len(row) - 1 - len(e), len(row) - 1)
        nll = -lp[targets, np.array(row)[targets + 1]]
        totals.append(nll.sum())
        means.append(nll.mean())
    return int(np.argmin(totals)), int(np.argmin(means))


@pytest.fixture(scope="module")
def ngram_ckpt(tmp_path_factory):
    rng = random.Random(0)
    text = " ".join(rng.choice(SENTENCES) for _ in range(3000))
    model = rungs.build("ngram:12", 256, tokens=np.frombuffer(text.encode(), np.uint8))
    return checkpoint.save(tmp_path_factory.mktemp("eval") / "ngram", model, ByteTokenizer())


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "questions.jsonl"
    lines = [json.dumps({"ind": i, "ctx": c, "endings": e, "label": l, "split": "val"}) for i, (c, e, l) in
             enumerate(QUESTIONS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_multiple_choice_gives_the_known_answer_key(ngram_ckpt, hellaswag_file, capsys):
    results = main(["--checkpoint", str(ngram_ckpt), "--hellaswag", str(hellaswag_file), "--batch-size", "4"])
    assert results["acc"] == results["acc_norm"] == pytest.approx(4 / 6) and results["examples"] == 6
    assert "acc 0.6667 | acc_norm 0.6667 (4/6 and 4/6" in capsys.readouterr().out
    model, tok = checkpoint.load(ngram_ckpt)
    for ctx, endings, _ in QUESTIONS:  # the likely ending wins under both rules, computed directly
        assert direct_choice(model, tok.encode(ctx), [tok.encode(" " + e) for e in endings]) == (0, 0)


def test_acc_and_acc_norm_match_a_direct_computation_on_a_transformer():
    """Padding, batching and a context cut to the block must not change any choice."""
    model = build(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=3)
    rng = np.random.default_rng(0)
    questions = []
    for i in range(40):
        context = rng.integers(0, 64, size=int(rng.integers(1, 30))).tolist()  # up to twice the block
        endings = [rng.integers(0, 64, size=int(rng.integers(1, 8))).tolist() for _ in range(4)]
        questions.append(Question(context, endings, int(rng.integers(0, 4))))
    got = evaluate_choices(model, questions, batch_size=7)
    picks = [direct_choice(model, q.context, q.endings) for q in questions]
    assert got.correct == sum(p[0] == q.label for p, q in zip(picks, questions))
    assert got.correct_norm == sum(p[1] == q.label for p, q in zip(picks, questions))
    assert got.correct != got.correct_norm or any(p[0] != p[1] for p in picks)  # the two rules do differ here


def test_text_scores_of_a_file_a_split_and_a_prepared_directory_agree(ngram_ckpt, data_files, tmp_path, capsys):
    model, tok = checkpoint.load(ngram_ckpt)
    verdict = data_files / "the-verdict.txt"
    whole = main(["--checkpoint", str(ngram_ckpt), "--data", str(verdict)])
    direct = score(model, np.frombuffer(verdict.read_bytes(), np.uint8), tok)
    assert (whole["loss"], whole["bits_per_byte"], whole["tokens"]) == (direct.loss, direct.bits_per_byte,
                                                                        direct.tokens)
    assert whole["bits_per_byte"] == pytest.approx(whole["loss"] / math.log(2))  # bytes: one token each
    assert whole["perplexity"] == pytest.approx(math.exp(whole["loss"]))
    ds = prepare(str(verdict), "byte", data_dir=tmp_path / "data")
    prepared = main(["--checkpoint", str(ngram_ckpt), "--data", str(ds.path)])  # its val.bin
    held_out = main(["--checkpoint", str(ngram_ckpt), "--data", str(verdict), "--split", "val"])
    assert prepared["loss"] == held_out["loss"] and prepared["tokens"] == held_out["tokens"] < whole["tokens"] / 5
    out = capsys.readouterr().out
    assert f"loss {whole['loss']:.4f} | perplexity {whole['perplexity']:.3f} | bits/byte" in out


def test_cli(ngram_ckpt, hellaswag_file, tmp_path):
    proc = run_module("mlx_gpt.eval", "--checkpoint", str(ngram_ckpt), "--hellaswag", str(hellaswag_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "acc 0.6667 | acc_norm 0.6667" in proc.stdout


def test_questions_with_a_byte_order_mark_and_line_separators_inside_strings(tmp_path):
    lines = [{"ctx": "a\u2028b", "endings": ["c\x85", "d"], "label": 1},
             {"ctx": "e", "endings": ["f", "g"], "label": 0}]
    text = "\n".join(json.dumps(q, ensure_ascii=False) for q in lines) + "\r\n"
    (tmp_path / "q.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    got = read_questions(tmp_path / "q.jsonl", ByteTokenizer())
    assert [bytes(q.context).decode() for q in got] == ["a\u2028b", "e"] and [q.label for q in got] == [1, 0]


@pytest.mark.parametrize("line,message", [
    ("{not json", "questions.jsonl:2: not JSON"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "questions.jsonl:2: label must be an index into endings"),
    ('{"ctx": "a", "endings": "bc", "label": 0}', "endings must be a list"),
    ('{"ctx": "", "endings": ["b", "c"], "label": 0}', "ctx must be a non-empty string"),
    ('[1, 2]', "expected an object"),
    ('{"ctx": "a\\ud800", "endings": ["b", "c"], "label": 0}',
     "questions.jsonl:2: ctx or an ending is not valid UTF-8"),
    ("[" * 100_000, "questions.jsonl:2: not JSON (nested too deeply)"),
])
def test_bad_questions_are_one_line_errors(ngram_ckpt, tmp_path, line, message):
    good = json.dumps({"ctx": "the cat", "endings": ["sat", "ran"], "label": 0})
    (tmp_path / "questions.jsonl").write_text(good + "\n" + line + "\n")
    proc = run_module("mlx_gpt.eval", "--checkpoint", str(ngram_ckpt), "--hellaswag", "questions.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, message)


def test_bad_invocations_are_one_line_errors(ngram_ckpt, tmp_path, sp_tokenizer):
    proc = run_module("mlx_gpt.eval", "--checkpoint", str(ngram_ckpt), cwd=tmp_path)
    assert_one_line_error(proc, "nothing to evaluate")
    proc = run_module("mlx_gpt.eval", "--checkpoint", str(ngram_ckpt), "--hellaswag", "missing.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "missing.jsonl not found")
    (tmp_path / "notes.txt").write_text("the cat sat on the mat. " * 200)
    ds = prepare(str(tmp_path / "notes.txt"), sp_tokenizer, data_dir=tmp_path / "data")
    proc = run_module("mlx_gpt.eval", "--checkpoint", str(ngram_ckpt), "--data", str(ds.path), cwd=tmp_path)
    assert_one_line_error(proc, "another tokenizer than the checkpoint's")


def test_questions_read_as_llmc_renders_them(tmp_path):
    """Context and " " + ending are encoded apart, as llm.c's hellaswag.py does."""
    (tmp_path / "q.jsonl").write_text(json.dumps({"ctx": "A man", "endings": ["runs.", "sits."], "label": 1}) + "\n\n")
    [q] = read_questions(tmp_path / "q.jsonl", ByteTokenizer())
    assert q.context == list(b"A man") and q.endings == [list(b" runs."), list(b" sits.")] and q.label == 1
