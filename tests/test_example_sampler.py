"""Packed batches of examples (--pack): whole examples fill each row in the order drawn, positions
restart at each one, every drawn example is trained on once, the sampler's state resumes a run
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


def test_rows_hold_whole_examples_in_draw_order_with_restarting_positions(split):
    T = 24
    sampler = example_sampler.ExampleSampler(split, 3, T, seed=5, accum=2, mask_prompt=True, pack=True)
    x, y, positions = sampler.next()
    assert x.shape == y.shape == positions.shape == (2, 3, T)
    order = iter(drawn(5, 200, len(split)))
    for row_x, row_y, row_p in zip(x.reshape(-1, T), y.reshape(-1, T), positions.reshape(-1, T)):
        starts = np.flatnonzero(row_p == 0)
        at = 0
        for a, b in zip(starts, list(starts[1:]) + [T]):
            assert (row_p[a:b] == np.arange(b - a)).all()  # positions restart and count up
        used = 0
        while True:  # the examples of this row, as the sampler drew them
            i = next(order)
            ids, mask = split.example(i)
            n = min(len(ids), T + 1) - 1
            if used and used + n > T:  # did not fit: it opens the next row
                order = iter([i] + list(order))
                break
            ids = ids[: n + 1].astype(np.int64)
            assert (row_x[at:at + n] == ids[:-1]).all() and row_p[at] == 0
            want = np.where(mask[1:n + 1] == 1, ids[1:], IGNORE)
            assert (row_y[at:at + n] == want).all()
            at, used = at + n, used + n
            if used >= T:
                break
        assert (row_y[at:] == IGNORE).all() and (row_x[at:] == 0).all()  # padding, trained on nothing


def test_packing_fills_rows_far_better_than_one_example_a_row(split):
    x, y, _ = example_sampler.ExampleSampler(split, 8, 48, seed=1, pack=True).next()
    alone = example_sampler.ExampleSampler(split, 8, 48, seed=1).next()[1]
    assert (y != IGNORE).sum() > 2 * (alone != IGNORE).sum()
    assert (y != IGNORE).mean() > 0.7  # only the tail of a row that the next example did not fit is padding


def test_a_packed_samplers_state_resumes_its_draws_exactly(split):
    a = example_sampler.ExampleSampler(split, 2, 32, seed=9, accum=2, pack=True)
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state()))  # as a checkpoint keeps it
    assert state["pending"] is not None or a.pending is None
    b = example_sampler.ExampleSampler(split, 2, 32, seed=0, accum=2, pack=True)
    b.set_state(state)
    for _ in range(3):
        for got, want in zip(b.next(), a.next()):
            assert np.array_equal(got, want)
    with pytest.raises(UserError, match="corrupt"):
        b.set_state({**state, "pending": len(split)})


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
