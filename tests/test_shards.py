"""Shards: written byte for byte as llm.c's write_datafile lays them out, found in llm.c's order,
and refused when one is missing or they mix token widths."""

import struct

import numpy as np
import pytest

from mlx_gpt.data import load_dataset
from mlx_gpt.errors import UserError
from mlx_gpt.shards import ShardWriter, shard_name


def _llmc_bytes(tokens, magic, version, fmt):
    """llm.c's dev/data/data_common.py layout, field by field: 256 int32 (magic, version, count, 0...)."""
    return struct.pack("<256i", magic, version, len(tokens), *[0] * 253) + struct.pack(f"<{len(tokens)}{fmt}", *tokens)


@pytest.mark.parametrize("vocab,magic,version,fmt", [(50257, 20240520, 1, "H"), (128256, 20240801, 7, "I")])
def test_writer_cuts_shards_as_llmc_lays_them_out(tmp_path, vocab, magic, version, fmt):
    w = ShardWriter(tmp_path, "web", "train", vocab, shard_tokens=10)
    tokens = np.arange(37) * (vocab // 40)
    done = w.write(tokens[:15]) + w.write(tokens[15:])
    assert [(p.name, n, at) for p, n, at in done] == [("web_train_000001.bin", 10, 10), ("web_train_000002.bin", 10, 5),
                                                      ("web_train_000003.bin", 10, 15)]
    assert w.close()[1] == 7 and w.close() is None
    for i in range(4):
        raw = (tmp_path / f"web_train_{i + 1:06d}.bin").read_bytes()
        assert raw == _llmc_bytes(tokens[i * 10:(i + 1) * 10].tolist(), magic, version, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"web_train_{i:06d}.bin" for i in range(1, 5)]


def test_abandoned_shard_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, "web", "val", 256, shard_tokens=100)
    w.write(np.arange(50))
    assert [p.name for p in tmp_path.iterdir()] == [".web_val_000000.bin.partial"]
    w.abandon()
    assert not list(tmp_path.iterdir())


def _fineweb_folder(tmp_path, n_train=3, fmt="H", magic=20240520, version=1):
    d = tmp_path / "fineweb10B"
    d.mkdir()
    (d / "fineweb_val_000000.bin").write_bytes(_llmc_bytes([1, 2, 3, 4] * 10, magic, version, fmt))
    for i in range(1, n_train + 1):
        (d / f"fineweb_train_{i:06d}.bin").write_bytes(_llmc_bytes([i] * (20 + i), magic, version, fmt))
    return d


def test_llmc_fineweb_shards_load_in_order(tmp_path):
    ds = load_dataset(_fineweb_folder(tmp_path))
    assert [f.name for f in ds.train_files] == [f"fineweb_train_{i:06d}.bin" for i in (1, 2, 3)]
    assert [f.name for f in ds.val_files] == ["fineweb_val_000000.bin"] and ds.vocab_size == 50257
    assert ds.tokens("train").tolist() == [1] * 21 + [2] * 22 + [3] * 23


def test_a_missing_shard_or_mixed_widths_are_refused(tmp_path):
    d = _fineweb_folder(tmp_path, n_train=4)
    (d / "fineweb_train_000002.bin").unlink()
    with pytest.raises(UserError, match="fineweb_train_000002.bin is missing"):
        load_dataset(d)
    (d / "fineweb_train_000002.bin").write_bytes(_llmc_bytes([5] * 30, 20240801, 7, "I"))
    with pytest.raises(UserError, match="different vocabularies"):
        load_dataset(d)
    (d / "fineweb_train_000002.bin").write_bytes(_llmc_bytes([5] * 30, 20240520, 1, "H")[:-6])
    with pytest.raises(UserError, match="fineweb_train_000002.bin is truncated"):
        load_dataset(d)
    assert shard_name("web", "val", 3, (2, 16)) == "web_val_p002of016_000003.bin"


def test_a_full_disk_is_an_error_and_leaves_no_shard(tmp_path, monkeypatch):
    import errno

    w = ShardWriter(tmp_path, "web", "train", 256, shard_tokens=100)
    w.write(np.arange(60))

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    w._file = Full(w._file)
    with pytest.raises(UserError, match="writing .*web_train_000001.bin failed: No space left on device"):
        w.write(np.arange(60))
    assert not list(tmp_path.iterdir())
