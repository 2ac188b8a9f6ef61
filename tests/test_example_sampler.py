"""Packed batches of examples (--pack): whole examples fill each row, positions restart at each
one, every drawn example is trained on once, the sampler's state resumes a run
bit for bit, and the combinations that cannot pack are one error line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import assert_one_line_error, run_module
from mlx_gpt import checkpoint, example_sampler, examples
from mlx_gpt.errors import UserError
from mlx_gpt.loss import IGNORE
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=48, batch_size=4, eval_iters=2, sample_tokens=0)


def write_set(path, n=80, seed=0):
    """Instructions of very different lengths: mostly short, a few longer than the block."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        words = int(rng.choice([1, 2, 3, 12], p=[0.5, 0.25, 0.2, 0.05]))
        lines.append({"prompt": f"q{i} " + "ab " * words, "completion": "xy" * int(rng.integers(1, 6)) + "\n"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sets")
    return examples.prepare_examples(str(write_set(tmp / "train.jsonl")), data_dir=tmp / "data").splits["train"]


def drawn(seed: int, count: int, n: int) -> list[int]:
    """The examples a packed sampler seeded ``seed`` draws, in order (one integer at a time)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [int(rng.integers(0, n)) for _ in range(count)]


def example_at(split, tokens: np.ndarray, T: int) -> int:
    """The example whose first tokens (as many as it takes in a row of T) are ``tokens``."""
    for i in range(len(split)):
        ids = split.example(i)[0]
        if min(len(ids), T + 1) - 1 == len(tokens) and (ids[: len(tokens)] == tokens).all():
            return i
    raise AssertionError(f"no example is {tokens}")


def test_rows_hold_whole_examples_with_restarting_positions_each_drawn_once(split):
    T = 24
    sampler = example_sampler.ExampleSampler(split, 3, T, seed=5, accum=2, mask_prompt=True, pack=True)
    placed = []
    for _ in range(3):
        x, y, positions = sampler.next()
        assert x.shape == y.shape == positions.shape == (2, 3, T)
        for row_x, row_y, row_p in zip(x.reshape(-1, T), y.reshape(-1, T), positions.reshape(-1, T)):
            starts = list(np.flatnonzero(row_p == 0)) + [T]
            for a, b in zip(starts, starts[1:]):
                assert (row_p[a:b] == np.arange(b - a)).all()  # positions restart and count up
                if (row_x[a:] == 0).all():  # the padding after the examples, trained on nothing
                    assert b == T and (row_y[a:] == IGNORE).all()
                    continue
                i = example_at(split, row_x[a:b], T)
                ids, mask = split.example(i)
                ids, n = ids.astype(np.int64), b - a
                assert (row_y[a:b] == np.where(mask[1:n + 1] == 1, ids[1:n + 1], IGNORE)).all()
                placed.append(i)
    # every example drawn so far is in a row, or held for the next ones
    assert sorted(placed + sampler.held) == sorted(drawn(5, len(placed) + len(sampler.held), len(split)))


def test_packing_fills_rows_far_better_than_one_example_a_row(split):
    packed = example_sampler.ExampleSampler(split, 8, 48, seed=1, pack=True)
    x, y, _ = (np.concatenate(a) for a in zip(*(packed.next() for _ in range(10))))
    alone = example_sampler.ExampleSampler(split, 8, 48, seed=1).next()[1]
    assert (y != IGNORE).mean() > 2 * (alone != IGNORE).mean()
    assert (x != 0).mean() > 0.85  # examples of 8 to 50 positions: a row's tail is seldom left empty


def test_a_packed_samplers_state_resumes_its_draws_exactly(split):
    a = example_sampler.ExampleSampler(split, 2, 32, seed=9, accum=2, pack=True)
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state()))  # as a checkpoint keeps it
    assert state["held"] == a.held and a.held
    b = example_sampler.ExampleSampler(split, 2, 32, seed=0, accum=2, pack=True)
    b.set_state(state)
    for _ in range(3):
        for got, want in zip(b.next(), a.next()):
            assert np.array_equal(got, want)
    with pytest.raises(UserError, match="corrupt"):
        b.set_state({**state, "held": [len(split)]})


def test_ranks_take_their_rows_of_the_packed_batch(split):
    one = example_sampler.ExampleSampler(split, 4, 32, seed=3, accum=2, pack=True).next()
    ranks = [example_sampler.ExampleSampler(split, 2, 32, seed=3, accum=2, rank=r, world=2, pack=True).next()
             for r in range(2)]
    for k in range(3):  # x, y, positions: rank 0's rows, then rank 1's
        assert np.array_equal(np.concatenate([r[k] for r in ranks], axis=1), one[k])


def test_a_resumed_packed_run_equals_the_uninterrupted_one(tmp_path):
    common = dict(data=str(write_set(tmp_path / "train.jsonl")), data_dir=str(tmp_path / "data"), mask_prompt=True,
                  pack=True, lr_decay_iters=6, warmup_iters=2, eval_interval=3, checkpoint_interval=100, dropout=0.1,
                  **TINY)
    losses = []
    train(TrainConfig.of(out=str(tmp_path / "whole"), max_iters=6, **common), progress=False,
          on_step=lambda step, loss: losses.append(loss))
    first = TrainConfig.of(out=str(tmp_path / "split"), max_iters=3, **common)
    train(first, progress=False)
    train(first.replace(max_iters=6, resume=True), progress=False)
    whole, split = (dict(tree_flatten(checkpoint.load_model(tmp_path / d).parameters())) for d in ("whole", "split"))
    assert all(mx.array_equal(whole[k], split[k]).item() for k in whole)  # bit for bit
    assert all(np.isfinite(losses))


def test_running_text_cannot_pack_one_error_line(tmp_path):
    (tmp_path / "text.txt").write_text("plain running text, not examples\n" * 40)
    proc = run_module("mlx_gpt.train", "--data", str(tmp_path / "text.txt"), "--pack", "--max-iters", "1",
                      "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--n-layer", "1",
                      "--n-embd", "16", "--n-head", "2", "--block-size", "32", cwd=tmp_path)
    assert_one_line_error(proc, "--pack packs example sets")
    assert proc.returncode == 2
