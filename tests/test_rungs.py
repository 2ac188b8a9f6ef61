import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_one_line_error, run_module
from mlx_gpt import backend
from mlx_gpt import checkpoint
from mlx_gpt.errors import UserError
from mlx_gpt.generate import generate
from mlx_gpt.models.rungs import NEURAL, RUNGS, build, parse
from mlx_gpt.tokenizer import ByteTokenizer
from mlx_gpt.optim import make_optimizer
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_train_step
from mlx_gpt.models.transformer import sinusoids

# every neural rung, shrunk to train in a second or two
TINY = {
    "bengio": dict(block_size=16, context=4, n_embd=16, n_hidden=64),
    "rnn": dict(block_size=16, n_layer=1, n_embd=32),
    "lstm": dict(block_size=16, n_layer=1, n_embd=32),
    "transformer": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
    "gpt1": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
    "gpt": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
    "modern": dict(block_size=16, n_layer=1, n_head=2, n_embd=32),
}
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 4


def tiny(name: str, seed: int = 0):
    """A rung as a run or ``load`` gives it: with this machine's layers."""
    if name in NEURAL:
        return backend.layers(build(name, 256, overrides=TINY[name], seed=seed))
    return build(name, 256, tokens=np.frombuffer(TEXT.encode(), np.uint8), overrides={"block_size": 16})


def test_specs_name_a_rung_and_an_order():
    assert parse("ngram:4").order == 4 and parse("ngram").order == 3 and parse("kneser-ney").order == 5
    assert parse("unigram").order == 1 and parse("bigram").order == 2 and parse("lstm").order is None
    assert [parse(r).counted for r in RUNGS] == [True] * 4 + [False] * 7
    for spec, message in [("ngram:0", "n must be at least 1"), ("kneser-ney:-2", "n must be at least 1"),
                          ("lstm:3", "takes no order"), ("ngram:x", "whole number"), ("gpt3", "unknown rung")]:
        with pytest.raises(UserError, match=message):
            parse(spec)
    with pytest.raises(UserError, match="does not apply to the lstm rung"):
        build("lstm", 256, overrides={"n_head": 4})


@pytest.mark.parametrize("name", list(NEURAL))
def test_each_neural_rung_drives_the_loss_on_one_batch_close_to_zero(name):
    model = tiny(name)
    cfg = TrainConfig.of(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, max_iters=150, weight_decay=0.0)
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg)  # the training step itself
    batch = np.random.default_rng(0).integers(0, 256, size=(1, 4, 17))
    x, y = mx.array(batch[..., :-1]), mx.array(batch[..., 1:])
    first = step(x, y)[0].item()
    for _ in range(cfg.optim.max_iters - 1):
        loss, _ = step(x, y)
        mx.eval(loss, model.parameters(), optimizer.state)
    assert first > math.log(256) - 1
    assert loss.item() < 0.1


@pytest.mark.parametrize("name", list(NEURAL))
def test_cached_steps_equal_one_full_pass(name):
    model = tiny(name, seed=3)
    model.eval()
    ids = mx.array(np.random.default_rng(1).integers(0, 256, size=(2, 12)))
    full = np.array(model(ids))
    cache = model.make_cache()
    parts = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate([np.array(p) for p in parts], axis=1), full, atol=1e-4, rtol=1e-4)
    assert cache[0].offset == 12


@pytest.mark.parametrize("name", list(RUNGS))
def test_samples_from_every_rung_decode_to_text(name, tmp_path):
    model = tiny(name)
    model.eval()
    text = generate(model, ByteTokenizer(), "To be", 24, temperature=1.0, seed=0)
    assert isinstance(text, str) and 0 < len(text.encode("utf-8", "replace"))
    assert generate(model, ByteTokenizer(), "To be", 24, temperature=1.0, seed=0) == text  # seeded
    # and every rung goes through a checkpoint and back unchanged
    checkpoint.save(tmp_path / "ckpt", model, ByteTokenizer())
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    ids = mx.array([list(b"To be, or")])
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(model(ids)))
    assert checkpoint.read_config(tmp_path / "ckpt")["model_type"] == parse(name).model_type


def test_count_rungs_sample_what_they_counted():
    model = tiny("kneser-ney")
    assert generate(model, ByteTokenizer(), "To be, or no", 14, temperature=0) == "t to be, that "


def test_sinusoids_follow_the_paper():
    pe = np.array(sinusoids(mx.arange(3, 8), 8))
    pos = np.arange(3, 8)[:, None]
    i = np.arange(4)[None, :]
    np.testing.assert_allclose(pe[:, 0::2], np.sin(pos / 10000 ** (2 * i / 8)), atol=1e-5)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(pos / 10000 ** (2 * i / 8)), atol=1e-5)


def test_post_layernorm_normalises_the_residual_stream():
    """The Transformer and GPT-1 rungs end in LayerNorm (post-LN); GPT-2 does not until ln_f."""
    for name in ("transformer", "gpt1"):
        model = tiny(name)
        h = model.embed(mx.array([[1, 2, 3]]), mx.arange(3))
        for block in model.h:
            h = block(h)
        np.testing.assert_allclose(np.array(h.mean(axis=-1)), 0, atol=1e-5)
        np.testing.assert_allclose(np.array(h.var(axis=-1)), 1, atol=1e-3)


def small_run(tmp_path, data, model: str | None, **kw) -> TrainConfig:
    """A short run of ``model`` (None: --init's)."""
    return TrainConfig.of(data=str(data), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                          **({"model": model} if model else {}), block_size=16, batch_size=4, max_iters=3,
                          eval_iters=1, log_interval=1, sample_tokens=8, **kw)


@pytest.mark.parametrize("model", ["lstm", "kneser-ney:3"])
def test_train_builds_the_chosen_rung(model, tmp_path, data_files):
    run = train(small_run(tmp_path, data_files / "the-verdict.txt", model), progress=False)
    loaded, _ = checkpoint.load(run.out)
    assert checkpoint.read_config(run.out)["model_type"] == parse(model).model_type
    assert type(loaded) is type(run.model)
    metrics = (run.out / "metrics.jsonl").read_text()
    assert "val_loss" in metrics
    if parse(model).counted:
        with pytest.raises(UserError, match="fitted, not fine-tuned"):
            train(small_run(tmp_path / "again", data_files / "the-verdict.txt", None, init=str(run.out)),
                  progress=False)


def test_train_cli_rejects_an_unknown_rung(tmp_path, data_files):
    proc = run_module("mlx_gpt.train", "--data", str(data_files / "the-verdict.txt"), "--model", "ngram:0",
                      "--data-dir", str(tmp_path / "data"), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "n must be at least 1")


def test_a_count_rung_is_fitted_on_every_train_shard(tmp_path, data_files):
    from mlx_gpt.data import prepare
    from mlx_gpt.training.model import new

    ds = prepare(str(data_files / "the-verdict.txt"), "byte", data_dir=tmp_path / "data", shard_tokens=2000,
                 workers=1)
    assert len(ds.train_files) > 2
    got = new(TrainConfig.of(data=str(ds.path), model="bigram"), ds)
    want = build("bigram", ds.vocab_size, tokens=ds.tokens("train"))
    assert int(got.count[: ds.vocab_size].sum()) == len(ds.tokens("train"))
    assert mx.array_equal(got.count, want.count) and mx.array_equal(got.child_count, want.child_count)
