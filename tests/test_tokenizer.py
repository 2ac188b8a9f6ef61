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


def test_vocab_too_small_is_refused():
    with pytest.raises(UserError, match="at least 260"):
        SentencePieceTokenizer.train(["abc"], 100)


def test_vocab_smaller_than_the_corpus_alphabet_says_what_to_use():
    lines = ["".join(chr(0x4E00 + i) for i in range(j, j + 50)) + "\n" for j in range(0, 400, 50)]
    with pytest.raises(UserError, match=r"too small for this corpus's characters; use at least \d+"):
        SentencePieceTokenizer.train(lines, 300)
