"""The engine's thread under a fault: every request in flight ends with an error, none waits out its
timeout, and the next request is served."""

import asyncio

from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.serve.batcher import Engine
from mlx_gpt.serve.requests import Job
from mlx_gpt.tokenizer import ByteTokenizer


async def answer(engine: Engine, job: Job, seconds: float = 30) -> list:
    handle = engine.submit(job, asyncio.get_running_loop())
    events, ended = [], set()
    while len(ended) < job.n:
        event = await asyncio.wait_for(handle.queue.get(), seconds)
        events.append(event)
        if event.error or event.finish_reason:
            ended.add(event.index)
    return events


def test_a_fault_as_a_prompt_joins_the_batch_fails_its_request_and_the_engine_serves_on(monkeypatch):
    model = build(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    engine = Engine(model, ByteTokenizer(), max_batch=4, timeout=600)
    real, calls = engine._insert, []

    def faulty(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a fault inserting the rows")
        return real(*args, **kw)

    monkeypatch.setattr(engine, "_insert", faulty)
    engine.start()
    try:
        job = Job(prompt=tuple(b"The with statement"), max_tokens=8, n=2)
        failed = asyncio.run(answer(engine, job))
        assert {e.index for e in failed if e.error} == {0, 1}  # each choice told, well before the timeout
        served = asyncio.run(answer(engine, job))
        assert not any(e.error for e in served) and sum(len(e.tokens) for e in served) == 16
    finally:
        engine.stop()
