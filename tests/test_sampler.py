"""Samplers over shards: windows never cross a shard, random draws in proportion to the shards'
sizes, the sequential order of llm.c's DistributedDataLoader, and exact resume across shards."""

import numpy as np
import pytest

from mlx_gpt.data import write_tokens
from mlx_gpt.errors import UserError
from mlx_gpt.sampler import BatchSampler, SequentialSampler

SIZES = (300, 1000, 61, 500)


def _shards(tmp_path, sizes=SIZES):
    """Shards whose tokens say where they are: shard s holds s * 2000 + 0, 1, 2 ..."""
    files, tokens = [], []
    for s, n in enumerate(sizes):
        t = s * 2000 + np.arange(n)
        write_tokens(tmp_path / f"x_train_{s + 1:06d}.bin", t, vocab_size=10_000)
        files.append(tmp_path / f"x_train_{s + 1:06d}.bin")
        tokens.append(t)
    return files, tokens


def test_random_windows_stay_in_a_shard_drawn_in_proportion_to_its_size(tmp_path):
    files, _ = _shards(tmp_path)
    T = 64
    s = BatchSampler(files, batch_size=50, block_size=T, seed=0, accum=2)
    counts = np.zeros(len(SIZES))
    for _ in range(40):
        x, y = s.next()
        assert x.shape == y.shape == (2, 50, T)
        window = np.concatenate([x, y[..., -1:]], axis=-1)
        assert (np.diff(window, axis=-1) == 1).all()  # consecutive tokens: never across a shard's end
        np.add.at(counts, window[..., 0].ravel() // 2000, 1)
    windows = np.array([n - T for n in SIZES])
    assert np.abs(counts / counts.sum() - windows / windows.sum()).max() < 0.02
    assert (window[..., -1] % 2000 < np.array(SIZES)[window[..., 0] // 2000]).all()


def test_one_file_draws_what_it_drew_before_shards(tmp_path):
    """Old checkpoints resume with the same batches: the window starts are the generator's
    integers over the file's n - T windows, as before."""
    files, tokens = _shards(tmp_path, (777,))
    B, T, A = 3, 16, 2
    s = BatchSampler(files[0], B, T, seed=5, accum=A)
    rng = np.random.Generator(np.random.PCG64(5))
    for _ in range(4):
        starts = rng.integers(0, 777 - T, size=A * B).reshape(A, B)
        x, y = s.next()
        np.testing.assert_array_equal(x, tokens[0][starts[..., None] + np.arange(T)])
        np.testing.assert_array_equal(y, tokens[0][starts[..., None] + np.arange(1, T + 1)])


def _llmc_order(tokens, B, T, rank, world, steps):
    """llm.c's DataLoader unshuffled: per shard (len - 1) // (world*B*T) samples, sample k of rank r
    at (k * world + r) * B*T, shard after shard, then the first again."""
    out, shard, k = [], 0, 0
    while len(out) < steps:
        samples = (len(tokens[shard]) - 1) // (world * B * T)
        if k >= samples:
            shard, k = (shard + 1) % len(tokens), 0
            continue
        at = (k * world + rank) * B * T
        out.append(tokens[shard][at : at + B * T + 1])
        k += 1
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_sequential_reads_shards_in_llmcs_order_and_resumes_exactly(tmp_path, world):
    files, tokens = _shards(tmp_path)
    B, T = 2, 20
    for rank in range(world):
        s = SequentialSampler(files, B, T, accum=1, rank=rank, world=world)
        expect = _llmc_order(tokens, B, T, rank, world, 60)
        got = [s.next() for _ in range(60)]
        for (x, y), e in zip(got, expect):
            np.testing.assert_array_equal(x[0], e[:-1].reshape(B, T))
            np.testing.assert_array_equal(y[0], e[1:].reshape(B, T))
    s = SequentialSampler(files, B, T, accum=3, world=world)
    for _ in range(5):
        s.next()
    saved = s.state()
    assert saved["shard"] > 0  # past the first shard's end
    ahead = [s.next() for _ in range(20)]
    resumed = SequentialSampler(files, B, T, accum=3, world=world)
    resumed.set_state(saved)
    for (x, y), (rx, ry) in zip(ahead, (resumed.next() for _ in range(20))):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_random_resume_is_exact_across_shards(tmp_path):
    files, _ = _shards(tmp_path)
    s = BatchSampler(files, 4, 32, seed=9, accum=2)
    for _ in range(3):
        s.next()
    saved = s.state()
    ahead = [s.next() for _ in range(5)]
    resumed = BatchSampler(files, 4, 32, seed=123, accum=2)
    resumed.set_state(saved)
    for (x, _), (rx, _) in zip(ahead, (resumed.next() for _ in range(5))):
        np.testing.assert_array_equal(x, rx)


def test_saved_sequential_states_are_checked(tmp_path):
    files, _ = _shards(tmp_path)
    s = SequentialSampler(files, 2, 20)
    s.set_state({"sampler": "sequential", "position": 3})  # saved before shards: the first shard
    assert s.state() == {"sampler": "sequential", "shard": 0, "position": 3}
    with pytest.raises(UserError, match="shard 9, but the data has 4"):
        s.set_state({"sampler": "sequential", "shard": 8, "position": 0})
    with pytest.raises(UserError, match="saved shard"):
        s.set_state({"sampler": "sequential", "shard": -1, "position": 0})
    with pytest.raises(UserError, match="no shard of"):
        SequentialSampler(files, 8, 200)
    with pytest.raises(UserError, match="every shard of"):
        BatchSampler(files, 8, 1000, seed=0)
