"""Every reader of untrusted bytes, fed damaged inputs that Hypothesis generates.

Files are cut short, have bits flipped, declare huge sizes, wrong dtypes or types, hold bytes that
are not UTF-8 or JSON nested deeper than Python recurses. Each reader must give a clean
``UserError`` or a correct result: never another exception, a crash, or an allocation sized by
what a header claims rather than by the file (``bounded_allocations`` makes such an allocation
fail the test). Runs are bounded (``max_examples``, no deadline on a shared machine) so that the
whole file takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import DATA  # noqa: E402
from mlx_gpt.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)
FEW = settings(FUZZ, max_examples=40)
ALLOCATION_LIMIT = 64 * 2**20  # every file here is far smaller; a bigger buffer was sized by a header


def fresh(tmp_path_factory, name: str) -> Path:
    """A new folder per example (Hypothesis runs many examples in one test call)."""
    return tmp_path_factory.mktemp(name, numbered=True)


def clean(read: Callable[[], object]) -> object | None:
    """read()'s result, or None when it raised a UserError; any other exception fails the test."""
    try:
        return read()
    except UserError as e:
        assert len(str(e).splitlines()) == 1, repr(e)  # the CLI prints it as one line
        return None


class _BoundedNumpy:
    """numpy, except that buffers above ALLOCATION_LIMIT fail the test."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, shape, dtype=float, *a, **k):
        n = int(np.prod(np.asarray(shape, dtype=object))) if np.ndim(shape) else int(shape)
        assert n * np.dtype(dtype).itemsize <= ALLOCATION_LIMIT, f"a buffer of {shape} {dtype} sized by a header"
        return self._real.empty(shape, dtype, *a, **k)

    zeros = empty

    def ascontiguousarray(self, a, *args, **kw):
        assert a.nbytes <= ALLOCATION_LIMIT, f"a copy of {a.shape} sized by a header"
        return self._real.ascontiguousarray(a, *args, **kw)


@contextmanager
def bounded_allocations():
    from mlx_gpt.formats import tensors, torch_pickle

    saved = tensors.np, torch_pickle.np
    tensors.np = torch_pickle.np = _BoundedNumpy(np)
    try:
        yield
    finally:
        tensors.np, torch_pickle.np = saved


def damaged(raw: bytes) -> st.SearchStrategy[bytes]:
    """raw cut short, with bits flipped, with a run of bytes overwritten, or with bytes inserted."""
    n = len(raw)
    cut = st.integers(0, max(n - 1, 0)).map(lambda k: raw[:k])
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8).map(
        lambda fl: _flip(raw, fl))
    overwrite = st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
        lambda p: raw[: p[0]] + p[1] + raw[p[0] + len(p[1]):])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda p: raw[: p[0]] + p[1] + raw[p[0]:])
    return st.one_of(cut, flips, overwrite, insert)


def _flip(raw: bytes, flips) -> bytes:
    b = bytearray(raw)
    for i, bit in flips:
        b[i] ^= 1 << bit
    return bytes(b)


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12), st.just("\ud800"), st.just(1e999))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
DEEP = "[" * 100_000 + "]" * 100_000


def json_text(value) -> str:
    """JSON as a file would hold it (a lone surrogate escaped, as JSON can write it), or DEEP as is."""
    return DEEP if value == DEEP else json.dumps(value, allow_nan=True)


# ---------------------------------------------------------------------------- safetensors


def _safetensors_sample(path: Path) -> dict[str, np.ndarray]:
    from mlx_gpt.formats.safetensors_file import write_safetensors
    from mlx_gpt.formats.tensors import LazyTensor

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3),
              "c": rng.standard_normal(5).astype(np.float16), "d": np.zeros((0, 2), np.float32)}
    write_safetensors(path, {k: LazyTensor.of(v) for k, v in arrays.items()}, metadata={"format": "pt"})
    return arrays


def _read_all_safetensors(path: Path) -> dict[str, np.ndarray]:
    from mlx_gpt.formats.safetensors_file import read_safetensors

    return {k: t.load() for k, t in read_safetensors(path).items()}


def _agrees_with_its_bytes(path: Path, got: dict[str, np.ndarray]) -> None:
    """Each tensor read is exactly the bytes its header entry points at, in its shape and dtype."""
    from mlx_gpt.formats.safetensors_file import CODES
    from mlx_gpt.formats.tensors import STORAGE

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    spans = []
    for name, a in got.items():
        entry = header[name]
        begin, end = entry["data_offsets"]
        assert a.shape == tuple(entry["shape"]) and a.dtype == STORAGE[CODES[entry["dtype"]]]
        assert a.tobytes() == raw[8 + n + begin : 8 + n + end]
        spans.append((begin, end))
    for (b1, e1), (b2, e2) in zip(sorted(spans), sorted(spans)[1:]):
        assert e1 <= b2 or b1 == e1 or b2 == e2, "two tensors share bytes"


@FUZZ
@given(data=st.data())
def test_safetensors_damaged_bytes(tmp_path_factory, data):
    d = fresh(tmp_path_factory, "st")
    arrays = _safetensors_sample(d / "ok.safetensors")
    raw = (d / "ok.safetensors").read_bytes()
    (d / "x.safetensors").write_bytes(data.draw(damaged(raw)))
    with bounded_allocations():
        got = clean(lambda: _read_all_safetensors(d / "x.safetensors"))
    if got is not None:
        _agrees_with_its_bytes(d / "x.safetensors", got)
    assert all(np.array_equal(v, arrays[k]) for k, v in _read_all_safetensors(d / "ok.safetensors").items())


SIZES = st.one_of(st.integers(-3, 12), st.integers(2**31, 2**64), st.floats(allow_nan=True), st.just(1e999),
                  st.booleans(), st.text(max_size=3), st.none())


@FUZZ
@given(dtype=st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "", 7, None, ["F32"]]),
       shape=st.one_of(st.lists(SIZES, max_size=3), SIZES), offsets=st.one_of(st.lists(SIZES, max_size=3), SIZES),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), extra=st.binary(max_size=64))
@example(dtype="F32", shape=[1e999, 8], offsets=[0, 32], length=None, extra=b"")
@example(dtype="F32", shape=[8.5], offsets=[0, 32], length=None, extra=bytes(32))
@example(dtype="F32", shape=[2**62, 2**62], offsets=[0, 0], length=None, extra=b"")
@example(dtype="F32", shape=[2], offsets=[0, 8], length=2**63, extra=bytes(8))
def test_safetensors_generated_headers(tmp_path_factory, dtype, shape, offsets, length, extra):
    d = fresh(tmp_path_factory, "sth")
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets},
                         "__metadata__": {"format": "pt"}}, allow_nan=True).encode()
    (d / "x.safetensors").write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + extra)
    with bounded_allocations():
        got = clean(lambda: _read_all_safetensors(d / "x.safetensors"))
    if got is not None:
        _agrees_with_its_bytes(d / "x.safetensors", got)


def test_safetensors_tensors_that_share_or_skip_bytes_are_refused(tmp_path):
    from mlx_gpt.formats.safetensors_file import read_safetensors

    for spans in ([[0, 8], [0, 8]], [[0, 8], [4, 12]], [[0, 8], [12, 20]]):
        entries = {n: {"dtype": "F32", "shape": [2], "data_offsets": s} for n, s in zip("ab", spans)}
        header = json.dumps(entries).encode()
        (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(20))
        with pytest.raises(UserError, match="x.safetensors"):
            read_safetensors(tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------- torch.save files


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> dict[str, bytes]:
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("torch")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    state = {"w": w, "wt": w.t(), "b": torch.arange(5, dtype=torch.float16), "half": w[1:3]}
    out = {}
    for legacy in (False, True):
        path = d / f"{legacy}.bin"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        out["legacy" if legacy else "zip"] = path.read_bytes()
    out["expected"] = {k: v.contiguous().numpy() for k, v in state.items()}
    return out


def _read_all_torch(path: Path) -> dict[str, np.ndarray]:
    from mlx_gpt.formats.torch_pickle import read_torch

    return {k: t.load() for k, t in read_torch(path).items()}


@FUZZ
@given(data=st.data(), layout=st.sampled_from(["zip", "legacy"]))
def test_torch_damaged_bytes(tmp_path_factory, torch_files, data, layout):
    d = fresh(tmp_path_factory, "pt")
    raw = data.draw(damaged(torch_files[layout]))
    (d / "x.bin").write_bytes(raw)
    with bounded_allocations():
        got = clean(lambda: _read_all_torch(d / "x.bin"))
    if got is not None and layout == "zip":  # the zip's CRCs cover the storages: what reads back was saved
        for k, v in got.items():
            assert np.array_equal(v, torch_files["expected"][k])


def _torch_file(path: Path, numel: int, shape, stride, legacy: bool) -> None:
    """A torch.save file of one float32 tensor "w", its pickle written opcode by opcode as torch
    writes it, declaring any storage size, shape and stride; the storage holds 16 zeros."""
    import io
    import pickle
    import zipfile

    from mlx_gpt.formats import torch_pickle

    body = io.BytesIO()
    body.write(b"\x80\x02ccollections\nOrderedDict\n)R")  # OrderedDict()
    body.write(b"X\x01\x00\x00\x00w")  # key "w"
    body.write(b"ctorch._utils\n_rebuild_tensor_v2\n(")  # the call and its arguments' mark
    body.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu")
    body.write(pickle.dumps(numel, protocol=2)[2:-1])
    body.write(b"NtQ" if legacy else b"tQ")  # the persistent id of the storage
    body.write(b"K\x00")  # storage offset 0
    for t in (shape, stride):
        body.write(pickle.dumps(tuple(t), protocol=2)[2:-1])
    body.write(b"\x89ccollections\nOrderedDict\n)RtRs.")  # requires_grad, hooks; call; setitem; stop
    raw = body.getvalue()
    if legacy:
        parts = [pickle.dumps(torch_pickle.LEGACY_MAGIC, 2), pickle.dumps(torch_pickle.LEGACY_PROTOCOL, 2),
                 pickle.dumps({"little_endian": True}, 2), raw, pickle.dumps(["0"], 2), struct.pack("<q", numel),
                 bytes(64)]
        path.write_bytes(b"".join(parts))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", raw)
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/data/0", bytes(64))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_hand_written_torch_file_reads(tmp_path, legacy):
    _torch_file(tmp_path / "x.bin", 16, (4, 4), (1, 4), legacy)
    w = _read_all_torch(tmp_path / "x.bin")["w"]
    assert w.shape == (4, 4) and w.dtype == np.float32 and not w.any()


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_naming_a_global_with_line_breaks_is_refused_on_one_line(tmp_path, legacy):
    import zipfile

    from mlx_gpt.formats.torch_pickle import read_torch

    raw = b"\x80\x02cos\x0c\x85\nsys\rtem\xe2\x80\xa8\n)R."
    if legacy:
        (tmp_path / "x.bin").write_bytes(raw)
    else:
        with zipfile.ZipFile(tmp_path / "x.bin", "w") as z:
            z.writestr("archive/data.pkl", raw)
    with pytest.raises(UserError) as e:
        read_torch(tmp_path / "x.bin")
    assert len(str(e.value).splitlines()) == 1, str(e.value)


@FEW
@given(numel=st.integers(0, 2**62), shape=st.lists(st.integers(0, 2**40), max_size=3),
       stride=st.lists(st.integers(1, 2**40), max_size=3), legacy=st.booleans())
@example(numel=16, shape=[2**40], stride=[0], legacy=False)  # repeats one storage past the memory: refused
@example(numel=2**40, shape=[2**40], stride=[1], legacy=True)
def test_torch_pickles_that_claim_huge_tensors(tmp_path_factory, numel, shape, stride, legacy):
    """A pickle may declare any storage size, shape and stride; only what the file holds is read."""
    path = fresh(tmp_path_factory, "pth") / "x.bin"
    _torch_file(path, numel, shape, stride, legacy)
    with bounded_allocations():
        got = clean(lambda: _read_all_torch(path))
    if got is not None:
        assert got["w"].shape == tuple(shape) and not got["w"].any()


# ---------------------------------------------------------------------------- llm.c files


@pytest.fixture(scope="module")
def llmc_files(tmp_path_factory) -> dict[str, bytes]:
    from mlx_gpt.formats import llmc
    from mlx_gpt.formats.tensors import LazyTensor
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
    from mlx_gpt.models.gpt import GPTConfig

    d = tmp_path_factory.mktemp("llmc")
    cfg = GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    weights = {n: LazyTensor.of(rng.standard_normal(s).astype(np.float32)) for n, s in llmc.layout(cfg, 300)}
    llmc.write_model(d / "m.bin", cfg, weights)
    singles = [bytes([b]) for b in range(256)]
    tok = GPT2Tokenizer.from_token_bytes(singles + [b"ab", b"abc", b"<|endoftext|>"], special=[258])
    return {"model": (d / "m.bin").read_bytes(), "tokenizer": llmc.tokenizer_bytes(tok)}


@FUZZ
@given(data=st.data())
def test_llmc_model_damaged_bytes(tmp_path_factory, llmc_files, data):
    from mlx_gpt.formats import llmc

    d = fresh(tmp_path_factory, "llmc")
    raw = llmc_files["model"]
    header = st.tuples(st.sampled_from([3, 5, 4, -1]), *[st.one_of(st.integers(-2, 40), st.integers(2**20, 2**31 - 1))
                                                         for _ in range(6)])
    choice = data.draw(st.one_of(damaged(raw), header.map(
        lambda h: raw[:4] + struct.pack("<7i", *h) + raw[32:])))
    (d / "x.bin").write_bytes(choice)
    with bounded_allocations():
        got = clean(lambda: {k: t.read() for k, t in llmc.read_model(d / "x.bin")[1].items()})
    if got is not None and choice[:32] == raw[:32]:
        assert len(choice) == len(raw)


@FUZZ
@given(data=st.data())
def test_llmc_tokenizer_damaged_bytes(tmp_path_factory, llmc_files, data):
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    d = fresh(tmp_path_factory, "llmt")
    raw = llmc_files["tokenizer"]
    header = st.tuples(st.sampled_from([1, 2, 3]), st.integers(-1, 2**31 - 1), st.integers(-2**31, 2**31 - 1))
    choice = data.draw(st.one_of(damaged(raw), header.map(lambda h: raw[:4] + struct.pack("<3i", *h) + raw[16:])))
    (d / "t.bin").write_bytes(choice)
    tok = clean(lambda: GPT2Tokenizer.from_llmc(d / "t.bin"))
    if tok is not None:
        for text in ("abc ab <|endoftext|>", "\u00e9\u65e5"):
            assert tok.decode(tok.encode(text)) == text


@FUZZ
@given(data=st.data())
def test_token_files_damaged_bytes(tmp_path_factory, data):
    from mlx_gpt import data as tokens_module

    d = fresh(tmp_path_factory, "tok")
    tokens_module.write_tokens(d / "ok.bin", np.arange(50, dtype=np.int64) % 300, 300)
    raw = (d / "ok.bin").read_bytes()
    header = st.tuples(st.sampled_from([20240520, 20240801, 1]), st.sampled_from([1, 7, 2]),
                       st.integers(-2**31, 2**31 - 1))
    choice = data.draw(st.one_of(damaged(raw), header.map(lambda h: struct.pack("<3i", *h) + raw[12:])))
    (d / "x.bin").write_bytes(choice)
    got = clean(lambda: np.asarray(tokens_module.open_tokens(d / "x.bin")))
    if got is not None:
        info = tokens_module.read_header(d / "x.bin")
        assert got.size == info.count and len(choice) == tokens_module.HEADER_BYTES + got.nbytes


# ---------------------------------------------------------------------------- tokenizer files


@pytest.fixture(scope="module")
def small_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE small enough to mutate quickly: GPT-2's bytes and its first 300 merges."""
    from mlx_gpt.gpt2_tokenizer import byte_to_unicode

    vocab = {c: i for i, c in enumerate(byte_to_unicode().values())}
    lines = (DATA / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:301]
    merges = [tuple(line.split(" ")) for line in lines]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _expected_pairs(merges_text: str) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(merges_text.split("\n"), 1):
        line = line.rstrip("\r")
        if line and not (n == 1 and line.startswith("#version")):
            out.append(tuple(line.split(" ")))
    return out


