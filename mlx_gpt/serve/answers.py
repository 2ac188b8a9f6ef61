"""An answer as OpenAI's API shapes it: the JSON of a whole response or of each stream chunk,
built from the events a request's choices produced (``requests.Event``), with usage and
log-probabilities in the completions' or the chat's layout."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

from .openai_api import ModelInfo, Parsed
from .requests import Event, TokenInfo


@dataclass
class Choice:
    """One choice's events, added up."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt: list[TokenInfo] | None = None
    finish_reason: str | None = None
    error: str | None = None

    def add(self, event: Event) -> None:
        self.text += event.text
        self.tokens += event.tokens
        if event.prompt is not None:
            self.prompt = event.prompt
        self.finish_reason = event.finish_reason or self.finish_reason
        self.error = event.error or self.error


class Shaper:
    """Builds the JSON of one request's answer: whole, or as stream chunks."""

    def __init__(self, parsed: Parsed, info: ModelInfo, request_id: str, created: int) -> None:
        self.p, self.info, self.id, self.created = parsed, info, request_id, created
        self._token_bytes = _token_bytes(info.tokenizer)
        self._token_text = functools.lru_cache(maxsize=65536)(self._text_of)

    def _text_of(self, token: int) -> str:
        """A token as text; a token that is part of a character is "bytes:\\xNN...", as OpenAI writes it."""
        text = self.info.tokenizer.decode([token])
        raw = self._token_bytes(token)
        if raw is not None and "\ufffd" in text:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.info.name}

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(j.prompt) for j in self.p.jobs)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, choices: list[Choice]) -> dict:
        """The whole answer (``stream: false``)."""
        if self.p.chat:
            out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.tokens), "finish_reason": c.finish_reason}
                   for i, c in enumerate(choices)]
            return {**self._head("chat.completion"), "choices": out, "usage": self.usage(choices)}
        out = [self._text_choice(i, c, self.p.prompt_texts[i // self.p.n] if self.p.echo else "")
               for i, c in enumerate(choices)]
        return {**self._head("text_completion"), "choices": out, "usage": self.usage(choices)}

    def chunk(self, index: int, event: Event, echo_text: str = "") -> dict | None:
        """One stream chunk for an event; None when it carries nothing to show."""
        if not (event.text or event.finish_reason or echo_text or (self.p.logprobs is not None and event.tokens)):
            return None
        if self.p.chat:
            choice = {"index": index, "delta": {"content": event.text} if event.text else {},
                      "logprobs": self._chat_logprobs(event.tokens), "finish_reason": event.finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**self._head("text_completion"), "choices": [self._text_choice(index, event, echo_text)]}

    def _text_choice(self, index: int, part: Choice | Event, echo_text: str) -> dict:
        """A completion's choice, whole or a chunk of it: its text and tokens, the prompt's first when echoed."""
        tokens = (part.prompt or []) + part.tokens if self.p.echo else part.tokens
        return {"index": index, "text": echo_text + part.text, "finish_reason": part.finish_reason,
                "logprobs": self._completion_logprobs(tokens)}

    def role_chunk(self, index: int) -> dict:
        """A chat stream's first chunk for a choice: who speaks."""
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def usage_chunk(self, choices: list[Choice]) -> dict:
        obj = "chat.completion.chunk" if self.p.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(choices)}

    def _completion_logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        if self.p.logprobs is None:
            return None
        texts = [self._token_text(t.id) for t in tokens]
        offsets = [0, *itertools.accumulate(map(len, texts))][: len(texts)]  # where each token's text starts
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {self._token_text(i): lp for i, lp in t.top}
                                 for t in tokens],
                "text_offset": offsets}

    def _chat_logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        if self.p.logprobs is None:
            return None

        def entry(i: int, lp: float) -> dict:
            raw = self._token_bytes(i)
            text = self.info.tokenizer.decode([i])
            return {"token": self._token_text(i), "logprob": lp,
                    "bytes": list(raw if raw is not None else text.encode("utf-8"))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}


def _token_bytes(tokenizer) -> Any:
    """token id -> its bytes, where the tokenizer can say (byte-level, GPT-2's BPE); else None."""
    if getattr(tokenizer, "kind", None) == "byte":
        return lambda i: bytes([i])
    if hasattr(tokenizer, "token_bytes"):
        table = tokenizer.token_bytes()
        return lambda i: table[i] if 0 <= i < len(table) else None
    return lambda i: None
