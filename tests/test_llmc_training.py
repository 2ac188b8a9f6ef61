"""Training from an imported llm.c checkpoint follows llm.c's own train_gpt2.c, loss for loss.

tests/data/llmc_losses.json holds the losses llm.c printed for 10 steps from a small random
GPT-2-shaped model (2 layers, width 64, GPT-2's 50,257-token vocabulary, 64 positions) on
tiny Shakespeare tokenized as llm.c's dev/data/tinyshakespeare.py does, with the settings of
its train_gpt2.c: B=4, T=64, AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no
clipping, a constant lr, batches in file order. That file says how they were produced. The
test makes the same weights (numpy, from the seed) and tokens, writes the model with our llm.c
exporter, imports that file back, trains it with ``python -m mlx_gpt.train`` and compares.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from mlx_gpt import checkpoint
from mlx_gpt.convert import export_checkpoint, import_checkpoint
from mlx_gpt.data import write_tokens
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
from mlx_gpt.models.gpt import GPT, GPTConfig

FIGURES = Path(__file__).parent / "data" / "llmc_losses.json"
CFG = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=4, n_embd=64)
VAL_TOKENS = 32768  # llm.c's split: the first 32,768 tokens are validation
# llm.c prints losses with 6 decimals (5e-7 of rounding); the rest is float32 arithmetic in a
# different order over 10 steps of Adam: measured at most 2.0e-6 apart
LOSS_ATOL = 1e-5


def random_weights(cfg: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """GPT-2-like random weights under our names, from numpy alone (the same on every machine).

    Biases and norm gains are random too, so that no zero or one can hide a mix-up in the format.
    """
    rng = np.random.default_rng(seed)
    shapes = [(k, tuple(v.shape)) for k, v in _flat(GPT(cfg).parameters())]
    out = {}
    for name, shape in shapes:
        if ".ln_" in name or name.startswith("ln_f"):
            value = 1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("weight") else 0.02 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        else:
            std = 0.02 / np.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
            value = std * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def _flat(tree) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def shakespeare_tokens(text: str, encode, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) as llm.c's tinyshakespeare.py makes them: each "\\n\\n"-separated section is a
    document, preceded by end-of-text and followed by the "\\n\\n" it was split on (not the last)."""
    sections = text.split("\n\n")
    tokens = []
    for i, section in enumerate(sections):
        tokens.append(eot)
        tokens.extend(encode(section + "\n\n" if i < len(sections) - 1 else section))
    tokens = np.array(tokens, dtype=np.int64)
    return tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]


def tiktoken_encoder(gpt2_dir: Path):
    """tiktoken's GPT-2 BPE built from GPT-2's own files (tiktoken would download them)."""
    from test_gpt2_tokenizer import tiktoken_gpt2

    return tiktoken_gpt2(gpt2_dir).encode_ordinary


def write_inputs(out: Path, data_files: Path, seed: int) -> tuple[Path, Path]:
    """The llm.c model file (through our exporter) and a data folder with llm.c's token files."""
    import mlx.core as mx

    tok = GPT2Tokenizer.from_files(data_files / "gpt2" / "encoder.json", data_files / "gpt2" / "vocab.bpe")
    model = GPT(CFG)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(CFG, seed).items()], strict=True)
    checkpoint.save(out / "random", model, tok)
    model_file = out / "llmc" / "model.bin"
    model_file.parent.mkdir(parents=True)
    export_checkpoint(out / "random", model_file, to="llmc", progress=False)
    val, train = shakespeare_tokens((data_files / "tinyshakespeare.txt").read_text(),
                                    tiktoken_encoder(data_files / "gpt2"), tok.eot_id)
    data = out / "tinyshakespeare"
    data.mkdir()
    write_tokens(data / "tiny_shakespeare_val.bin", val, CFG.vocab_size)
    write_tokens(data / "tiny_shakespeare_train.bin", train, CFG.vocab_size)
    return model_file, data


@pytest.mark.slow
def test_training_an_imported_llmc_checkpoint_follows_llmc_losses(tmp_path, data_files):
    pytest.importorskip("tiktoken")
    figures = json.loads(FIGURES.read_text())
    model_file, data = write_inputs(tmp_path, data_files, figures["seed"])
    import_checkpoint(model_file, tmp_path / "imported", progress=False)
    steps = len(figures["losses"])
    proc = run_module("mlx_gpt.train", "--init", str(tmp_path / "imported"), "--data", str(data),
                      "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                      "--sampler", "sequential", "--batch-size", "4", "--block-size", "64", "--grad-accum", "1",
                      "--learning-rate", "1e-4", "--min-lr", "1e-4", "--warmup-iters", "0", "--beta1", "0.9",
                      "--beta2", "0.999", "--weight-decay", "0", "--grad-clip", "0", "--dtype", "float32",
                      "--max-iters", str(steps), "--log-interval", "1", "--eval-interval", "1000",
                      "--eval-iters", "1", "--sample-tokens", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = {r["step"]: r["loss"] for r in records if "loss" in r}
    # llm.c's "step k" is the loss before its (k+1)-th update; ours is numbered from 1
    got = [ours[k + 1] for k in range(steps)]
    np.testing.assert_allclose(got, figures["losses"], rtol=0, atol=LOSS_ATOL)
    assert figures["losses"][-1] < figures["losses"][0] - 0.01  # it trained: the comparison sees updates
