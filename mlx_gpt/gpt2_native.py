"""GPT-2's BPE in C++ (``bpe/``) for prepare's workers: built once on first use, cached, else None.

Cutting text into GPT-2's pieces with Python's ``re`` and looking each piece up costs more per
token than the whole of a Rust encoder's work, so ``bpe/encoder.cpp`` does both in C++: the
pre-tokenizer's pattern written out as a loop over the UTF-8 bytes, then each distinct piece
byte-pair-encoded once (GPT2Tokenizer's merges, best first) and remembered.

Which characters are letters (``\\p{L}``), numbers (``\\p{N}``) and spaces (Unicode's
White_Space, what ``\\s`` means to the pattern) is decided here, from ``unicodedata``, into a
table handed to the encoder. A code point that this Python's Unicode database does not know
(assigned by a later Unicode) could be classed wrongly, so a text holding one is left to the
Python path (``encode`` gives None).

The module is built on first use and cached by ``native.Module`` (see ``native.py``), like the
CPU kernels. Without CMake, a compiler or nanobind, after a failed build, or with
``MLX_GPT_NO_EXT=1``, ``encoder()`` gives None and the Python encoder runs.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

from .native import Module

MODULE = Module("_mlx_gpt_bpe", Path(__file__).resolve().parent / "bpe", what="the C++ GPT-2 encoder",
                built="C++", fallback="Python")
OTHER, LETTER, NUMBER, SPACE, UNKNOWN = range(5)  # bpe/encoder.cpp's classes
# Unicode's White_Space property: what \s matches in GPT-2's pattern (str.isspace also takes U+001C..U+001F)
WHITE_SPACE = (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000)


@lru_cache(maxsize=1)
def char_classes() -> bytes:
    """Each code point's class for the encoder: letter, number, space, other, or unknown (unassigned
    in this Python's Unicode database)."""
    by_category = {"L": LETTER, "N": NUMBER}
    table = bytearray([UNKNOWN]) * 0x110000
    # planes 4 to 13 hold nothing yet; 15 and 16 are private use
    for start, end in ((0, 0x40000), (0xE0000, 0xF0000)):
        for cp in range(start, end):
            category = unicodedata.category(chr(cp))
            table[cp] = UNKNOWN if category == "Cn" else by_category.get(category[0], OTHER)
    table[0xF0000:] = bytes(0x110000 - 0xF0000)
    for cp in WHITE_SPACE:
        table[cp] = SPACE
    return bytes(table)


def encoder(tokenizer, remember: int):
    """A C++ encoder of a GPT2Tokenizer's vocabulary and merges (``encode(text)``: a uint32 array,
    or None for text to encode otherwise), or None where the module is not available."""
    from .gpt2_tokenizer import byte_to_unicode

    module = MODULE.load()  # built on the first call of a process if needed
    if module is None:
        return None
    vocab = tokenizer.vocab
    chars = byte_to_unicode()
    byte_ids = [vocab[chars[b]] for b in range(256)]
    merges = [(vocab[a], vocab[b], vocab[a + b]) for a, b in tokenizer.merges]
    return module.Encoder(char_classes(), byte_ids, merges, remember)


def status() -> str:
    """Which GPT-2 bulk encoder runs: the C++ one (and where it is), or Python's and why."""
    return MODULE.status()