@FUZZ
@given(data=st.data())
def test_gpt2_vocab_and_merges_files_damaged(tmp_path_factory, small_bpe, data):
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer, check_bpe

    vocab, merges = small_bpe
    d = fresh(tmp_path_factory, "bpe")
    vocab_raw = json.dumps(vocab, ensure_ascii=False).encode()
    merges_raw = ("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n").encode()
    which = data.draw(st.sampled_from(["vocab", "merges", "both", "entries"]))
    if which == "entries":  # whole entries dropped, ids swapped or merges lines removed
        v = dict(vocab)
        for k in data.draw(st.lists(st.sampled_from(sorted(v)), max_size=3)):
            v.pop(k, None)
        if data.draw(st.booleans()):
            a, b = data.draw(st.lists(st.sampled_from(sorted(vocab)), min_size=2, max_size=2, unique=True))
            if a in v and b in v:
                v[a], v[b] = v[b], v[a]
        keep = data.draw(st.lists(st.booleans(), min_size=len(merges), max_size=len(merges)))
        vocab_raw = json.dumps(v, ensure_ascii=False).encode()
        merges_raw = ("\n".join(f"{a} {b}" for (a, b), k in zip(merges, keep) if k) + "\n").encode()
    else:
        if which in ("vocab", "both"):
            vocab_raw = data.draw(damaged(vocab_raw))
        if which in ("merges", "both"):
            merges_raw = data.draw(damaged(merges_raw))
    (d / "vocab.json").write_bytes(vocab_raw)
    (d / "merges.txt").write_bytes(merges_raw)
    tok = clean(lambda: GPT2Tokenizer.from_directory(d))
    if tok is not None:  # what loads is exactly what the files say, and consistent
        assert tok.vocab == json.loads(vocab_raw)
        assert tok.merges == _expected_pairs(merges_raw.decode("utf-8"))
        assert check_bpe(tok.vocab, tok.merges) is None
        text = "the cat ate \u00e9t\u00e9 \U0001f600 <|endoftext|>\n\t42"
        assert tok.decode(tok.encode(text)) == text


