"""GPT2Tokenizer against tiktoken's GPT-2 encoding built from the same encoder.json / vocab.bpe."""

import json
import random
import shutil

import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer, byte_to_unicode, check_bpe, to_bytes, to_unicode
from mlx_gpt.tokenizer import load_tokenizer

# GPT-2's pre-tokenization pattern, as tiktoken writes it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TEXTS = [
    "Hello world",
    "",
    " ",
    "\n",
    "   leading and trailing   ",
    "runs  of   spaces\n\n\nand\tnewlines \n \n\t\t  tabs  \r\n windows line\r\nends",
    "I'm sure they're here, we'll see; you've been, he'd go, it's mine. DON'T SHOUT'S 'quoted'",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-03-26 +1e-5 0x7f 100%",
    "punctuation!!! ?!? ... --- (parens) [brackets] {braces} <tags> @#$%^&*_=+|\\/~`",
    "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ and symbols ∑ √ ∞ ≠ → ©",
    "日本語のテキスト、中文文本。한국어 텍스트 русский текст Ελληνικά العربية עברית हिन्दी ไทย",
    "mixed: naïve café résumé Zürich Łódź ﬁ ligature, combining e\u0301 and zero\u200bwidth",
    "code: def f(x):\n    return x ** 2  # comment\n\tif a != b: pass",
    "<|endoftext|> is text here, as is <|endoftext|>",
    "a" * 300 + " " + "ab" * 150,
    "\x00\x01 control \x7f bytes \ufeff bom",
]


@pytest.fixture(scope="module")
def gpt2_dir(data_files):
    return data_files / "gpt2"


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    return GPT2Tokenizer.from_directory(gpt2_dir)


