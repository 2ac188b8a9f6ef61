"""The HTTP routes: OpenAI's endpoints, the health check and the page at ``/``, over one ``Engine``.

Every failure a client can cause comes back as OpenAI's error JSON with its status (400, 404,
413, 503); anything else is logged on the server and answered with a 500 of the same shape,
never a traceback. A client that goes away (a closed stream, or a dropped connection while a
whole answer is computed) cancels its request, which frees its rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
import traceback
import uuid
from importlib import resources
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batcher import Engine
from .requests import Event, Handle, QueueFull
from .answers import Choice, Shaper
from .openai_api import APIError, ModelInfo, Parsed, parse_chat, parse_completion


def create_app(engine: Engine, info: ModelInfo, *, max_body: int = 32 << 20) -> Starlette:
    """The ASGI application; max_body: the largest request body read, in bytes (413 beyond)."""
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": info.name, **engine.load})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": 0, "owned_by": "mlx_gpt",
             "max_model_len": info.block_size}]})

    async def _answer(request: Request, parse) -> Response:
        try:
            parsed = parse(await _read_json(request, max_body), info)
            handles = _submit(engine, parsed)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        prefix = "chatcmpl" if parsed.chat else "cmpl"
        shaper = Shaper(parsed, info, f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))
        if parsed.stream:
            return StreamingResponse(_stream(parsed, shaper, handles), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _collect(request, parsed, handles)
        if choices is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        errors = [c.error for c in choices if c.error]
        if errors:
            return JSONResponse(APIError(503, errors[0], type="server_error").body(), status_code=503)
        return JSONResponse(shaper.response(choices))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", functools.partial(_answer, parse=parse_completion), methods=["POST"]),
              Route("/v1/chat/completions", functools.partial(_answer, parse=parse_chat), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON, read no further than limit bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit:,} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _submit(engine: Engine, parsed: Parsed) -> list[Handle]:
    """Queue each of the request's jobs, or none: a full queue refuses the whole request."""
    loop = asyncio.get_running_loop()
    handles: list[Handle] = []
    try:
        for job in parsed.jobs:
            handles.append(engine.submit(job, loop))
    except QueueFull as e:
        for h in handles:
            h.cancel()
        raise APIError(503, f"the server is busy: {e}; retry later", type="server_error", code="queue_full") \
            from None
    return handles


async def _events(handles: list[Handle]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several jobs as they come, each with its job's place."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(j: int, handle: Handle) -> None:
        async for event in handle.events():
            await queue.put((j, event))
        await queue.put((j, None))

    tasks = [asyncio.create_task(pump(j, h)) for j, h in enumerate(handles)]
    open_jobs = len(handles)
    try:
        while open_jobs:
            j, event = await queue.get()
            if event is None:
                open_jobs -= 1
            else:
                yield j, event
    finally:
        for t in tasks:
            t.cancel()


async def _collect(request: Request, parsed: Parsed, handles: list[Handle]) -> list[Choice] | None:
    """Every choice, whole; None if the client disconnected first (the jobs are then cancelled)."""
    choices = [Choice() for _ in range(len(handles) * parsed.n)]

    async def gather() -> None:
        async for j, event in _events(handles):
            choices[j * parsed.n + event.index].add(event)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.create_task(gather()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            for h in handles:
                h.cancel()
    return choices if work.done() and not work.cancelled() else None


async def _stream(parsed: Parsed, shaper: Shaper, handles: list[Handle]) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, ``data: [DONE]`` at the end. Closing it (the client
    went away) cancels the jobs."""
    choices = [Choice() for _ in range(len(handles) * parsed.n)]
    echoed: set[int] = set()
    try:
        if parsed.chat:
            for i in range(len(choices)):
                yield _sse(shaper.role_chunk(i))
        async for j, event in _events(handles):
            index = j * parsed.n + event.index
            choices[index].add(event)
            if event.error:
                yield _sse(APIError(503, event.error, type="server_error").body())
                continue
            echo = ""
            if parsed.echo and index not in echoed:
                echoed.add(index)
                echo = parsed.prompt_texts[j]
            chunk = shaper.chunk(index, event, echo)
            if chunk is not None:
                yield _sse(chunk)
        if parsed.include_usage:
            yield _sse(shaper.usage_chunk(choices))
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