def _mutate_json(value, path: list, new):
    """value with the node at path (a list of keys/indices) replaced by new."""
    if not path:
        return new
    if isinstance(value, dict):
        value = dict(value)
    else:
        value = list(value)
    value[path[0]] = _mutate_json(value[path[0]], path[1:], new)
    return value


def _json_paths(value, depth: int = 0) -> list[list]:
    out: list[list] = [[]]
    if depth > 3:
        return out
    items = value.items() if isinstance(value, dict) else enumerate(value[:3]) if isinstance(value, list) else []
    for k, v in items:
        out += [[k, *p] for p in _json_paths(v, depth + 1)]
    return out


@pytest.fixture(scope="module")
def hf_tokenizer_json(small_bpe, tmp_path_factory) -> dict:
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    vocab, merges = small_bpe
    tok = GPT2Tokenizer(vocab, merges)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok._tok.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>", "special": True}]
    return data


@FUZZ
@given(data=st.data())
def test_hf_tokenizer_json_damaged(tmp_path_factory, hf_tokenizer_json, data):
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    d = fresh(tmp_path_factory, "hft")
    paths = [p for p in _json_paths(hf_tokenizer_json) if p[:2] != ["model", "vocab"] or len(p) < 3]
    path = data.draw(st.sampled_from(paths))
    new = data.draw(JSON_VALUES)
    text = json_text(_mutate_json(hf_tokenizer_json, path, new))
    if data.draw(st.booleans()):
        text = data.draw(damaged(text.encode())).decode("utf-8", "surrogateescape")
    (d / "tokenizer.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    tok = clean(lambda: GPT2Tokenizer.from_path(d / "tokenizer.json"))
    if tok is not None:
        sample = "the cat \u00e9t\u00e9 \U0001f600"
        assert tok.decode(tok.encode(sample)) == sample


@pytest.fixture(scope="module")
def sp_saved(tmp_path_factory) -> Path:
    from mlx_gpt.tokenizer import SentencePieceTokenizer

    lines = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."] * 30
    d = tmp_path_factory.mktemp("sp")
    SentencePieceTokenizer.train(lines, 300).save(d)
    return d


@FEW
@given(data=st.data())
def test_saved_tokenizer_files_damaged(tmp_path_factory, sp_saved, data):
    from mlx_gpt.tokenizer import load_tokenizer

    d = fresh(tmp_path_factory, "spd")
    shutil.copytree(sp_saved, d, dirs_exist_ok=True)
    good = load_tokenizer(sp_saved)
    target = data.draw(st.sampled_from(["tokenizer.model", "tokenizer.json", "meta values"]))
    if target == "meta values":
        meta = json.loads((d / "tokenizer.json").read_text())
        meta[data.draw(st.sampled_from(["kind", "model_file", "model_sha256", "version"]))] = data.draw(JSON_VALUES)
        (d / "tokenizer.json").write_text(json.dumps(meta, allow_nan=True))
    else:
        (d / target).write_bytes(data.draw(damaged((d / target).read_bytes())))
    tok = clean(lambda: load_tokenizer(d))
    if tok is not None and tok.kind == "sentencepiece":
        text = "The quick brown fox, to be or not."
        assert tok.encode(text) == good.encode(text)  # a model that loads is the model that was saved


# ---------------------------------------------------------------------------- TOML config files


def _config_class():
    from mlx_gpt import train

    return train.TrainConfig


TOML_VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
                        st.text(max_size=8).map(json.dumps), st.sampled_from(["nan", "inf", "-inf", '"a\\u0000b"',
                                                                                "[1, 2]", "{a = 1}", "1979-05-27"]))


