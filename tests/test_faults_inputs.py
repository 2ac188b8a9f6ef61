"""Damaged input files through every CLI that reads them, as a careless download or a dying disk leaves them.

Each case damages one file a command reads (tokenizer files, weights, HellaSwag and metrics jsonl, a
TOML config, the cached C++ kernels) and runs the command in a subprocess. A damaged file is one
``error:`` line naming it (exit 2, no traceback, no signal death), or, where nothing the user asked
for is lost (the kernel cache), the command's correct result; never silently different ids or values.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import DATA, ROOT
from test_faults import corpus_text, expect_error, expect_ok

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "1", "--sample-tokens", "4", "--max-iters", "2", "--eval-interval", "2"]
GPT2 = DATA / "gpt2"


def cli(module: str, *args, cwd: Path, extra_env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, *(["-m", module] if not module.endswith(".py") else [module]), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


class Base:
    """A tiny SentencePiece run, a tiny Hugging Face GPT-2 directory and llm.c files, copied by each case."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = root / "corpus.txt"
        self.corpus.write_text(corpus_text())
        self.run = root / "run"
        proc = cli("mlx_gpt.train", "--data", self.corpus, "--data-dir", root / "data", "--tokenizer", "sp:300",
                   "--out", self.run, *TINY, cwd=root)
        assert proc.returncode == 0, proc.stderr
        self.hf = root / "hf"
        self.llmc = root / "llmc"
        self._write_gpt2_files()

    def _write_gpt2_files(self) -> None:
        """A 1-layer GPT-2 as Hugging Face and llm.c write it, with GPT-2's real tokenizer."""
        from mlx_gpt.formats import hf, llmc
        from mlx_gpt.formats.tensors import LazyTensor
        from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
        from mlx_gpt.models.gpt import GPTConfig

        cfg = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=8)
        rng = np.random.default_rng(0)
        weights = {name: LazyTensor.of((0.02 * rng.standard_normal(shape)).astype(np.float32))
                   for name, shape in llmc.layout(cfg, cfg.vocab_size)}
        tok = GPT2Tokenizer.from_path(GPT2)
        self.hf.mkdir()
        hf.write_directory(self.hf, cfg, weights, tok)
        self.llmc.mkdir()
        padded = dict(weights)
        llmc.write_model(self.llmc / "gpt2.bin", cfg, padded)
        llmc.write_tokenizer(self.llmc / "gpt2_tokenizer.bin", tok)

    def copy(self, what: Path, dest: Path) -> Path:
        shutil.copytree(what, dest)
        return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return Base(tmp_path_factory.mktemp("base"))


CASES: dict[str, Callable] = {}