def tiktoken_gpt2(gpt2_dir):
    """tiktoken's GPT-2 encoding built from OpenAI's files in gpt2_dir (tiktoken would download them)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def tiktoken_enc(gpt2_dir):
    return tiktoken_gpt2(gpt2_dir)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings drawn from many scripts and whitespace, to reach pre-tokenizer corners."""
    rng = random.Random(seed)
    pools = ["abcXYZ", "0123456789", " \t\n\r", "'’\"-.,!?", "éßøçñ", "αβγ", "жщы", "中文字", "ひらがな", "😀🎉🇯🇵",
             "\u0301\u200d"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def test_ids_equal_tiktoken_on_varied_text(tok, tiktoken_enc, data_files):
    texts = TEXTS + _random_texts(300) + [(data_files / "tinyshakespeare.txt").read_text()[:100_000]]
    for text in texts:
        assert tok.encode(text) == tiktoken_enc.encode_ordinary(text), repr(text[:60])


def test_decode_inverts_encode(tok):
    for text in TEXTS + _random_texts(100, seed=1):
        assert tok.decode(tok.encode(text)) == text


def test_gpt2_sizes_and_end_of_text(tok, tiktoken_enc):
    assert tok.kind == "gpt2"
    assert tok.vocab_size == 50257 == tiktoken_enc.n_vocab
    assert tok.eot_id == 50256 == tiktoken_enc.eot_token
    assert tok.decode([50256]) == "<|endoftext|>"
    # the string in a document is ordinary text, never the end-of-text id
    assert 50256 not in tok.encode("<|endoftext|>")


def test_saved_with_a_checkpoint_and_loaded_back(tok, tmp_path):
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["kind"] == "gpt2" and (tmp_path / meta["vocab_file"]).is_file() and (tmp_path / meta["merges_file"]).is_file()
    back = load_tokenizer(tmp_path)
    assert isinstance(back, GPT2Tokenizer)
    assert back.vocab == tok.vocab and back.merges == tok.merges
    assert back.encode(TEXTS[6]) == tok.encode(TEXTS[6])


def test_both_file_namings_give_the_same_tokenizer(gpt2_dir, tok, tmp_path):
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "merges.txt")
    hf_named = GPT2Tokenizer.from_directory(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    hf_named.save(a), tok.save(b)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def write_tokenizer_json(gpt2_dir, path, *, string_merges: bool = False, **pre_tokenizer) -> None:
    """GPT-2's tokenizer.json as the tokenizers library writes it (the only tokenizer file some repos ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE.from_file(vocab=str(gpt2_dir / "encoder.json"), merges=str(gpt2_dir / "vocab.bpe")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(**{"add_prefix_space": False, **pre_tokenizer})
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(path))
    if string_merges:  # tokenizers before 0.20 wrote each merge as one "a b" string
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("string_merges", [False, True])
def test_tokenizer_json_alone_gives_tiktoken_ids(gpt2_dir, tok, tiktoken_enc, tmp_path, string_merges):
    from tokenizers import Tokenizer

    write_tokenizer_json(gpt2_dir, tmp_path / "tokenizer.json", string_merges=string_merges)
    from_json = GPT2Tokenizer.from_directory(tmp_path)
    assert from_json.vocab == tok.vocab and from_json.merges == tok.merges and from_json.eot_id == 50256
    assert GPT2Tokenizer.from_path(tmp_path / "tokenizer.json").vocab == tok.vocab
    library = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS[:12] + _random_texts(100, seed=1):
        ids = from_json.encode(text)
        assert ids == tiktoken_enc.encode_ordinary(text) == library.encode(text, add_special_tokens=False).ids
        assert from_json.decode(ids) == text


def test_tokenizer_json_with_another_pipeline_is_refused(gpt2_dir, tmp_path):
    write_tokenizer_json(gpt2_dir, tmp_path / "tokenizer.json", add_prefix_space=True)
    with pytest.raises(UserError, match="prefix space"):
        GPT2Tokenizer.from_directory(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["add_prefix_space"] = False
    data["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError, match="normalizes text"):
        GPT2Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": 1, "kind": "byte"}')  # our own meta file
    with pytest.raises(UserError, match="no GPT-2 tokenizer files"):
        GPT2Tokenizer.from_directory(tmp_path)


def test_merges_recovered_from_token_bytes_alone(tok):
    """llm.c's tokenizer file has only each id's bytes: the merges must come back exactly."""
    rebuilt = GPT2Tokenizer.from_token_bytes(tok.token_bytes(), special=[tok.eot_id])
    assert rebuilt.merges == tok.merges
    assert rebuilt.vocab == tok.vocab


def test_byte_map_is_gpt2s():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    data = bytes(range(256))
    assert to_bytes(to_unicode(data)) == data


def test_bad_tokenizer_files_are_user_errors(gpt2_dir, tmp_path):
    with pytest.raises(UserError, match="no GPT-2 tokenizer files"):
        GPT2Tokenizer.from_directory(tmp_path)
    vocab = {**byte_vocab(), "ab": 256}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na c\n")
    with pytest.raises(UserError, match="vocab.json and .*merges.txt disagree: merge 1 \\('a' 'c'\\) makes 'ac'"):
        GPT2Tokenizer.from_directory(tmp_path)
    (tmp_path / "merges.txt").write_text("a b extra\n")
    with pytest.raises(UserError, match="merges.txt:1"):
        GPT2Tokenizer.from_directory(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 5}')
    with pytest.raises(UserError, match="ids must be"):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", gpt2_dir / "vocab.bpe")
    (tmp_path / "vocab.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", gpt2_dir / "vocab.bpe")


def byte_vocab() -> dict[str, int]:
    """The 256 byte tokens, in GPT-2's order."""
    return {c: i for i, c in enumerate(byte_to_unicode().values())}


@pytest.mark.parametrize("vocab, merges, problem", [
    ({"a": 0}, [], "byte 0 has no token"),
    ({**byte_vocab(), "ab": 257}, [("a", "b")], "ids must be 0..256, each once, but id 256"),
    ({**byte_vocab(), "ab": 256}, [("a", "x y")], "joins 'x y'"),
    ({**byte_vocab(), "ab": 256}, [("a", "b"), ("a", "b")], "merge 2 \\('a' 'b'\\) appears twice"),
    ({**byte_vocab(), "ab": 256, "abc": 257}, [("a", "b")],
     "tokens of V that no merge of M makes: 1 \\(the first: 'abc', id 257\\)"),
    ({**byte_vocab(), "ab": 256, "€": 257}, [("a", "b")], "no merge of M makes: 1 \\(the first: '€'"),
])
def test_vocabularies_that_disagree_with_their_merges_are_refused(vocab, merges, problem):
    with pytest.raises(UserError, match=problem):
        GPT2Tokenizer(vocab, merges, files=("V", "M"))


def test_files_saved_with_a_byte_order_mark_read_as_without(gpt2_dir, tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (gpt2_dir / name).read_bytes())
    assert GPT2Tokenizer.from_directory(tmp_path).encode("Hello world") == [15496, 995]


def test_a_complete_vocabulary_with_its_merges_passes(gpt2_dir):
    tok = GPT2Tokenizer.from_path(gpt2_dir)
    assert check_bpe(tok.vocab, tok.merges) is None
    assert check_bpe({**byte_vocab(), "ab": 256, "<pad>": 257}, [("a", "b")], special=["<pad>"]) is None
    swapped = tok.vocab
    swapped["Ġt"], swapped["Ġa"] = swapped["Ġa"], swapped["Ġt"]
    assert "GPT-2's merge 1 ('Ġ' 't') makes token 256" in check_bpe(swapped, tok.merges)
    bytes_swapped = tok.vocab
    bytes_swapped["a"], bytes_swapped["b"] = bytes_swapped["b"], bytes_swapped["a"]
    assert "GPT-2's token 'a' has id 65, not 64" in check_bpe(bytes_swapped, tok.merges)
    assert "makes: 1 (the first: " in check_bpe(tok.vocab, tok.merges[:-1])  # the last merge's token, made by none
    extended = {**tok.vocab, "<|pad|>": 50257, "<|sep|>": 50258}  # special tokens a derived vocabulary adds
    assert check_bpe(extended, tok.merges, special=["<|endoftext|>", "<|pad|>", "<|sep|>"]) is None
    moved = {**tok.vocab, "<|pad|>": 50256, "<|endoftext|>": 50257}  # a special token in GPT-2's own range
    assert "claim to be GPT-2's" in check_bpe(moved, tok.merges, special=["<|endoftext|>", "<|pad|>"])


def test_token_bytes_that_are_not_bpe_are_refused():
    singles = [bytes([b]) for b in range(256)]
    with pytest.raises(UserError, match="single bytes have no token"):
        GPT2Tokenizer.from_token_bytes(singles[:-1])
    with pytest.raises(UserError, match="not a merge of two earlier tokens"):
        GPT2Tokenizer.from_token_bytes(singles + [b"abc"])  # 'abc' needs 'ab' or 'bc' first
    with pytest.raises(UserError, match="same bytes"):
        GPT2Tokenizer.from_token_bytes(singles + [b"ab", b"ab"])
    ok = GPT2Tokenizer.from_token_bytes(singles + [b"ab", b"abc"])
    assert ok.merges == [("a", "b"), ("ab", "c")] and ok.encode("abc abd") == [257, 32, 256, 100]  # ids here are the bytes