@FUZZ
@given(lines=st.lists(st.tuples(st.sampled_from(["max_iters", "max-iters", "learning_rate", "learning-rate", "out",
                                                 "dtype", "dropout", "seed", "bias", "nonsense", "[train]"]),
                                TOML_VALUES), max_size=5),
       junk=st.one_of(st.none(), st.binary(max_size=20)))
@example(lines=[("max_iters", 5), ("max-iters", 500)], junk=None)
@example(lines=[("learning_rate", "nan")], junk=None)
@example(lines=[("out", '"a\\u0000b"')], junk=None)
@example(lines=[], junk=b"x = " + b"[" * 50_000)
def test_toml_config_files(tmp_path_factory, lines, junk):
    from mlx_gpt import flags

    d = fresh(tmp_path_factory, "toml")
    text = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in lines).encode() + b"\n"
    (d / "c.toml").write_bytes(text + (junk or b""))
    got = clean(lambda: flags.read_toml(d / "c.toml", _config_class()))
    if got is not None:
        for name, value in got.items():
            assert "-" not in name
            if isinstance(value, float):
                assert np.isfinite(value), (name, value)
            if isinstance(value, str):
                assert "\0" not in value
        keys = [k.replace("-", "_") for k, _ in lines]
        assert len(set(keys)) == len(keys), "a setting given twice was accepted"


