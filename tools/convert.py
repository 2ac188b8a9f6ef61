"""Import GPT-2 checkpoints (Hugging Face, llm.c) into mlx_gpt and export them: see mlx_gpt/convert.py.

  python tools/convert.py path/to/hf-gpt2 --out checkpoints/gpt2
  python tools/convert.py gpt2_124M.bin --out checkpoints/gpt2        (gpt2_tokenizer.bin beside it)
  python tools/convert.py checkpoints/run --to hf --out exports/run-hf
"""

import sys
from pathlib import Path

# a checkout works without installing: its package comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_gpt  # noqa: E402,F401  (loads the fast BLAS before MLX)
from mlx_gpt.convert import main  # noqa: E402
from mlx_gpt.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
