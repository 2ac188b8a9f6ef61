"""Import and export of GPT-2 checkpoints, with transformers' GPT2LMHeadModel as the oracle.

transformers and torch are test-only oracles: every conversion under test that runs as the CLI
runs in a process where importing torch fails.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx_gpt  # noqa: F401  (before mlx.core, so MLX gets the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt import checkpoint, convert
from mlx_gpt.errors import UserError, run_cli
from mlx_gpt.generate import generate
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

REPO = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. It's 3:14 — naïve café, 日本語 😀!"
TOLERANCE = 1e-4
FORMATS = ("safetensors", "sharded", "bin", "bin_legacy", "bin_sharded")


def _random_gpt2(seed: int, **config):
    """A GPT2LMHeadModel with GPT-2's N(0, 0.02) weights and random biases and norm gains too,
    so no zero bias or unit gain can hide a mix-up."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = (".ln_" in name or ".ln_f." in name) and name.endswith("weight")
            p.copy_((1.0 if gain else 0.0) + 0.02 * torch.randn_like(p))
    return model


def _save_hf(model, directory: Path, fmt: str, tokenizer_dir: Path) -> Path:
    """One model in each of Hugging Face's weight layouts, with OpenAI's tokenizer files."""
    if fmt in ("safetensors", "sharded"):
        model.save_pretrained(directory, max_shard_size="300KB" if fmt == "sharded" else "50GB")
    elif fmt == "bin_sharded":  # transformers 4's sharded .bin layout: shards and an index
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        state = model.state_dict()
        names = list(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
        for shard, keys in shards.items():
            torch.save({k: state[k] for k in keys}, directory / shard)
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:  # what save_pretrained(safe_serialization=False) wrote: the state dict, head included
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin",
                   _use_new_zipfile_serialization=fmt == "bin")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def _logits(model, ids: list[int]) -> np.ndarray:
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits.numpy()
    return np.array(model(mx.array([ids])))


@pytest.fixture(scope="module")
def tok(data_files):
    return GPT2Tokenizer.from_directory(data_files / "gpt2")


@pytest.fixture(scope="module")
def small(tmp_path_factory, data_files):
    """A small random GPT-2 (full vocabulary, odd epsilon) saved in every layout."""
    model = _random_gpt2(0, n_layer=2, n_head=4, n_embd=64, n_positions=128, layer_norm_epsilon=1e-6)
    root = tmp_path_factory.mktemp("hf")
    dirs = {fmt: _save_hf(model, root / fmt, fmt, data_files / "gpt2") for fmt in FORMATS}
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    return model, dirs


