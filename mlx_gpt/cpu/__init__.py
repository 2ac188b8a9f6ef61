"""The CPU wing: what makes MLX's CPU backend fast, kept out of the models' sight.

- ``blas``: loads OpenBLAS before ``mlx.core`` (the Linux wheel links the reference BLAS).
- ``matvec``: sends one-row products to BLAS gemv (decoding).
- ``ops``: GELU, softmax, layer norm, cross-entropy, linear layers and AdamW built for the CPU;
  ``attention``: attention on top of them.
- ``extension``: builds and loads ``ext/``, those ops' C++ kernels as MLX primitives, which
  ``ops`` uses where they load (MLX's own operations are the fallback).
- ``layers``: ``accelerate(model)`` swaps a model's plain MLX layers for ones computed by ``ops``.
- ``parallel``: the train step's gradients, and evaluations, split over one MLX stream per core.

The core reaches this package only through ``mlx_gpt.backend``.

This package's ``__init__`` imports nothing: ``blas`` must run before anything loads ``mlx.core``.
"""


def accelerate(model):
    """Give ``model`` the CPU's layers when MLX runs on the CPU (no-op elsewhere); returns it."""
    from .layers import accelerate as _accelerate

    return _accelerate(model)
