"""Example datasets: three shapes tokenized once with their masks, batches one example a row,
training on the completions only, and one error line for every kind of bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_one_line_error, run_module
from mlx_gpt import chat, eval as ev, example_sampler, examples
from mlx_gpt.errors import UserError, run_cli
from mlx_gpt.loss import IGNORE
from mlx_gpt.tokenizer import ByteTokenizer, load_tokenizer
from mlx_gpt.train import main as train_main, train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import estimate_loss, make_eval_loss

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=48, batch_size=4, eval_iters=2, sample_tokens=0)
CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}]},
         {"messages": [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "gpt"}]}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{a}+{b}=", "completion": f"{a + b}\n"} for a, b in rng.integers(0, 50, (n, 2))]


def products(n, seed=0):
    """Answers of 2 to 5 tokens."""
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{a}*{b}=", "completion": f"{a * b}\n"} for a, b in rng.integers(0, 100, (n, 2))]


class EotBytes(ByteTokenizer):
    """Bytes and an end-of-text id (256), to see where examples end."""

    vocab_size, eot_id = 257, 256

    def decode(self, ids):
        return super().decode(i for i in ids if i != 256)


def test_completions_are_prompt_then_trained_completion(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    ds = examples.prepare_examples(str(source), data_dir=tmp_path / "data")
    assert len(ds.splits["train"]) == 27 and len(ds.splits["val"]) == 3  # every tenth held out
    ids, mask = ds.splits["train"].example(0)
    want = pairs(30)[0]
    assert bytes(ids.tolist()).decode() == want["prompt"] + want["completion"]
    assert bytes(ids[mask == 1].tolist()).decode() == want["completion"]
    assert int(ds.splits["val"].lines[0]) == 10  # the line it came from
    again = examples.prepare_examples(str(source), data_dir=tmp_path / "data")  # reused, not redone
    assert (again.path / "train.tokens").stat().st_mtime_ns == (ds.path / "train.tokens").stat().st_mtime_ns
    assert examples.is_examples(str(ds.path)) and examples.prepare_examples(str(ds.path)).path == ds.path  # --data it
    with open(ds.path / "train.mask", "r+b") as f:  # a damaged file is refused, not read short
        f.truncate(5)
    with pytest.raises(UserError, match="the train split's files are damaged"):
        examples.load_examples(ds.path)


def test_chat_examples_train_on_assistant_turns_and_end_of_text(tmp_path):
    for split in ("train", "valid"):
        write_jsonl(tmp_path / f"{split}.jsonl", CHATS)
    tok = EotBytes()
    ds = examples.prepare_examples(str(tmp_path), tok, data_dir=tmp_path / "data")
    ids, mask = ds.splits["train"].example(0)
    text = chat.render(chat.DEFAULT_TEMPLATE, CHATS[0]["messages"])
    assert tok.decode(ids.tolist()) == text and ids[-1] == tok.eot_id and mask[-1] == 1
    trained = [tok.decode(ids[a:b].tolist()) for a, b in _runs(mask)]
    assert trained == ["hello<|im_end|>\n", "4<|im_end|>\n"]


def _runs(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_compressed_example_files(tmp_path):
    import gzip

    (tmp_path / "d").mkdir()
    for name, rows in (("train.jsonl.gz", pairs(12)), ("valid.jsonl.gz", pairs(3, seed=1))):
        with gzip.open(tmp_path / "d" / name, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    assert examples.is_examples(str(tmp_path / "d")) and examples.is_examples(str(tmp_path / "d" / "train.jsonl.gz"))
    ds = examples.prepare_examples(str(tmp_path / "d"), data_dir=tmp_path / "data")
    assert [len(ds.splits[s]) for s in ("train", "val")] == [12, 3]
    ids, mask = ds.splits["val"].example(2)
    assert bytes(ids[mask == 1].tolist()).decode() == pairs(3, seed=1)[2]["completion"]


def test_text_examples_and_renamed_fields(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"body": f"line {i}"} for i in range(10)])
    # one file of text records is a corpus of documents (prepare's), unless --format text says examples
    fields = examples.Fields(text="body")
    assert not examples.is_examples(str(tmp_path / "t.jsonl"), fields=fields)
    assert examples.is_examples(str(tmp_path / "t.jsonl"), "text", fields)
    ds = examples.prepare_examples(str(tmp_path / "t.jsonl"), fields=examples.Fields(text="body"),
                                   data_dir=tmp_path / "data")
    ids, mask = ds.splits["train"].example(1)
    assert bytes(ids.tolist()).decode() == "line 1" and mask.all()
    write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}] * 10)
    ds = examples.prepare_examples(str(tmp_path / "q.jsonl"), fields=examples.Fields(prompt="q", completion="a"),
                                   data_dir=tmp_path / "data")
    assert ds.splits["train"].example(0)[1].tolist() == [0, 1]


def test_rows_pad_cut_and_mask(tmp_path):
    write_jsonl(tmp_path / "train.jsonl",
                [{"prompt": "abc", "completion": "de"}, {"prompt": "x" * 20, "completion": "yz"}] * 5)
    split = examples.prepare_examples(str(tmp_path / "train.jsonl"), data_dir=tmp_path / "data").splits["train"]
    x, y = example_sampler.rows(split, np.array([0, 1]), 8, mask_prompt=True)
    assert x[0].tolist() == list(b"abcd") + [0] * 4
    assert y[0].tolist() == [IGNORE, IGNORE, ord("d"), ord("e")] + [IGNORE] * 4  # targets: b c d e; b, c are prompt
    assert x[1].tolist() == list(b"x" * 8) and (y[1] == IGNORE).all()  # cut inside the prompt: nothing to learn
    _, y = example_sampler.rows(split, np.array([0]), 8, mask_prompt=False)
    assert y[0].tolist() == list(b"bcde") + [IGNORE] * 4
    assert example_sampler.check_lengths(split, 8, truncate=True) == 4
    with pytest.raises(UserError, match=r"train.jsonl:2: an example of 22 tokens is longer than the block of 8"):
        example_sampler.check_lengths(split, 8, truncate=False)


def test_masked_val_loss_is_the_mean_over_completion_tokens(tmp_path):
    """A run with --mask-prompt learns the completions; its val loss is the masked mean a direct
    computation gives over every answer token of the same batches, and eval's is the mean over every
    answer token of the split."""
    write_jsonl(tmp_path / "train.jsonl", products(200))
    write_jsonl(tmp_path / "valid.jsonl", products(20, seed=1))
    run = train(TrainConfig.of(data=str(tmp_path), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                               mask_prompt=True, max_iters=30, eval_interval=30, learning_rate=3e-3, streams=1,
                               **TINY), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    sampler = run.samplers.val
    got = estimate_loss(make_eval_loss(run.model, run.cfg), sampler, 2, run.cfg.step.seed + 1)
    assert got == pytest.approx(val, abs=1e-6)
    sampler.set_state(np.random.Generator(np.random.PCG64(run.cfg.step.seed + 1)).bit_generator.state)
    batches = [[a[0] for a in sampler.next()] for _ in range(2)]
    assert len({int(n) for x, y in batches for n in (y != IGNORE).sum(1)}) > 1  # rows of unequal answers
    direct = [direct_loss(run.model, x, y) for x, y in batches]
    assert val == pytest.approx(sum(m * n for m, n in direct) / sum(n for _, n in direct), abs=1e-5)
    assert load_tokenizer(tmp_path / "run").kind == "byte"
    # eval's loss of the whole val split: the mean over every answer token of its 20 examples
    got = ev.main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path), "--mask-prompt",
                   "--data-dir", str(tmp_path / "data"), "--batch-size", "7"])["loss"]
    split = run.dataset.splits["val"]
    sums = [direct_loss(run.model, *example_sampler.rows(split, np.array([i]), 48, True)) for i in range(len(split))]
    assert got == pytest.approx(sum(m * n for m, n in sums) / sum(n for _, n in sums), abs=1e-5)


def direct_loss(model, x, y) -> tuple[float, int]:
    """(mean negative log-likelihood of the kept targets, their count), from the softmax in numpy."""
    logits = np.array(model(mx.array(x)).astype(mx.float32), dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    keep = y != IGNORE
    return float(-np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0][keep].mean()), int(keep.sum())


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(train_main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BAD = {
    "not json": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "bad.jsonl:2: not JSON"),
    "missing field": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "bad.jsonl:2: no 'completion' field"),
    "empty completion": ('{"prompt": "a", "completion": ""}\n', "bad.jsonl:1: 'completion' is empty"),
    "no shape": ('{"question": "a"}\n', "bad.jsonl:1: no 'text'"),
    "mixed shapes": ('{"prompt": "a", "completion": "b"}\n\n{"text": "a"}\n',
                     "bad.jsonl:3: a text example in a file of completions examples (line 1)"),
    "roles out of order": ('{"messages": [{"role": "assistant", "content": "a"}]}\n',
                           "bad.jsonl:1: roles out of order"),
    "not an object": ('[1, 2]\n', "bad.jsonl:1: not a JSON object"),
    "not utf-8": (b'{"text": "\xff"}\n', "bad.jsonl:1: not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_naming_file_and_line(tmp_path, capsys, case):
    content, expected = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = cli_error(["--data", str(path), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
                     capsys)
    assert expected in line
    assert not (tmp_path / "run").exists() and not any((tmp_path / "data").glob("*"))  # nothing half-written
    assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_a_template_that_fails_and_a_too_long_example(tmp_path, capsys):
    from mlx_gpt.tokenizer import with_chat_template

    write_jsonl(tmp_path / "c.jsonl", CHATS)
    tok = with_chat_template(ByteTokenizer(), "{{ raise_exception('no system messages') }}")
    with pytest.raises(UserError, match=r"c.jsonl:1: the chat template fails to render: no system messages"):
        examples.prepare_examples(str(tmp_path / "c.jsonl"), tok, data_dir=tmp_path / "data")
    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "c" * 60}] + pairs(20))
    line = cli_error(["--data", str(tmp_path / "long.jsonl"), "--data-dir", str(tmp_path / "data"), "--no-truncate",
                      "--out", str(tmp_path / "run"), "--block-size", "32"], capsys)
    assert "long.jsonl:1: an example of 61 tokens is longer than the block of 32" in line


def test_a_folder_without_valid_jsonl_from_the_command_line(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", pairs(5))
    proc = run_module("mlx_gpt.train", "--data", "d", "--max-iters", "1", cwd=tmp_path)
    assert_one_line_error(proc, "has no valid.jsonl")
    assert proc.returncode == 2


def test_a_resumed_example_run_equals_the_uninterrupted_one(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gpt import checkpoint

    write_jsonl(tmp_path / "train.jsonl", pairs(60))
    common = dict(data=str(tmp_path / "train.jsonl"), data_dir=str(tmp_path / "data"), mask_prompt=True,
                  lr_decay_iters=6, warmup_iters=2, eval_interval=3, checkpoint_interval=100, dropout=0.1, **TINY)
    train(TrainConfig.of(out=str(tmp_path / "whole"), max_iters=6, **common), progress=False)
    first = TrainConfig.of(out=str(tmp_path / "split"), max_iters=3, **common)
    train(first, progress=False)
    train(first.replace(max_iters=6, resume=True), progress=False)
    whole, split = (dict(tree_flatten(checkpoint.load_model(tmp_path / d).parameters())) for d in ("whole", "split"))
    assert all(mx.array_equal(whole[k], split[k]).item() for k in whole)  # bit for bit


def test_the_demonstrations_instruction_set(tmp_path):
    """tools/finetune_demo.py's tasks: right answers, and held-out prompts no training line repeats."""
    import datetime
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("finetune_demo", ROOT / "tools" / "finetune_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tests = demo.write_sets(tmp_path, 50, 10, seed=0)
    seen = {json.loads(line)["prompt"] for split in ("train", "valid")
            for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()}
    assert len(seen) > 100 and not seen & {r["prompt"] for rows in tests.values() for r in rows}
    for r in tests["date"]:
        day = datetime.date.fromisoformat(r["prompt"].split()[-1].rstrip(":"))
        assert r["completion"] == day.strftime("%d/%m/%Y") + "\n"
    for r in tests["reverse"]:
        assert r["completion"] == r["prompt"].split()[-1].rstrip(":")[::-1] + "\n"
    for r in tests["add"]:
        a, b = (int(w.rstrip(":")) for w in r["prompt"].split()[1::2])
        assert r["completion"] == f"{a + b}\n"
    prepared = examples.prepare_examples(str(tmp_path), data_dir=tmp_path / "data")
    assert prepared.splits.keys() == {"train", "val", "test"}


@pytest.mark.parametrize("pack", [False, True])
def test_examples_compose_with_lora_accumulation_and_bfloat16(tmp_path, pack):
    """--init with LoRA adapters, --grad-accum and bfloat16 train on masked examples, one a row or
    packed: the loss falls and the base's weights stay as they were (in the compute dtype)."""
    from mlx.utils import tree_flatten

    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build

    base = build(GPTConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2, n_embd=32), seed=0)
    checkpoint.save(tmp_path / "base", base, ByteTokenizer())
    write_jsonl(tmp_path / "train.jsonl", pairs(100))
    losses = []
    run = train(TrainConfig.of(data=str(tmp_path / "train.jsonl"), data_dir=str(tmp_path / "data"),
                               init=str(tmp_path / "base"), lora_rank=4, mask_prompt=True, grad_accum=2, batch_size=4,
                               dtype="bfloat16", learning_rate=1e-2, max_iters=12, eval_interval=12, eval_iters=1,
                               pack=pack, sample_tokens=0, out=str(tmp_path / "lora")), progress=False,
                on_step=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    frozen = {k: v for k, v in tree_flatten(run.model.parameters()) if "lora" not in k}
    for k, v in tree_flatten(base.parameters()):  # frozen, and held in bfloat16 (lora.cast_frozen)
        got = frozen[k] if k in frozen else frozen[k.replace(".weight", ".linear.weight")]
        assert mx.array_equal(got, v.astype(got.dtype)).item(), k


def test_ranks_draw_the_rows_of_one_batch_and_format_is_obeyed(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", pairs(40))
    split = examples.prepare_examples(str(tmp_path / "t.jsonl"), data_dir=tmp_path / "data").splits["train"]
    one = example_sampler.ExampleSampler(split, 6, 16, seed=3, accum=2, mask_prompt=True).next()
    ranks = [example_sampler.ExampleSampler(split, 3, 16, seed=3, accum=2, rank=r, world=2, mask_prompt=True).next()
             for r in range(2)]
    for k in range(2):  # x, then y: rank 0's rows, then rank 1's, are the one process's batch
        assert np.array_equal(np.concatenate([r[k] for r in ranks], axis=1), one[k])
    with pytest.raises(UserError, match=r"t.jsonl:1: no 'text' field"):
        examples.prepare_examples(str(tmp_path / "t.jsonl"), fmt="text", data_dir=tmp_path / "data2")


def test_a_checkpoints_template_lays_out_pairs_and_is_kept_by_fine_tuning(tmp_path):
    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import with_chat_template

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    tok = with_chat_template(ByteTokenizer(), template)
    checkpoint.save(tmp_path / "base", build(GPTConfig(vocab_size=256, block_size=48, n_layer=1, n_head=2,
                                                       n_embd=16), seed=0), tok)
    write_jsonl(tmp_path / "train.jsonl", pairs(20))
    run = train(TrainConfig.of(data=str(tmp_path / "train.jsonl"), data_dir=str(tmp_path / "data"),
                               init=str(tmp_path / "base"), mask_prompt=True, max_iters=2, eval_iters=1,
                               sample_tokens=0, out=str(tmp_path / "tuned")), progress=False)
    ids, mask = run.dataset.splits["train"].example(0)
    first = pairs(20)[0]
    assert bytes(ids.tolist()).decode() == f"[user] {first['prompt']}\n[assistant] {first['completion']}\n"
    assert bytes(ids[mask == 1].tolist()).decode() == first["completion"] + "\n"  # with the turn's end
    assert load_tokenizer(tmp_path / "tuned").chat_template == template
