import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from mlx_gpt.data import HEADER_BYTES, TokenFile, load_dataset, open_tokens, prepare, read_header, write_tokens
from mlx_gpt.sources import read_source
from mlx_gpt.sampler import BatchSampler, SequentialSampler, make_sampler
from conftest import assert_one_line_error, run_module
from mlx_gpt.errors import UserError
from mlx_gpt.tokenizer import ByteTokenizer


def test_header_fields_and_uint16_payload(tmp_path):
    tokens = np.array([0, 1, 65535, 42, 7])
    write_tokens(tmp_path / "t.bin", tokens, vocab_size=65536)
    raw = (tmp_path / "t.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (header[0], header[1], header[2]) == (20240520, 1, 5)
    assert not header[3:].any()
    assert len(raw) == HEADER_BYTES + 2 * 5
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert open_tokens(tmp_path / "t.bin").tolist() == tokens.tolist()


def _llmc_file(path, magic, version, tokens, fmt):
    """A token file laid out as llm.c's data_common.write_datafile does, field by field."""
    header = struct.pack("<3i", magic, version, len(tokens)) + struct.pack("<253i", *[0] * 253)
    path.write_bytes(header + struct.pack(f"<{len(tokens)}{fmt}", *tokens))
    return path


def test_llmc_gpt2_and_llama3_files_are_read(tmp_path):
    gpt2 = _llmc_file(tmp_path / "gpt2.bin", 20240520, 1, [50256, 0, 65535, 17], "H")
    llama = _llmc_file(tmp_path / "llama.bin", 20240801, 7, [128000, 0, 65536, 128255, 9], "I")
    assert read_header(gpt2) == TokenFile(20240520, 1, 4) and read_header(gpt2).llmc_vocab_size == 50257
    assert read_header(llama) == TokenFile(20240801, 7, 5) and read_header(llama).llmc_vocab_size == 128256
    assert open_tokens(gpt2).tolist() == [50256, 0, 65535, 17]
    assert open_tokens(llama).tolist() == [128000, 0, 65536, 128255, 9]


def test_writes_what_llmc_writes(tmp_path):
    """uint16 GPT-2 files while ids fit, LLaMA-3's uint32 files beyond: llm.c's bytes exactly."""
    write_tokens(tmp_path / "small.bin", np.array([0, 1, 65535]), vocab_size=65536)
    expected = _llmc_file(tmp_path / "a.bin", 20240520, 1, [0, 1, 65535], "H")
    assert (tmp_path / "small.bin").read_bytes() == expected.read_bytes()
    write_tokens(tmp_path / "big.bin", np.array([0, 65536, 128255]), vocab_size=128256)
    expected = _llmc_file(tmp_path / "b.bin", 20240801, 7, [0, 65536, 128255], "I")
    assert (tmp_path / "big.bin").read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("magic,version,message", [
    (20240520, 2, "unsupported token file version 2"),  # neither llm.c's nor readable as one
    (20240801, 1, "unsupported token file version 1"),
    (20240522, 1, "not a token file"),  # llm.c's HellaSwag eval file
])
def test_unknown_headers_are_refused(tmp_path, magic, version, message):
    path = _llmc_file(tmp_path / "t.bin", magic, version, [1, 2], "I")
    with pytest.raises(UserError, match=message):
        read_header(path)


def test_llama3_directory_takes_llama3_vocabulary(tmp_path):
    _llmc_file(tmp_path / "x_train.bin", 20240801, 7, list(range(0, 128256, 1000)), "I")
    _llmc_file(tmp_path / "x_val.bin", 20240801, 7, [128255, 1, 2], "I")
    assert load_dataset(tmp_path).vocab_size == 128256


def test_token_ids_outside_the_vocabulary_are_refused_on_opening(tmp_path, monkeypatch):
    import mlx_gpt.data as data

    monkeypatch.setattr(data, "SCAN_CHUNK", 7)  # the offending id sits in a later chunk
    ids = [1] * 40 + [65535] + [2] * 10  # GPT-2's vocabulary has 50257 ids
    _llmc_file(tmp_path / "x_train.bin", 20240520, 1, ids, "H")
    _llmc_file(tmp_path / "x_val.bin", 20240520, 1, [1, 2, 3], "H")
    with pytest.raises(UserError, match=r"x_train.bin holds token id 65535, outside the vocabulary of 50257"):
        load_dataset(tmp_path)
    ds = prepare(str(_corpus(tmp_path)), data_dir=tmp_path / "d")
    val = open_tokens(ds.val_file).astype(np.int64)
    val[len(val) // 2] = 300
    write_tokens(ds.val_file, val, vocab_size=301)  # a byte dataset holding id 300
    with pytest.raises(UserError, match="val_000000.bin holds token id 300, outside the vocabulary of 256"):
        load_dataset(ds.path)


def test_token_ids_are_scanned_once_across_processes_and_again_when_a_shard_changes(tmp_path, monkeypatch):
    import mlx_gpt.data as data

    ds = prepare(str(_corpus(tmp_path)), data_dir=tmp_path / "d")  # opening it scans every shard once
    assert set(json.loads((ds.path / data.ID_MEMO).read_text())["files"]) == {ds.train_file.name, ds.val_file.name}
    # another process opens it without reading a token: its scan would stop it
    never = ("import sys, mlx_gpt.data as d\n"
             "d._largest_id = lambda p: sys.exit(f'scanned {p.name}')\n"
             "print(d.load_dataset(sys.argv[1]).vocab_size)")
    proc = subprocess.run([sys.executable, "-c", never, str(ds.path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "256", proc.stderr
    # the same size, an id outside the vocabulary, the modification time put back: scanned again, refused
    scanned, real = [], data._largest_id
    monkeypatch.setattr(data, "_largest_id", lambda p: scanned.append(p.name) or real(p))
    stat = ds.val_file.stat()
    val = open_tokens(ds.val_file).astype(np.int64)
    val[3] = 300
    time.sleep(0.02)  # past the file system's clock tick: its change time moves
    write_tokens(ds.val_file, val, vocab_size=301)
    os.utime(ds.val_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ds.val_file.stat().st_size == stat.st_size
    with pytest.raises(UserError, match="holds token id 300"):
        load_dataset(ds.path)
    assert scanned == [ds.val_file.name]


def test_the_id_memo_of_a_read_only_folder_goes_to_the_cache(tmp_path, monkeypatch):
    import mlx_gpt.data as data

    ds = prepare(str(_corpus(tmp_path)), data_dir=tmp_path / "d")
    (ds.path / data.ID_MEMO).unlink()
    monkeypatch.setenv("MLX_GPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)  # a folder this user cannot write
    load_dataset(ds.path)
    assert not (ds.path / data.ID_MEMO).exists()
    memo = json.loads(next((tmp_path / "cache" / "token-ids").glob("*.json")).read_text())
    assert set(memo["files"]) == {ds.train_file.name, ds.val_file.name}


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world. " * 100)
    return path


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
    n_train, n_val = read_header(ds.train_file).count, read_header(ds.val_file).count
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


def test_gpt2_tokenizer_from_files_gives_tiktoken_ids(tmp_path, data_files):
    from test_gpt2_tokenizer import tiktoken_gpt2

    enc = tiktoken_gpt2(data_files / "gpt2")
    text = (data_files / "tinyshakespeare.txt").read_text()[:50_000]
    (tmp_path / "play.txt").write_text(text)
    ds = prepare(str(tmp_path / "play.txt"), f"gpt2:{data_files / 'gpt2'}", data_dir=tmp_path / "data")
    assert ds.path.name == "play-gpt2" and ds.vocab_size == 50257 and ds.tokenizer.kind == "gpt2"
    cut = int(len(text) * 0.9)
    assert open_tokens(ds.train_file).tolist() == enc.encode_ordinary(text[:cut]) + [50256]
    assert open_tokens(ds.val_file).tolist() == enc.encode_ordinary(text[cut:]) + [50256]
    assert read_header(ds.train_file) == TokenFile(20240520, 1, len(enc.encode_ordinary(text[:cut])) + 1)
    assert json.loads((ds.path / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_gpt2_tokenizer_from_the_default_place(tmp_path, data_files):
    (tmp_path / "play.txt").write_text("To be, or not to be.\n" * 50)
    data = tmp_path / "data"
    with pytest.raises(UserError, match=r"data/tokenizers/gpt2/ \(vocab.json \+ merges.txt or encoder.json"):
        prepare(str(tmp_path / "play.txt"), "gpt2", data_dir=data)
    shutil.copytree(data_files / "gpt2", data / "tokenizers" / "gpt2")
    ds = prepare(str(tmp_path / "play.txt"), "gpt2", data_dir=data)
    assert ds.tokenizer.encode(" To be") == [1675, 307]
    assert prepare(str(tmp_path / "play.txt"), "gpt2", data_dir=data).path == ds.path  # reused


def test_prepare_cli_with_gpt2_files(tmp_path, data_files):
    (tmp_path / "play.txt").write_text("To be, or not to be.\n" * 50)
    proc = run_module("mlx_gpt.prepare", "play.txt", "--tokenizer", f"gpt2:{data_files / 'gpt2'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "data/play-gpt2: " in proc.stdout and "vocab 50257" in proc.stdout
    proc = run_module("mlx_gpt.prepare", "play.txt", "--tokenizer", "gpt2", cwd=tmp_path)
    assert_one_line_error(proc, "data/tokenizers/gpt2/", "gpt2:PATH")
    proc = run_module("mlx_gpt.prepare", "play.txt", "--tokenizer", "gpt2:nowhere", cwd=tmp_path)
    assert_one_line_error(proc, "tokenizer nowhere not found")


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


def test_sequential_sampler_reads_as_llmc_does(tmp_path):
    """llm.c's DataLoader, one shard, no shuffle: window k starts at k*B*T and holds B*T+1 tokens;
    (n - 1) // (B*T) windows, then back to the start."""
    B, T, n = 2, 4, 30  # (30 - 1) // 8 = 3 windows; tokens 25..29 are never read
    write_tokens(tmp_path / "t.bin", np.arange(n) + 100, vocab_size=256)
    s = SequentialSampler(tmp_path / "t.bin", B, T, accum=2)
    llmc = []
    for k in (0, 1, 2, 0, 1, 2, 0, 1):  # the order of llm.c's windows over four steps of two
        buf = np.arange(k * B * T, k * B * T + B * T + 1) + 100
        llmc.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
    got = []
    for _ in range(4):
        x, y = s.next()
        assert x.shape == y.shape == (2, B, T) and x.dtype == np.int32
        got += [(x[0], y[0]), (x[1], y[1])]
    for (gx, gy), (ex, ey) in zip(got, llmc):
        np.testing.assert_array_equal(gx, ex)
        np.testing.assert_array_equal(gy, ey)
    assert s.state() == {"sampler": "sequential", "position": 2}


def test_sequential_sampler_state_resumes_exactly(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(500) % 256, vocab_size=256)
    a = make_sampler("sequential", tmp_path / "t.bin", 3, 8, seed=0)
    for _ in range(5):
        a.next()
    saved = json.loads(json.dumps(a.state()))
    expected = [a.next()[0] for _ in range(40)]  # past the wrap
    b = make_sampler("sequential", tmp_path / "t.bin", 3, 8, seed=0)
    b.set_state(saved)
    for e in expected:
        np.testing.assert_array_equal(b.next()[0], e)
    with pytest.raises(UserError, match="saved with --sampler sequential"):
        make_sampler("random", tmp_path / "t.bin", 3, 8, seed=0).set_state(saved)
    with pytest.raises(UserError, match="saved with --sampler random"):
        b.set_state(make_sampler("random", tmp_path / "t.bin", 3, 8, seed=0).state())
    with pytest.raises(UserError, match="fewer than one batch"):
        make_sampler("sequential", tmp_path / "t.bin", 50, 10, seed=0)


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


def test_a_checkpoints_tokenizer_reuses_the_text_prepared_with_it_and_names_read_plainly(tmp_path, data_files,
                                                                                         sp_tokenizer):
    """Fine-tuning encodes with the checkpoint's tokenizer: text already prepared with that
    tokenizer (``prepare --tokenizer gpt2``) is reused, whatever its folder's name; new folders are
    named by the tokenizer's kind (the-verdict-sp300), with its digest only where that name is taken."""
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    verdict, data = str(data_files / "the-verdict.txt"), tmp_path / "data"
    by_spec = prepare(verdict, f"gpt2:{data_files / 'gpt2'}", data_dir=data)
    assert by_spec.path.name == "the-verdict-gpt2" and by_spec.name == "the-verdict"
    again = prepare(verdict, GPT2Tokenizer.from_directory(data_files / "gpt2"), data_dir=data)
    assert again.path == by_spec.path and again.train_file.stat().st_mtime_ns == by_spec.train_file.stat().st_mtime_ns
    sp = prepare(verdict, sp_tokenizer, data_dir=data)
    assert sp.path.name == f"the-verdict-sp{sp_tokenizer.vocab_size}"
    other = prepare(verdict, ByteTokenizer(), data_dir=data, val_fraction=0.2)
    assert other.path.name == "the-verdict-byte"
    taken = prepare(verdict, ByteTokenizer(), data_dir=data, val_fraction=0.3)  # the same name, other text split
    assert taken.path.name.startswith("the-verdict-byte-") and (data / "the-verdict-byte").is_dir()