# ---------------------------------------------------------------------------- jsonl: HellaSwag and metrics


GOOD_QUESTION = {"ctx": "the fox", "endings": ["jumps", "sleeps"], "label": 0}
GOOD_METRICS = [{"step": 0, "val_loss": 5.5, "train_loss": 5.6}, {"step": 1, "loss": 5.4, "lr": 1e-3}]


def _lines(data, good: dict) -> bytes:
    kinds = st.one_of(
        st.just(json.dumps(good)),
        JSON_VALUES.map(json_text),
        st.builds(lambda k, v: json.dumps({**good, k: v}, allow_nan=True),
                  st.sampled_from(sorted(good) + ["ctx", "endings", "label", "step", "loss", "lr", "val_loss"]),
                  JSON_VALUES),
        st.just(DEEP), st.just('{"ctx": "a\\ud800", "endings": ["x", "y"], "label": 0}'),
        st.just('{"ctx": "a\u2028b", "endings": ["x", "y\u0085z"], "label": 1, "step": 2, "loss": 1.0}'),
    )
    lines = data.draw(st.lists(kinds, min_size=1, max_size=4))
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):
        raw = data.draw(damaged(raw))
    return raw


@FUZZ
@given(data=st.data())
def test_hellaswag_jsonl(tmp_path_factory, data):
    from mlx_gpt.eval import read_questions
    from mlx_gpt.tokenizer import ByteTokenizer

    d = fresh(tmp_path_factory, "hs")
    raw = _lines(data, GOOD_QUESTION)
    (d / "hs.jsonl").write_bytes(raw)
    got = clean(lambda: read_questions(d / "hs.jsonl", ByteTokenizer()))
    if got is not None:
        records = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]
        assert len(got) == len(records)
        for q, r in zip(got, records):
            assert bytes(q.context).decode() == r["ctx"] and q.label == r["label"]
            assert [bytes(e).decode() for e in q.endings] == [" " + e for e in r["endings"]]


