"""The C++ GPT-2 encoder gives tiktoken's ids (and the Python path's) on any text, long pieces and
forgotten pieces included; text it cannot class goes to the Python path, still with tiktoken's ids."""

import unicodedata

import numpy as np
import pytest

from mlx_gpt import gpt2_native
from mlx_gpt.gpt2_bulk import BulkEncoder, bulk_encoder
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
from test_gpt2_bulk import ODD
from test_gpt2_tokenizer import TEXTS, _random_texts, tiktoken_gpt2

# pieces far longer than any remembered one, each merged through the heap
LONG = [" " * 5000 + "x", "-" * 3000 + "!", "ab" * 2000, "\n" * 2000 + "end", "9" * 1000, "é" * 700 + "?"]


@pytest.fixture(scope="module")
def tok(data_files):
    return GPT2Tokenizer.from_path(data_files / "gpt2")


@pytest.fixture(scope="module")
def native(tok):
    encoder = gpt2_native.encoder(tok, remember=1 << 20)
    if encoder is None:
        pytest.skip(f"no C++ encoder here: {gpt2_native.status()}")
    return encoder


def test_ids_equal_tiktoken_and_python(tok, native, data_files):
    enc, python = tiktoken_gpt2(data_files / "gpt2"), BulkEncoder(tok)
    texts = TEXTS + ODD + LONG + _random_texts(1000, seed=11) + [(data_files / "the-verdict.txt").read_text()]
    for rounds in range(2):  # the second time every short piece is remembered
        for text in texts:
            ids = native.encode(text)
            assert ids is not None and ids.dtype == np.uint32, repr(text[:60])
            assert ids.tolist() == enc.encode_ordinary(text) == python.encode(text), repr(text[:60])
    assert 0 < native.remembered < 1 << 20


def test_forgetting_keeps_memory_bounded_never_the_ids(tok, data_files):
    small = gpt2_native.encoder(tok, remember=50)
    if small is None:
        pytest.skip(gpt2_native.status())
    enc = tiktoken_gpt2(data_files / "gpt2")
    for text in TEXTS + _random_texts(200, seed=3):
        assert small.encode(text).tolist() == enc.encode_ordinary(text) and small.remembered <= 50


def test_text_it_cannot_class_goes_to_the_python_path(tok, native, data_files):
    unassigned = next(chr(c) for c in range(0x370, 0x3000) if unicodedata.category(chr(c)) == "Cn")
    text = f"a{unassigned}b and more words"
    assert native.encode(text) is None
    assert native.encode("a\ud800b") is None  # a lone surrogate: not UTF-8
    ids = bulk_encoder(tok)(text)
    assert ids.tolist() == tiktoken_gpt2(data_files / "gpt2").encode_ordinary(text)


def test_char_classes_are_gpt2s():
    table = gpt2_native.char_classes()
    cls = {name: getattr(gpt2_native, name) for name in ("OTHER", "LETTER", "NUMBER", "SPACE")}
    for ch, want in [("a", "LETTER"), ("ß", "LETTER"), ("中", "LETTER"), ("7", "NUMBER"), ("½", "NUMBER"),
                     ("Ⅻ", "NUMBER"), ("²", "NUMBER"), (" ", "SPACE"), ("\u3000", "SPACE"), ("\x85", "SPACE"),
                     ("\x1c", "OTHER"), ("_", "OTHER"), ("\u200b", "OTHER"), ("😀", "OTHER"), ("\U000F0000", "OTHER")]:
        assert table[ord(ch)] == cls[want], repr(ch)


def test_without_the_module_the_python_encoder_gives_the_same_ids(tok, data_files, monkeypatch):
    monkeypatch.setattr(gpt2_native, "encoder", lambda tokenizer, remember: None)  # no compiler, MLX_GPT_NO_EXT=1
    enc, encode = tiktoken_gpt2(data_files / "gpt2"), bulk_encoder(tok)
    for text in TEXTS + ODD + _random_texts(100, seed=5):
        ids = encode(text)
        assert ids.dtype == np.int64 and ids.tolist() == enc.encode_ordinary(text)
