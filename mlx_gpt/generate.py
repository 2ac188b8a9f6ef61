"""Generate text from a checkpoint: ``python -m mlx_gpt.generate --checkpoint DIR --prompt TEXT``.

The prompt is prefilled in one forward pass; after that, on the CPU, each token costs one
call of a compiled single-token step against fixed-capacity KV caches (``cache.FixedKVCache``),
so the step is traced once and reused for every token. On GPUs, and for models without such
caches, the same loop runs uncompiled over the model's growing caches. The next step is queued with
``mx.async_eval`` before the current token is read back, so Python's work (detokenizing,
printing, stop checks) overlaps the model's.

When the context fills the model's block size the window slides: the last ``keep`` tokens
are prefilled into fresh caches and decoding goes on. Text is streamed as it becomes
decodable (``detokenizer.StreamingDetokenizer``), cut before any stop string, and ends at
the tokenizer's end-of-text token or after ``max_new_tokens``.

In Python::

    model, tokenizer = mlx_gpt.load("checkpoints/run")
    text = generate(model, tokenizer, "Once upon a time", 100, temperature=0.8, seed=0)
    for piece in stream(model, tokenizer, "Once upon a time", 100, seed=0):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import backend
from .models.base import eval_mode
from .models.cache import FixedKVCache
from .detokenizer import StreamingDetokenizer
from .errors import UserError, run_cli
from .limits import check_bytes, check_seed, check_text
from .sampling import SamplingConfig, mark_seen, sample
from .tokenizer import Tokenizer


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

    def _decoding_threads(self):
        """BLAS threads for decoding, measured once per Decoder (``backend.decoding_threads``)."""
        return backend.decoding_threads(_matvec_shape(self.model), self._blas_threads)

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
            seen = state.get("seen")
            if seen is None:
                seen = mx.zeros(logits.shape, mx.bool_)
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

        with eval_mode(self.model), self._decoding_threads():
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


class StopStrings:
    """Cuts a text stream just before the first stop string, holding back text that may start one."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of text that is safe to show now (all of it that precedes a stop string)."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Text held back for a stop string that never came."""
        text, self._held = self._held, ""
        return "" if self.stopped else text


class _Continuation:
    """One sample's text: detokenized as it streams, ended by end-of-text or a stop string."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.eot_id = tokenizer.eot_id
        self.ids: list[int] = []
        self.done = False
        self._detok = StreamingDetokenizer(tokenizer, context=prompt_ids)
        self._stops = StopStrings(stop)

    def add(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.eot_id:
            return self.close()
        self.ids.append(token)
        text = self._stops.feed(self._detok.add(token))
        self.done = self._stops.stopped
        return text

    def close(self) -> str:
        """The text still held back: the sequence has ended."""
        if self.done:
            return ""
        self.done = True
        return self._stops.feed(self._detok.flush()) + self._stops.flush()


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token (a document start)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise UserError(f"the prompt is empty and the {tokenizer.kind} tokenizer has no end-of-text token "
                        "to start from; give a prompt")
    return [tokenizer.eot_id]


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def stream_batch(decoder: Decoder, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *, seed: int,
                 num_samples: int = 1, stop: Sequence[str] = (), timing: Timing | None = None
                 ) -> Iterator[list[str]]:
    """Yield, step by step, the new text of each of num_samples continuations ("" where none).

    Stops when every continuation has ended: max_new_tokens, end-of-text or a stop string
    (which is not part of the text).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)  # errors now, not at the first next()
    steps = decoder.tokens(prompt_ids, max_new_tokens, seed=seed, num_samples=num_samples, timing=timing)
    return _stream_rows(steps, [_Continuation(tokenizer, prompt_ids, stop) for _ in range(num_samples)])


def _stream_rows(steps: Iterator[list[int]], rows: list[_Continuation]) -> Iterator[list[str]]:
    with contextlib.closing(steps):
        for ids in steps:
            yield [row.add(t) for row, t in zip(rows, ids)]
            if all(row.done for row in rows):
                break
    tail = [row.close() for row in rows]
    if any(tail):
        yield tail


def stream(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, seed: int | None = None,
           stop: Sequence[str] = (), timing: Timing | None = None, keep: int | None = None,
           **sampling) -> Iterator[str]:
    """Yield the continuation of prompt piece by piece, each piece whole characters.

    sampling: the fields of ``SamplingConfig`` (temperature, top_k, top_p, min_p,
    repetition_penalty). seed None draws a fresh one.
    """
    decoder = Decoder(model, SamplingConfig(**sampling), keep=keep)
    seed = random_seed() if seed is None else seed
    for pieces in stream_batch(decoder, tokenizer, prompt, max_new_tokens, seed=seed, stop=stop, timing=timing):
        if pieces[0]:
            yield pieces[0]


def generate_batch(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, num_samples: int = 1,
                   seed: int | None = None, stop: Sequence[str] = (), timing: Timing | None = None,
                   keep: int | None = None, **sampling) -> list[str]:
    """num_samples continuations of prompt, drawn as one batch."""
    decoder = Decoder(model, SamplingConfig(**sampling), keep=keep)
    seed = random_seed() if seed is None else seed
    texts = [""] * num_samples
    for pieces in stream_batch(decoder, tokenizer, prompt, max_new_tokens, seed=seed, num_samples=num_samples,
                               stop=stop, timing=timing):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (), keep: int | None = None) -> str:
    """The continuation of prompt (prompt not included); the global MLX random state is untouched."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, seed=seed, stop=stop, keep=keep,
                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty))


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.generate", description="Generate text from a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (trained, fine-tuned or converted)")
    p.add_argument("--prompt", help="text to continue ('-' reads it from stdin); required unless --interactive")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this fraction as likely as the top")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens in the context (1: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, 0 .. 2**63-1; None draws a fresh one, printed at the end")
    p.add_argument("--num-samples", type=int, default=1, help="continuations to draw, as one batch")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a continuation where this text appears, without printing it (repeatable)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before its continuation")
    return p


