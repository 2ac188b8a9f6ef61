"""mlx_gpt: train, fine-tune and run GPT models with MLX.

OpenBLAS is loaded before anything imports ``mlx.core`` (see ``blas.py``), so every entry
point and a plain ``import mlx_gpt`` get fast CPU matmuls on Linux.
"""

from .cpu.blas import load_optimized_blas

load_optimized_blas()

try:
    import mlx.core  # noqa: E402,F401
except ImportError as e:  # on Linux the mlx package alone has no backend
    raise ImportError(f"MLX cannot load its backend ({e}); on Linux install one with mlx_gpt: "
                      "pip install -e '.[cpu]' (or '.[cuda12]', '.[cuda13]')") from e

from .errors import UserError  # noqa: E402
from .models.gpt import GPT, GPTConfig  # noqa: E402

__version__ = "0.1.0"


def load(path: str):
    """Load a checkpoint directory: ``model, tokenizer = load("checkpoints/run")``."""
    from .checkpoint import load as _load

    return _load(path)


__all__ = ["GPT", "GPTConfig", "UserError", "load", "__version__"]
