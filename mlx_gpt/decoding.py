"""A model's next tokens for a prompt: prefill, then one step per token, the window sliding.

The prompt is prefilled in one forward pass; after that, on the CPU, each token costs one
call of a compiled single-token step against fixed-capacity KV caches (``cache.FixedKVCache``),
so the step is traced once and reused for every token. On GPUs, and for models without such
caches, the same loop runs uncompiled over the model's growing caches. The next step is queued with
``mx.async_eval`` before the current token is read back, so the caller's work (detokenizing,
printing, stop checks) overlaps the model's.

When the context fills the model's block size the window slides: the last ``keep`` tokens
are prefilled into fresh caches and decoding goes on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import backend
from .errors import UserError
from .models.base import eval_mode
from .models.cache import FixedKVCache
from .sampling import SamplingConfig, mark_seen, sample


@dataclass
class Timing:
    """Token counts and wall-clock seconds of one generation, for the tokens/s report.

    The prompt phase runs from the start to the first new token (prefill plus one draw);
    the generation phase covers every token after the first.
    """

    rows: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.rows * self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        steps = self.new_tokens - 1
        return self.rows * steps / self.generation_seconds if steps > 0 and self.generation_seconds > 0 else 0.0

    def summary(self) -> str:
        rows = f"{self.rows} x " if self.rows > 1 else ""
        return (f"prompt: {rows}{self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {rows}{self.new_tokens} tokens, {self.generation_tps:.1f} tok/s")


class Decoder:
    """A model's next tokens for a prompt: one prefill pass, then one step per token.

    On the CPU, a model that reads its positions and attention mask from the cache (marked by
    ``accepts_fixed_cache``, as ``GPT`` is) gets fixed-capacity caches and a step compiled
    once per Decoder, reused for every token and window slide (and every later call with the
    same batch size and cache capacity). The model's weights are inputs of the compiled step,
    not constants baked into it, so a Decoder stays valid while the model trains. Any other
    model with ``make_cache()`` and ``model(idx, cache)``, and every model on a GPU, runs the
    same loop eagerly with its own caches. The compiled step saves the CPU backend's
    per-operation cost, while on CUDA it measured slower than the eager loop (it also attends
    over the whole capacity). Metal keeps the eager loop too, as mlx-lm's generation does.

    keep: tokens kept when the context fills the block size and the window slides (default
    three quarters of the block). ``keep == block_size`` recomputes the full window for every
    token past the block size, exactly like cropping the context to the last block.

    On the CPU with OpenBLAS, each token is a chain of matrix-vector products, and a second
    BLAS thread helps only while a core is free for it: on a busy machine every product waits
    for one. So the first generation measures products of the model's shape with one thread
    and with one per core and decodes with the faster (``blas_threads``); the process's
    setting is restored afterwards, since training wants every core.
    """

    capacity_step = 256  # fixed caches are sized in steps of this many positions, so shapes repeat

    def __init__(self, model, sampling: SamplingConfig = SamplingConfig(), *, keep: int | None = None) -> None:
        self.model = model
        self.sampling = sampling
        self.block_size = model.block_size
        self.keep = max(1, self.block_size * 3 // 4) if keep is None else keep
        if not 1 <= self.keep <= self.block_size:
            raise UserError(f"keep must be in [1, block_size={self.block_size}], got {self.keep}")
        self.compiled = (bool(getattr(model, "accepts_fixed_cache", False))
                         and mx.default_device().type == mx.DeviceType.cpu)
        if self.compiled:
            self._n_layers = len(model.make_cache())
            self._step = mx.compile(self._fixed_step, inputs=[model.state])
        self._blas_threads: list[int] = []  # chosen at the first generation on the CPU

    @property
    def blas_threads(self) -> int | None:
        """The BLAS threads decoding chose on the CPU (None until the first generation there)."""
        return self._blas_threads[0] if self._blas_threads else None

    def capacity(self, n_positions: int) -> int:
        """Cache positions for n_positions tokens: rounded up to a step, at most the block size."""
        if not self.compiled:
            return self.block_size  # the model's own caches grow as needed
        step = self.capacity_step
        return min(self.block_size, max(1, -(-n_positions // step) * step))

    def _draw(self, logits: mx.array, fed: mx.array, state: dict) -> tuple[mx.array, dict]:
        """Draw the next tokens from last-position logits (B, vocab); fed (B, T) joins the context."""
        state = dict(state)
        if self.sampling.uses_context:
            seen = state["seen"] if "seen" in state else mx.zeros(logits.shape, mx.bool_)
            state["seen"] = mark_seen(seen, fed)
        key = None
        if not self.sampling.greedy:
            state["rng"], key = mx.random.split(state["rng"])
        return sample(logits, self.sampling, key, state.get("seen")), state

    def _prefill(self, window: mx.array, capacity: int, state: dict, fed: mx.array) -> tuple[mx.array, dict, list]:
        """Run window (B, T) through fresh caches; draw the next tokens.

        Returns the tokens, the state and the model's own caches (for a compiled Decoder the
        caches' arrays join the state instead, and the list is empty).
        """
        caches = [FixedKVCache(capacity) for _ in range(self._n_layers)] if self.compiled else self.model.make_cache()
        logits = self.model(window, caches)[:, -1, :]
        y, state = self._draw(logits, fed, state)
        if self.compiled:
            return y, {**state, **_fixed_state(caches)}, []
        return y, state, caches

    def _fixed_step(self, tokens: mx.array, state: dict) -> tuple[mx.array, dict]:
        """Feed tokens (B,) at state["offset"]; draw the next ones. Compiled: shapes never change."""
        caches = [FixedKVCache(k.shape[2], k, v, state["offset"]) for k, v in zip(state["keys"], state["values"])]
        logits = self.model(tokens[:, None], caches)[:, -1, :]
        y, state = self._draw(logits, tokens[:, None], state)
        return y, {**state, **_fixed_state(caches)}

    def _eager_step(self, tokens: mx.array, state: dict, caches: list) -> tuple[mx.array, dict]:
        logits = self.model(tokens[:, None], caches)[:, -1, :]
        return self._draw(logits, tokens[:, None], state)

    def tokens(self, prompt: Sequence[int], max_new_tokens: int, *, seed: int = 0, num_samples: int = 1,
               timing: Timing | None = None) -> Iterator[list[int]]:
        """Yield the next token of each of num_samples continuations, max_new_tokens times."""
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        if len(prompt) == 0:
            raise UserError("the prompt must hold at least one token")
        return self._tokens(prompt, max_new_tokens, seed, num_samples, timing if timing is not None else Timing())

    def _tokens(self, prompt: Sequence[int], max_new_tokens: int, seed: int, num_samples: int,
                timing: Timing) -> Iterator[list[int]]:
        if max_new_tokens == 0:
            return
        block = self.block_size
        prompt_rows = np.tile(np.asarray(prompt, np.int32), (num_samples, 1))  # (B, n)
        steps: list[list[int]] = []  # the tokens drawn so far, one list of B ids per step
        if prompt_rows.shape[1] > block:
            print(f"warning: the prompt is {prompt_rows.shape[1]} tokens; the model sees only the last {block} "
                  "(its block size)", file=sys.stderr)
        window = prompt_rows[:, -block:]
        capacity = self.capacity(window.shape[1] + max_new_tokens - 1)
        timing.rows, timing.prompt_tokens = num_samples, window.shape[1]
        state = {} if self.sampling.greedy else {"rng": mx.random.key(seed)}

        # BLAS threads for decoding, measured once per Decoder
        with eval_mode(self.model), backend.decoding_threads(_matvec_shape(self.model), self._blas_threads):
            start = time.perf_counter()
            y, state, caches = self._prefill(mx.array(window), capacity, state, fed=mx.array(prompt_rows))
            n_cached = window.shape[1]
            row = y.tolist()  # the prompt phase ends with the first token
            timing.prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(max_new_tokens):
                if i + 1 < max_new_tokens:  # queue the next step before reading this token back
                    if n_cached == capacity:  # window full: slide it, keeping the last `keep` tokens
                        assert capacity == block, "caches are sized to fit unless the block is the limit"
                        kept = _last_tokens(prompt_rows, steps, self.keep - 1)
                        window = mx.concatenate([mx.array(kept), y[:, None]], axis=1)
                        y_next, state, caches = self._prefill(window, capacity, state, fed=y[:, None])
                        n_cached = self.keep
                    elif self.compiled:
                        y_next, state = self._step(y, state)
                        n_cached += 1
                    else:
                        y_next, state = self._eager_step(y, state, caches)
                        n_cached += 1
                    mx.async_eval(y_next, state, [c.state for c in caches])
                if i > 0:
                    row = y.tolist()
                    timing.generation_seconds = time.perf_counter() - start
                timing.new_tokens = i + 1
                steps.append(row)
                yield row
                if i + 1 < max_new_tokens:
                    y = y_next


def _last_tokens(prompt_rows: np.ndarray, steps: list[list[int]], k: int) -> np.ndarray:
    """The last k tokens (B, k) of each row of prompt_rows (B, n) followed by the drawn steps."""
    recent = np.asarray(steps[len(steps) - min(k, len(steps)):], np.int32).reshape(-1, prompt_rows.shape[0]).T
    from_prompt = prompt_rows[:, prompt_rows.shape[1] - (k - recent.shape[1]):]
    return np.concatenate([from_prompt, recent], axis=1)


def _matvec_shape(model) -> tuple[int, int]:
    """(rows, cols) of a typical weight a decode step multiplies by: the MLP's (4C, C) for a GPT."""
    n_embd = getattr(getattr(model, "config", None), "n_embd", None)
    if n_embd:
        return 4 * n_embd, n_embd
    from mlx.utils import tree_flatten

    shapes = [tuple(v.shape) for _, v in tree_flatten(model.parameters()) if v.ndim == 2]
    return max(shapes, key=lambda s: s[0] * s[1], default=(256, 256))


def _fixed_state(caches: list[FixedKVCache]) -> dict:
    return {"keys": [c.keys for c in caches], "values": [c.values for c in caches], "offset": caches[0].offset}