@FUZZ
@given(data=st.data())
def test_metrics_jsonl(tmp_path_factory, data):
    from mlx_gpt.plot import read_run

    d = fresh(tmp_path_factory, "run")
    raw = "\n".join(json.dumps(m) for m in GOOD_METRICS).encode() + b"\n" + _lines(data, GOOD_METRICS[1])
    (d / "metrics.jsonl").write_bytes(raw)
    (d / "config.json").write_text(json_text(data.draw(st.one_of(
        JSON_VALUES, st.builds(lambda b: {"train": {"batch_size": b}, "model": {"block_size": 8}}, JSON_LEAVES)))))
    got = clean(lambda: read_run(d))
    if got is not None:
        records = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]
        assert [p for p in got.train] == [(r["step"], float(r["loss"])) for r in records if "loss" in r]
        assert got.tokens_per_step is None or got.tokens_per_step >= 0


# ---------------------------------------------------------------------------- Hugging Face config.json


@FUZZ
@given(key=st.sampled_from(["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "activation_function",
                            "layer_norm_epsilon", "model_type", "n_inner", "tie_word_embeddings", "format"]),
       value=JSON_VALUES, whole=st.booleans())
@example(key="activation_function", value=["gelu_new"], whole=False)
@example(key="n_embd", value=DEEP, whole=True)
@example(key="n_head", value=3, whole=False)
def test_hf_config_json(tmp_path_factory, key, value, whole):
    from mlx_gpt.formats import hf

    d = fresh(tmp_path_factory, "hfc")
    config = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 16, "vocab_size": 300}
    (d / "config.json").write_text(json_text(value) if whole else json.dumps({**config, key: value}, allow_nan=True))
    cfg = clean(lambda: hf.read_config(d))
    if cfg is not None:
        assert dataclasses.is_dataclass(cfg) and cfg.n_embd % cfg.n_head == 0


