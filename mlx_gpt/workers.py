"""Tokenizing a stream of text pieces on a pool of worker processes, results in order.

Each task is a list of (text, is val, ends a document) pieces; a worker returns the task's train
and val tokens, end-of-text after each document's last piece. Only a few tasks are in flight at
once, so memory stays flat however long the stream. A worker that dies (killed, out of memory)
breaks the pool, which is reported as an error instead of waiting on it for ever; a prepare that is
itself killed (SIGTERM, SIGKILL: no chance to shut its pool down) takes its workers with it on
Linux, instead of leaving them waiting for tasks for ever.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .gpt2_bulk import bulk_encoder
from .tokenizer import Tokenizer, load_tokenizer

Task = Sequence[tuple[str, bool, bool]]
IN_FLIGHT = 3  # tasks queued per worker: enough to keep each busy, few enough to bound memory
_worker: dict = {}
DIED = ("a tokenizing worker process died (killed, or out of memory); the shards written so far are kept: "
        "run the same prepare again to go on")


def bulk_encode(tok: Tokenizer) -> Callable[[str], np.ndarray]:
    """The fastest way to a tokenizer's ids for text in bulk (the same ids as its ``encode``)."""
    if tok.kind == "byte":  # the ids are the bytes: no list of Python ints needed
        return lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if tok.kind == "gpt2":
        return bulk_encoder(tok)
    return lambda text: np.asarray(tok.encode(text), dtype=np.int64)


def encode_pieces(tok: Tokenizer, task: Task, dtype: np.dtype,
                  encode: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, val tokens) of a task's pieces, in order, each text's ids ``encode``'s (``bulk_encode``)."""
    out: tuple[list, list] = ([], [])
    eot = None if tok.eot_id is None else np.asarray([tok.eot_id], dtype)
    for text, val, last in task:
        out[val].append(encode(text))
        if last and eot is not None:
            out[val].append(eot)
    # ids below the vocabulary's size, which dtype holds: cast in the one copy
    return tuple(np.concatenate(p, dtype=dtype, casting="unsafe") if p else np.zeros(0, dtype) for p in out)


def _start(tokenizer_dir: str, dtype: str, parent: int) -> None:
    _end_with(parent)
    if _worker.get("dir") != tokenizer_dir:  # spawned: not inherited from the parent
        tok = load_tokenizer(tokenizer_dir)
        _worker.update(dir=tokenizer_dir, tok=tok, encode=bulk_encode(tok))
    _worker["dtype"] = np.dtype(dtype)


def _end_with(parent: int) -> None:
    """Have Linux end this process when the one that started it ends, however it ends."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


def _encode(task: Task) -> tuple[np.ndarray, np.ndarray]:
    return encode_pieces(_worker["tok"], task, _worker["dtype"], _worker["encode"])


def encoded(tasks: Iterable[Task | None], tokenizer_dir: str, dtype: np.dtype, workers: int,
            tok: Tokenizer | None = None) -> Iterator[tuple[np.ndarray, np.ndarray] | None]:
    """Each task's (train, val) tokens in task order; a None task (one to skip) gives None.

    ``workers`` 1 encodes here, in this process, with ``tok`` (else the saved one); more start
    that many processes: forked on Linux, as llm.c's fineweb.py's pool is (a script that calls
    this needs no ``__main__`` guard, and the workers touch nothing of MLX's), spawned elsewhere
    (macOS's frameworks do not survive a fork).
    """
    if workers <= 1:
        tok = tok or load_tokenizer(tokenizer_dir)
        encode = bulk_encode(tok)
        for task in tasks:
            yield None if task is None else encode_pieces(tok, task, dtype, encode)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    if tok is not None and context.get_start_method() == "fork":
        # forked workers inherit the tokenizer and its encoder (built here once, if it must be),
        # instead of each reading and checking its files again
        _worker.update(dir=str(tokenizer_dir), tok=tok, encode=bulk_encode(tok))
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                               initargs=(str(tokenizer_dir), np.dtype(dtype).str, os.getpid()))
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(None if task is None else pool.submit(_encode, task))
            while len(pending) > IN_FLIGHT * workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    except BrokenProcessPool:  # submitting to, or waiting on, a pool a dead worker broke
        raise UserError(DIED) from None
    finally:
        for f in pending:
            if f is not None:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        _worker.clear()


def _result(future):
    return None if future is None else future.result()
