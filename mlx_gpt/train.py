"""Train a GPT: ``python -m mlx_gpt.train`` (see ``--help``), or ``train(TrainConfig.of(...))``.

The pieces, in the order a run goes, are in ``training/``: the config, the compiled step, the
run's setup (and resume) and the loop. This module is their command line.
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import flags
from .errors import run_cli
from .training.config import FINETUNE_DEFAULTS, LORA_DEFAULTS, TrainConfig, resolve
from .training.loop import train_run
from .training.run import Run, release, setup


def train(cfg: TrainConfig, *, progress: bool | None = None,
          on_step: Callable[[int, float], None] | None = None) -> Run:
    """Run (or resume) training; returns the finished run. ``on_step(step, loss)`` sees every loss.

    ``cfg`` is taken as it is, its unset fields given the run's defaults (``TrainConfig.of``
    resolves settings as the command line does, a resumed run's included)."""
    run = setup(cfg)
    try:
        return train_run(run, progress=progress, on_step=on_step)
    finally:
        release(run.locks)


def _defaults(d: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())


def build_parser():
    return flags.build(TrainConfig, prog="python -m mlx_gpt.train",
                       description="Train a GPT (or any rung of the ladder) on your text with MLX.",
                       epilog=f"With --init, unset settings take fine-tuning defaults: {_defaults(FINETUNE_DEFAULTS)}; "
                              f"with --lora-rank too: {_defaults(LORA_DEFAULTS)}.")


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The run's config from the command line (and its --config file)."""
    return resolve(flags.parse(build_parser(), TrainConfig, argv))


def main(argv: Sequence[str] | None = None) -> Run:
    return train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
