"""OpenAI's HTTP API as this server reads it: request bodies checked into jobs, errors as OpenAI's
error object (``answers.py`` shapes what goes back).

Nothing here runs the model or touches HTTP: ``parse_completion`` and ``parse_chat`` turn a
request body into ``requests.Job``s (or raise ``APIError`` with the status and parameter to
blame).
The parameters follow OpenAI's legacy completions and chat completions; ``top_k`` and
``repetition_penalty`` are accepted as extras, as vLLM and mlx-lm accept them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from .. import chat
from ..errors import UserError
from ..generate import encode_prompt
from ..limits import check_text
from .requests import Job, Sampling

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**64

# OpenAI's roles, as the chat template names them (its "developer" is the template's system)
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it: HTTP status, message, type, parameter, code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ModelInfo:
    """What request checking needs to know of the served model."""

    name: str
    tokenizer: Any
    block_size: int
    vocab_size: int
    max_batch: int
    max_token_chars: int  # the longest text one token decodes to: a bound on a prompt's length before encoding


@dataclass
class Parsed:
    """A checked request: its jobs (one per prompt) and how to shape the answer."""

    chat: bool
    jobs: list[Job]
    prompt_texts: list[str]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs in the answer

    @property
    def n(self) -> int:
        return self.jobs[0].n


def render_chat(messages: list[dict], tokenizer) -> tuple[str, tuple[str, ...]]:
    """(the prompt for a chat, the stop strings that end the assistant's turn): the checkpoint's
    chat template (``chat.template_of``: its own, else the default), as ``generate --chat`` uses."""
    template, tokens = chat.template_of(tokenizer), chat.special_tokens(tokenizer)
    try:
        text = chat.render(template, messages, add_generation_prompt=True, **tokens)
        end = chat.end_of_turn(template, **tokens)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    return text, (end,) if end else ()


def max_token_chars(tokenizer, vocab_size: int) -> int:
    """The most characters one token of this tokenizer decodes to."""
    return max([1] + [len(tokenizer.decode([i])) for i in range(min(vocab_size, tokenizer.vocab_size))])


# ------------------------------------------------------------------------ checking requests


def parse_completion(body: Any, info: ModelInfo) -> Parsed:
    """A ``POST /v1/completions`` body as jobs."""
    body = _object_for(info, body)
    if body.get("suffix") is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = _prompts(body.get("prompt"), info)
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _boolean(body, "echo", False)
    n = _integer(body, "n", 1, 1, info.max_batch)
    best_of = _integer(body, "best_of", None, 1, info.max_batch)
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    max_tokens = _integer(body, "max_tokens", 16, 0, None)
    jobs, texts = [], []
    for ids, text in prompts:
        _check_context(len(ids), max_tokens, info)
        jobs.append(_job(body, info, ids, max_tokens, n, logprobs, echo_logprobs=echo and logprobs is not None))
        texts.append(text)
    return Parsed(False, jobs, texts, *_stream_options(body), echo=echo, logprobs=logprobs)


def parse_chat(body: Any, info: ModelInfo) -> Parsed:
    """A ``POST /v1/chat/completions`` body as a job; the chat's format adds its stop strings."""
    body = _object_for(info, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    text, stops = render_chat([_message(m, i) for i, m in enumerate(messages)], info.tokenizer)
    ((ids, text),) = _prompts(text, info, encode=chat.encode)  # end-of-text in the template: its token
    wants_logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wants_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top or 0) if wants_logprobs else None
    n = _integer(body, "n", 1, 1, info.max_batch)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, max(info.block_size - len(ids), 0), 0, None)  # default: the context's rest
    _check_context(len(ids), max_tokens, info, "messages")
    job = _job(body, info, ids, max_tokens, n, logprobs, echo_logprobs=False, extra_stops=stops)
    return Parsed(True, [job], [text], *_stream_options(body), logprobs=logprobs)


def _object_for(info: ModelInfo, body: Any) -> dict:
    """The body, a JSON object naming the served model."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model must be a string: the served model's id (GET /v1/models)", param="model")
    if model != info.name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{info.name}`", param="model",
                       code="model_not_found")
    return body


def _message(m: Any, i: int) -> dict:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise APIError(400, f"{param} must be an object with a role of {', '.join(CHAT_ROLES)}", param=param)
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"{param}.content: only text parts are supported", param=f"{param}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{param}.content must be a string", param=f"{param}.content")
    return {"role": CHAT_ROLES[m["role"]], "content": content}


def _prompts(prompt: Any, info: ModelInfo, encode: Callable[[Any, str], list[int]] = encode_prompt
             ) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt: a string, a list of strings, token ids or lists of them;
    text is encoded by ``encode`` (a chat's as ``generate --chat`` encodes it)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        items = [prompt]  # one prompt: text or token ids
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            if len(p) > info.block_size * info.max_token_chars:  # more tokens than the context, surely
                _check_context(len(p) // info.max_token_chars, 0, info)
            try:  # generate's checks and encoding: an empty prompt starts at end-of-text
                check_text(p, "the prompt")
                out.append((encode(info.tokenizer, p), p))
            except UserError as e:
                raise APIError(400, str(e), param="prompt") from None
        elif p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.vocab_size for t in p):
            out.append((list(p), info.tokenizer.decode(p)))
        else:
            raise APIError(400, f"token ids must be a non-empty list of integers in [0, {info.vocab_size})",
                           param="prompt")
    return out


def _check_context(prompt_tokens: int, max_tokens: int, info: ModelInfo, param: str = "prompt") -> None:
    if prompt_tokens + max_tokens > info.block_size or prompt_tokens >= info.block_size:
        raise APIError(400, f"This model's maximum context length is {info.block_size} tokens, however you "
                            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt, "
                            f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                       param=param, code="context_length_exceeded")


def _job(body: dict, info: ModelInfo, ids: list[int], max_tokens: int, n: int, logprobs: int | None, *,
         echo_logprobs: bool, extra_stops: tuple[str, ...] = ()) -> Job:
    sampling = Sampling(
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=_integer(body, "top_k", 0, 0, None),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, None, open_low=True),
        logit_bias=_logit_bias(body.get("logit_bias"), info),
        logprobs=logprobs)
    seed = _integer(body, "seed", None, -(2**63), MAX_SEED - 1)
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed % MAX_SEED
    return Job(tuple(ids), max_tokens, sampling, seed, n, _stops(body.get("stop")) + extra_stops, echo_logprobs)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)


def _logit_bias(bias: Any, info: ModelInfo) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise APIError(400, "logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < info.vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {info.vocab_size})", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of {key} must be a number in [-100, 100]", param="logit_bias")
        out.append((token, float(value)))
    return tuple(out)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    return stream, bool(stream and options and options.get("include_usage"))


def _integer(body: dict, name: str, default: int | None, lo: int | None, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        bounds = f"from {lo}" + (f" to {hi}" if hi is not None else "")
        raise APIError(400, f"{name} must be an integer {bounds}, got {value!r}", param=name)
    return value


def _float(body: dict, name: str, default: float, lo: float, hi: float | None, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > lo if open_low else value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = ("(" if open_low else "[") + f"{lo:g}, " + (f"{hi:g}]" if hi is not None else "inf)")
        raise APIError(400, f"{name} must be a number in {bounds}, got {value!r}", param=name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false", param=name)
    return value