@pytest.fixture(scope="module")
def imported(small, tmp_path_factory):
    """The small model converted from safetensors, for the export tests."""
    out = tmp_path_factory.mktemp("ckpt") / "small"
    convert.import_checkpoint(small[1]["safetensors"], out, progress=False)
    return out


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        run_cli(convert.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _run_without_torch(*commands: list[str]) -> subprocess.CompletedProcess:
    """Run tools/convert.py commands in a fresh interpreter where torch and the oracles cannot load."""
    script = (
        "import runpy, sys\n"
        "for name in ('torch', 'transformers', 'tiktoken', 'safetensors'):\n"
        "    sys.modules[name] = None  # any import of them now raises ImportError\n"
        f"for argv in {[list(map(str, c)) for c in commands]!r}:\n"
        "    sys.argv = ['tools/convert.py', *argv]\n"
        "    runpy.run_path('tools/convert.py', run_name='__main__')\n"
        "assert sys.modules['torch'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------- import


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_gives_transformers_logits(small, tok, tmp_path, fmt):
    hf_model, dirs = small
    out = convert.import_checkpoint(dirs[fmt], tmp_path / "ckpt", progress=False)
    model, tokenizer = checkpoint.load(out)
    ids = tokenizer.encode(TEXT)
    assert ids == tok.encode(TEXT) and tokenizer.eot_id == 50256
    assert model.config.layer_norm_eps == 1e-6 and model.config.block_size == 128
    np.testing.assert_allclose(_logits(model, ids), _logits(hf_model, ids), atol=TOLERANCE, rtol=0)


def test_cli_converts_and_exports_with_torch_blocked(small, tmp_path):
    _, dirs = small
    ckpt = tmp_path / "from_bin"
    r = _run_without_torch([dirs["bin"], "--out", ckpt],
                           [dirs["sharded"], "--out", tmp_path / "from_shards", "--quiet"],
                           [ckpt, "--to", "hf", "--out", tmp_path / "hf", "--quiet"],
                           [ckpt, "--to", "llmc", "--out", tmp_path / "llmc" / "model.bin", "--quiet"],
                           [ckpt, "--to", "mlx-lm", "--out", tmp_path / "mlx-lm", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "read pytorch_model.bin" in r.stderr  # the progress bar of the one unquiet run
    assert f"wrote {ckpt}: GPT-2 with 2 layers, 4 heads, width 64" in r.stdout
    for path in (ckpt / "model.safetensors", tmp_path / "from_shards/model.safetensors",
                 tmp_path / "hf/model.safetensors", tmp_path / "llmc/model.bin", tmp_path / "llmc/gpt2_tokenizer.bin",
                 tmp_path / "mlx-lm/model.safetensors"):
        assert path.is_file(), path


def test_imported_checkpoint_generates_and_fine_tunes(imported, data_files, tmp_path):
    from mlx_gpt import train

    model, tokenizer = checkpoint.load(imported)
    text = generate(model, tokenizer, "Hello", max_new_tokens=8, temperature=0)
    assert tokenizer.encode(text)  # some continuation, decoded through GPT-2's tokenizer
    run = train.main(["--init", str(imported), "--data", str(data_files / "the-verdict.txt"),
                      "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "ft"), "--max-iters", "2",
                      "--batch-size", "2", "--block-size", "32", "--eval-interval", "2", "--eval-iters", "1",
                      "--log-interval", "1", "--sample-tokens", "4", "--warmup-iters", "1", "--no-compile"])
    tuned, tuned_tok = checkpoint.load(run.out)
    assert tuned.config.n_embd == 64 and tuned_tok.encode(TEXT) == tokenizer.encode(TEXT)


# ---------------------------------------------------------------------------- export


def test_export_hf_loads_in_transformers_with_the_same_logits(small, imported, tok, tmp_path):
    hf_model, _ = small
    convert.export_checkpoint(imported, tmp_path / "hf", to="hf", progress=False)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = tok.encode(TEXT)
    np.testing.assert_allclose(_logits(back, ids), _logits(hf_model, ids), atol=TOLERANCE, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(TEXT)["input_ids"] == ids and hf_tok.eos_token_id == 50256


def test_export_llmc_then_import_gives_identical_weights(imported, tmp_path):
    out = tmp_path / "llmc" / "gpt2_small.bin"
    result = convert.export_checkpoint(imported, out, to="llmc", progress=False)
    assert result.paths == [out, out.parent / "gpt2_tokenizer.bin"]
    assert "eps 1e-05, this model with 1e-06" in result.notes[0]  # llm.c's header has no place for it
    header = np.fromfile(out, np.int32, 8)
    assert list(header) == [20240326, 3, 128, 50257, 2, 4, 64, 50304]
    back = convert.import_checkpoint(out, tmp_path / "back", progress=False)  # gpt2_tokenizer.bin beside it
    a, b = mx.load(str(imported / "model.safetensors")), mx.load(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    assert (back / "merges.txt").read_bytes() == (imported / "merges.txt").read_bytes()
    assert (back / "vocab.json").read_bytes() == (imported / "vocab.json").read_bytes()


def test_export_mlx_lm_layout(imported, tok, tmp_path):
    convert.export_checkpoint(imported, tmp_path / "lm", to="mlx-lm", progress=False)
    config = json.loads((tmp_path / "lm/config.json").read_text())
    # mlx-lm's gpt2 ModelArgs fields
    for key in ("model_type", "n_ctx", "n_embd", "n_head", "n_layer", "n_positions", "layer_norm_epsilon",
                "vocab_size"):
        assert key in config
    weights = mx.load(str(tmp_path / "lm/model.safetensors"))
    ours = mx.load(str(imported / "model.safetensors"))
    assert sorted(weights) == sorted("model." + k for k in ours)
    for k in ours:  # under "model." mlx-lm takes Linear weights as they are, (out, in)
        assert mx.array_equal(weights["model." + k], ours[k]).item()


def test_export_mlx_lm_loads_in_mlx_lm(imported, tok, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    convert.export_checkpoint(imported, tmp_path / "lm", to="mlx-lm", progress=False)
    model, lm_tok = mlx_lm.load(str(tmp_path / "lm"))
    ids = tok.encode(TEXT)
    mine, _ = checkpoint.load(imported)
    np.testing.assert_allclose(_logits(model, ids), _logits(mine, ids), atol=TOLERANCE, rtol=0)
    assert lm_tok.encode(TEXT) == ids


ROUND_TRIP = ["Hello, world!\n\n    def f(x):\n\treturn x ** 2  # 3.14", "naïve café 日本語 😀👍🏽 e\u0301",
              "  runs   of  spaces\r\n", ""]


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_export_of_byte_and_sentencepiece_checkpoints_loads_in_transformers(tmp_path, capsys, kind, data_files):
    """The tokenizer goes along as tokenizer.json: AutoTokenizer gives our ids and our text back, the
    model our logits, and config.json carries the tokenizer's own end-of-text id (or none), never 50256."""
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer, SentencePieceTokenizer

    if kind == "byte":
        tok = ByteTokenizer()
    else:
        text = (data_files / "tinyshakespeare.txt").read_text()[:300_000]
        tok = SentencePieceTokenizer.train(text.splitlines(keepends=True), 600)
    model = build(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    ckpt = checkpoint.save(tmp_path / kind, model, tok)
    code, out, _ = _cli([str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf"), "--quiet"], capsys)
    assert code == 0 and "note:" not in out, out
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert back.config.vocab_size == tok.vocab_size
    assert back.config.eos_token_id == back.config.bos_token_id == tok.eot_id  # None for bytes, 1 for sp
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf_tok) == tok.vocab_size and hf_tok.eos_token_id == tok.eot_id
    for text in ROUND_TRIP + [(data_files / "the-verdict.txt").read_text()[:5000]]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), repr(text[:40])
        assert hf_tok.decode(ids) == text == tok.decode(ids)
    ids = tok.encode(TEXT)[:64]
    np.testing.assert_allclose(_logits(back, ids), _logits(model, ids), atol=TOLERANCE, rtol=0)
    code, out, _ = _cli([str(ckpt), "--to", "llmc", "--out", str(tmp_path / "m.bin"), "--quiet"], capsys)
    assert code == 0 and f"{kind} tokenizer has no llmc form" in out
    mlx_lm = pytest.importorskip("mlx_lm")
    convert.export_checkpoint(ckpt, tmp_path / "lm", to="mlx-lm", progress=False)
    _, lm_tok = mlx_lm.load(str(tmp_path / "lm"))
    assert lm_tok.encode(ROUND_TRIP[1]) == tok.encode(ROUND_TRIP[1])
    assert lm_tok.eos_token_ids == ({tok.eot_id} if tok.eot_id is not None else set())


def test_sentencepiece_conversion_gives_sentencepiece_ids_on_varied_text(sp_tokenizer, data_files):
    """The tokenizers pipeline written for a SentencePiece BPE encodes as SentencePiece does."""
    import random

    from mlx_gpt.formats.hf_tokenizer import to_tokenizers
    from mlx_gpt.tokenizer import SentencePieceTokenizer

    rng = random.Random(0)
    pools = ["abcXYZ", "0123456789", " \t\n\r", "'’\"-.,!?", "éßøçñ", "αβγ", "жщы", "中文字", "😀🎉🇯🇵", "\u0301\u200d",
             "the ", "ing ", "    "]
    texts = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 80))) for _ in range(500)]
    code = (REPO / "mlx_gpt" / "data.py").read_text()
    play = (data_files / "tinyshakespeare.txt").read_text()
    trained = SentencePieceTokenizer.train((play[:200_000] + code * 5).splitlines(keepends=True), 800)
    for tok in (sp_tokenizer, trained):
        fast = to_tokenizers(tok)
        for text in texts + [code, play[-20_000:]]:
            assert fast.encode(text, add_special_tokens=False).ids == tok.encode(text), repr(text[:40])


# ---------------------------------------------------------------------------- refusals


def _assert_refused(argv, capsys, parent: Path, out: Path, match: str) -> None:
    """One line on stderr, a non-zero exit, and nothing new beside the output."""
    before = sorted(os.listdir(parent)) if parent.exists() else []
    code, _, err = _cli([*map(str, argv), "--out", str(out), "--quiet"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert match in err, err
    assert not out.exists()
    assert (sorted(os.listdir(parent)) if parent.exists() else []) == before


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) * 2 // 3]))
    elif how == "flip":  # one flipped bit in the middle of the tensor data
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(b"\x00garbage" * 16)


@pytest.mark.parametrize("case", [
    ("safetensors", "model.safetensors", "truncate", "truncated"),
    ("safetensors", "model.safetensors", "garbage", "not a safetensors file"),
    ("sharded", "model-00002-of-00003.safetensors", "truncate", "truncated"),
    ("bin", "pytorch_model.bin", "truncate", "truncated or corrupt"),
    ("bin", "pytorch_model.bin", "flip", "CRC"),
    ("bin_legacy", "pytorch_model.bin", "truncate", "truncated"),
    ("safetensors", "config.json", "garbage", "config.json is not valid JSON"),
    ("safetensors", "vocab.bpe", "garbage", "vocab.bpe"),
], ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_damaged_hf_inputs_fail_cleanly(small, tmp_path, capsys, case):
    fmt, name, how, match = case
    src = _copy(small[1][fmt], tmp_path / "src")
    if not (src / name).exists():
        pytest.skip(f"transformers wrote other shard names: {sorted(os.listdir(src))}")
    _damage(src / name, how)
    _assert_refused([src], capsys, tmp_path / "out", tmp_path / "out" / "ckpt", match)


def test_sharded_index_naming_a_missing_shard_fails_cleanly(small, tmp_path, capsys):
    src = _copy(small[1]["sharded"], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.wte.weight"] = "model-99.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_refused([src], capsys, tmp_path, tmp_path / "ckpt", "model-99.safetensors is missing")


@pytest.mark.parametrize("how", ["truncate", "version"])
def test_damaged_llmc_inputs_fail_cleanly(imported, tmp_path, capsys, how):
    src = tmp_path / "in" / "model.bin"
    convert.export_checkpoint(imported, src, to="llmc", progress=False)
    if how == "truncate":
        _damage(src, "truncate")
    else:
        raw = bytearray(src.read_bytes())
        raw[4:8] = np.int32(4).tobytes()
        src.write_bytes(bytes(raw))
    _assert_refused([src], capsys, tmp_path, tmp_path / "ckpt", "truncated" if how == "truncate" else "version 4")
    _damage(src.parent / "gpt2_tokenizer.bin", "truncate")
    convert.export_checkpoint(imported, src, to="llmc", progress=False, overwrite=True)
    _damage(src.parent / "gpt2_tokenizer.bin", "truncate")
    _assert_refused([src], capsys, tmp_path, tmp_path / "ckpt", "gpt2_tokenizer.bin is truncated")


def test_malicious_pytorch_model_bin_is_refused_and_never_runs(small, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    src = _copy(small[1]["bin"], tmp_path / "src")
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/data/0", b"\0" * 16)
    _assert_refused([src], capsys, tmp_path, tmp_path / "ckpt", "refused: its pickle calls os.system")
    assert not marker.exists()


def test_names_and_shapes_must_match_exactly(small, tmp_path):
    base = small[1]["safetensors"]
    tensors = safetensors_numpy.load_file(str(base / "model.safetensors"))

    def attempt(changed: dict, match: str):
        src = _copy(base, tmp_path / f"src{len(os.listdir(tmp_path))}")
        safetensors_numpy.save_file(changed, str(src / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UserError, match=match):
            convert.import_checkpoint(src, tmp_path / "never", progress=False)
        assert not (tmp_path / "never").exists()

    attempt({**tensors, "transformer.h.0.attn.rotary": np.zeros(3, np.float32)}, "unknown tensor 'h.0.attn.rotary'")
    attempt({k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}, "missing 'h.1.mlp.c_fc.bias'")
    wrong = dict(tensors)
    wrong["transformer.h.0.attn.c_proj.weight"] = np.zeros((64, 32), np.float32)
    attempt(wrong, r"'h.0.attn.c_proj.weight' is \(32, 64\), the model needs \(64, 64\)")
    untied = {**tensors, "lm_head.weight": tensors["transformer.wte.weight"] + 1}
    attempt(untied, "lm_head.weight differs from wte")
    tied = {**tensors, "lm_head.weight": tensors["transformer.wte.weight"].copy(),
            "transformer.h.0.attn.bias": np.ones((1, 1, 128, 128), np.float32)}  # old files' mask buffer
    src = _copy(base, tmp_path / "tied")
    safetensors_numpy.save_file(tied, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert.import_checkpoint(src, tmp_path / "ok", progress=False)
    # GPT2Model's names, as the original GPT-2 upload has them: no prefix, mask buffers kept
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare.update({"h.0.attn.bias": np.ones((1, 1, 128, 128), np.float32), "h.1.attn.masked_bias": np.array(-1e4)})
    src = _copy(base, tmp_path / "bare")
    safetensors_numpy.save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert.import_checkpoint(src, tmp_path / "bare_ok", progress=False)
    a, b = mx.load(str(tmp_path / "ok/model.safetensors")), mx.load(str(tmp_path / "bare_ok/model.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_unsupported_configs_are_refused(small, imported, tmp_path):
    with pytest.raises(UserError, match="already an mlx_gpt checkpoint; pass --to"):
        convert.import_checkpoint(imported, tmp_path / "never", progress=False)
    for change, match in [({"activation_function": "gelu"}, "not GPT-2's tanh GELU"),
                          ({"model_type": "llama"}, "is not GPT-2"),
                          ({"scale_attn_by_inverse_layer_idx": True}, "not supported")]:
        src = _copy(small[1]["safetensors"], tmp_path / f"src{len(os.listdir(tmp_path))}")
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=match):
            convert.import_checkpoint(src, tmp_path / "never", progress=False)


def test_existing_output_is_kept_unless_overwrite(small, imported, tmp_path, capsys):
    src = small[1]["safetensors"]
    out = _copy(imported, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    (out / "metrics.jsonl").write_text("{}\n")
    code, _, err = _cli([str(src), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "already holds a checkpoint; pass --overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before
    code, _, err = _cli([str(src), "--out", str(out), "--quiet", "--overwrite"], capsys)
    assert code == 0, err
    # a directory this tool did not write is never replaced
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    for argv in ([str(src), "--out", str(other)], [str(imported), "--to", "hf", "--out", str(other)]):
        code, _, err = _cli([*argv, "--overwrite", "--quiet"], capsys)
        assert code == 2 and "refusing to replace it" in err
    assert (other / "cat.jpg").read_bytes() == b"meow"


@pytest.mark.parametrize("given", ["gpt2", "gpt2/encoder.json"])
def test_a_source_without_tokenizer_needs_one(imported, data_files, tmp_path, capsys, given):
    src = tmp_path / "m.bin"
    convert.export_checkpoint(imported, src, to="llmc", progress=False)
    (tmp_path / "gpt2_tokenizer.bin").unlink()
    _assert_refused([src], capsys, tmp_path, tmp_path / "ckpt", "comes with no tokenizer; pass --tokenizer")
    code, _, err = _cli([str(src), "--out", str(tmp_path / "ckpt"), "--tokenizer", str(data_files / given),
                         "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "ckpt" / "merges.txt").read_bytes() == (imported / "merges.txt").read_bytes()


def test_a_repo_shipping_only_tokenizer_json_converts(small, tok, data_files, tmp_path):
    from test_gpt2_tokenizer import write_tokenizer_json

    src = _copy(small[1]["safetensors"], tmp_path / "repo")
    for name in ("encoder.json", "vocab.bpe"):
        (src / name).unlink()
    write_tokenizer_json(data_files / "gpt2", src / "tokenizer.json")
    out = convert.import_checkpoint(src, tmp_path / "ckpt", progress=False)
    model, back = mlx_gpt.load(out)
    assert back.vocab == tok.vocab and back.merges == tok.merges
    ids = back.encode(TEXT)
    assert ids == tok.encode(TEXT)
    np.testing.assert_allclose(_logits(model, ids), _logits(small[0], ids), atol=TOLERANCE)


# ---------------------------------------------------------------------------- GPT-2 124M shapes


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_124m_shapes(data_files, tok, tmp_path, fmt):
    hf_model = _random_gpt2(1)  # GPT2Config() is GPT-2 124M
    src = _save_hf(hf_model, tmp_path / fmt, fmt, data_files / "gpt2")
    out = convert.import_checkpoint(src, tmp_path / "ckpt", progress=False)
    model, tokenizer = checkpoint.load(out)
    assert model.num_params() == 124_439_808
    ids = tokenizer.encode(TEXT * 4)
    np.testing.assert_allclose(_logits(model, ids), _logits(hf_model, ids), atol=TOLERANCE, rtol=0)


def test_an_export_replaces_only_what_it_wrote(imported, tmp_path, capsys):
    """A folder or file of the export's own layout that mlx_gpt did not write (no record of it, or
    a file the record does not list) is refused, with --overwrite too; our own is replaced."""
    hf_dir, bin_path = tmp_path / "hf", tmp_path / "llmc" / "model.bin"
    for argv in (["--to", "hf", "--out", str(hf_dir)], ["--to", "llmc", "--out", str(bin_path)]):
        for _ in range(2):
            code, _, err = _cli([str(imported), *argv, "--overwrite", "--quiet"], capsys)
            assert code == 0, err
    (hf_dir / "notes.txt").write_text("mine")  # a file our record does not list
    code, _, err = _cli([str(imported), "--to", "hf", "--out", str(hf_dir), "--overwrite", "--quiet"], capsys)
    assert code == 2 and "was not written by mlx_gpt" in err and (hf_dir / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")  # the layout of an export, someone else's
    (theirs / "model.safetensors").write_bytes(b"their weights")
    their_bin = tmp_path / "their.bin"
    their_bin.write_bytes(b"their llm.c model")
    for argv in (["--to", "hf", "--out", str(theirs)], ["--to", "llmc", "--out", str(their_bin)]):
        code, _, err = _cli([str(imported), *argv, "--overwrite", "--quiet"], capsys)
        assert code == 2 and "was not written by mlx_gpt" in err
    assert (theirs / "model.safetensors").read_bytes() == b"their weights"
    assert their_bin.read_bytes() == b"their llm.c model"
