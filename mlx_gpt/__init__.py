"""mlx_gpt: train, fine-tune and run GPT models with MLX.

OpenBLAS is loaded before anything imports ``mlx.core`` (see ``blas.py``), so every entry
point and a plain ``import mlx_gpt`` get fast CPU matmuls on Linux.
"""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum, frame):  # pragma: no cover (a Ctrl-C in the first second)
    _sys.stderr.write("interrupted\n")
    _os._exit(130)


# Under ``python -m mlx_gpt.X`` (or ``mlx-gpt``), a Ctrl-C while the modules load exits as one later
# on does (run_cli then installs the ordinary handler), not with a traceback of an import. First
# thing, so that no import comes before it.
if (_sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "") == "mlx-gpt") and \
        _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from .cpu.blas import load_optimized_blas  # noqa: E402

load_optimized_blas()

try:
    import mlx.core  # noqa: E402,F401
except ImportError as e:  # on Linux the mlx package alone has no backend
    raise ImportError(f"MLX cannot load its backend ({e}); on Linux install one with mlx_gpt: "
                      "pip install -e '.[cpu]' (or '.[cuda12]', '.[cuda13]')") from e

from . import backend as _backend  # noqa: E402
from . import lora as _lora  # noqa: E402,F401  (LoRA checkpoints: how they load)
from . import quantize as _quantize  # noqa: E402,F401  (quantized checkpoints: how they load)
from .checkpoint import load  # noqa: E402  (``model, tokenizer = mlx_gpt.load("checkpoints/run")``)
from .errors import UserError  # noqa: E402,F811

_backend.install()  # the loss's and optimizer's operations: the CPU wing's where MLX runs on the CPU
from .models.gpt import GPT, GPTConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "UserError", "load", "__version__"]
