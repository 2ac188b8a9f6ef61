"""``mlx-gpt COMMAND ...`` (or ``python -m mlx_gpt COMMAND ...``): every entry point under one name.

Each command is also ``python -m mlx_gpt.COMMAND``; the arguments are the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Sequence

from .errors import run_cli

COMMANDS = {
    "train": "train or fine-tune a model",
    "generate": "sample from a checkpoint",
    "prepare": "tokenize a corpus into data/",
    "eval": "loss, perplexity, bits per byte and multiple-choice accuracy of a checkpoint",
    "ladder": "train and compare the language-model ladder",
    "plot": "draw runs' loss curves",
    "convert": "import/export GPT-2 checkpoints (Hugging Face, llm.c, mlx-lm)",
    "fuse": "fold a LoRA run's adapters into its base, as an ordinary checkpoint",
    "serve": "serve a checkpoint over HTTP: OpenAI's API and a page to try it",
    "info": "MLX version, device, BLAS and measured GFLOP/s",
}


def available() -> dict[str, str]:
    return {name: text for name, text in COMMANDS.items() if importlib.util.find_spec(f"mlx_gpt.{name}")}


def usage() -> str:
    lines = ["usage: mlx-gpt COMMAND [ARGS ...]   (COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in available().items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in available():
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"mlx_gpt.{name}")
    sys.argv[0] = f"mlx-gpt {name}"
    run_cli(module.main, rest)


if __name__ == "__main__":
    main()