def _run_prompt(decoder: Decoder, tokenizer: Tokenizer, prompt: str, args: argparse.Namespace, seed: int) -> None:
    """Print the continuation(s) of one prompt to stdout and the speed to stderr."""
    timing = Timing()
    out = sys.stdout
    pieces = stream_batch(decoder, tokenizer, prompt, args.max_new_tokens, seed=seed, num_samples=args.num_samples,
                          stop=args.stop, timing=timing)
    if args.num_samples == 1:
        out.write(prompt if args.echo else "")
        for piece in pieces:
            out.write(piece[0])
            out.flush()
        out.write("\n")
    else:
        texts = [""] * args.num_samples
        for step in pieces:
            texts = [t + p for t, p in zip(texts, step)]
        out.write("\n---\n".join((prompt if args.echo else "") + t for t in texts) + "\n")
    out.flush()
    print(f"{timing.summary()} | seed {seed}", file=sys.stderr)


def _check_fits(model, num_samples: int) -> None:
    """Refuse a batch whose caches and logits alone exceed the machine's memory."""
    c = model.config
    per_row = c.block_size * (2 * getattr(c, "n_layer", 1) * getattr(c, "n_embd", 1) + c.vocab_size)
    check_bytes(4 * num_samples * per_row, f"--num-samples {num_samples}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte is one prompt's error, not a crash
    if args.seed is not None:
        check_seed(args.seed)
    for text, what in ((args.prompt or "", "--prompt"), *((s, "--stop") for s in args.stop)):
        check_text(text, what)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompt is None and not args.interactive:
        raise UserError("give --prompt TEXT (or --interactive)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is not None:
        check_text(prompt, "the prompt")

    from . import checkpoint

    model, tokenizer = checkpoint.load(args.checkpoint)
    _check_fits(model, args.num_samples)
    decoder = Decoder(model, sampling)
    seed = random_seed() if args.seed is None else args.seed
    try:
        if prompt is not None:
            _run_prompt(decoder, tokenizer, prompt, args, seed)
        if args.interactive:
            _interact(decoder, tokenizer, args, seed + 1)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _interact(decoder: Decoder, tokenizer: Tokenizer, args: argparse.Namespace, seed: int) -> None:
    """Prompts from stdin until EOF; Ctrl-C ends the current continuation, not the session."""
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            sys.stderr.write("\n")
            return
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        try:
            check_text(prompt, "this prompt")
            _run_prompt(decoder, tokenizer, prompt, args, seed)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        seed += 1


if __name__ == "__main__":
    run_cli(main)
