"""Our tokenizers as Hugging Face tokenizer files, so ``AutoTokenizer`` gives the same ids.

GPT-2's BPE goes as vocab.json + merges.txt under transformers' GPT2Tokenizer. The byte and
SentencePiece tokenizers go as a ``tokenizer.json`` built with the ``tokenizers`` library (what
transformers' fast tokenizers run), under PreTrainedTokenizerFast:

- bytes: a BPE with no merges whose 256 tokens are ``<0x00>`` .. ``<0xFF>``; byte fallback turns
  every character into its UTF-8 bytes, so id = byte value, and the ByteFallback decoder joins
  them back.
- SentencePiece BPE: the same pieces and ids; spaces become U+2581 (SentencePiece's escape),
  text is split where a run of U+2581 begins after other characters (SentencePiece's word
  split when whitespace-only pieces are allowed), and the merges are every split of a piece
  into two pieces, ranked by the piece's score (SentencePiece joins the best-scored pair
  first); characters without a piece fall back to byte tokens. The conversion is checked on a
  probe text before it is written, and refused when any id differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .json_file import read_json
from ..gpt2_tokenizer import EOT, GPT2Tokenizer
from ..tokenizer import CHAT_TEMPLATE_FILE, ByteTokenizer, SentencePieceTokenizer, Tokenizer

SPACE = "\u2581"  # SentencePiece's visible space
# text that reaches the corners of the conversion: runs of spaces, tabs, newlines, digits,
# punctuation, accents, other scripts, emoji (byte fallback) and a combining mark
PROBE = ("The quick brown fox, 3.14159 and 2024-03-26!\n\n    def f(x):\n\treturn x ** 2  # note\n"
         "  leading   and trailing  \r\n naïve café Zürich Łódź e\u0301 日本語のテキスト русский Ελληνικά "
         "😀👍🏽🇫🇷 ∑√∞ 'quoted' \"double\" (parens) [brackets] {braces} <tags> @#$%^&*_=+|\\/~`")


def has_form(tokenizer: Tokenizer) -> bool:
    """Whether write_tokenizer can write this tokenizer so that transformers gives the same ids."""
    return isinstance(tokenizer, GPT2Tokenizer) or to_tokenizers(tokenizer) is not None


def write_tokenizer(directory: Path, tokenizer: Tokenizer, block_size: int) -> None:
    """Write the tokenizer files (and tokenizer_config.json) AutoTokenizer loads; see has_form."""
    if isinstance(tokenizer, GPT2Tokenizer):
        tokenizer.write_files(directory)
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": block_size}
        if tokenizer.eot_id is not None:
            config.update(bos_token=EOT, eos_token=EOT, unk_token=EOT)
        _write_config(directory, config, tokenizer)
        return
    fast = to_tokenizers(tokenizer)
    if fast is None:
        raise ValueError(f"the {tokenizer.kind} tokenizer has no exact tokenizer.json form")
    fast.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False}
    if tokenizer.eot_id is not None:
        eot = fast.id_to_token(tokenizer.eot_id)
        config.update(bos_token=eot, eos_token=eot)
    if isinstance(tokenizer, SentencePieceTokenizer):
        config["unk_token"] = fast.id_to_token(0)
    _write_config(directory, config, tokenizer)


def to_tokenizers(tokenizer: Tokenizer):
    """The tokenizer as a ``tokenizers.Tokenizer`` giving the same ids, or None if there is none."""
    if isinstance(tokenizer, ByteTokenizer):
        return _bytes()
    if isinstance(tokenizer, SentencePieceTokenizer):
        fast = _sentencepiece(tokenizer)
        same = fast.encode(PROBE, add_special_tokens=False).ids == tokenizer.encode(PROBE)
        return fast if same else None
    return None


def _bytes():
    from tokenizers import Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    fast = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    fast.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return fast


def _sentencepiece(tokenizer: SentencePieceTokenizer):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    sp = tokenizer._sp
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i)]
    # pieces BPE may build: not bytes, not the unknown or control pieces
    normal = {sp.id_to_piece(i): i for i in range(n) if not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i))}
    merges = []
    for piece, i in sorted(normal.items(), key=lambda kv: (-sp.get_score(kv[1]), kv[1])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        merges += sorted(splits, key=lambda p: (normal[p[0]], normal[p[1]]))
    unk = next(sp.id_to_piece(i) for i in range(n) if sp.is_unknown(i))
    fast = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk, fuse_unk=True))
    fast.normalizer = normalizers.Replace(" ", SPACE)
    fast.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+"), behavior="isolated")
    fast.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True) for i in special])
    fast.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return fast


def read_chat_template(directory: Path) -> str | None:
    """The chat template a Hugging Face tokenizer folder carries: chat_template.jinja, else
    tokenizer_config.json's ``chat_template`` (a string, or named templates of which "default")."""
    jinja = directory / CHAT_TEMPLATE_FILE
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the chat template in {directory}: {' '.join(str(e).split())[:100]}") from None
    path = directory / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{directory}/tokenizer_config.json: chat_template is not a string")
    return template


def _write_config(directory: Path, config: dict, tokenizer: Tokenizer) -> None:
    template = getattr(tokenizer, "chat_template", None)
    if template:  # where transformers and mlx-lm read it
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
