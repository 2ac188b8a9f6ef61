"""JSON files read strictly, one way for every file a command reads: a checkpoint's config and
state, tokenizer metadata, Hugging Face's configs and shard indexes, GPT-2's vocabulary.

A file that is missing, cut short, not UTF-8, nested too deeply or not JSON is one error naming
it; so is an object that names a key twice, which JSON readers would settle silently by keeping
the last. A byte-order mark, as some editors save, is not part of the text.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def read_json(path: Path, missing: str = ""):
    """A JSON file's value. ``missing``: what the error for a missing file adds (why it is needed)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"), object_pairs_hook=_no_repeated_keys)
    except FileNotFoundError:
        raise UserError(f"{path} is missing{missing}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON: {(str(e).splitlines() or [''])[0]:.200}") from None
    except RecursionError:
        raise UserError(f"{path} is not valid JSON: nested too deeply") from None


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r:.60} appears twice in one object")
    return out
