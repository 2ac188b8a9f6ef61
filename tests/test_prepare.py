"""Streaming prepare: every corpus format, tiktoken's ids, shards as llm.c writes them, resume,
the no-op repeat, --part, and bad input (one error line, no shard a reader would take as whole)."""

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_gpt.prepare as prep
import mlx_gpt.sources as sources
from mlx_gpt.data import load_dataset, open_tokens, prepare
from mlx_gpt.errors import UserError, run_cli
from mlx_gpt.sampler import BatchSampler, SequentialSampler
from mlx_gpt.shards import SHARD

EOT = 50256


@pytest.fixture(scope="module")
def enc(data_files):
    from test_gpt2_tokenizer import tiktoken_gpt2

    return tiktoken_gpt2(data_files / "gpt2")


def _docs(data_files, n, start=0):
    words = (data_files / "the-verdict.txt").read_text().split(" ")
    return [" ".join(words[(start + i) * 7 % 3000:(start + i) * 7 % 3000 + 5 + i % 13]) + ("\n\n" * (i % 3))
            for i in range(n)]


def _write_jsonl(path, docs, field="text"):
    data = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=4)


def _corpus(tmp_path, data_files):
    """A folder of every format (one nested), and its documents in the order they are read."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    text = (data_files / "the-verdict.txt").read_text()[:6000]
    (root / "a.txt").write_text(text)
    docs = {"b.jsonl": _docs(data_files, 12), "c.jsonl.gz": _docs(data_files, 9, 12),
            "d.jsonl.zst": _docs(data_files, 7, 21), "nested/e.parquet": _docs(data_files, 10, 28)}
    for name, d in docs.items():
        (_write_parquet if name.endswith(".parquet") else _write_jsonl)(root / name, d)
    (root / "notes.md").write_text("not a corpus file")
    return root, text, [d for name in sorted(docs) for d in docs[name]]


def _split(ds, split):
    files = ds.train_files if split == "train" else ds.val_files
    return np.concatenate([open_tokens(f) for f in files]).tolist()


def test_every_format_gives_tiktoken_ids_in_llmc_shards(tmp_path, data_files, enc):
    root, text, records = _corpus(tmp_path, data_files)
    ds = prepare(str(root), f"gpt2:{data_files / 'gpt2'}", data_dir=tmp_path / "data", shard_tokens=700, workers=1)
    cut = sources.val_cut(root / "a.txt", 0.1)
    train, val = enc.encode_ordinary(text[:cut]) + [EOT], enc.encode_ordinary(text[cut:]) + [EOT]
    for i, d in enumerate(records, 1):  # a.txt is document 0
        (val if sources.is_val(i, 0.1, None) else train).extend(enc.encode_ordinary(d) + [EOT])
    assert _split(ds, "train") == train and _split(ds, "val") == val
    assert 0 < len(val) < len(train) / 3
    names = [f.name for f in ds.val_files + ds.train_files]
    assert names[0] == "corpus_val_000000.bin" and names[len(ds.val_files)] == "corpus_train_000001.bin"
    for f in ds.train_files[:-1]:  # every shard full but the last; headers as llm.c writes them
        raw = f.read_bytes()
        assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 700) and len(raw) == 1024 + 2 * 700
    meta = json.loads((ds.path / "meta.json").read_text())
    assert meta["documents"] == 1 + len(records) and meta["shards"]["train"][0] == ["corpus_train_000001.bin", 700]


def test_a_big_text_file_in_pieces_gives_the_ids_of_the_whole(tmp_path, data_files, enc, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 300)
    monkeypatch.setattr(prep, "TASK_CHARS", 500)
    text = (data_files / "tinyshakespeare.txt").read_text()[:20_000]
    text = text.replace("\n", "\r\n", 40).replace(" ", "  ", 30) + "\n\n\n   \t tail"
    (tmp_path / "big.txt").write_text(text, newline="")
    ds = prepare(str(tmp_path / "big.txt"), f"gpt2:{data_files / 'gpt2'}", data_dir=tmp_path / "data", workers=1)
    cut = sources.val_cut(tmp_path / "big.txt", 0.1)
    assert _split(ds, "train") == enc.encode_ordinary(text[:cut]) + [EOT]
    assert _split(ds, "val") == enc.encode_ordinary(text[cut:]) + [EOT]


def test_pieces_cut_only_where_the_text_allows():
    pieces = list(sources.text_pieces(["ab cd  ef\n gh " * 200_000]))
    assert "".join(pieces) == "ab cd  ef\n gh " * 200_000 and len(pieces) > 1
    for left, right in zip(pieces, pieces[1:]):
        assert not left[-1].isspace() and right[0] == " " and not right[1].isspace()


def test_worker_processes_write_what_one_process_writes(tmp_path, data_files, monkeypatch):
    monkeypatch.setattr(prep, "TASK_CHARS", 400)
    root, _, _ = _corpus(tmp_path, data_files)
    one = prepare(str(root), "byte", data_dir=tmp_path / "one", shard_tokens=3000, workers=1)
    two = prepare(str(root), "byte", data_dir=tmp_path / "two", shard_tokens=3000, workers=2)
    assert [f.read_bytes() for f in one.train_files + one.val_files] == \
        [f.read_bytes() for f in two.train_files + two.val_files]


def test_an_interrupted_prepare_keeps_its_shards_and_ends_as_an_uninterrupted_one(tmp_path, data_files, monkeypatch):
    monkeypatch.setattr(prep, "TASK_CHARS", 300)
    root, _, _ = _corpus(tmp_path, data_files)
    whole = prepare(str(root), "byte", data_dir=tmp_path / "whole", shard_tokens=1000, workers=1)
    save, saves = prep._save_journal, []

    def interrupted(work, journal):
        save(work, journal)
        saves.append(1)
        if len(saves) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_save_journal", interrupted)
    data = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), "byte", data_dir=data, shard_tokens=1000, workers=1)
    work = data / ".corpus-byte.partial"
    assert not (data / "corpus-byte").exists() and not list(work.glob(".*.partial"))
    kept = {f.name: f.stat().st_mtime_ns for f in work.glob("*.bin")}
    assert len(kept) >= 4
    monkeypatch.setattr(prep, "_save_journal", save)
    ds = prepare(str(root), "byte", data_dir=data, shard_tokens=1000, workers=1)
    assert {f.name: f.stat().st_mtime_ns for f in ds.path.glob("*.bin") if f.name in kept} == kept
    assert [f.read_bytes() for f in ds.train_files + ds.val_files] == \
        [f.read_bytes() for f in whole.train_files + whole.val_files]
    assert not work.exists()


def test_a_repeated_prepare_is_a_no_op_and_a_changed_source_is_prepared_again(tmp_path, data_files):
    root, _, records = _corpus(tmp_path, data_files)
    ds = prepare(str(root), "byte", data_dir=tmp_path / "data")
    stamp, before = {f: f.stat().st_mtime_ns for f in ds.path.iterdir()}, len(_split(ds, "train"))
    assert {f: f.stat().st_mtime_ns for f in prepare(str(root), "byte", data_dir=tmp_path / "data").path.iterdir()} \
        == stamp
    _write_jsonl(root / "b.jsonl", records[:3])
    again = prepare(str(root), "byte", data_dir=tmp_path / "data")
    assert len(_split(again, "train")) < before


def test_val_documents_hold_out_the_first_documents(tmp_path, data_files):
    docs = _docs(data_files, 30)
    _write_jsonl(tmp_path / "c.jsonl", docs)
    ds = prepare(str(tmp_path / "c.jsonl"), "byte", data_dir=tmp_path / "data", val_documents=4)
    assert bytes(_split(ds, "val")).decode() == "".join(docs[:4])
    assert bytes(_split(ds, "train")).decode() == "".join(docs[4:])
    by_fraction = prepare(str(tmp_path / "c.jsonl"), "byte", data_dir=tmp_path / "f", val_fraction=0.2)
    held = [d for i, d in enumerate(docs) if sources.is_val(i, 0.2, None)]
    assert bytes(_split(by_fraction, "val")).decode() == "".join(held) and 4 <= len(held) <= 8


def test_sentencepiece_trains_on_a_bounded_seeded_sample(tmp_path, data_files):
    lines = [f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000)]
    a = prep.sample_lines(["".join(lines)], 5000, seed=3)
    assert a == prep.sample_lines(["".join(lines[:1000]), "".join(lines[1000:])], 5000, seed=3)
    assert sum(map(len, a)) <= 5000 and len(a) > 50 and set(a) <= set(lines)
    assert a != prep.sample_lines(["".join(lines)], 5000, seed=4)
    text = (data_files / "tinyshakespeare.txt").read_text()[:200_000]
    (tmp_path / "play.txt").write_text(text)
    ds = prepare(str(tmp_path / "play.txt"), "sp:400", data_dir=tmp_path / "data", sp_sample_bytes=60_000)
    assert ds.tokenizer.decode(_split(ds, "val")) == text[sources.val_cut(tmp_path / "play.txt", 0.1):]


def test_parts_prepare_disjoint_slices_that_together_are_the_whole(tmp_path, data_files):
    root = tmp_path / "books"
    root.mkdir()
    text = (data_files / "tinyshakespeare.txt").read_text()
    for i in range(5):
        (root / f"{i}.txt").write_text(text[i * 9000:(i + 1) * 9000 - i * 700])
    whole = prepare(str(root), "byte", data_dir=tmp_path / "data", shard_tokens=4000)
    parts = [prepare(str(root), "byte", data_dir=tmp_path / "data", shard_tokens=4000, part=(i, 3))
             for i in (1, 2, 3)]
    assert [p.path.name for p in parts] == [f"books-byte-p00{i}of003" for i in (1, 2, 3)]
    assert sum((_split(p, "train") for p in parts), []) == _split(whole, "train")
    merged = tmp_path / "merged"  # by hand: one part's folder, the others' shards
    shutil.copytree(parts[0].path, merged)
    for p in parts[1:]:
        for f in p.train_files + p.val_files:
            shutil.copy(f, merged)
    assert [f.name for f in load_dataset(merged).train_files] == \
        [f.name for f in prep.merge_parts(tmp_path / "m2", [p.path for p in parts[::-1]]).train_files]
    with pytest.raises(UserError, match="part 2/3 is missing"):
        prep.merge_parts(tmp_path / "m3", [parts[0].path, parts[2].path])
    with pytest.raises(UserError, match="is not a part"):
        prep.merge_parts(tmp_path / "m3", [whole.path])
    ds = load_dataset(tmp_path / "m2")
    assert json.loads((ds.path / "meta.json").read_text())["documents"] == 5
    names = [f.name for f in ds.train_files]
    assert len(set(names)) == len(names) == sum(len(p.train_files) for p in parts)
    assert names[0] == "books_train_p001of003_000001.bin" and _split(ds, "train") == _split(whole, "train")
    BatchSampler(ds.train_files, 2, 16, seed=0).next()
    SequentialSampler(ds.train_files, 2, 16).next()
    with pytest.raises(UserError, match="part 3/9 of .* holds no files"):
        prepare(str(root), "byte", data_dir=tmp_path / "data", part=(3, 9))
    with pytest.raises(UserError, match="--part needs one tokenizer"):
        prepare(str(root), "sp:300", data_dir=tmp_path / "data", part=(1, 2))


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        run_cli(prep.main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _no_shard_to_read(data):
    """Nothing under data that a reader globbing shards would take for a whole one."""
    for dirpath, dirnames, filenames in os.walk(data):
        visible = not any(part.startswith(".") for part in os.path.relpath(dirpath, data).split(os.sep) if part != ".")
        assert not (visible and any(SHARD.match(f) for f in filenames)), (dirpath, filenames)
        assert not any(f.endswith(".partial") for f in filenames), filenames


@pytest.mark.parametrize("name,damage,expect", [
    ("x.jsonl.gz", lambda p: p.write_bytes(p.read_bytes()[:-30]), "truncated or not gzip"),
    ("x.jsonl.zst", lambda p: p.write_bytes(p.read_bytes()[:-9]), "truncated"),
    ("x.parquet", lambda p: p.write_bytes(p.read_bytes()[:200] + b"\0" * 50 + p.read_bytes()[250:]), "Parquet"),
    ("x.arrow", lambda p: p.write_bytes(p.read_bytes()[:-3000]), "cannot read Arrow"),
    ("x.jsonl", lambda p: p.write_bytes(p.read_bytes() + b'{"text": "unclosed\n'), "x.jsonl:61: not JSON"),
    ("x.jsonl", lambda p: p.write_bytes(p.read_bytes() + b'{"body": "x"}\n'), "x.jsonl:61: no 'text' field"),
    ("x.jsonl", lambda p: p.write_bytes(p.read_bytes() + b'{"text": 3}\n'), "x.jsonl:61: a non-string 'text'"),
    ("x.jsonl", lambda p: p.write_bytes(p.read_bytes() + b'{"text": "\xff"}\n'), "x.jsonl:61: not UTF-8"),
    ("x.jsonl", lambda p: p.write_bytes(p.read_bytes() + b'{"text": "a \\ud800"}\n'), "x.jsonl:61: the 'text' field is not"),
    ("x.txt", lambda p: p.write_bytes(b"fine\n" * 3000 + b"bad \xc3\x28\n"), "x.txt:3001: not UTF-8"),
])
def test_bad_input_is_one_error_line_and_no_shard(tmp_path, data_files, capsys, name, damage, expect):
    path = tmp_path / name
    docs = _docs(data_files, 60) * 3
    if name.endswith(".parquet"):
        _write_parquet(path, docs)
    elif name.endswith(".arrow"):  # as Hugging Face datasets' save_to_disk writes them: an Arrow stream
        import pyarrow as pa

        table = pa.table({"text": docs})
        with pa.ipc.new_stream(str(path), table.schema) as w:
            for batch in table.to_batches(max_chunksize=10):
                w.write_batch(batch)
    elif name.endswith(".txt"):
        path.write_text("")
    else:
        _write_jsonl(path, docs[:60])
    damage(path)
    line = _cli(capsys, str(path), "--data-dir", str(tmp_path / "data"), "--shard-tokens", "500", "--workers", "1")
    assert expect in line and name in line
    _no_shard_to_read(tmp_path / "data")


def test_bad_settings_and_missing_text(tmp_path, data_files, capsys):
    _write_jsonl(tmp_path / "c.jsonl", _docs(data_files, 5), field="body")
    assert "--text-field" in _cli(capsys, str(tmp_path / "c.jsonl"), "--data-dir", str(tmp_path / "d"))
    ds = prepare(str(tmp_path / "c.jsonl"), "byte", data_dir=tmp_path / "d", text_field="body", val_documents=1)
    assert bytes(_split(ds, "val")).decode() == _docs(data_files, 1)[0]
    assert "--shard-tokens" in _cli(capsys, str(tmp_path / "c.jsonl"), "--shard-tokens", "0")
    assert "no val text" not in _cli(capsys, str(tmp_path / "nowhere.jsonl"))


def test_a_worker_that_dies_is_reported(tmp_path):
    from mlx_gpt.tokenizer import ByteTokenizer
    from mlx_gpt.workers import encoded

    ByteTokenizer().save(tmp_path)

    def tasks():
        for i in range(400):
            if i == 20:
                import multiprocessing

                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
            yield [("some text " * 100, False, True)]

    with pytest.raises(UserError, match="worker process died"):
        for _ in encoded(tasks(), str(tmp_path), np.dtype("<u2"), workers=2):
            pass


def test_a_jsonl_line_without_end_is_refused_before_it_fills_memory(tmp_path, data_files, capsys, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 5000)
    path = tmp_path / "x.jsonl"
    _write_jsonl(path, _docs(data_files, 3))
    with open(path, "ab") as f:  # a hole of zeros, as a file written by two processes at once holds
        f.write(bytes(20000))
    line = _cli(capsys, str(path), "--data-dir", str(tmp_path / "data"), "--workers", "1")
    assert "x.jsonl:4: a line longer than" in line


@pytest.mark.skipif(sys.platform != "linux", reason="the workers end with their parent on Linux")
def test_workers_end_when_the_prepare_is_killed(tmp_path):
    """SIGKILL leaves a prepare no chance to shut its pool down: its workers must not wait for ever."""
    from mlx_gpt.tokenizer import ByteTokenizer

    ByteTokenizer().save(tmp_path)
    script = ("import multiprocessing, sys, time\n"
              "import numpy as np\n"
              "from mlx_gpt.workers import encoded\n"
              "def tasks():\n"
              "    while True:\n"
              "        yield [('some text', False, True)]\n"
              "        time.sleep(0.05)\n"
              "for i, _ in enumerate(encoded(tasks(), sys.argv[1], np.dtype('<u2'), workers=2)):\n"
              "    if i == 3:\n"
              "        print(*[c.pid for c in multiprocessing.active_children()], flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's reaping is left


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_training_on_shards_resumes_exactly(tmp_path, data_files, sampler):
    """A run over a folder of small shards, stopped and resumed, logs the uninterrupted run's losses
    (the sampler's shard and position travel with the checkpoint)."""
    from test_train import losses_of, small_cfg

    from mlx_gpt.checkpoint import load_state
    from mlx_gpt.train import train

    text = (data_files / "tinyshakespeare.txt").read_text()[:60_000]
    _write_jsonl(tmp_path / "c.jsonl.gz", [text[i:i + 3000] for i in range(0, len(text), 3000)])
    ds = prepare(str(tmp_path / "c.jsonl.gz"), "byte", data_dir=tmp_path / "data", shard_tokens=600)
    assert len(ds.train_files) >= 8
    common = dict(max_iters=10, lr_decay_iters=10, warmup_iters=2, eval_interval=5, checkpoint_interval=100,
                  sample_interval=100, sampler=sampler, batch_size=4)
    train(small_cfg(tmp_path, ds.path, **common, out=str(tmp_path / "whole")), progress=False)
    first = small_cfg(tmp_path, ds.path, **{**common, "max_iters": 6}, out=str(tmp_path / "split"))
    train(first, progress=False)
    if sampler == "sequential":
        assert load_state(tmp_path / "split")["sampler"]["shard"] > 0  # 4 windows a shard: past one's end
    train(first.replace(max_iters=10, resume=True), progress=False)
    assert losses_of(tmp_path / "whole") == losses_of(tmp_path / "split")


def test_train_prepares_a_folder_of_records_through_the_stream(tmp_path, data_files):
    from test_train import small_cfg

    from mlx_gpt.train import train

    (tmp_path / "dump").mkdir()
    text = (data_files / "the-verdict.txt").read_text()
    _write_jsonl(tmp_path / "dump" / "a.jsonl.zst", [text[i:i + 900] for i in range(0, len(text), 900)], field="body")
    run = train(small_cfg(tmp_path, tmp_path / "dump", text_field="body", max_iters=2, eval_interval=2,
                          sample_interval=100), progress=False)
    assert [f.name for f in run.dataset.train_files] == ["dump_train_000001.bin"]
    held = [d for i, d in enumerate(text[i:i + 900] for i in range(0, len(text), 900)) if sources.is_val(i, 0.1, None)]
    assert bytes(_split(run.dataset, "val")).decode() == "".join(held)


def test_a_prepared_folder_missing_its_last_shard_is_refused(tmp_path, data_files):
    _write_jsonl(tmp_path / "c.jsonl", _docs(data_files, 40))
    ds = prepare(str(tmp_path / "c.jsonl"), "byte", data_dir=tmp_path / "data", shard_tokens=500)
    ds.train_files[-1].unlink()
    with pytest.raises(UserError, match=f"shard .*{ds.train_files[-1].name} is missing"):
        load_dataset(ds.path)


def test_a_saved_hugging_face_dataset_is_a_corpus(tmp_path, data_files):
    datasets = pytest.importorskip("datasets")
    docs = _docs(data_files, 25)
    datasets.Dataset.from_dict({"content": docs, "n": list(range(25))}).save_to_disk(str(tmp_path / "saved"))
    ds = prepare(str(tmp_path / "saved"), "byte", data_dir=tmp_path / "data", text_field="content", val_documents=5)
    assert bytes(_split(ds, "val")).decode() == "".join(docs[:5])
    assert bytes(_split(ds, "train")).decode() == "".join(docs[5:])


def test_progress_lines_where_there_is_no_terminal(tmp_path, data_files, monkeypatch, capsys):
    monkeypatch.setattr(prep, "REPORT_EVERY", 0.0)
    monkeypatch.setattr(prep, "TASK_CHARS", 2000)
    (tmp_path / "a.txt").write_text((data_files / "the-verdict.txt").read_text())
    prepare(str(tmp_path / "a.txt"), "byte", data_dir=tmp_path / "data")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 3 and all(line.startswith("prepare: 1 documents, ") or line.startswith("prepare: 0 documents")
                                  for line in lines), lines
    assert "tokens/s" in lines[-1] and "% of the source, ETA" in lines[-1]
