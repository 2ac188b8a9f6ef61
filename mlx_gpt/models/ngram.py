"""Count-based language models: n-grams with add-k smoothing, and interpolated Kneser-Ney.

They are the bottom rungs of the ladder, so they speak the neural models' interface: an
``nn.Module`` whose ``model(idx, cache)`` returns logits (B, T, V) — here the exact log of a
next-token distribution that sums to 1 — saved and loaded like any checkpoint. Fitting is
counting (one ``np.unique`` per order, no gradient descent); querying is MLX ops only, so it
compiles and runs wherever MLX does.

The counts are a trie flattened into arrays. Entry e is a distinct n-gram of order 1..n seen in
the training tokens: entries 0..V-1 are the unigrams (entry id = token id, count possibly 0);
entry V+i is the i-th higher-order n-gram in order of its key, (entry of its first m-1 tokens)
* V + (its last token). Entries of order m-1 all precede those of order m, so sorting by key
also groups by order and by context, which gives the two lookups a query needs:
- the entry of an n-gram (h, w) is one binary search for ``entry(h) * V + w``;
- the continuations of a context h are one run of entries,
  ``child_start[h] : child_start[h] + child_count[h]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from ..errors import UserError
from .base import LanguageModel, ModelConfig
from .cache import HistoryCache

SMOOTHING = ("add-k", "kneser-ney")


@dataclass(frozen=True)
class NGramConfig(ModelConfig):
    """An order-n count model. ``sizes`` and ``fanout`` are set by fitting and fix array shapes.

    sizes[m-1]: distinct m-grams stored (sizes[0] = vocab_size).
    fanout[L]: the most distinct tokens seen after any context of L tokens (fanout[0] = vocab_size).
    block_size: the longest sequence evaluated or prompted at once; the model itself looks
    back only order - 1 tokens.
    """

    vocab_size: int = 256
    order: int = 3
    smoothing: str = "add-k"
    k: float = 0.1
    block_size: int = 128
    sizes: tuple[int, ...] = ()
    fanout: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        object.__setattr__(self, "fanout", tuple(int(f) for f in self.fanout))
        if self.order < 1:
            raise UserError(f"n-gram order n must be at least 1, got {self.order}")
        self.require_positive("vocab_size", "block_size")
        if self.smoothing not in SMOOTHING:
            raise UserError(f"unknown smoothing {self.smoothing!r}; choose from {', '.join(SMOOTHING)}")
        if self.smoothing == "add-k" and not self.k > 0:
            raise UserError(f"add-k smoothing needs k > 0, got {self.k}")
        if self.sizes and (len(self.sizes) != self.order or len(self.fanout) != self.order
                           or self.sizes[0] != self.vocab_size):
            raise UserError("n-gram sizes/fanout do not match its order and vocabulary")

    @property
    def fitted(self) -> bool:
        return bool(self.sizes)


class NGram(LanguageModel):
    """P(w | last n-1 tokens) from counts; the arrays are frozen parameters (see module doc)."""

    def __init__(self, cfg: NGramConfig):
        super().__init__()
        self.config = cfg
        E = sum(cfg.sizes) if cfg.fitted else cfg.vocab_size
        self.key = mx.zeros((E - cfg.vocab_size,), mx.int64)
        self.word = mx.zeros((E,), mx.int32)
        self.count = mx.zeros((E,), mx.int32)
        self.child_start = mx.zeros((E,), mx.int32)
        self.child_count = mx.zeros((E,), mx.int32)
        if cfg.smoothing == "kneser-ney":
            self.continuation = mx.zeros((E,), mx.int32)
            self.discount = mx.zeros((cfg.order,), mx.float32)
        self.freeze()

    def num_params(self) -> int:
        """Stored n-gram types, one count each (the size of the table, not of the arrays)."""
        return sum(self.config.sizes) if self.config.fitted else 0

    def make_cache(self) -> list[HistoryCache]:
        return [HistoryCache(max(self.config.order - 2, 0))]  # the context of position 0 reaches back n-2

    # ------------------------------------------------------------------ queries

    def __call__(self, idx: mx.array, cache: list[HistoryCache] | None = None) -> mx.array:
        """Log-probabilities (B, T, V) of the token after each position of idx (B, T)."""
        cfg = self.config
        if not cfg.fitted:
            raise ValueError("this n-gram model has not been fitted")
        B, T = idx.shape
        seq = cache[0].update_and_fetch(idx) if cache else idx
        contexts = self._context_entries(seq.astype(mx.int64))  # [L] -> (B, S), L = 1..n-1
        P = seq.shape[1] - T  # positions of history before idx
        contexts = [None] + [c[:, P:].reshape(-1) for c in contexts[1:]]
        if cfg.smoothing == "kneser-ney":
            p = self._kneser_ney(contexts, B * T)
        else:
            p = self._add_k(contexts, B * T, T, P)
        return mx.log(p).reshape(B, T, cfg.vocab_size)

    def _context_entries(self, seq: mx.array) -> list[mx.array]:
        """Entry of the L-gram ending at each position, for L = 1..n-1 (-1: unseen or cut off).

        The L-gram ending at t is the (L-1)-gram ending at t-1 extended by seq[t], so each
        length is one vectorised binary search; a -1 parent makes a negative key that matches
        nothing, so "unseen" propagates by itself.
        """
        V = self.config.vocab_size
        out = [seq]  # length 1: the entry of a unigram is its token
        for _ in range(2, self.config.order):
            prev = out[-1]
            found = self._find(prev[:, :-1] * V + seq[:, 1:])
            out.append(mx.concatenate([mx.full((seq.shape[0], 1), -1, mx.int64), found], axis=1))
        return [None] + out  # indexed by context length; length 0, the empty context, has no entry

    def _find(self, query: mx.array) -> mx.array:
        """Entry id of each key in query, or -1: a fixed-length binary search (compiles)."""
        K = self.key.shape[0]
        if K == 0:
            return mx.full(query.shape, -1, mx.int64)
        lo = mx.zeros(query.shape, mx.int32)
        hi = mx.full(query.shape, K, mx.int32)
        for _ in range(math.ceil(math.log2(K + 1))):
            active = lo < hi
            mid = (lo + hi) // 2
            below = self.key[mx.minimum(mid, K - 1)] < query
            lo = mx.where(active & below, mid + 1, lo)
            hi = mx.where(active & ~below, mid, hi)
        hit = (lo < K) & (self.key[mx.minimum(lo, K - 1)] == query)
        return mx.where(hit, lo.astype(mx.int64) + self.config.vocab_size, -1)

    def _continuations(self, ctx: mx.array, fanout: int, source: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Dense counts (N, V) of what followed each context entry, their total and how many
        distinct tokens had a non-zero count. Entries -1 (unseen context) give zeros."""
        N, V = ctx.shape[0], self.config.vocab_size
        seen = ctx >= 0
        c = mx.where(seen, ctx, 0)
        n_children = mx.where(seen, self.child_count[c], 0)
        slot = mx.arange(fanout)
        valid = slot[None, :] < n_children[:, None]  # (N, F)
        child = mx.where(valid, self.child_start[c][:, None] + slot[None, :], 0)
        a = mx.where(valid, source[child], 0).astype(mx.float32)
        dense = mx.zeros((N, V), mx.float32).at[mx.arange(N)[:, None], self.word[child]].add(a)
        return dense, a.sum(axis=-1), (a > 0).sum(axis=-1).astype(mx.float32)

    def _kneser_ney(self, contexts: list, N: int) -> mx.array:
        """Interpolated Kneser-Ney: p_m = (max(a(hw) - D_m, 0) + D_m N1+(h.) p_{m-1}) / a(h.),
        with a = raw counts at the top order and continuation counts N1+(.hw) below it; an
        unseen context backs off to p_{m-1}; order 1 interpolates with the uniform distribution,
        so no token ever gets probability 0."""
        n, V = self.config.order, self.config.vocab_size
        unigram = (self.count if n == 1 else self.continuation)[:V].astype(mx.float32)
        D = self.discount[0]
        p = (mx.maximum(unigram - D, 0) + D * (unigram > 0).sum() / V) / unigram.sum()
        p = mx.broadcast_to(p, (N, V))
        for L in range(1, n):
            source = self.count if L == n - 1 else self.continuation
            dense, total, distinct = self._continuations(contexts[L], self.config.fanout[L], source)
            D = self.discount[L]
            smoothed = (mx.maximum(dense - D, 0) + D * distinct[:, None] * p) / mx.maximum(total, 1)[:, None]
            p = mx.where((total > 0)[:, None], smoothed, p)
        return p

    def _add_k(self, contexts: list, N: int, T: int, P: int) -> mx.array:
        """(c(hw) + k) / (c(h.) + kV) for the last n-1 tokens; an unseen context is uniform.

        Where fewer than n-1 tokens precede a position (the start of a text), the longest
        history there is serves as the context, as an n-gram of that lower order."""
        cfg = self.config
        n, V, k = cfg.order, cfg.vocab_size, cfg.k
        if n == 1:
            counts = self.count[:V].astype(mx.float32)
            return mx.broadcast_to((counts + k) / (counts.sum() + k * V), (N, V))
        # context length at position j of a row: every token so far (P + j + 1), at most n-1
        length = mx.minimum(P + 1 + mx.arange(N) % T, n - 1)
        stacked = mx.stack(contexts[1:], axis=0)  # (n-1, N)
        ctx = mx.take_along_axis(stacked, (length - 1)[None, :], axis=0)[0]
        dense, total, _ = self._continuations(ctx, max(cfg.fanout[1:]), self.count)
        return (dense + k) / (total[:, None] + k * V)


