"""Fold a LoRA run's adapters into its base: ``python -m mlx_gpt.fuse --adapter RUN --out DIR``.

The result is an ordinary checkpoint (every weight ``W + (alpha / r) B A``, the run's tokenizer),
which generate, eval, convert and ``train --init`` read without the base, and which can be moved
or shared on its own. ``--out`` is checked as train checks it: a folder holding anything but a
checkpoint is refused, an existing checkpoint is replaced only with ``--overwrite`` (and whole,
atomically), and the adapters' own run and their base can never be the target.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from . import checkpoint, rundir
from .errors import UserError, run_cli


def fuse(adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the fused checkpoint of the LoRA run in ``adapter`` to ``out``; returns ``out``."""
    out = Path(out)
    config = checkpoint.read_config(adapter)
    if "lora" not in config:
        raise UserError(f"{adapter} holds no LoRA adapters: it is an ordinary checkpoint already")
    base = config["lora"].get("base", {}).get("path") if isinstance(config["lora"], dict) else None
    lock = rundir.claim_out(out, overwrite=overwrite, inputs={"the adapters' own run": checkpoint.resolve(adapter),
                                                            "their base": base})
    # no trainer may write into out, nor change the adapters or their base while they are read
    pins = [rundir.RunLock(Path(p), shared=True) for p in (checkpoint.resolve(adapter), base)
            if p is not None and checkpoint.exists(p)]
    try:
        for pin in pins:
            pin.acquire()
        model, tokenizer = checkpoint.load(adapter)
        return checkpoint.save(out, model, tokenizer, train_config=config.get("train"))
    finally:
        for pin in pins:
            pin.release()
        lock.release()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.fuse",
                                description="Fold a LoRA run's adapters into its base, as an ordinary checkpoint.")
    p.add_argument("--adapter", required=True, help="the LoRA run's directory (train --lora-rank's --out)")
    p.add_argument("--out", required=True, help="the fused checkpoint's directory")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = fuse(args.adapter, args.out, overwrite=args.overwrite)
    print(f"fused {args.adapter} into {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
