"""GPT-2 encoding for bulk text (prepare's workers): the same ids as ``GPT2Tokenizer.encode``, faster.

GPT-2's BPE works on pieces that a regular expression cuts out of the text (a word with its
leading space, a run of digits, of punctuation, of spaces), and text repeats its pieces: so each
distinct piece is encoded once and remembered. ``bulk_encoder`` does that in C++ where
``gpt2_native`` builds it; ``BulkEncoder`` is the same in Python, for text the C++ encoder
leaves (a character its table does not know) and where it is not available.

In Python the pieces are cut by ``re``, which has no ``\\p{L}`` / ``\\p{N}``: ``[^\\W\\d_]`` and
``\\d`` stand for them, which differ only on characters that are numbers without being decimal
digits (``½``, ``²``, Roman numerals) and four control characters ``\\s`` takes for spaces. A text
holding one of those is encoded whole by the tokenizer itself, so the ids never differ.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache
from itertools import chain
from typing import Callable

import numpy as np

from . import gpt2_native

# GPT-2's pattern, with ``re``'s classes for letters and numbers (see above)
PIECE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
ODD_ASCII = re.compile("[\x1c-\x1f]")
MAX_REMEMBERED = 1 << 20  # distinct pieces kept before starting over (memory stays bounded)


@lru_cache(maxsize=1)
def _misread() -> frozenset[str]:
    """Characters ``re``'s classes put elsewhere than GPT-2's: numbers that are not decimal digits,
    and the separators U+001C..U+001F that ``\\s`` takes for spaces."""
    numbers = (chr(c) for c in range(0x80, sys.maxunicode + 1))
    odd = {ch for ch in numbers if unicodedata.category(ch) in ("No", "Nl") or (ch.isdigit() and not ch.isdecimal())}
    return frozenset(odd | {"\x1c", "\x1d", "\x1e", "\x1f"})


class BulkEncoder:
    """``encode(text)``: a GPT-2 tokenizer's ids for text, each distinct piece encoded once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        misread = ODD_ASCII.search(text) if text.isascii() else not _misread().isdisjoint(text)
        if misread:
            return self.tokenizer.encode(text)
        pieces = PIECE.findall(text)
        try:
            return list(chain.from_iterable(map(self.known.__getitem__, pieces)))
        except KeyError:
            self._learn(pieces)
            return list(chain.from_iterable(map(self.known.__getitem__, pieces)))

    def _learn(self, pieces: list[str]) -> None:
        new = [p for p in dict.fromkeys(pieces) if p not in self.known]
        if len(self.known) + len(new) > MAX_REMEMBERED:
            self.known.clear()
            new = list(dict.fromkeys(pieces))
        for p in new:
            self.known[p] = tuple(self.tokenizer.encode(p))


def bulk_encoder(tokenizer) -> Callable[[str], np.ndarray]:
    """``encode(text)``: a GPT2Tokenizer's ids for text as an array, in C++ where it is built."""
    python = BulkEncoder(tokenizer)
    native = gpt2_native.encoder(tokenizer, MAX_REMEMBERED)

    def encode(text: str) -> np.ndarray:
        ids = None if native is None else native.encode(text)
        return np.asarray(python.encode(text), dtype=np.int64) if ids is None else ids

    return encode