SHARDS = st.one_of(st.text(max_size=12), st.sampled_from(["a.safetensors", "../a.safetensors", "a\0b", "", ".", ".."]),
                   JSON_LEAVES)


@FUZZ
@given(index=st.one_of(JSON_VALUES, st.just(DEEP), st.builds(
    lambda m: {"weight_map": m}, st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), SHARDS, max_size=5))))
@example(index={"weight_map": {"a": "a\0b"}})
@example(index={"weight_map": {"a": "a.safetensors", "b": "a.safetensors", "c": "a.safetensors", "d": "a.safetensors"}})
def test_hf_shard_index(tmp_path_factory, index):
    from mlx_gpt.formats import hf

    d = fresh(tmp_path_factory, "shards")
    arrays = _safetensors_sample(d / "a.safetensors")
    (d / "model.safetensors.index.json").write_text(json_text(index))
    got = clean(lambda: {k: t.load() for k, t in hf.read_weights(d).items()})
    if got is not None:
        assert set(index["weight_map"]) <= set(got) and all(np.array_equal(got[k], arrays[k]) for k in got)


# ---------------------------------------------------------------------------- corpora and example sets

GOOD_RECORDS = [{"text": "first document\nwith two lines"}, {"text": "second \u00e9\u65e5"}, {"text": ""}]


