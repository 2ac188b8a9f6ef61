"""Continuous batching: every running sequence advances one token per step, together.

One thread owns the model. Each turn of its loop it admits waiting requests while the batch
has room, feeds up to ``prefill_chunk`` tokens of new prompts (so a long prompt delays the
running sequences by a chunk, not by its whole length, while several short ones go in at
once), then runs one decode step over every running sequence. A sequence joins the batch
when its prompt is prefilled and leaves it as soon as it ends, is cancelled (its client went
away) or runs out of time; the others never wait for it.

Each sequence has its own keys and values: a row of the batch's ``SlotKVCache`` buffers, with
its own length, so sequences at different positions share one compiled step. Rows are kept
packed (a leaving row is replaced by the last one) and the buffers are sized in buckets of
rows (powers of two) and positions (steps of ``capacity_step``), so the step is traced once per
bucket, not once per batch.

Sampling runs on the host, per sequence (``requests.Sequence``); the model's logits cross to
the host once per step.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback

import mlx.core as mx
import numpy as np

from .. import backend
from ..models.cache import SlotKVCache
from ..models.gpt import GPT
from .requests import Event, Handle, Job, QueueFull, Sequence, TokenInfo, logprobs_of


class _Prefill:
    """A job whose prompt is being fed, a chunk per turn, into its own cache."""

    def __init__(self, handle: Handle, model) -> None:
        self.handle = handle
        self.caches = model.make_cache()
        self.done = 0  # prompt tokens fed
        self.scored: list[TokenInfo] = []  # the prompt's tokens with their log-probabilities (echo)


class Engine:
    """The batch of running sequences and the thread that steps it.

    model: one that reads positions and masks from the cache and has ``features`` and ``head``
    (``serve.main`` refuses any other); max_batch: sequences decoded together at most (a
    request with n choices takes n); max_queue: requests waiting for room at most, beyond
    which ``submit`` raises QueueFull; timeout: seconds a request may take in all, queued or
    running (then it ends with an error if it never started, else with finish_reason
    "length"); prefill_chunk: prompt tokens fed per turn, over as many new prompts as it covers.
    """

    capacity_step = 128

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, timeout: float = 600.0,
                 prefill_chunk: int = 256) -> None:
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.block_size = model.block_size
        self.vocab = model.config.vocab_size
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Condition(threading.RLock())  # reentrant: a signal handler may call shutdown
        self._waiting: collections.deque[Handle] = collections.deque()
        self._prefills: list[_Prefill] = []
        self._rows: list[Sequence] = []
        self._keys: list[mx.array] = []
        self._values: list[mx.array] = []
        self._shape = (0, 0)  # (rows, capacity) of the buffers
        self._stopping = False
        self._stop_reason = ""
        self._thread: threading.Thread | None = None
        self._head_t = _head_for_rows(model) if max_batch > 1 else None
        self._step = mx.compile(self._decode, inputs=[model.state])
        self._blas = backend.BlasThreads(backend.cpu_cores()) if backend.blas_threads() is not None else None
        self._blas_now: int | None = None
        self.steps = 0  # decode steps run, for tests and logs

    # -------------------------------------------------------------- the HTTP side's calls

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlx_gpt-engine", daemon=True)
        self._warm_up()
        self._thread.start()

    def shutdown(self, reason: str = "the server is shutting down") -> None:
        """End every request with an error event and let the thread finish; returns at once."""
        with self._lock:
            self._stopping = True
            self._stop_reason = reason
            self._lock.notify_all()

    def stop(self) -> None:
        """``shutdown``, then wait for the thread."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a job; raises QueueFull when max_queue jobs already wait."""
        assert 1 <= job.n <= self.max_batch and len(job.prompt) + job.max_tokens <= self.block_size
        handle = Handle(job, loop, self.wake, time.monotonic() + self.timeout)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def _warm_up(self) -> None:
        """Run a prefill and trace the step for one row before the first request, which would
        otherwise wait for them."""
        caches = self.model.make_cache()
        mx.eval(self.model.head(self.model.features(mx.zeros((1, 2), mx.int32), caches)))
        rows, capacity = self._bucket(1, 1)
        nh, hs = self._kv_shape()
        buffers = [mx.zeros((rows, nh, capacity, hs)) for _ in self.model.h]
        one = mx.zeros((rows,), mx.int32)
        mx.eval(self._step(one, buffers, list(buffers), one))

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    @property
    def load(self) -> dict:
        """Sequences running, prompts being prefilled, requests waiting, decode steps run (a snapshot)."""
        return {"running": len(self._rows), "prefilling": len(self._prefills), "waiting": len(self._waiting),
                "steps": self.steps}

    # -------------------------------------------------------------- the engine's thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._prefills or self._rows):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception:  # a bug: fail the requests in flight, keep serving the next ones
                traceback.print_exc(file=sys.stderr)
                self._fail_all("internal error while generating")
        self._fail_all(self._stop_reason)

    def _turn(self) -> None:
        self._drop_finished_handles()
        self._admit()
        budget = self.prefill_chunk  # prompt tokens fed per turn, shared by the prompts waiting
        while self._prefills and budget > 0:
            budget -= self._prefill_chunk(self._prefills[0], budget)
        if self._rows:
            self._decode_step()

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            handles = list(self._waiting)
            self._waiting.clear()
        handles += [p.handle for p in self._prefills]
        self._prefills.clear()
        for seq in self._rows:  # a job's choices are running, prefilling or waiting: never two of these
            seq.handle.emit(Event(seq.index, error=reason))
        self._rows.clear()
        self._shape = (0, 0)
        self._keys, self._values = [], []
        for handle in handles:
            handle.fail(reason)

    def _drop_finished_handles(self) -> None:
        """Cancelled and timed-out requests leave the queue, the prefills and the batch."""
        now = time.monotonic()
        with self._lock:
            waiting = list(self._waiting)
            self._waiting = collections.deque(h for h in waiting if not h.cancelled and h.deadline > now)
        for h in waiting:
            if not h.cancelled and h.deadline <= now:
                h.fail("timed out waiting for a free slot")
        for p in [p for p in self._prefills if p.handle.cancelled or p.handle.deadline <= now]:
            self._prefills.remove(p)
            if not p.handle.cancelled:
                p.handle.fail("timed out")
        for row in reversed(range(len(self._rows))):
            seq = self._rows[row]
            if seq.handle.cancelled:
                self._remove_row(row)
            elif seq.handle.deadline <= now:
                seq.handle.emit(Event(seq.index, text=seq.continuation.close(), finish_reason="length"))
                self._remove_row(row)

    def _admit(self) -> None:
        """Move waiting jobs to prefill while the batch has room for all their choices."""
        while True:
            with self._lock:
                if not self._waiting:
                    return
                taken = len(self._rows) + sum(p.handle.job.n for p in self._prefills)
                if taken + self._waiting[0].job.n > self.max_batch:
                    return
                handle = self._waiting.popleft()
            self._prefills.append(_Prefill(handle, self.model))

    def _prefill_chunk(self, p: _Prefill, budget: int) -> int:
        """Feed the next chunk of a prompt, at most budget tokens; when it is all in, its choices
        join the batch. Returns the tokens fed."""
        job = p.handle.job
        prompt = job.prompt
        start, end = p.done, min(len(prompt), p.done + budget)
        x = mx.array([prompt[start:end]], mx.int32)
        if job.echo_logprobs:
            logits = self.model(x, p.caches)[0]  # (T, vocab)
            p.scored += self._score(logits, prompt, start, job.sampling.logprobs or 0)
            last = logits[-1]
        else:
            h = self.model.features(x, p.caches)[:, -1:, :]
            last = self.model.head(h)[0, 0]
        p.done = end
        if end < len(prompt):
            mx.eval([c.state for c in p.caches])
            return end - start
        logits = np.array(last.astype(mx.float32))
        joining = []
        for seq in (Sequence(p.handle, i, self.tokenizer, self.vocab) for i in range(job.n)):
            event = seq.advance(seq.draw(logits)) if job.max_tokens else Event(seq.index, finish_reason="length")
            event.prompt = p.scored if job.echo_logprobs else None  # the prompt's scores go with the first event
            p.handle.emit(event)
            if event.finish_reason is None:
                joining.append(seq)
        if joining:
            self._insert(joining, p.caches)
        self._prefills.remove(p)  # only now: a fault before it fails the job with the rest in flight
        return end - start

    def _score(self, logits: mx.array, prompt: tuple[int, ...], start: int, k: int) -> list[TokenInfo]:
        """The prompt's tokens start+1 .. start+T with the log-probabilities logits (T, vocab) give them."""
        rows = np.array(logits.astype(mx.float32))
        infos = [TokenInfo(prompt[0], None)] if start == 0 else []
        return infos + [TokenInfo(t, *logprobs_of(row, t, k)) for row, t in zip(rows, prompt[start + 1 :])]

    # -------------------------------------------------------------- the batch's rows

    def _bucket(self, rows: int, positions: int) -> tuple[int, int]:
        """Buffer shape for this many rows and positions: rows to a power of two, positions to a step."""
        step = self.capacity_step
        return 1 << max(rows - 1, 0).bit_length(), min(self.block_size, -(-positions // step) * step)

    def _fit(self) -> None:
        """Resize the buffers to the bucket the current rows need (rows packed first)."""
        need = max((len(s.job.prompt) + s.job.max_tokens for s in self._rows), default=1)
        shape = self._bucket(len(self._rows), need)
        if shape == self._shape:
            return
        if not self._rows:
            self._keys, self._values, self._shape = [], [], (0, 0)
            return
        rows, capacity = shape
        keep_rows, keep_pos = min(rows, self._shape[0]), min(capacity, self._shape[1])
        nh, hs = self._kv_shape()
        new_keys, new_values = [], []
        for buffers, out in ((self._keys, new_keys), (self._values, new_values)):
            for b in buffers or [None] * len(self.model.h):
                a = mx.zeros((rows, nh, capacity, hs), mx.float32 if b is None else b.dtype)
                if b is not None and keep_rows:
                    a[:keep_rows, :, :keep_pos, :] = b[:keep_rows, :, :keep_pos, :]
                out.append(a)
        self._keys, self._values, self._shape = new_keys, new_values, shape

    def _kv_shape(self) -> tuple[int, int]:
        c = self.model.config
        return c.n_head, c.n_embd // c.n_head

    def _insert(self, seqs: list[Sequence], caches) -> None:
        """New rows at the end of the batch, each with a copy of the prefilled keys and values."""
        first = len(self._rows)
        self._rows += seqs
        self._fit()
        n = len(seqs[0].job.prompt)
        for layer, cache in enumerate(caches):
            k, v = cache.keys[:, :, :n, :], cache.values[:, :, :n, :]
            self._keys[layer][first : first + len(seqs), :, :n, :] = k.astype(self._keys[layer].dtype)
            self._values[layer][first : first + len(seqs), :, :n, :] = v.astype(self._values[layer].dtype)
        mx.eval(self._keys, self._values)

    def _remove_row(self, row: int) -> None:
        """Free a row at once: the last row moves into it, and the buffers shrink to their bucket."""
        last = len(self._rows) - 1
        if row != last:
            self._rows[row] = self._rows[last]
            for buffers in (self._keys, self._values):
                for i, b in enumerate(buffers):
                    b[row] = b[last]
        self._rows.pop()
        self._fit()

    def _decode(self, tokens: mx.array, keys: list[mx.array], values: list[mx.array], lengths: mx.array):
        """One token for every row: tokens (S,) at each row's length; the next logits (S, vocab)."""
        caches = [SlotKVCache(k, v, lengths) for k, v in zip(keys, values)]
        if self._head_t is not None and tokens.shape[0] > 1:
            logits = self.model.features(tokens[:, None], caches)[:, -1, :] @ self._head_t
        else:
            logits = self.model(tokens[:, None], caches)[:, -1, :]
        return logits.astype(mx.float32), [c.keys for c in caches], [c.values for c in caches]

    def _decode_step(self) -> None:
        rows, _ = self._shape
        n = len(self._rows)
        tokens = np.zeros(rows, np.int32)
        lengths = np.zeros(rows, np.int32)
        for i, seq in enumerate(self._rows):
            tokens[i], lengths[i] = seq.next_token, seq.length
        threads = self._blas.pick(rows) if self._blas else None
        if threads is not None and threads != self._blas_now:
            backend.set_blas_threads(threads)
            self._blas_now = threads
        start = time.perf_counter()
        logits, self._keys, self._values = self._step(mx.array(tokens), self._keys, self._values, mx.array(lengths))
        logits = np.array(logits)
        if threads is not None:
            self._blas.record(rows, threads, time.perf_counter() - start)
        self.steps += 1
        done = []
        for i, seq in enumerate(self._rows[:n]):
            seq.length += 1
            event = seq.advance(seq.draw(logits[i]))
            seq.handle.emit(event)
            if event.finish_reason is not None:
                done.append(i)
        for i in reversed(done):
            self._remove_row(i)


def _head_for_rows(model) -> mx.array | None:
    """The tied head laid out (n_embd, vocab), for the steps of several rows on the CPU, or None.

    A product of a few rows against the head as it is stored (vocab, n_embd) makes BLAS pack the
    whole vocabulary-sized matrix before it multiplies; against this contiguous copy it streams the
    weight once. One row keeps the stored head, whose matrix-vector path is faster still.
    """
    weight = model.wte.weight
    if not isinstance(model, GPT) or not backend.on_cpu() or weight.dtype != mx.float32:  # quantized: integers
        return None
    head = mx.contiguous(weight.T)
    mx.eval(head)
    return head
