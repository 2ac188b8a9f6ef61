"""The CPU wing: what makes MLX's CPU backend fast, kept out of the models' sight.

- ``blas``: loads OpenBLAS before ``mlx.core`` (the Linux wheel links the reference BLAS).
- ``matvec``: sends one-row products to BLAS gemv (decoding).
- ``ops``: GELU, softmax, attention, layer norm, cross-entropy and linear layers built for the CPU.
- ``extension``: builds and loads ``ext/``, those ops' C++ kernels as MLX primitives, which
  ``ops`` uses where they load (its pure-MLX formulations are the fallback).
- ``layers``: ``accelerate(model)`` swaps a model's plain MLX layers for ones computed by ``ops``.
- ``parallel``: a train step split over one MLX stream per core.

This package's ``__init__`` imports nothing: ``blas`` must run before anything loads ``mlx.core``.
"""


def accelerate(model):
    """Give ``model`` the CPU's layers when MLX runs on the CPU (no-op elsewhere); returns it."""
    from .layers import accelerate as _accelerate

    return _accelerate(model)