def _compress(raw: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        import gzip

        return gzip.compress(raw)
    if suffix == ".zst":
        zstd = pytest.importorskip("zstandard")
        return zstd.ZstdCompressor(write_checksum=True).compress(raw)
    return raw


@FUZZ
@given(data=st.data(), suffix=st.sampled_from(["", ".gz", ".zst"]))
@example(data=None, suffix="")  # a line of JSON nested deeper than Python recurses
def test_jsonl_corpus_files(tmp_path_factory, data, suffix):
    from mlx_gpt.sources import jsonl_records

    d = fresh(tmp_path_factory, "jsonl")
    raw = "".join(json.dumps(r) + "\n" for r in GOOD_RECORDS).encode()
    if data is None:
        raw += DEEP.encode() + b"\n"
    elif suffix == "":
        raw = _lines(data, GOOD_RECORDS[0])
    packed = _compress(raw, suffix)
    if data is not None and suffix:
        packed = data.draw(st.one_of(st.just(packed), damaged(packed)))
    path = d / f"c.jsonl{suffix}"
    path.write_bytes(packed)
    got = clean(lambda: list(jsonl_records(path)))
    if got is not None and packed == _compress(raw, suffix):  # undamaged: exactly the file's records
        lines = [ln for ln in raw.decode("utf-8").split("\n")]
        assert got == [(n, json.loads(ln)) for n, ln in enumerate(lines, 1) if ln.strip()]


@FEW
@given(data=st.data())
def test_parquet_corpus_files(tmp_path_factory, data):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from mlx_gpt.sources import _parquet_texts

    d = fresh(tmp_path_factory, "pq")
    texts = [r["text"] for r in GOOD_RECORDS] * 3
    pq.write_table(pa.table({"text": texts}), d / "ok.parquet")
    raw = (d / "ok.parquet").read_bytes()
    choice = data.draw(damaged(raw))
    (d / "x.parquet").write_bytes(choice)
    got = clean(lambda: list(_parquet_texts(d / "x.parquet", "text")))
    if got is not None:
        assert all(isinstance(t, str) for t in got) and len(got) <= len(texts) * 2


GOOD_EXAMPLES = [{"prompt": "Add 2 and 3:", "completion": " 5"}, {"prompt": "Reverse ab:", "completion": " ba"}]
GOOD_CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}]}]


@FUZZ
@given(data=st.data(), good=st.sampled_from([GOOD_EXAMPLES, GOOD_CHATS, GOOD_RECORDS]))
def test_example_files(tmp_path_factory, data, good):
    from mlx_gpt.examples import Fields, examples_of
    from mlx_gpt.tokenizer import ByteTokenizer

    d = fresh(tmp_path_factory, "ex")
    raw = "".join(json.dumps(r) + "\n" for r in good).encode() + _lines(data, good[0])
    (d / "train.jsonl").write_bytes(raw)
    got = clean(lambda: list(examples_of(d / "train.jsonl", ByteTokenizer(), None, Fields())))
    if got is not None:
        for number, ids, mask in got:
            assert len(ids) == len(mask) and all(0 <= i < 256 for i in ids) and set(mask) <= {0, 1}


@FEW
@given(data=st.data())
def test_shard_directories(tmp_path_factory, data):
    from mlx_gpt import data as tokens_module

    d = fresh(tmp_path_factory, "shards")
    rng = np.random.default_rng(0)
    for split, k in (("val", 0), ("train", 1), ("train", 2), ("train", 3)):
        tokens_module.write_tokens(d / f"c_{split}_{k:06d}.bin", rng.integers(0, 300, 500), 300)
    victim = d / f"c_train_{data.draw(st.integers(1, 3)):06d}.bin"
    raw = victim.read_bytes()
    victim.write_bytes(data.draw(st.one_of(damaged(raw), st.just(b""))))
    ds = clean(lambda: tokens_module.load_dataset(d))
    if ds is not None:
        for f in ds.train_files:
            info = tokens_module.read_header(f)
            assert f.stat().st_size == tokens_module.HEADER_BYTES + info.count * np.dtype(info.dtype).itemsize
