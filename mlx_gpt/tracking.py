"""Experiment tracking: ``--report-to tensorboard,wandb,trackio`` sends what metrics.jsonl holds, and
the run's settings, to the trackers their users already watch.

Each tracker is an optional extra (``pip install "mlx_gpt[track]"``), imported only when named.
metrics.jsonl stays the record: a tracker gets each of its lines as it is written (the step's
loss, norm, learning rate and speed; the evaluations' train and val loss), under the same names,
at the same step. TensorBoard's event files go to ``--report-dir``/<run>/ (``tensorboard
--logdir runs``); wandb writes there too, online or, with ``WANDB_MODE=offline``, for ``wandb
sync`` later; trackio keeps its own local store (``TRACKIO_DIR``, ``trackio show``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

TRACKERS = ("tensorboard", "wandb", "trackio")
PROJECT = "mlx_gpt"


def parse(spec: str) -> tuple[str, ...]:
    """The trackers a comma-separated ``--report-to`` names ("" or "none": none)."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--report-to {unknown[0]!r} is not a tracker; choose from {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))


def metrics(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers, its step left out (a skipped norm, None, too)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _needs(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {name} package: pip install \"mlx_gpt[track]\"") from None


class TensorBoard:
    """Scalars and the settings (as text) in a TensorBoard event file, written with its own writer."""

    def __init__(self, directory: Path, name: str, config: dict) -> None:
        writer = _needs("tensorboard.summary.writer.event_file_writer", "tensorboard")
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._event, self._summary = Event, Summary
        self.writer = writer.EventFileWriter(str(directory / name))
        self._add(text_pb("config", json.dumps(config, indent=2, default=str)), 0)

    def _add(self, summary, step: int) -> None:
        self.writer.add_event(self._event(summary=summary, step=step, wall_time=time.time()))

    def log(self, values: dict[str, float], step: int) -> None:
        self._add(self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run (offline with WANDB_MODE=offline), the settings as its config."""

    def __init__(self, directory: Path, name: str, config: dict) -> None:
        wandb = _needs("wandb", "wandb")
        (directory / name).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=PROJECT, name=name, dir=str(directory / name), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run in its local store, the settings as its config."""

    def __init__(self, directory: Path, name: str, config: dict) -> None:
        self.trackio = _needs("trackio", "trackio")
        self.run = self.trackio.init(project=PROJECT, name=name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio}


class Trackers:
    """The run's trackers together: each metrics.jsonl record goes to all of them."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: dict) -> None:
        values = metrics(record)
        if values:
            for t in self.trackers:
                t.log(values, int(record["step"]))

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()


def start(spec: str, directory: str | Path, name: str, config: dict[str, Any]) -> Trackers | None:
    """The trackers ``spec`` names, started for run ``name`` with its settings (None: none named)."""
    names = parse(spec)
    if not names:
        return None
    directory, started = Path(directory), []
    for n in names:
        try:
            started.append(KINDS[n](directory, name, config))
        except UserError:
            raise
        except Exception as e:  # the tracker's own refusal (not logged in, no network): the user's to fix
            Trackers(started).close()
            raise UserError(f"--report-to {n} could not start: {' '.join(str(e).split())[:200]} (wandb without an "
                            "account or network: WANDB_MODE=offline)") from None
    return Trackers(started)
