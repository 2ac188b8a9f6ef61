"""``python -m mlx_gpt.serve``: see ``mlx_gpt.serve``."""

from ..errors import run_cli
from . import main

if __name__ == "__main__":
    run_cli(main)
