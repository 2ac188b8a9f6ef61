"""--report-to: what metrics.jsonl holds, read back from each tracker's own files with its own reader."""

import glob
import importlib.util
import json
import struct

import pytest

from mlx_gpt import tracking
from mlx_gpt.errors import UserError
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4, eval_iters=1, sample_tokens=0, max_iters=6,
            eval_interval=3, log_interval=2)
# trackio is not a test dependency (it brings a web stack): its check runs where it is installed
TRACKERS = ["tensorboard", "wandb"] + (["trackio"] if importlib.util.find_spec("trackio") else [])


def test_parse_and_metrics():
    assert tracking.parse("") == () and tracking.parse("none") == ()
    assert tracking.parse("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    with pytest.raises(UserError, match="'mlflow' is not a tracker"):
        tracking.parse("tensorboard,mlflow")
    with pytest.raises(UserError, match="not a tracker"):
        TrainConfig.of(report_to="tb")
    record = {"step": 3, "loss": 2.5, "norm": None, "lr": 1e-3, "flag": True}
    assert tracking.metrics(record) == {"loss": 2.5, "lr": 1e-3}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, shakespeare):
    d = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("TRACKIO_DIR", str(d / "trackio"))
    mp.chdir(d)
    try:
        train(TrainConfig.of(data=str(shakespeare), data_dir=str(d / "data"), out=str(d / "run"),
                             report_to=",".join(TRACKERS), report_dir=str(d / "runs"), **TINY), progress=False)
    finally:
        mp.undo()
    records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return d, records


def expected(records, name):
    return [(r["step"], r[name]) for r in records if r.get(name) is not None]


@pytest.mark.parametrize("name", ["loss", "lr", "val_loss", "train_loss", "tok_s"])
def test_tensorboard_event_files_hold_the_metrics(tracked_run, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, records = tracked_run
    events = EventAccumulator(str(d / "runs" / "run"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    got = [(e.step, e.value) for e in events.Scalars(name)]
    want = expected(records, name)
    assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    config = json.loads(events.Tensors("config")[0].tensor_proto.string_val[0])
    assert config["max_iters"] == 6 and config["report_to"] == ",".join(TRACKERS)


def wandb_records(path) -> list[bytes]:
    """The records of a .wandb file: after a 7-byte header (":W&B", magic, version), LevelDB's log
    layout, 32 KiB blocks of chunks each with a 7-byte header (CRC, length, kind: full, first,
    middle, last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if left < 7 or kind == 0:  # a block's padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics_and_config(tracked_run):
    from wandb.proto import wandb_internal_pb2

    d, records = tracked_run
    [path] = glob.glob(str(d / "runs" / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for data in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.HasField("history"):
            history.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        if rec.HasField("run"):
            config.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in rec.run.config.update})
    for name in ("loss", "val_loss", "lr"):
        got = [(h["_step"], h[name]) for h in history if name in h]
        assert got == [(s, pytest.approx(v, rel=1e-12)) for s, v in expected(records, name)]
    assert config["max_iters"] == 6 and config["report_to"] == ",".join(TRACKERS)


@pytest.mark.skipif("trackio" not in TRACKERS, reason="trackio is not installed (the track extra)")
def test_trackio_store_holds_the_metrics(tracked_run, monkeypatch):
    d, records = tracked_run
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(tracking.PROJECT, "run")
    got = [(row["step"], row["val_loss"]) for row in logs if row.get("val_loss") is not None]
    assert got == [(s, pytest.approx(v)) for s, v in expected(records, "val_loss")]


def test_a_missing_tracker_is_one_error(tmp_path, shakespeare, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r'--report-to wandb needs the wandb package: pip install "mlx_gpt\[track\]"'):
        train(TrainConfig.of(data=str(shakespeare), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                             report_to="wandb", **TINY), progress=False)


def test_a_tracker_that_refuses_to_start_is_one_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login()")

    monkeypatch.setattr(tracking.Wandb, "__init__", refuse)
    with pytest.raises(UserError, match=r"--report-to wandb could not start: api_key not configured \(no-tty\) call"):
        tracking.start("tensorboard,wandb", tmp_path, "run", {})
