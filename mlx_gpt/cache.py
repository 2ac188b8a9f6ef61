"""Per-layer key/value cache for incremental decoding."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of the tokens seen so far, grown in blocks of ``step`` positions.

    Growing in blocks (rather than concatenating every token) keeps the per-token step from
    copying the whole cache; ``offset`` is the number of valid positions.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v of shape (B, nh, T, hs); return all valid keys and values."""
        prev = self.offset
        T = k.shape[2]
        if self.keys is None or prev + T > self.keys.shape[2]:
            B, nh, _, hs = k.shape
            n_new = ((T + self.step - 1) // self.step) * self.step
            grow_k = mx.zeros((B, nh, n_new, hs), k.dtype)
            grow_v = mx.zeros((B, nh, n_new, v.shape[3]), v.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], grow_v], axis=2)
        self.offset += T
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]
