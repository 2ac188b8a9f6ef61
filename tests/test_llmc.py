"""llm.c's checkpoint and tokenizer files, against files laid out here the way llm.c writes them."""

import numpy as np
import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.formats import llmc
from mlx_gpt.formats.tensors import LazyTensor, float32_to_bfloat16
from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
from mlx_gpt.models.gpt import GPTConfig

CFG = GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=8)
# llm.c's write_tensors order; every per-layer parameter is written for all layers in turn
ORDER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
         "mlp.c_proj.bias"]


def _params(cfg: GPTConfig, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
              "mlp.c_proj.bias": (C,)}
    p = {"wte.weight": rng.standard_normal((V, C)), "wpe.weight": rng.standard_normal((cfg.block_size, C)),
         "ln_f.weight": rng.standard_normal(C), "ln_f.bias": rng.standard_normal(C)}
    for i in range(cfg.n_layer):
        for name, shape in shapes.items():
            p[f"h.{i}.{name}"] = rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in p.items()}


def _llmc_file(path, cfg: GPTConfig, params, version=3):
    """Lay out a checkpoint as llm.c's write_model does (vocab padded to a multiple of 128)."""
    vp = (cfg.vocab_size + 127) // 128 * 128
    header = np.zeros(256, np.int32)
    header[:8] = [20240326, version, cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, vp]
    wte = np.concatenate([params["wte.weight"], np.zeros((vp - cfg.vocab_size, cfg.n_embd), np.float32)])
    seq = [wte, params["wpe.weight"]]
    seq += [params[f"h.{i}.{name}"] for name in ORDER for i in range(cfg.n_layer)]
    seq += [params["ln_f.weight"], params["ln_f.bias"]]
    body = b"".join((a.astype("<f4") if version == 3 else float32_to_bfloat16(a)).tobytes() for a in seq)
    path.write_bytes(header.tobytes() + body)


def test_reads_a_float32_checkpoint(tmp_path):
    params = _params(CFG)
    _llmc_file(tmp_path / "m.bin", CFG, params)
    cfg, tensors = llmc.read_model(tmp_path / "m.bin")
    assert cfg == CFG
    assert set(tensors) == set(params)
    for name, a in params.items():
        np.testing.assert_array_equal(tensors[name].read(), a, err_msg=name)


def test_reads_a_bfloat16_checkpoint_as_torch_rounds_it(tmp_path):
    torch = pytest.importorskip("torch")
    params = _params(CFG, seed=1)
    _llmc_file(tmp_path / "m.bin", CFG, params, version=5)
    _, tensors = llmc.read_model(tmp_path / "m.bin")
    for name, a in params.items():
        expected = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(tensors[name].read(), expected, err_msg=name)


def test_written_file_is_laid_out_like_llmcs(tmp_path):
    params = _params(CFG, seed=2)
    llmc.write_model(tmp_path / "ours.bin", CFG, {k: LazyTensor.of(v) for k, v in params.items()})
    _llmc_file(tmp_path / "ref.bin", CFG, params)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "trailing", "magic", "version", "header"])
def test_damaged_checkpoints_are_user_errors(tmp_path, damage):
    path = tmp_path / "m.bin"
    _llmc_file(path, CFG, _params(CFG))
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:1024], np.int32).copy()
    if damage == "truncated":
        raw = raw[:-4]
    elif damage == "trailing":
        raw += b"\0" * 4
    elif damage == "magic":
        header[0] = 12345
    elif damage == "version":
        header[1] = 4
    else:
        header[7] = 10  # padded vocab below the vocab
    if damage in ("magic", "version", "header"):
        raw[:1024] = header.tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        llmc.read_model(path)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def gpt2_tok(data_files):
    return GPT2Tokenizer.from_directory(data_files / "gpt2")


def test_tokenizer_file_is_llmcs_and_reads_back(gpt2_tok, data_files, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(data_files / "gpt2/vocab.bpe"), str(data_files / "gpt2/encoder.json"))
    enc = tiktoken.Encoding("gpt2", pat_str=r"'s", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    # llm.c's write_tokenizer: header, then each id's bytes with a length byte
    header = np.zeros(256, np.int32)
    header[:4] = [20240328, 2, enc.max_token_value + 1, enc.eot_token]
    ref = header.tobytes() + b"".join(bytes([len(b)]) + b for b in map(enc.decode_single_token_bytes,
                                                                        range(enc.max_token_value + 1)))
    llmc.write_tokenizer(tmp_path / "tok.bin", gpt2_tok)
    assert (tmp_path / "tok.bin").read_bytes() == ref
    back = GPT2Tokenizer.from_llmc(tmp_path / "tok.bin")
    assert back.vocab == gpt2_tok.vocab and back.merges == gpt2_tok.merges and back.eot_id == 50256


def test_damaged_tokenizer_files_are_user_errors(gpt2_tok, tmp_path):
    llmc.write_tokenizer(tmp_path / "tok.bin", gpt2_tok)
    raw = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-5])
    with pytest.raises(UserError, match="truncated"):
        GPT2Tokenizer.from_llmc(tmp_path / "cut.bin")
    (tmp_path / "magic.bin").write_bytes(b"\0" * 4 + raw[4:])
    with pytest.raises(UserError, match="not an llm.c tokenizer"):
        GPT2Tokenizer.from_llmc(tmp_path / "magic.bin")
