import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gpt.errors import UserError
from mlx_gpt.models.gpt import GPT, GPTConfig, build, preset

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def test_logits_shape():
    model = build(TINY, seed=0)
    logits = model(mx.zeros((3, 17), dtype=mx.int32))
    assert logits.shape == (3, 17, 97)
    assert logits.dtype == mx.float32


def test_causality_later_tokens_never_change_earlier_logits():
    model = build(TINY, seed=0)
    x = mx.random.randint(0, 97, (2, 20), key=mx.random.key(1))
    y = mx.concatenate([x[:, :12], (x[:, 12:] + 5) % 97], axis=1)
    a, b = model(x), model(y)
    np.testing.assert_allclose(np.array(a[:, :12]), np.array(b[:, :12]), atol=1e-6)
    assert not np.allclose(np.array(a[:, 12:]), np.array(b[:, 12:]), atol=1e-3)


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_presets_have_gpt2_parameter_counts(name, count):
    # construction is lazy in MLX: nothing is allocated until evaluated
    assert GPT(preset(name)).num_params() == count


def test_head_is_tied_to_token_embedding():
    model = build(TINY, seed=0)
    x = mx.array([[1, 2, 3]])
    h = model.ln_f(model.h[1](model.h[0](model.wte(x) + model.wpe(mx.arange(3)))))
    np.testing.assert_allclose(np.array(model(x)), np.array(h @ model.wte.weight.T), atol=1e-5)
    names = {k for k, _ in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters())}
    assert "lm_head.weight" not in names and "wte.weight" in names and "h.1.mlp.c_fc.weight" in names


def test_gpt2_initialisation_statistics():
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=6, n_head=4, n_embd=128)
    model = build(cfg, seed=3)
    assert abs(float(mx.std(model.wte.weight)) - 0.02) < 0.001
    assert abs(float(mx.std(model.h[0].mlp.c_fc.weight)) - 0.02) < 0.001
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(float(mx.std(model.h[0].mlp.c_proj.weight)) - resid) < 0.0005
    assert float(mx.abs(model.h[0].attn.c_attn.bias).max()) == 0.0
    assert float(mx.min(model.h[0].ln_1.weight)) == 1.0 == float(mx.max(model.ln_f.weight))


def test_same_seed_same_weights():
    a, b = build(TINY, seed=7), build(TINY, seed=7)
    assert mx.array_equal(a.h[1].attn.c_attn.weight, b.h[1].attn.c_attn.weight)


def test_kv_cache_matches_full_forward():
    model = build(TINY, seed=0)
    x = mx.random.randint(0, 97, (2, 24), key=mx.random.key(2))
    cache = model.make_cache()
    parts = [model(x[:, :10], cache)] + [model(x[:, i:i + 1], cache) for i in range(10, 24)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(model(x)), atol=1e-5)


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(UserError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_embd": 64, "flavour": 1})


def test_positions_beyond_block_size_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        build(TINY)(mx.zeros((1, 33), dtype=mx.int32))


# --------------------------------------------------------------------------- packed rows (--pack)

LENGTHS = (5, 9, 1, 11, 6)  # examples packed into one row of 32 positions, then padding


def packed_row(seed: int = 0) -> tuple[mx.array, mx.array, list[slice]]:
    """One row holding examples of LENGTHS tokens: its tokens (1, 32), positions (1, 32) and the
    examples' places in it."""
    rng = np.random.default_rng(seed)
    places, at = [], 0
    for n in LENGTHS:
        places.append(slice(at, at + n))
        at += n
    positions = np.concatenate([np.arange(n) for n in LENGTHS] + [np.arange(32 - at)])
    return mx.array(rng.integers(0, 97, (1, 32)), dtype=mx.int32), mx.array(positions[None], dtype=mx.int32), places


def packed_models():
    """GPT-2 (learned positions), the modern GPT (RoPE, QK-norm) and the two post-LN rungs."""
    from mlx_gpt.models import modern, transformer

    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    post_ln = GPTConfig(**cfg)
    yield build(TINY, seed=0)
    yield modern.build(modern.ModernConfig(**cfg, zero_init=False), seed=0)
    for cls in (transformer.TransformerLM, transformer.GPT1):
        model = cls(post_ln)
        mx.eval(model.parameters())
        yield model


@pytest.mark.parametrize("model", list(packed_models()), ids=["gpt", "modern", "transformer", "gpt1"])
def test_each_packed_example_computes_what_it_does_alone(model):
    x, positions, places = packed_row()
    packed = model(x, positions=positions)
    for where in places:
        alone = model(x[:, where])  # at positions 0.., attending to itself only
        np.testing.assert_allclose(np.array(packed[:, where]), np.array(alone), atol=2e-5)


@pytest.mark.parametrize("model", list(packed_models())[:2], ids=["gpt", "modern"])
def test_changing_one_packed_example_leaves_the_others_logits(model):
    x, positions, places = packed_row()
    changed = np.array(x)
    changed[0, places[1]] = (changed[0, places[1]] + 7) % 97
    a, b = np.array(model(x, positions=positions)), np.array(model(mx.array(changed), positions=positions))
    others = np.ones(32, bool)
    others[places[1]] = False
    np.testing.assert_array_equal(a[:, others], b[:, others])  # not close: the same numbers
    assert not np.allclose(a[:, places[1]], b[:, places[1]], atol=1e-3)
    # without the restarting positions, later examples would see it
    c = np.array(model(mx.array(changed)))
    assert not np.allclose(np.array(model(x))[:, places[2]], c[:, places[2]], atol=1e-4)


def test_positions_restart_at_each_example():
    from mlx_gpt.models.gpt import Packed

    _, positions, places = packed_row()
    mask = np.array(Packed(positions).as_array())[0, 0]
    starts = np.array(Packed(positions).starts())[0]
    for where in places:
        assert (starts[where] == where.start).all() and positions[0, where.start].item() == 0
        block = mask[where, where]
        np.testing.assert_array_equal(block, np.tril(np.ones_like(block)))  # causal within an example
        assert mask[where].sum() == block.sum()  # and nothing outside it


def test_rotation_at_positions_equals_mlx_rope():
    from mlx_gpt.models.gpt import ROPE_BASE, rope_at

    x = mx.random.normal((2, 3, 7, 16), key=mx.random.key(2))
    for offset in (0, 5):
        want = mx.fast.rope(x, 16, traditional=False, base=ROPE_BASE, scale=1.0, offset=offset)
        positions = mx.broadcast_to(mx.arange(offset, offset + 7, dtype=mx.int32), (2, 7))
        np.testing.assert_allclose(np.array(rope_at(x, positions)), np.array(want), atol=1e-5)
