import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

SAMPLES = [
    "Hello, world!",
    "ASCII with digits 0123456789 and punctuation ~!@#$%^&*()_+{}|:\"<>?",
    "Grüße aus Köln; café naïve façade",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά и русский текст, עברית, العربية",
    "emoji 🙂🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore tabs\nnew lines\n\n\nand\r\nCRLF\rCR",
    "\u00a0non-breaking\u2003em space\u200bzero width\ufeffbom",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def sp(shakespeare):
    lines = shakespeare.read_text().splitlines(keepends=True)
    return SentencePieceTokenizer.train(lines, 512)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids, default=0) < 256
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_round_trip_is_exact(sp, text):
    ids = sp.encode(text)
    assert all(0 <= i < sp.vocab_size for i in ids)
    assert sp.decode(ids) == text


def test_sentencepiece_compresses_its_corpus(sp, shakespeare):
    text = shakespeare.read_text()[:20000]
    assert len(sp.encode(text)) < 0.6 * len(text)  # 256 merges on top of the bytes
    assert sp.vocab_size == 512 and sp.eot_id is not None


def test_saved_and_reloaded_models_give_identical_ids(sp, tmp_path):
    sp.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SentencePieceTokenizer)
    for text in SAMPLES:
        assert again.encode(text) == sp.encode(text)
    ByteTokenizer().save(tmp_path / "..")
    assert isinstance(load_tokenizer(tmp_path / ".."), ByteTokenizer)


def test_bad_tokenizer_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "sentencepiece", "model_file": "tokenizer.model"}')
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "klingon"}')
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)


def piece_ends(proto: bytes) -> list[int]:
    """Where each piece record of a SentencePiece model ends (field 1, length-delimited)."""
    ends, pos = [], 0
    while proto[pos] == 0x0A:
        n, k, shift = 0, pos + 1, 0
        while True:
            n |= (proto[k] & 0x7F) << shift
            shift += 7
            k += 1
            if not proto[k - 1] & 0x80:
                break
        pos = k + n
        ends.append(pos)
    return ends


@pytest.mark.parametrize("damage", ["cut after a piece", "one byte changed", "empty"])
def test_a_damaged_sentencepiece_model_is_refused_not_loaded_as_another(sp, tmp_path, damage):
    sp.save(tmp_path)
    proto = (tmp_path / "tokenizer.model").read_bytes()
    if damage == "cut after a piece":
        proto = proto[: piece_ends(proto)[300]]
    elif damage == "one byte changed":
        i = proto.index("\u2581".encode(), len(proto) // 3)
        proto = proto[: i + 3] + bytes([proto[i + 3] ^ 0x20]) + proto[i + 4 :]
    else:
        proto = b""
    (tmp_path / "tokenizer.model").write_bytes(proto)
    with pytest.raises(UserError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    # without the recorded hash (older checkpoints) a model cut short is still refused
    (tmp_path / "tokenizer.json").write_text('{"kind": "sentencepiece", "model_file": "tokenizer.model"}')
    if damage != "one byte changed":
        with pytest.raises(UserError, match="tokenizer.model is not a valid SentencePiece model"):
            load_tokenizer(tmp_path)


@pytest.mark.parametrize("meta", ['{"kind": "sentencepiece", "model_file": 7}', '[1]', '"byte"', '{"kind": ["byte"]}',
                                  '{"kind": "sentencepiece", "model_file": "../tokenizer.model"}',
                                  '{"kind": "sentencepiece", "model_sha256": 5}', "[" * 100_000])
def test_a_malformed_tokenizer_json_is_one_user_error(sp, tmp_path, meta):
    sp.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text(meta)
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_vocab_too_small_is_refused():
    with pytest.raises(UserError, match="at least 260"):
        SentencePieceTokenizer.train(["abc"], 100)


def test_vocab_smaller_than_the_corpus_alphabet_says_what_to_use():
    lines = ["".join(chr(0x4E00 + i) for i in range(j, j + 50)) + "\n" for j in range(0, 400, 50)]
    with pytest.raises(UserError, match=r"too small for this corpus's characters; use at least \d+"):
        SentencePieceTokenizer.train(lines, 300)
