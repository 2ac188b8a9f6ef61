"""What each model carries from one call to the next while decoding: every cache, in one place.

Attention layers keep keys and values (``KVCache``, or ``FixedKVCache`` for a compiled step),
recurrent layers their state (``RecurrentState``), and fixed-window models the last tokens
(``HistoryCache``).

A cache sits inside each attention layer: ``update_and_fetch`` appends the new keys and values
and returns every key and value the new queries may look at, ``attention_mask`` says which of
them each new query sees, and ``offset`` is how many positions were written before the call
(the model places its position embeddings after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


class KVCache:
    """Keys and values of the tokens seen so far, grown in blocks of ``step`` positions.

    Growing in blocks (rather than concatenating every token) keeps the per-token step from
    copying the whole cache; ``offset`` is the number of valid positions, a Python int.
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
            self.keys, self.values = self._grown(self.keys, k), self._grown(self.values, v)
        self.offset += T
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grown(self, buffer: mx.array | None, new: mx.array) -> mx.array:
        """buffer's valid positions followed by room for new (B, nh, T, hs), in whole steps."""
        B, nh, T, hs = new.shape
        room = mx.zeros((B, nh, -(-T // self.step) * self.step, hs), new.dtype)
        return room if buffer is None else mx.concatenate([buffer[..., : self.offset, :], room], axis=2)

    def attention_mask(self, T: int) -> str | None:
        """The mask for the T queries just added: only valid keys are returned, so causal suffices.

        MLX's "causal" aligns the mask to the last query, which is what a cached prefill needs.
        """
        return "causal" if T > 1 else None

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class FixedKVCache:
    """Keys and values in buffers of a fixed ``capacity``, with ``offset`` an array.

    Every decode step then sees arrays of the same shapes and no Python number that changes,
    so one compiled step serves every position: the new keys are written in place at
    ``offset`` and a mask (``PrefixMask``) hides the positions not written yet. MLX's attention
    reads the whole capacity through it, so choose the capacity near the length the generation
    needs; the CPU kernel reads only the written positions.
    """

    def __init__(self, capacity: int, keys: mx.array | None = None, values: mx.array | None = None,
                 offset: mx.array | None = None) -> None:
        self.capacity = capacity
        self.keys = keys
        self.values = values
        self.offset = mx.array(0, mx.int32) if offset is None else offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v of shape (B, nh, T, hs) at offset; return the full (B, nh, capacity, hs) buffers."""
        if self.keys is None:
            self.keys, self.values = (mx.zeros((*a.shape[:2], self.capacity, a.shape[3]), a.dtype) for a in (k, v))
        # slice_update on a buffer nothing else holds runs in place
        self.keys = mx.slice_update(self.keys, k, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset, axes=(2,))
        self.offset = self.offset + k.shape[2]
        return self.keys, self.values

    def attention_mask(self, T: int) -> PrefixMask:
        """What the T queries just added see: each, the positions up to its own."""
        return PrefixMask(self.offset, T, self.capacity)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values, self.offset) if a is not None]


@dataclass(frozen=True)
class PrefixMask:
    """The mask of a fixed-capacity cache: of its ``capacity`` positions the first ``length`` (an
    array, known when the step runs: one for the batch, or one a row) are written, and the
    ``queries`` new ones are the last of those, each seeing the positions up to its own. A kernel
    that takes the lengths reads only the written keys; any other attention takes ``as_array()``.
    """

    length: mx.array
    queries: int
    capacity: int

    def as_array(self) -> mx.array:
        """Whether each query sees each position: (queries, capacity), or (rows, 1, queries,
        capacity) for a length a row."""
        query_pos = self.length[..., None] - self.queries + mx.arange(self.queries)
        seen = mx.arange(self.capacity) <= query_pos[..., None]
        return seen[:, None] if self.length.ndim == 1 else seen


class HistoryCache:
    """The last `keep` tokens of each sequence: all the history a fixed-window model needs."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.tokens: mx.array | None = None  # (B, <= keep)
        self.offset = 0

    def update_and_fetch(self, idx: mx.array) -> mx.array:
        """Prepend the kept history to idx (B, T); remember the new tail."""
        seq = idx if self.tokens is None else mx.concatenate([self.tokens, idx], axis=1)
        self.offset += idx.shape[1]
        self.tokens = seq[:, seq.shape[1] - min(self.keep, seq.shape[1]):]
        return seq

    @property
    def state(self) -> list[mx.array]:
        return [] if self.tokens is None else [self.tokens]


class RecurrentState:
    """One layer's state after the tokens seen so far (the LSTM also keeps its cell)."""

    def __init__(self) -> None:
        self.hidden: mx.array | None = None  # (B, n_embd)
        self.cell: mx.array | None = None
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.hidden, self.cell) if a is not None]


class SlotKVCache:
    """Keys and values of several unrelated sequences decoded as one batch: one slot (row) each.

    Every slot has its own length (``lengths``, an int32 array of shape (S,)), so sequences that
    started at different times share a step: the new keys of each row are written at that row's
    length, its queries see only its own written positions (``attention_mask``), and ``offset``
    is (S, 1), which places each row's position embedding after its own tokens. The buffers have
    a fixed capacity, so a step compiled once serves every position. A serving loop keeps these
    arrays between steps and copies a prefilled sequence into a free row (see ``mlx_gpt.serve``).
    """

    def __init__(self, keys: mx.array, values: mx.array, lengths: mx.array) -> None:
        self.keys = keys  # (S, nh, capacity, hs)
        self.values = values
        self.lengths = lengths  # (S,) int32
        self.offset = lengths[:, None]

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v of shape (S, nh, T, hs) at each row's length; return the whole buffers."""
        S, nh, T, hs = k.shape
        where = (self.lengths[:, None] + mx.arange(T)[None, :])[:, None, :, None]  # (S, 1, T, 1)
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(where, k.shape), k, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(where, v.shape), v, axis=2)
        return self.keys, self.values

    def attention_mask(self, T: int) -> PrefixMask:
        """Each row's new queries see that row's positions up to their own."""
        return PrefixMask(self.lengths + T, T, self.keys.shape[2])

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]
