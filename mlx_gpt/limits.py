"""Refuse values no machine or library here can take, before anything is allocated or trained:
sizes beyond the memory, seeds beyond 64 bits, text that is not UTF-8.

A config read from a file or a flag can ask for anything (``n_layer`` 10**7, a block of 10**8
positions, three million samples at once); building it would abort, segfault or swap the
machine for minutes before failing. This is a coarse guard, not a memory plan: it counts only
what is certain to be allocated (the weights in float32, or a buffer's bytes) against the
memory MLX may use here.
"""

from __future__ import annotations

import os
from typing import Mapping

from .errors import UserError


MAX_SEED = 2**63  # MLX takes unsigned 64-bit seeds; the CLIs add offsets (per step, per prompt)


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed < MAX_SEED:
        raise UserError(f"{flag} must be in 0 .. 2**63-1, got {seed}")


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: bytes that are not UTF-8 (in argv, or stdin read with
    surrogateescape) arrive as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 text (at character {e.start})") from None


def machine_bytes() -> int:
    """The memory this process can use: MLX's limit, else the physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import mlx.core as mx

        return min(int(mx.get_memory_limit()), physical) or physical
    except (ImportError, AttributeError, RuntimeError):
        return physical


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GB"


def check_bytes(nbytes: float, what: str) -> None:
    """Refuse ``what`` if it needs more than the machine's memory."""
    have = machine_bytes()
    if nbytes > have:
        raise UserError(f"{what} needs at least {_gb(nbytes)} of memory, more than this machine's {_gb(have)}")


def model_params(config: Mapping) -> int:
    """A lower bound on a model's parameter count from the fields its config shares with the
    ladder's models: embeddings, positions, and 12 C^2 a transformer (or recurrent) layer."""
    def get(name: str, default: int = 0) -> int:
        v = config.get(name, default)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

    V, T, C, L = get("vocab_size"), get("block_size"), get("n_embd"), get("n_layer")
    return V * C + T * C + L * 12 * C * C if C else V


def check_model(config: Mapping, what: str) -> None:
    """Refuse a model whose weights alone (float32) exceed the machine's memory."""
    check_bytes(4 * model_params(config), what)
