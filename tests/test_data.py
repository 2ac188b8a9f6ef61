import json

import numpy as np
import pytest

from mlx_gpt.data import (HEADER_BYTES, MAGIC, BatchSampler, load_dataset, open_tokens, prepare, read_header,
                          read_source, write_tokens)
from mlx_gpt.errors import UserError
from mlx_gpt.tokenizer import ByteTokenizer


def test_header_fields_and_uint16_payload(tmp_path):
    tokens = np.array([0, 1, 65535, 42, 7])
    write_tokens(tmp_path / "t.bin", tokens, vocab_size=65536)
    raw = (tmp_path / "t.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (header[0], header[1], header[2]) == (MAGIC, 1, 5) == (20240520, 1, 5)
    assert not header[3:].any()
    assert len(raw) == HEADER_BYTES + 2 * 5
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert open_tokens(tmp_path / "t.bin").tolist() == tokens.tolist()


def test_uint32_when_vocabulary_needs_it(tmp_path):
    tokens = np.array([0, 65536, 128255])
    write_tokens(tmp_path / "t.bin", tokens, vocab_size=128256)
    assert read_header(tmp_path / "t.bin") == (2, 3)
    assert (tmp_path / "t.bin").stat().st_size == HEADER_BYTES + 4 * 3
    assert open_tokens(tmp_path / "t.bin").dtype == np.dtype("<u4")
    assert open_tokens(tmp_path / "t.bin").tolist() == tokens.tolist()
    write_tokens(tmp_path / "u.bin", np.array([1, 2]), vocab_size=65536)
    assert read_header(tmp_path / "u.bin") == (1, 2)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(100), vocab_size=256)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_header(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 2000)
    with pytest.raises(UserError, match="not a token file"):
        read_header(tmp_path / "junk.bin")


def test_y_is_x_shifted_by_one(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(1000) % 256, vocab_size=256)
    sampler = BatchSampler(tmp_path / "t.bin", batch_size=4, block_size=16, seed=0, accum=3)
    x, y = sampler.next()
    assert x.shape == y.shape == (3, 4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])
    np.testing.assert_array_equal((x[..., 0] + 1) % 256, y[..., 0])


def test_sampler_state_round_trips_through_json(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(5000) % 256, vocab_size=256)
    a = BatchSampler(tmp_path / "t.bin", 2, 8, seed=1)
    a.next()
    saved = json.loads(json.dumps(a.state()))
    expected = [a.next()[0] for _ in range(3)]
    b = BatchSampler(tmp_path / "t.bin", 2, 8, seed=99)
    b.set_state(saved)
    for e in expected:
        np.testing.assert_array_equal(b.next()[0], e)


def test_prepare_byte_dataset_and_reuse(tmp_path, shakespeare):
    ds = prepare(str(shakespeare), "byte", data_dir=tmp_path)
    assert ds.path == tmp_path / "tinyshakespeare-byte" and ds.vocab_size == 256
    n_train, n_val = read_header(ds.train_file)[1], read_header(ds.val_file)[1]
    assert n_train + n_val == len(shakespeare.read_bytes())
    assert abs(n_val / (n_train + n_val) - 0.1) < 0.01
    text = shakespeare.read_text()
    assert ByteTokenizer().decode(open_tokens(ds.val_file)) == text[int(len(text) * 0.9):]
    mtime = ds.train_file.stat().st_mtime_ns
    again = prepare(str(shakespeare), "byte", data_dir=tmp_path)
    assert again.train_file.stat().st_mtime_ns == mtime  # the cache is reused
    assert prepare(str(ds.path)).path == ds.path  # a prepared directory is a source too


def test_prepare_sentencepiece_folder_with_end_of_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document number {i}. " * 200)
    ds = prepare(str(corpus), "sp:300", data_dir=tmp_path / "data")
    assert ds.vocab_size == 300 and ds.tokenizer.kind == "sentencepiece"
    train = open_tokens(ds.train_file)
    assert (train == ds.tokenizer.eot_id).sum() == 3  # one end-of-text after each document
    assert json.loads((ds.path / "meta.json").read_text())["documents"] == 3


def test_llmc_token_files_are_read_as_they_are(tmp_path):
    write_tokens(tmp_path / "tiny_train.bin", np.arange(3000) % 50257, vocab_size=50257)
    write_tokens(tmp_path / "tiny_val.bin", np.arange(500), vocab_size=50257)
    ds = load_dataset(tmp_path)
    assert ds.vocab_size == 50257 and ds.tokenizer is None
    assert ds.train_file.name == "tiny_train.bin"
    assert prepare(str(tmp_path)).val_file.name == "tiny_val.bin"


def test_builtin_corpus_needs_no_download():
    name, docs = read_source("pydoc")
    assert name == "pydoc" and sum(map(len, docs)) > 100_000


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text(""), "empty"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
])
def test_bad_corpora(tmp_path, setup, message):
    path = tmp_path / "corpus.txt"
    setup(path)
    with pytest.raises(UserError, match=message):
        prepare(str(path), data_dir=tmp_path / "data")


def test_corpus_shorter_than_one_block(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(10), vocab_size=256)
    with pytest.raises(UserError, match="fewer than one block"):
        BatchSampler(tmp_path / "t.bin", 2, 64, seed=0)


class _FakeResponse:
    def __init__(self, payload: bytes):
        import io

        self._io, self.headers = io.BytesIO(payload), {"Content-Length": str(len(payload))}

    def read(self, n=-1):
        return self._io.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_shakespeare_download_is_checked_and_cached(tmp_path, monkeypatch, shakespeare):
    import urllib.request

    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return _FakeResponse(shakespeare.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    name, docs = read_source("shakespeare", tmp_path)
    assert name == "shakespeare" and docs[0] == shakespeare.read_text()
    read_source("shakespeare", tmp_path)
    assert len(calls) == 1  # the second use reads the cached copy


def test_corrupted_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"<html>captive portal</html>"))
    with pytest.raises(UserError, match="wrong checksum"):
        read_source("shakespeare", tmp_path)
    assert not any((tmp_path / "downloads").iterdir())