# ---------------------------------------------------------------------- fitting by counting


def fit(tokens: np.ndarray, cfg: NGramConfig) -> NGram:
    """Count every m-gram (m = 1..n) of tokens and return the model: one ``np.unique`` per order.

    ``ends`` holds, for every position, the entry of the (m-1)-gram ending there; the m-gram
    ending at t is that of t-1 extended by tokens[t], and its suffix is the (m-1)-gram ending at
    t, which is what Kneser-Ney's continuation counts N1+(. g) need.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    V, n = cfg.vocab_size, cfg.order
    if len(tokens) < n:
        raise UserError(f"an order-{n} n-gram needs at least {n} tokens of data, got {len(tokens)}")
    if len(tokens) >= 1 << 31:
        raise UserError(f"{len(tokens)} tokens are too many to count in int32")
    if tokens.min() < 0 or tokens.max() >= V:
        raise UserError(f"token ids must lie in [0, {V}), got {tokens.min()}..{tokens.max()}")
    keys, counts, suffixes = [], [np.bincount(tokens, minlength=V)], []
    ends, base = tokens, V
    for m in range(2, n + 1):
        key = ends[:-1] * V + tokens[m - 1:]
        uniq, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        suffixes.append(ends[1:][first])
        keys.append(uniq)
        counts.append(count)
        ends, base = base + inverse.reshape(-1), base + len(uniq)
    sizes = [V] + [len(k) for k in keys]
    E = sum(sizes)
    keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    counts = np.concatenate(counts)
    word = np.concatenate([np.arange(V), keys % V])
    child_count = np.bincount(keys // V, minlength=E)
    child_start = V + np.searchsorted(keys, np.arange(E, dtype=np.int64) * V)
    starts = np.cumsum([0] + sizes)
    fanout = [V] + [max(1, int(child_count[starts[L - 1]:starts[L]].max())) for L in range(1, n)]
    model = NGram(replace(cfg, sizes=tuple(sizes), fanout=tuple(fanout)))
    arrays = {"key": keys, "word": word, "count": counts, "child_start": child_start, "child_count": child_count}
    if cfg.smoothing == "kneser-ney":
        continuation = np.bincount(np.concatenate(suffixes), minlength=E) if suffixes else np.zeros(E, np.int64)
        arrays["continuation"] = continuation
        # Ney's estimate D = n1 / (n1 + 2 n2), from the counts each order interpolates
        discount = []
        for m in range(1, n + 1):
            a = (counts if m == n else continuation)[starts[m - 1]:starts[m]]
            n1, n2 = int((a == 1).sum()), int((a == 2).sum())
            discount.append(n1 / (n1 + 2 * n2) if n1 else 0.5)
        arrays["discount"] = np.array(discount, np.float32)
    model.load_weights([(name, mx.array(a, dtype=getattr(model, name).dtype)) for name, a in arrays.items()])
    mx.eval(model.parameters())
    return model
