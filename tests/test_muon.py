import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import checkpoint
from mlx_gpt.errors import UserError
from mlx_gpt.models import gpt, modern
from mlx_gpt.muon import takes_muon
from mlx_gpt.optim import make_optimizer
from mlx_gpt.train import train
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import loss_fn, make_train_step

LR, MUON_LR, WD = 2e-3, 0.02, 0.1
SHAPE = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def optim_cfg(**kw) -> TrainConfig:
    return TrainConfig.of(optimizer="muon", learning_rate=LR, min_lr=LR, warmup_iters=0, max_iters=100,
                          muon_lr=MUON_LR, muon_momentum=0.95, weight_decay=WD, beta1=0.9, beta2=0.99, **kw)


def torch_optimizers(torch, weights: dict):
    """torch.optim.Muon on the blocks' 2-D weights, torch.optim.AdamW on the rest (decay on 2-D only)."""
    tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()}
    hidden = [t for k, t in tensors.items() if takes_muon(k, mx.array(weights[k]))]
    rest = [(k, t) for k, t in tensors.items() if not any(t is h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=MUON_LR, weight_decay=WD, momentum=0.95)
    adamw = torch.optim.AdamW([{"params": [t for _, t in rest if t.ndim >= 2], "weight_decay": WD},
                               {"params": [t for _, t in rest if t.ndim < 2], "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.99), eps=1e-8)
    return tensors, (muon, adamw)


@pytest.mark.parametrize("model_type,ns_dtype,tolerance", [("modern", "float32", 1e-5), ("gpt", "float32", 1e-5),
                                                           ("modern", "bfloat16", 3e-3)])
def test_muon_and_adamw_update_as_torch_for_six_steps(torch, monkeypatch, model_type, ns_dtype, tolerance):
    """Weights within 1e-5 relative of torch's after each step, with the Newton-Schulz iteration in
    float32 on both sides (torch's own code, its working precision changed). In bfloat16, as both
    ship, the two BLAS libraries sum in different orders, and the iteration amplifies the bits
    that flips, so there the weights agree to bfloat16's precision times the step."""
    model = (modern.build(modern.ModernConfig(**SHAPE), seed=1) if model_type == "modern"
             else gpt.build(gpt.GPTConfig(**SHAPE), seed=1))
    rng = np.random.default_rng(0)  # no zero-initialised weight: every path carries gradient
    model.load_weights([(k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.parameters())])
    opt = make_optimizer(optim_cfg().optim)
    opt.init(model.trainable_parameters())
    opt.ns_dtype = getattr(mx, ns_dtype)
    if ns_dtype == "float32":
        monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t.float())
    tensors, torch_opts = torch_optimizers(torch, params(model))
    grad_fn = nn.value_and_grad(model, loss_fn)
    for step in range(6):
        x, y = (mx.array(rng.integers(0, 64, (4, 16))) for _ in range(2))
        _, grads = grad_fn(model, x, y)
        for k, g in tree_flatten(grads):  # the same gradients on both sides: the optimizers are compared
            tensors[k].grad = torch.tensor(np.array(g))
        model.update(opt.apply_gradients(grads, model))
        for o in torch_opts:
            o.step()
        for k, v in params(model).items():
            want = tensors[k].detach().numpy()
            err = np.abs(v - want).max() / np.abs(want).max()
            assert err < tolerance, (step, k, err)


def test_muon_takes_only_the_blocks_matrices():
    model = modern.build(modern.ModernConfig(**SHAPE))
    opt = make_optimizer(optim_cfg().optim)
    opt.init(model.trainable_parameters())
    kinds = {k.rsplit(".", 1)[0]: k.rsplit(".", 1)[1] for k, _ in tree_flatten(opt.state) if k.count(".")}
    assert kinds["h.0.attn.c_attn.weight"] == kinds["h.1.mlp.c_proj.weight"] == "b"
    assert kinds["wte.weight"] == kinds["lm_head.weight"] == kinds["h.0.ln_1.weight"] == "v"
    with pytest.raises(UserError, match="--optimizer"):
        TrainConfig.of(optimizer="sgd")


def test_accumulated_micro_batches_step_as_the_whole_batch():
    x = mx.random.randint(0, 64, (2, 3, 16), key=mx.random.key(2))
    y = mx.random.randint(0, 64, (2, 3, 16), key=mx.random.key(3))
    models = []
    for accum in (2, 1):
        model = modern.build(modern.ModernConfig(**SHAPE), seed=0)
        cfg = optim_cfg(grad_accum=accum, batch_size=3 * 2 // accum, streams=1)
        opt = make_optimizer(cfg.optim)
        opt.ns_dtype = mx.float32  # as on the CPU: in bfloat16 the sums' order (micro-batches or one) shows
        step = make_train_step(model, opt, cfg)
        for _ in range(3):
            step(x, y) if accum == 2 else step(x.reshape(1, 6, 16), y.reshape(1, 6, 16))
        models.append(params(model))
    for k, v in models[0].items():
        np.testing.assert_allclose(v, models[1][k], atol=2e-5)


def test_a_muon_run_stopped_and_resumed_equals_the_uninterrupted(tmp_path, shakespeare):
    common = dict(data=str(shakespeare), data_dir=str(tmp_path / "data"), model="modern", optimizer="muon",
                  n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2, log_interval=1,
                  sample_tokens=0, max_iters=8, lr_decay_iters=8, warmup_iters=2, eval_interval=4,
                  checkpoint_interval=100)
    train(TrainConfig.of(**common, out=str(tmp_path / "whole")), progress=False)
    train(TrainConfig.of(**{**common, "max_iters": 3}, out=str(tmp_path / "split")), progress=False)
    train(TrainConfig.of(**common, out=str(tmp_path / "split"), resume=True), progress=False)

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "whole") == losses(tmp_path / "split")  # bit for bit
    wa, wb = (params(checkpoint.load_model(tmp_path / d)) for d in ("whole", "split"))
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
