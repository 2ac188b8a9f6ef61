"""Turning a stream of token ids into a stream of text, one complete character at a time.

Byte-level and BPE tokens can end in the middle of a UTF-8 character: decoding such a prefix
gives U+FFFD where the cut falls, and printing it would put a replacement character on screen
that the finished text does not have. ``StreamingDetokenizer`` works on any tokenizer with
``decode``: it decodes the ids since the last text it gave out (plus one token before them,
so a tokenizer that renders a token differently at the start of a text sees it mid-text) and
holds text back while it ends in U+FFFD. The pieces it returns join to exactly
``tokenizer.decode(ids)`` for tokenizers whose decoding of a sequence is the decodings of
its complete-character pieces put together (byte-level, SentencePiece, GPT-2 BPE).
"""

from __future__ import annotations

from typing import Sequence

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """``add(id) -> new text`` for one sequence; ``flush()`` gives whatever is still held.

    ``context`` is the token before the first one added (the prompt's last), used only as
    left context: its own text is never returned.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._restart(list(context)[-1:])

    def _restart(self, ids: list[int]) -> None:
        # ids: tokens whose text was already given out (or is context); _done: its length
        self._ids = ids
        self._done = len(self._tokenizer.decode(ids)) if ids else 0

    def add(self, token: int) -> str:
        """The text that token completes ("" while a character is still cut)."""
        self._ids.append(int(token))
        text = self._tokenizer.decode(self._ids)
        if text.endswith(REPLACEMENT):
            return ""
        new = text[self._done :]
        self._restart(self._ids[-1:])
        return new

    def flush(self) -> str:
        """Everything not yet returned, replacement characters included: the sequence has ended."""
        text = self._tokenizer.decode(self._ids)[self._done :]
        self._restart(self._ids[-1:])
        return text
