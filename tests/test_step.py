"""The train step on packed rows: several examples a row train exactly as the same examples one a
row do (loss, gradients, and weights after AdamW updates), on every attention path."""

import json
from contextlib import nullcontext

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import backend, example_sampler, examples
from mlx_gpt.cpu import ops
from mlx_gpt.models import modern
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.optim import make_optimizer
from mlx_gpt.recompute import recompute_blocks
from mlx_gpt.training.config import TrainConfig
from mlx_gpt.training.step import make_eval_loss, make_train_step

BLOCK = 32
# rows of example indices; the lengths below make rows of 2 to 4 examples, one cut to the block
GROUPS = [[0, 1, 2], [3, 4], [9], [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Completions of 3 to 40 tokens (prompt and answer), the last cut to the block."""
    tmp = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    sizes = [(3, 6), (9, 2), (1, 4), (12, 9), (5, 5), (2, 2), (7, 1), (4, 8), (1, 3), (25, 15), (3, 3)]
    records = [{"prompt": "p" * a + str(i), "completion": "".join(chr(97 + c) for c in rng.integers(0, 26, b))}
               for i, (a, b) in enumerate(sizes)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp / "valid.jsonl").write_text(json.dumps(records[0]) + "\n")
    return examples.prepare_examples(str(tmp), data_dir=tmp / "data").splits["train"]


def batches(split, mask_prompt=True):
    """The same examples packed (accum 2, two rows each) and one a row (accum 2, five rows each)."""
    x, y, p = example_sampler.packed_rows(split, GROUPS, BLOCK, mask_prompt)
    alone = [[i] for g in GROUPS[:2] for i in g] + [[i] for g in GROUPS[2:] for i in g]
    ux, uy, _ = example_sampler.packed_rows(split, alone, BLOCK, mask_prompt)
    assert sum(map(len, GROUPS[:2])) == 5 == sum(map(len, GROUPS[2:]))  # both micro-batches hold 5 examples
    packed = [mx.array(a.reshape(2, 2, BLOCK)) for a in (x, y, p)]
    return packed, [mx.array(a.reshape(2, 5, BLOCK)) for a in (ux, uy)]


def model_of(kind: str, accelerated: bool):
    if kind == "modern":  # RoPE, RMSNorm, QK-norm
        model = modern.build(modern.ModernConfig(vocab_size=257, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                                                 zero_init=False), seed=1)
    else:
        model = build(GPTConfig(vocab_size=257, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, bias=False), seed=1)
    return backend.layers(model) if accelerated else model


def trained(kind, accelerated, streams, batch, recompute=False, steps=3, dtype="float32"):
    """Weights and losses after ``steps`` updates on ``batch``."""
    model = model_of(kind, accelerated)
    if recompute:
        recompute_blocks(model)
    cfg = TrainConfig.of(batch_size=batch[0].shape[1], grad_accum=2, streams=streams, learning_rate=3e-4,
                         min_lr=3e-4, warmup_iters=0, max_iters=10, weight_decay=0.1, compile=True, dtype=dtype)
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step = make_train_step(model, optimizer, cfg)
    losses = [step(*batch)[0].item() for _ in range(steps)]
    return losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("kind, accelerated, streams, recompute", [
    ("gpt", False, 1, False), ("gpt", True, 1, False), ("gpt", True, 2, False), ("modern", True, 2, False),
    ("modern", False, 1, False), ("gpt", True, 1, True)])
def test_packed_rows_train_as_the_examples_one_a_row(split, kind, accelerated, streams, recompute):
    """Plain MLX, the CPU's kernels, two CPU streams, and the blocks recomputed (--grad-checkpoint)."""
    packed, alone = batches(split)
    if accelerated and streams == 2 and backend.split_for(2, 2)[0] < 2:
        pytest.skip("one CPU stream here")
    with ops.native_ops() if not accelerated else nullcontext():
        losses, weights = trained(kind, accelerated, streams, packed, recompute)
        want_losses, want = trained(kind, accelerated, streams, alone, recompute)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    assert losses[0] > losses[-1]  # it trains
    for name in want:
        np.testing.assert_allclose(weights[name], want[name], atol=1e-5, err_msg=name)



@pytest.mark.parametrize("streams", [1, 2])
def test_packed_evaluation_is_the_examples_loss(split, streams):
    (x, y, p), (ux, uy) = batches(split)
    model = model_of("gpt", accelerated=True)
    cfg = TrainConfig.of(batch_size=2, streams=streams)
    loss = make_eval_loss(model, cfg)
    want = make_eval_loss(model, cfg.replace(batch_size=5))
    np.testing.assert_allclose(loss(x[0], y[0], p[0]).item(), want(ux[0], uy[0]).item(), atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_packed_rows_train_in_half_precision(split, dtype):
    """Mixed precision (float16 with its loss scale): the same losses as one a row, to its rounding."""
    packed, alone = batches(split)
    losses, _ = trained("gpt", True, 1, packed, dtype=dtype)
    want, _ = trained("gpt", True, 1, alone, dtype=dtype)
    np.testing.assert_allclose(losses, want, atol=3e-2)
    assert losses[0] > losses[-1]
