"""GPT-2's tokenizer files, read strictly: the vocabulary (``vocab.json``, OpenAI's ``encoder.json``),
the merges (``merges.txt``, OpenAI's ``vocab.bpe``), and Hugging Face's ``tokenizer.json`` when its
pipeline is GPT-2's. A file that is cut short, not JSON, names a key twice or holds the wrong types
is one error naming it; whether vocabulary and merges agree is ``gpt2_tokenizer.check_bpe``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .json_file import read_json


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """(vocab, merges, added tokens) of Hugging Face's tokenizer.json, when it describes a GPT-2-style
    byte-level BPE. Anything that would make its ids differ from GPT-2's pipeline (a normalizer, a
    prefix space, a non-byte-level pre-tokenizer, subword prefixes) is refused rather than ignored.
    """
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    steps = [data.get(key) for key in ("normalizer", "pre_tokenizer")] if isinstance(model, dict) else []
    if any(step is not None and not isinstance(step, dict) for step in steps):
        raise UserError(f"{path}: its normalizer and pre_tokenizer must be objects or null")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise UserError(f"{path} is not a Hugging Face BPE tokenizer.json")
    problem = _not_gpt2_pipeline(data, model)
    if problem:
        raise UserError(f"{path}: {problem}; only GPT-2's byte-level BPE pipeline is read")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise UserError(f"{path}: model.vocab must map token strings to integer ids")
    vocab = dict(vocab)
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise UserError(f"{path}: added_tokens must be a list")
    for added in added_tokens:  # e.g. <|endoftext|>, sometimes only listed here
        content, i = (added.get("content"), added.get("id")) if isinstance(added, dict) else (None, None)
        if not isinstance(content, str) or type(i) is not int or vocab.get(content, i) != i:
            raise UserError(f"{path}: added token {added!r:.60} conflicts with the vocabulary")
        vocab[content] = i
    merges = []
    if not isinstance(model["merges"], list):
        raise UserError(f"{path}: model.merges must be a list")
    for m in model["merges"]:  # "a b" strings (older files) or [a, b] pairs (tokenizers >= 0.20)
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(t, str) and t for t in pair):
            raise UserError(f"{path}: a merge is two tokens, got {m!r:.40}")
        merges.append((pair[0], pair[1]))
    return vocab, merges, [a["content"] for a in added_tokens]


def is_hf_tokenizer_json(path: Path) -> bool:
    """Whether path is Hugging Face's tokenizer.json (a "model" inside), not our meta file."""
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def _not_gpt2_pipeline(data: dict, model: dict) -> str | None:
    """What in a tokenizer.json would encode differently from GPT-2's pipeline, or None."""
    if data.get("normalizer") is not None:
        return f"it normalizes text ({data['normalizer'].get('type')!r:.40})"
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or len(steps) != 1 or not isinstance(steps[0], dict) \
            or steps[0].get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')!r:.40}, not ByteLevel"
    if steps[0].get("add_prefix_space") or not steps[0].get("use_regex", True):
        return "its ByteLevel pre-tokenizer adds a prefix space or skips GPT-2's split"
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "ignore_merges"):
        if model.get(key):
            return f"its BPE sets {key}"
    if model.get("byte_fallback"):
        return "its BPE falls back to bytes"
    return None


def read_vocab(path: Path) -> dict[str, int]:
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise UserError(f"{path} must map token strings to integer ids")
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    merges = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise UserError(f"{path}:{n}: a merge is two tokens separated by one space, got {line[:40]!r}")
        merges.append((pair[0], pair[1]))
    return merges