def case(fn: Callable) -> Callable:
    CASES[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------- GPT-2's tokenizer files


def gpt2_dir(t: Path) -> Path:
    d = t / "gpt2"
    shutil.copytree(GPT2, d)
    return d


def prepare_with(t: Path, b: Base, tokenizer: Path) -> subprocess.CompletedProcess:
    return cli("mlx_gpt.prepare", b.corpus, "--tokenizer", f"gpt2:{tokenizer}", "--data-dir", t / "data", cwd=t)


def merges_lines(d: Path) -> list[str]:
    return (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")


def edit_encoder(d: Path, edit: Callable[[dict], dict]) -> None:
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    (d / "encoder.json").write_text(json.dumps(edit(vocab), ensure_ascii=False), encoding="utf-8")


@case
def gpt2_merges_cut_in_half(t, b):
    d = gpt2_dir(t)
    lines = merges_lines(d)
    (d / "vocab.bpe").write_text("\n".join(lines[: len(lines) // 2]) + "\n", encoding="utf-8")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_empty(t, b):
    d = gpt2_dir(t)
    (d / "vocab.bpe").write_bytes(b"")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_only_the_version_line(t, b):
    d = gpt2_dir(t)
    (d / "vocab.bpe").write_text("#version: 0.2\n")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_a_line_repeated(t, b):
    d = gpt2_dir(t)
    lines = merges_lines(d)
    lines.insert(100, lines[30000])
    (d / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_two_lines_swapped(t, b):
    d = gpt2_dir(t)
    lines = merges_lines(d)
    lines[1], lines[2] = lines[2], lines[1]
    (d / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_cut_inside_a_line(t, b):
    d = gpt2_dir(t)
    raw = (d / "vocab.bpe").read_bytes()
    cut = raw.index(b" ", len(raw) // 2) + 1  # "a " : a merge of one token
    (d / "vocab.bpe").write_bytes(raw[:cut])
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_merges_not_utf8(t, b):
    d = gpt2_dir(t)
    (d / "vocab.bpe").write_bytes((d / "vocab.bpe").read_bytes()[:5000] + b"\xff\xfe a\n")
    expect_error(prepare_with(t, b, d), "vocab.bpe")


@case
def gpt2_encoder_entry_missing(t, b):
    d = gpt2_dir(t)
    edit_encoder(d, lambda v: {k: i for k, i in v.items() if k != "Ġt"})
    expect_error(prepare_with(t, b, d), "encoder.json")


@case
def gpt2_encoder_last_token_missing_ids_renumbered(t, b):
    d = gpt2_dir(t)

    def drop(v):
        out = {k: i for k, i in v.items() if i != 50255}
        out["<|endoftext|>"] = 50255
        return out

    edit_encoder(d, drop)
    expect_error(prepare_with(t, b, d), "encoder.json")


@case
def gpt2_encoder_two_ids_swapped(t, b):
    d = gpt2_dir(t)

    def swap(v):
        v["Ġt"], v["Ġa"] = v["Ġa"], v["Ġt"]
        return v

    edit_encoder(d, swap)
    expect_error(prepare_with(t, b, d), "encoder.json")


@case
def gpt2_encoder_a_token_no_merge_makes(t, b):
    d = gpt2_dir(t)
    edit_encoder(d, lambda v: {**v, "Ġzzqx": len(v)})
    expect_error(prepare_with(t, b, d), "encoder.json")


@case
def gpt2_encoder_key_twice(t, b):
    d = gpt2_dir(t)
    raw = json.dumps(json.loads((d / "encoder.json").read_text(encoding="utf-8")), ensure_ascii=False)
    assert '"Ġa": 257' in raw
    (d / "encoder.json").write_text(raw.replace('"Ġa": 257', '"Ġt": 257'), encoding="utf-8")
    expect_error(prepare_with(t, b, d), "encoder.json")


@case
def gpt2_encoder_cut_in_half(t, b):
    d = gpt2_dir(t)
    raw = (d / "encoder.json").read_bytes()
    (d / "encoder.json").write_bytes(raw[: len(raw) // 2])
    expect_error(prepare_with(t, b, d), "encoder.json")


def hf_tokenizer_json(t: Path, edit: Callable[[dict], None]) -> Path:
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_path(GPT2)
    path = t / "tokenizer.json"  # Hugging Face's own file, as the tokenizers library writes it
    tok._tok.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [{"id": 50256, "content": "<|endoftext|>", "special": True}]
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@case
def gpt2_tokenizer_json_an_added_token_not_an_object(t, b):
    path = hf_tokenizer_json(t, lambda d: d["added_tokens"].append("<pad>"))
    expect_error(prepare_with(t, b, path), "tokenizer.json")


@case
def gpt2_tokenizer_json_normalizer_not_an_object(t, b):
    path = hf_tokenizer_json(t, lambda d: d.update(normalizer="NFC"))
    expect_error(prepare_with(t, b, path), "tokenizer.json")


@case
def gpt2_tokenizer_json_merges_cut_in_half(t, b):
    path = hf_tokenizer_json(t, lambda d: d["model"].update(merges=d["model"]["merges"][:25000]))
    expect_error(prepare_with(t, b, path), "tokenizer.json")


@case
def llmc_tokenizer_truncated(t, b):
    path = t / "gpt2_tokenizer.bin"
    raw = (b.llmc / "gpt2_tokenizer.bin").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    expect_error(prepare_with(t, b, path), "gpt2_tokenizer.bin")


@case
def gpt2_files_intact_prepare(t, b):
    proc = prepare_with(t, b, gpt2_dir(t))
    expect_ok(proc)


# ---------------------------------------------------------------------------- a checkpoint's tokenizer files


def generate(t: Path, run: Path, **kw) -> subprocess.CompletedProcess:
    return cli("mlx_gpt.generate", "--checkpoint", run, "--prompt", "the", "--max-new-tokens", "8", "--seed", "1",
               "--temperature", "0", cwd=t, **kw)


@case
def sp_model_cut_after_a_piece(t, b):
    run = b.copy(b.run, t / "run")
    raw = (run / "tokenizer.model").read_bytes()
    # the model is a protobuf: field 1 (pieces) repeated, each "0a <len> ..."; cut after the 100th
    pos = 0
    for _ in range(100):
        assert raw[pos] == 0x0A
        n, k = raw[pos + 1], 2
        if n & 0x80:
            n, k = (n & 0x7F) | (raw[pos + 2] << 7), 3
        pos += k + n
    (run / "tokenizer.model").write_bytes(raw[:pos])
    expect_error(generate(t, run), "tokenizer.model")


@case
def sp_model_one_byte_changed(t, b):
    run = b.copy(b.run, t / "run")
    raw = bytearray((run / "tokenizer.model").read_bytes())
    i = raw.index("\u2581".encode(), len(raw) // 2)  # a piece that begins a word, past the byte pieces
    raw[i + 3] ^= 0x20  # its first letter's case
    (run / "tokenizer.model").write_bytes(bytes(raw))
    expect_error(generate(t, run), "tokenizer.model")


@case
def sp_model_empty(t, b):
    run = b.copy(b.run, t / "run")
    (run / "tokenizer.model").write_bytes(b"")
    expect_error(generate(t, run), "tokenizer.model")


@case
def tokenizer_meta_model_file_not_a_string(t, b):
    run = b.copy(b.run, t / "run")
    meta = json.loads((run / "tokenizer.json").read_text())
    meta["model_file"] = 7
    (run / "tokenizer.json").write_text(json.dumps(meta))
    expect_error(generate(t, run), "tokenizer.json")


@case
def tokenizer_meta_model_file_outside_the_checkpoint(t, b):
    run = b.copy(b.run, t / "run")
    meta = json.loads((run / "tokenizer.json").read_text())
    shutil.copy(run / "tokenizer.model", t / "elsewhere.model")
    meta["model_file"] = "../elsewhere.model"
    (run / "tokenizer.json").write_text(json.dumps(meta))
    expect_error(generate(t, run), "tokenizer.json")


@case
def gpt2_checkpoint_merges_cut_in_half(t, b):
    run = t / "imported"
    expect_ok(cli(str(ROOT / "tools" / "convert.py"), b.hf, "--out", run, "--quiet", cwd=t))
    lines = (run / "merges.txt").read_text(encoding="utf-8").split("\n")
    (run / "merges.txt").write_text("\n".join(lines[: len(lines) // 2]), encoding="utf-8")
    expect_error(generate(t, run), "merges.txt")


@case
def gpt2_checkpoint_meta_names_a_list(t, b):
    run = t / "imported"
    expect_ok(cli(str(ROOT / "tools" / "convert.py"), b.hf, "--out", run, "--quiet", cwd=t))
    meta = json.loads((run / "tokenizer.json").read_text())
    meta["vocab_file"] = ["vocab.json"]
    (run / "tokenizer.json").write_text(json.dumps(meta))
    expect_error(generate(t, run), "tokenizer.json")


# ---------------------------------------------------------------------------- HellaSwag jsonl


def hellaswag(t: Path, b: Base, lines: list[bytes]) -> subprocess.CompletedProcess:
    path = t / "hs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return cli("mlx_gpt.eval", "--checkpoint", b.run, "--hellaswag", path, cwd=t)


GOOD_QUESTION = b'{"ctx": "the fox", "endings": ["jumps", "sleeps"], "label": 0}'


@case
def hellaswag_lone_surrogate_in_ctx(t, b):
    expect_error(hellaswag(t, b, [GOOD_QUESTION, b'{"ctx": "the \\ud800 fox", "endings": ["a", "b"], "label": 1}']),
                 "hs.jsonl:2")


@case
def hellaswag_lone_surrogate_in_an_ending(t, b):
    expect_error(hellaswag(t, b, [b'{"ctx": "the fox", "endings": ["a\\udfff", "b"], "label": 1}']), "hs.jsonl:1")


@case
def hellaswag_line_nested_too_deep(t, b):
    expect_error(hellaswag(t, b, [GOOD_QUESTION, b"[" * 100_000 + b"]" * 100_000]), "hs.jsonl:2")


@case
def hellaswag_not_utf8(t, b):
    expect_error(hellaswag(t, b, [GOOD_QUESTION, b'{"ctx": "\xff\xfe"}']), "hs.jsonl")


@case
def hellaswag_label_true(t, b):
    expect_error(hellaswag(t, b, [b'{"ctx": "the fox", "endings": ["a", "b"], "label": true}']), "hs.jsonl:1")


@case
def hellaswag_good_file_scores(t, b):
    proc = hellaswag(t, b, [GOOD_QUESTION, b"", GOOD_QUESTION])
    expect_ok(proc)
    assert "2 and" in proc.stdout or "/2" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------- metrics.jsonl read by plot


def plot_with(t: Path, b: Base, line: bytes, config: bytes | None = None) -> subprocess.CompletedProcess:
    run = b.copy(b.run, t / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(line + b"\n")
    if config is not None:
        (run / "config.json").write_bytes(config)
    return cli("mlx_gpt.plot", run, "--out", t / "curves.png", cwd=t)


@case
def plot_loss_not_a_number(t, b):
    expect_error(plot_with(t, b, b'{"step": 3, "loss": "abc"}'), "metrics.jsonl")


@case
def plot_loss_null(t, b):
    expect_error(plot_with(t, b, b'{"step": 3, "loss": null}'), "metrics.jsonl")


@case
def plot_step_infinite(t, b):
    expect_error(plot_with(t, b, b'{"step": 1e999, "loss": 1.0}'), "metrics.jsonl")


@case
def plot_metrics_not_utf8(t, b):
    expect_error(plot_with(t, b, b'{"step": 3, "loss": 1.0, "note": "\xff"}'), "metrics.jsonl")


@case
def plot_metrics_nested_deep(t, b):
    expect_error(plot_with(t, b, b"[" * 100_000), "metrics.jsonl")


@case
def plot_config_batch_size_infinite(t, b):
    run_config = json.loads((b.run / "config.json").read_text())
    run_config.setdefault("train", {})["batch_size"] = float("inf")
    proc = plot_with(t, b, b"", json.dumps(run_config).encode())
    expect_ok(proc)
    assert (t / "curves.png").is_file()


# ---------------------------------------------------------------------------- TOML config files


def train_config(t: Path, b: Base, text: bytes) -> subprocess.CompletedProcess:
    (t / "c.toml").write_bytes(text)
    return cli("mlx_gpt.train", "--config", t / "c.toml", "--data", b.corpus, "--data-dir", t / "data",
               "--out", t / "out", *TINY, cwd=t)


@case
def toml_two_spellings_of_one_setting(t, b):
    expect_error(train_config(t, b, b"max_iters = 5\nmax-iters = 500\n"), "c.toml")
    assert not (t / "out").exists()


@case
def toml_learning_rate_nan(t, b):
    expect_error(train_config(t, b, b"learning_rate = nan\n"), "c.toml")


@case
def toml_string_with_nul(t, b):
    expect_error(train_config(t, b, b'init = "a\\u0000b"\n'), "c.toml")


@case
def toml_arrays_nested_deep(t, b):
    expect_error(train_config(t, b, b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n"), "c.toml")


@case
def toml_not_utf8(t, b):
    expect_error(train_config(t, b, b'out = "\xff"\n'), "c.toml")


# ---------------------------------------------------------------------------- weights: safetensors, torch, llm.c


def convert_hf(t: Path, hf: Path) -> subprocess.CompletedProcess:
    return cli(str(ROOT / "tools" / "convert.py"), hf, "--out", t / "imported", "--quiet", cwd=t)


def edit_safetensors_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@case
def safetensors_shape_infinite(t, b):
    hf = b.copy(b.hf, t / "hf")
    edit_safetensors_header(hf / "model.safetensors", lambda h: h["transformer.wte.weight"].update(shape=[1e999, 8]))
    expect_error(convert_hf(t, hf), "model.safetensors")


@case
def safetensors_shape_fractional(t, b):
    hf = b.copy(b.hf, t / "hf")
    edit_safetensors_header(hf / "model.safetensors", lambda h: h["transformer.ln_f.weight"].update(shape=[8.5]))
    expect_error(convert_hf(t, hf), "model.safetensors")


@case
def safetensors_two_tensors_share_bytes(t, b):
    hf = b.copy(b.hf, t / "hf")

    def alias(h):
        h["transformer.ln_f.bias"]["data_offsets"] = h["transformer.ln_f.weight"]["data_offsets"]

    edit_safetensors_header(hf / "model.safetensors", alias)
    expect_error(convert_hf(t, hf), "model.safetensors")


@case
def safetensors_header_length_huge(t, b):
    hf = b.copy(b.hf, t / "hf")
    raw = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    expect_error(convert_hf(t, hf), "model.safetensors")


def torch_dir(t: Path, b: Base, legacy: bool) -> Path:
    torch = pytest.importorskip("torch")
    from mlx_gpt.formats.safetensors_file import read_safetensors

    hf = b.copy(b.hf, t / "hf")
    state = {k: torch.from_numpy(v.load().copy()) for k, v in read_safetensors(hf / "model.safetensors").items()}
    (hf / "model.safetensors").unlink()
    torch.save(state, hf / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return hf


def rewrite_zip(path: Path, change: Callable[[str, bytes], tuple[bytes, int]]) -> None:
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries:
            data, method = change(name, data)
            z.writestr(zipfile.ZipInfo(name), data, compress_type=method)


@case
def torch_zip_byteorder_not_text(t, b):
    hf = torch_dir(t, b, legacy=False)
    rewrite_zip(hf / "pytorch_model.bin",
                lambda n, d: (b"\xff\xfe" if n.endswith("/byteorder") else d, zipfile.ZIP_STORED))
    expect_error(convert_hf(t, hf), "pytorch_model.bin")


@case
def torch_zip_compressed_pickle_damaged(t, b):
    hf = torch_dir(t, b, legacy=False)
    rewrite_zip(hf / "pytorch_model.bin",
                lambda n, d: (d, zipfile.ZIP_DEFLATED if n.endswith("data.pkl") else zipfile.ZIP_STORED))
    raw = bytearray((hf / "pytorch_model.bin").read_bytes())
    with zipfile.ZipFile(hf / "pytorch_model.bin") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 2, start + info.compress_size - 2):
        raw[k] ^= 0x5A
    (hf / "pytorch_model.bin").write_bytes(bytes(raw))
    expect_error(convert_hf(t, hf), "pytorch_model.bin")


@case
def torch_legacy_truncated(t, b):
    hf = torch_dir(t, b, legacy=True)
    raw = (hf / "pytorch_model.bin").read_bytes()
    (hf / "pytorch_model.bin").write_bytes(raw[: len(raw) - 1000])
    expect_error(convert_hf(t, hf), "pytorch_model.bin")


@case
def llmc_model_truncated(t, b):
    d = b.copy(b.llmc, t / "llmc")
    raw = (d / "gpt2.bin").read_bytes()
    (d / "gpt2.bin").write_bytes(raw[: len(raw) // 2])
    expect_error(cli(str(ROOT / "tools" / "convert.py"), d / "gpt2.bin", "--out", t / "imported", "--quiet", cwd=t),
                 "gpt2.bin")


@case
def llmc_model_header_claims_a_huge_model(t, b):
    d = b.copy(b.llmc, t / "llmc")
    raw = bytearray((d / "gpt2.bin").read_bytes())
    raw[16:20] = struct.pack("<i", 2**31 - 1)  # n_layer
    (d / "gpt2.bin").write_bytes(bytes(raw))
    expect_error(cli(str(ROOT / "tools" / "convert.py"), d / "gpt2.bin", "--out", t / "imported", "--quiet", cwd=t),
                 "gpt2.bin")


# ---------------------------------------------------------------------------- the cached C++ kernels


CACHE_ENV = "MLX_GPT_CACHE_DIR"


def kernel_cache(t: Path) -> Path:
    d = t / "cache"
    d.mkdir()
    return d


def reference_output(t: Path, b: Base) -> str:
    proc = generate(t, b.run, extra_env={"MLX_GPT_NO_EXT": "1"})
    expect_ok(proc)
    return proc.stdout


def damaged_extension(t: Path, damage: Callable[[bytes], bytes]) -> tuple[Path, dict]:
    """The built C++ kernels, damaged, in a cache whose rebuild cannot succeed (a compiler that fails)."""
    from mlx_gpt.cpu import extension

    if extension.load() is None:
        pytest.skip(f"the C++ kernels are not built here: {extension.status()}")
    good = Path(str(extension.status()).split("(", 1)[1].rstrip(")"))
    cache = kernel_cache(t)
    env = {CACHE_ENV: str(cache), "XDG_CACHE_HOME": str(cache), "CXX": "/bin/false"}
    old = os.environ.get("CXX")
    os.environ["CXX"] = "/bin/false"
    try:
        name = extension.KERNELS.target().name
    finally:
        if old is None:
            del os.environ["CXX"]
        else:
            os.environ["CXX"] = old
    for d in (cache, cache / "mlx_gpt"):
        d.mkdir(exist_ok=True)
        (d / name).write_bytes(damage(good.read_bytes()))
    return cache, env


def flip_middle(raw: bytes) -> bytes:
    mid = len(raw) // 2
    return raw[:mid] + bytes(x ^ 0xFF for x in raw[mid : mid + 4096]) + raw[mid + 4096 :]


@case
def extension_library_truncated(t, b):
    _, env = damaged_extension(t, lambda raw: raw[: len(raw) // 2])
    proc = generate(t, b.run, extra_env=env)
    expect_ok(proc)
    assert proc.stdout == reference_output(t, b)


@case
def extension_library_bytes_flipped(t, b):
    _, env = damaged_extension(t, flip_middle)
    proc = generate(t, b.run, extra_env=env)
    expect_ok(proc)
    assert proc.stdout == reference_output(t, b)


@case
def extension_library_empty(t, b):
    _, env = damaged_extension(t, lambda raw: b"")
    proc = generate(t, b.run, extra_env=env)
    expect_ok(proc)
    assert proc.stdout == reference_output(t, b)


def damaged_matvec(t: Path, damage: Callable[[bytes], bytes]) -> dict:
    from mlx_gpt.cpu import blas

    good = blas._state.get("matvec")
    if not good:
        pytest.skip("the matrix-vector router is not built here")
    cache = kernel_cache(t)
    for d in (cache, cache / "mlx_gpt"):
        d.mkdir(exist_ok=True)
        (d / Path(good).name).write_bytes(damage(Path(good).read_bytes()))
    return {CACHE_ENV: str(cache), "XDG_CACHE_HOME": str(cache), "MLX_GPT_NO_EXT": "1"}


@case
def matvec_library_truncated(t, b):
    env = damaged_matvec(t, lambda raw: raw[: len(raw) // 2])
    proc = generate(t, b.run, extra_env=env)
    expect_ok(proc)
    assert proc.stdout == reference_output(t, b)


@case
def matvec_library_bytes_flipped(t, b):
    env = damaged_matvec(t, flip_middle)
    proc = generate(t, b.run, extra_env=env)
    expect_ok(proc)
    assert proc.stdout == reference_output(t, b)


# ---------------------------------------------------------------------------- corpora, shards and example sets


def documents(n: int = 40) -> list[str]:
    lines = corpus_text().splitlines()
    return ["\n".join(lines[i::n]) for i in range(n)]


def jsonl(records: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def prepare(t: Path, source, *args) -> subprocess.CompletedProcess:
    return cli("mlx_gpt.prepare", source, "--data-dir", t / "data", "--workers", "1", *args, cwd=t)


def corpus_dir(t: Path) -> Path:
    d = t / "books"
    d.mkdir()
    for i, doc in enumerate(documents()):
        (d / f"book{i:02d}.txt").write_text(doc)
    return d


@case
def corpus_jsonl_line_not_json(t, b):
    records = [{"text": d} for d in documents()]
    records[7] = '{"text": "cut short'
    (t / "dump.jsonl").write_text(jsonl(records))
    expect_error(prepare(t, t / "dump.jsonl"), "dump.jsonl", "8")


@case
def corpus_jsonl_line_without_the_field(t, b):
    records = [{"text": d} for d in documents()]
    records[3] = {"body": "no text here"}
    (t / "dump.jsonl").write_text(jsonl(records))
    expect_error(prepare(t, t / "dump.jsonl"), "dump.jsonl", "4")


@case
def corpus_jsonl_gz_cut_short(t, b):
    import gzip

    raw = gzip.compress(jsonl([{"text": d} for d in documents()]).encode())
    (t / "dump.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    expect_error(prepare(t, t / "dump.jsonl.gz"), "dump.jsonl.gz")
    assert not list((t / "data").glob("*/*.bin")), "a shard of a failed prepare was left where a reader looks"


@case
def corpus_jsonl_zst_not_zstd(t, b):
    (t / "dump.jsonl.zst").write_bytes(jsonl([{"text": d} for d in documents()]).encode())
    expect_error(prepare(t, t / "dump.jsonl.zst"), "dump.jsonl.zst")


@case
def corpus_parquet_cut_short(t, b):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": documents()}), t / "part.parquet")
    raw = (t / "part.parquet").read_bytes()
    (t / "part.parquet").write_bytes(raw[: len(raw) - 40])
    expect_error(prepare(t, t / "part.parquet"), "part.parquet")


@case
def corpus_parquet_without_the_column(t, b):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": documents()}), t / "part.parquet")
    expect_error(prepare(t, t / "part.parquet"), "part.parquet", "text")


@case
def corpus_folder_with_a_file_not_utf8(t, b):
    d = corpus_dir(t)
    (d / "book05.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n")
    expect_error(prepare(t, d), "book05.txt")


@case
def corpus_folder_empty_of_corpus_files(t, b):
    (t / "books").mkdir()
    (t / "books" / "notes.md").write_text("not a corpus file\n")
    expect_error(prepare(t, t / "books"), "books")


def sharded(t: Path, b: Base) -> Path:
    """A corpus prepared into several small shards a split."""
    proc = prepare(t, corpus_dir(t), "--shard-tokens", "2000")
    expect_ok(proc)
    (out,) = [d for d in (t / "data").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(list(out.glob("*_train_*.bin"))) >= 3, sorted(p.name for p in out.iterdir())
    return out


def train_on(t: Path, data: Path) -> subprocess.CompletedProcess:
    return cli("mlx_gpt.train", "--data", data, "--out", t / "out", *TINY, cwd=t)


@case
def shards_one_missing_in_the_middle(t, b):
    out = sharded(t, b)
    sorted(out.glob("*_train_*.bin"))[1].unlink()
    expect_error(train_on(t, out), "shard")
    assert not (t / "out").exists()


@case
def shards_one_cut_short(t, b):
    out = sharded(t, b)
    victim = sorted(out.glob("*_train_*.bin"))[1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 100])
    expect_error(train_on(t, out), victim.name)


@case
def shards_of_two_vocabularies(t, b):
    from mlx_gpt import data

    out = sharded(t, b)
    victim = sorted(out.glob("*_train_*.bin"))[1]
    tokens = np.frombuffer(victim.read_bytes()[1024:], dtype=np.uint16)
    data.write_tokens(victim, tokens.astype(np.uint32), 70_000)  # uint32: another vocabulary's file
    expect_error(train_on(t, out), victim.name)


@case
def prepare_into_a_users_folder_of_the_same_name(t, b):
    d = corpus_dir(t)
    mine = t / "data" / "books-byte"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own notes, not a dataset\n")
    expect_error(prepare(t, d), "books-byte")
    assert (mine / "notes.txt").read_text() == "my own notes, not a dataset\n"


@case
def prepare_while_another_prepares_it(t, b):
    from mlx_gpt.rundir import RunLock

    d = corpus_dir(t)
    with RunLock(t / "data" / "books-byte"):  # another prepare of the same corpus, still at work
        expect_error(prepare(t, d), "books-byte", "in use")
    assert not (t / "data" / "books-byte").exists()
    expect_ok(prepare(t, d))


def examples(t: Path, records: list, name: str = "train.jsonl") -> Path:
    d = t / "examples"
    d.mkdir(exist_ok=True)
    (d / name).write_text(jsonl(records))
    if name == "train.jsonl":
        (d / "valid.jsonl").write_text(jsonl(records[:4]))
    return d


PAIRS = [{"prompt": f"Add {i} and {i + 1}:", "completion": f" {2 * i + 1}"} for i in range(20)]


def train_examples(t: Path, d: Path, *args) -> subprocess.CompletedProcess:
    return cli("mlx_gpt.train", "--data", d, "--data-dir", t / "data", "--out", t / "out", "--mask-prompt", *TINY,
               *args, cwd=t)


@case
def examples_into_a_users_folder_of_the_same_name(t, b):
    mine = t / "data" / "examples-byte-examples"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    expect_error(train_examples(t, examples(t, PAIRS), "--tokenizer", "byte"), "examples-byte-examples")
    assert (mine / "notes.txt").read_text() == "mine\n"


@case
def examples_a_line_not_json(t, b):
    records = list(PAIRS)
    records[5] = '{"prompt": "Add 5 and 6:", "completion"'
    expect_error(train_examples(t, examples(t, records)), "train.jsonl", "6")


@case
def examples_two_shapes_in_one_file(t, b):
    records = list(PAIRS)
    records[9] = {"text": "running text among prompt/completion pairs"}
    expect_error(train_examples(t, examples(t, records)), "train.jsonl", "10")


@case
def examples_chat_roles_out_of_order(t, b):
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(20)]
    chats[4] = {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "?"}]}
    expect_error(train_examples(t, examples(t, chats)), "train.jsonl", "5")


@case
def examples_an_empty_completion(t, b):
    records = list(PAIRS)
    records[2] = {"prompt": "Add 2 and 3:", "completion": ""}
    expect_error(train_examples(t, examples(t, records)), "train.jsonl", "3")


@case
def examples_longer_than_the_block_with_no_truncate(t, b):
    records = list(PAIRS)
    records[6] = {"prompt": "Repeat: " + "la " * 200, "completion": " done"}
    expect_error(train_examples(t, examples(t, records), "--no-truncate"), "train.jsonl", "7")


@case
def chat_template_that_does_not_parse(t, b):
    run = b.copy(b.run, t / "run")
    (run / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")  # as a checkpoint carries one
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.generate", "--checkpoint", str(run), "--chat",
                           "--max-new-tokens", "4"], input="hello\n", capture_output=True, text=True, cwd=t,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    expect_error(proc, "template")


# ---------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, tmp_path, base):
    CASES[name](tmp_path, base)


def test_table_is_large_enough():
    assert len(CASES) >= 50
