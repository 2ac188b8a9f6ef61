"""A request inside the engine: what it asks (``Job``, ``Sampling``), what it gets back
(``Event``s of ``TokenInfo``s, on the event loop that submitted it, through its ``Handle``), and
each of its choices as a ``Sequence`` that draws its own tokens on the host.

Sampling runs in numpy, per sequence: each request has its own temperature, penalties, logit
bias and random generator (seeded from the request's seed and the choice's index), so a
sequence draws the same tokens whatever else is in the batch. The log-probabilities reported are
the model's own (before penalties, bias and temperature).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np

from ..generate import Continuation


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the request is refused, not queued."""


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens (OpenAI's parameters, plus ``top_k`` and
    ``repetition_penalty``); ``logprobs`` None reports none, k >= 0 the chosen token's and
    the k most likely alternatives."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Job:
    """One prompt to continue ``n`` times; ``echo_logprobs`` also scores the prompt's own tokens."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    echo_logprobs: bool = False


@dataclass(frozen=True)
class TokenInfo:
    """A token, its log-probability under the model (None for a prompt's first token) and the
    most likely alternatives at its position, as (id, logprob)."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    """What one choice produced since its last event. ``text`` is whole characters, cut before
    any stop string; ``finish_reason`` ("stop", "length") ends the choice; ``error`` ends it
    for a reason of the server's (shutting down, a fault), ``prompt`` carries the prompt's
    scored tokens (echo), once, before any other event of the choice."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: list[TokenInfo] | None = None
    error: str | None = None


class Handle:
    """A submitted job as the HTTP side sees it: its events arrive on the event loop that submitted it."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, wake: Callable[[], None], deadline: float) -> None:
        self.job = job
        self.loop = loop
        self.wake = wake  # the engine's
        self.deadline = deadline
        self.cancelled = False
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        """Called by the engine's thread; a loop already closed (the server stopped) has no reader left."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass

    def fail(self, reason: str) -> None:
        """End each of the job's choices with an error event."""
        for i in range(self.job.n):
            self.emit(Event(i, error=reason))

    def cancel(self) -> None:
        """The client is gone: free the job's rows at the engine's next step."""
        self.cancelled = True
        self.wake()

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each of the job's choices has ended."""
        open_choices = self.job.n
        while open_choices:
            event = await self.queue.get()
            if event.finish_reason is not None or event.error is not None:
                open_choices -= 1
            yield event


class Sequence:
    """One choice being generated: its random generator, text stream and stopping rules."""

    def __init__(self, handle: Handle, index: int, tokenizer, vocab: int) -> None:
        job = handle.job
        self.handle, self.index, self.job = handle, index, job
        self.rng = np.random.default_rng([job.seed, index])
        self.length = len(job.prompt)  # positions in the cache
        self.next_token = -1  # drawn, not yet fed to the model
        self.continuation = Continuation(tokenizer, job.prompt, job.stop)
        s = job.sampling
        self.counts = np.zeros(vocab, np.float32) if (s.presence_penalty or s.frequency_penalty) else None
        self.seen = None
        if s.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[list(job.prompt)] = True
        self.bias = None
        if s.logit_bias:
            self.bias = np.zeros(vocab, np.float32)
            for token, value in s.logit_bias:
                self.bias[token] = value

    def draw(self, logits: np.ndarray) -> TokenInfo:
        """Pick the next token from this step's logits (vocab,) and note it as drawn."""
        s = self.job.sampling
        token = choose(logits, s, self.rng, self.counts, self.seen, self.bias)
        info = TokenInfo(token, *logprobs_of(logits, token, s.logprobs)) if s.logprobs is not None \
            else TokenInfo(token, None)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        self.next_token = token
        return info

    def advance(self, info: TokenInfo) -> Event:
        """The event for a drawn token; its finish_reason is set when the sequence ends with it."""
        event = Event(self.index, text=self.continuation.add(info.id), tokens=[info])
        if self.continuation.done:  # end-of-text or a stop string
            event.finish_reason = "stop"
        elif len(self.continuation.ids) >= self.job.max_tokens:
            event.text += self.continuation.close()
            event.finish_reason = "length"
        return event


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator, counts: np.ndarray | None = None,
           seen: np.ndarray | None = None, bias: np.ndarray | None = None) -> int:
    """The next token for logits (vocab,): bias and penalties, then greedy or a draw.

    OpenAI's penalties subtract ``presence`` from the logit of every token generated so far
    and ``frequency`` times its count; the repetition penalty divides positive (multiplies
    negative) logits of tokens in the prompt or the text, as ``sampling.apply_repetition_penalty``.
    A draw applies the temperature, top-k and top-p, and inverts the cumulative distribution at
    one uniform number, so a request's tokens depend only on its own generator.
    """
    x = logits.astype(np.float64)
    if bias is not None:
        x = x + bias
    if counts is not None:
        x = x - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
    if seen is not None:
        x = np.where(seen, np.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty), x)
    if s.greedy:
        return int(np.argmax(x))
    x = x / s.temperature
    if 0 < s.top_k < x.size:
        x = np.where(x >= np.partition(x, -s.top_k)[-s.top_k], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]  # mass ranked above each token
        keep = np.zeros(p.size, bool)
        keep[order[above < s.top_p]] = True
        p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


def logprobs_of(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of token and its k most likely tokens, from logits (vocab,)."""
    x = logits.astype(np.float64)
    m = x.max()
    lsm = x - (m + np.log(np.exp(x - m).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        ids = np.argpartition(-lsm, k - 1)[:k]
        ids = ids[np.argsort(-lsm[ids], kind="stable")]
        top = tuple((int(i), float(lsm[i])) for i in ids)
    return float(lsm[token]), top
