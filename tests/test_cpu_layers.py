"""cpu.accelerate: the CPU's layers compute what MLX's plain layers compute, with the same parameters."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt.cpu import accelerate, layers
from mlx_gpt.models import rungs
from mlx_gpt.models.gpt import GPTConfig, build

CFG = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64)


def loss_and_grads(model, x, y):
    def loss(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    return nn.value_and_grad(model, loss)(model)


def assert_same_loss_and_gradients(plain, fast):
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, 97, (3, 32))) for _ in range(2))
    (l1, g1), (l2, g2) = loss_and_grads(plain, x, y), loss_and_grads(fast, x, y)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=2e-6, rtol=1e-4, err_msg=k)


def test_accelerated_gpt_has_the_same_parameters_outputs_and_gradients():
    plain, fast = build(CFG, seed=1), accelerate(build(CFG, seed=1))
    assert [k for k, _ in tree_flatten(plain.parameters())] == [k for k, _ in tree_flatten(fast.parameters())]
    assert type(fast.h[0].attn) is layers.Attention and type(fast.h[0].ln_1) is layers.LayerNorm
    assert type(fast.h[0].mlp.c_fc) is layers.Linear and type(fast.h[0].mlp.gelu) is layers.GELU
    assert_same_loss_and_gradients(plain, fast)


def test_accelerated_modern_gpt_has_the_same_outputs_and_gradients():
    from mlx_gpt.models import modern

    cfg = modern.ModernConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64, zero_init=False)
    plain, fast = modern.build(cfg, seed=1), accelerate(modern.build(cfg, seed=1))
    assert type(fast.h[0].ln_1) is type(fast.h[0].attn.q_norm) is layers.RMSNorm
    assert type(fast.h[0].attn) is layers.Attention
    assert_same_loss_and_gradients(plain, fast)


def test_accelerate_is_a_no_op_off_the_cpu(monkeypatch):
    class Gpu:
        type = mx.DeviceType.gpu

    monkeypatch.setattr(mx, "default_device", lambda: Gpu)
    model = accelerate(build(CFG, seed=1))
    assert type(model.h[0].attn.c_attn) is nn.Linear


@pytest.mark.parametrize("accelerated", [False, True])
def test_attention_dropout_drops_attention_weights_in_training_only(accelerated):
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.5)
    model = build(cfg, seed=2)
    if accelerated:
        accelerate(model)
    attn = model.h[0].attn
    x = mx.random.normal((2, 16, 32), key=mx.random.key(0))
    attn.eval()
    quiet = attn(x)
    attn.train()
    mx.random.seed(3)
    a = attn.attend(*[mx.random.normal((2, 2, 16, 16), key=mx.random.key(i)) for i in range(3)], scale=0.25,
                    mask="causal")
    mx.random.seed(3)
    b = attn.attend(*[mx.random.normal((2, 2, 16, 16), key=mx.random.key(i)) for i in range(3)], scale=0.25,
                    mask="causal")
    np.testing.assert_array_equal(np.array(a), np.array(b))  # same seed, same mask
    attn.eval()
    c = attn.attend(*[mx.random.normal((2, 2, 16, 16), key=mx.random.key(i)) for i in range(3)], scale=0.25,
                    mask="causal")
    assert not np.allclose(np.array(a), np.array(c))  # training drops, evaluation does not
    np.testing.assert_array_equal(np.array(attn(x)), np.array(quiet))


def test_every_neural_rung_a_run_trains_or_a_checkpoint_loads_is_accelerated(tmp_path):
    from mlx_gpt import checkpoint
    from mlx_gpt.tokenizer import ByteTokenizer
    from mlx_gpt.training.config import TrainConfig
    from mlx_gpt.training.model import assemble

    for name in rungs.NEURAL:
        model = assemble(rungs.build(name, 256, seed=0), TrainConfig.of(model=name), fresh_adapters=True)
        assert not any(type(m) in layers.SWAPS for _, m in model.named_modules()), name
        checkpoint.save(tmp_path / name, model, ByteTokenizer())
        loaded, _ = checkpoint.load(tmp_path / name)
        assert not any(type(m) in layers.SWAPS for _, m in loaded.named_modules()), name
