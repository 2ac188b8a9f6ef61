"""mlx_gpt.cpu.ops (the C++ kernels where they load) against float64 truth, MLX's native kernels and PyTorch.

"Exact to float32 rounding" is checked as: the fast result is no further from the float64 value
than a few units in the last place (of the value, or of its scale where the reference formula
itself cancels), and no further than MLX's own native kernel is.
"""


import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gpt.cpu import attention as attn
from mlx_gpt.cpu import ops
from mlx_gpt.models.gpt import GPTConfig, build


EPS = np.finfo(np.float32).eps  # 2**-23, one ulp of 1.0


def f64(a: mx.array) -> np.ndarray:
    return np.array(a, dtype=np.float64)


def native(fn):
    """fn evaluated with MLX's native kernels."""

    def call(*args):
        with ops.native_ops():
            out = fn(*args)
            mx.eval(out)
        return out

    return call


def grad_of(fn, x: mx.array, cot: mx.array) -> mx.array:
    return mx.vjp(fn, [x], [cot])[1][0]


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------- dispatch


def test_fast_path_is_chosen_on_cpu_for_float32_only():
    assert mx.default_device() == mx.cpu
    assert ops.fast_ops_enabled(mx.float32)
    assert not ops.fast_ops_enabled(mx.bfloat16)
    with ops.native_ops():
        assert not ops.fast_ops_enabled(mx.float32)
    assert ops.fast_ops_enabled(mx.float32)


def test_non_float32_inputs_use_the_native_kernels():
    x = mx.array([[-2.0, 0.5, 3.0]], dtype=mx.bfloat16)
    assert mx.array_equal(ops.gelu_approx(x), nn.gelu_approx(x))
    assert mx.array_equal(ops.softmax(x), mx.softmax(x, axis=-1, precise=True))


# ---------------------------------------------------------------------------- GELU


def gelu64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tanh-GELU and its derivative in float64."""
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x**2)


@pytest.fixture(scope="module")
def gelu_inputs(rng):
    x = np.concatenate([rng.normal(0, 3, 200_000), np.linspace(-12, 12, 100_001), [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0]])
    return x.astype(np.float32), rng.normal(0, 1, x.shape).astype(np.float32)


def test_gelu_matches_float64_to_float32_rounding(gelu_inputs):
    x, _ = gelu_inputs
    want, _ = gelu64(x.astype(np.float64))
    fast = f64(ops.gelu_approx(mx.array(x)))
    ref = f64(native(ops.gelu_approx)(mx.array(x)))
    scale = np.maximum(np.abs(x), 1.0)  # 0.5 x (1 + tanh) cancels for x < 0: errors scale with |x|
    fast_err, ref_err = np.abs(fast - want) / scale, np.abs(ref - want) / scale
    assert fast_err.max() <= 2 * EPS, fast_err.max() / EPS
    assert fast_err.max() <= ref_err.max() + EPS
    # and in relative terms wherever the value is not tiny, where the native formula cancels: only
    # the float32 rounding of z = 2u, amplified by |z| in e**-|z|, is left
    big = np.abs(want) > 1e-6
    z = np.abs(x * (1.5957691216 + 0.0713548162 * x.astype(np.float64) ** 2))[big]
    rel = np.abs(fast - want)[big] / np.abs(want[big])
    assert (rel / (1 + z)).max() <= 4 * EPS
    assert (rel / (1 + z)).max() < (np.abs(ref - want)[big] / np.abs(want[big]) / (1 + z)).max()


def test_gelu_gradient_matches_float64_and_native(gelu_inputs):
    x, g = gelu_inputs
    _, dwant = gelu64(x.astype(np.float64))
    dwant = dwant * g
    fast = f64(mx.compile(lambda x, g: grad_of(ops.gelu_approx, x, g))(mx.array(x), mx.array(g)))
    ref = f64(native(lambda x, g: grad_of(ops.gelu_approx, x, g))(mx.array(x), mx.array(g)))
    scale = np.maximum(np.abs(x), 1.0) ** 3 * np.abs(g) + 1e-30  # d/dx has x**3-sized terms
    assert (np.abs(fast - dwant) / scale).max() <= 4 * EPS
    assert np.abs(fast - dwant).max() <= np.abs(ref - dwant).max() + 4 * EPS


def test_gelu_matches_torch_values_and_gradients(gelu_inputs, torch):
    F = torch.nn.functional
    x, g = gelu_inputs
    tx = torch.tensor(x, requires_grad=True)
    ty = F.gelu(tx, approximate="tanh")
    ty.backward(torch.tensor(g))
    fast = ops.gelu_approx(mx.array(x))
    dfast = grad_of(ops.gelu_approx, mx.array(x), mx.array(g))
    scale = np.maximum(np.abs(x), 1.0)
    assert (np.abs(f64(fast) - ty.detach().double().numpy()) / scale).max() <= 4 * EPS
    assert (np.abs(f64(dfast) - tx.grad.double().numpy()) / (scale**3 * (np.abs(g) + 1))).max() <= 8 * EPS


def test_gelu_keeps_infinities_and_nan():
    x = mx.array([np.inf, np.nan], dtype=mx.float32)
    out = f64(ops.gelu_approx(x))
    assert out[0] == np.inf and np.isnan(out[1])


# ---------------------------------------------------------------------------- softmax


@pytest.fixture(scope="module")
def scores(rng):
    """Attention-like scores with a causal -inf mask, some large rows, and a cotangent."""
    s = rng.normal(0, 3, (3, 4, 33, 33)).astype(np.float32)
    s[0, 0] *= 30  # peaked rows: exponents far below the max
    s = s + np.triu(np.full((33, 33), -np.inf, np.float32), 1)
    return s, rng.normal(0, 1, s.shape).astype(np.float32)


def softmax64(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_matches_float64_native_and_torch(scores, torch):
    F = torch.nn.functional
    s, _ = scores
    want = softmax64(s)
    fast = f64(ops.softmax(mx.array(s)))
    ref = f64(native(ops.softmax)(mx.array(s)))
    assert np.abs(fast - want).max() <= 2 * EPS
    assert np.abs(fast - want).max() <= np.abs(ref - want).max() + EPS
    assert np.all(fast[np.isneginf(s)] == 0.0)  # masked entries are exactly 0
    theirs = torch.softmax(torch.tensor(s), -1).double().numpy()
    assert np.abs(fast - theirs).max() <= np.abs(theirs - want).max() + 2 * EPS


def test_softmax_gradient_matches_float64_and_torch(scores, torch):
    F = torch.nn.functional
    s, g = scores
    p = softmax64(s)
    want = p * (g - (g * p).sum(-1, keepdims=True))
    fast = f64(mx.compile(lambda s, g: grad_of(ops.softmax, s, g))(mx.array(s), mx.array(g)))
    ref = f64(native(lambda s, g: grad_of(ops.softmax, s, g))(mx.array(s), mx.array(g)))
    scale = np.abs(g).max(-1, keepdims=True)  # p (g - <g, p>) is computed to the scale of g
    assert (np.abs(fast - want) / scale).max() <= 4 * EPS
    assert np.abs(fast - want).max() <= np.abs(ref - want).max() + EPS
    ts = torch.tensor(s, requires_grad=True)
    torch.softmax(ts, -1).backward(torch.tensor(g))
    theirs = ts.grad.double().numpy()
    assert np.abs(fast - theirs).max() <= np.abs(theirs - want).max() + 4 * EPS


def test_softmax_other_axes_fall_back_to_native():
    x = mx.random.normal((5, 7), key=mx.random.key(0))
    assert mx.allclose(ops.softmax(x, axis=0), mx.softmax(x, axis=0), atol=1e-7)


# ---------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_native_and_torch_with_gradients(rng, smoothing, torch):
    F = torch.nn.functional
    logits = (rng.normal(0, 4, (6, 9, 257))).astype(np.float32)
    targets = rng.integers(0, 257, (6, 9)).astype(np.int32)
    w = rng.uniform(0.5, 1.5, (6, 9)).astype(np.float32)  # a non-uniform cotangent

    def weighted(fn):
        return lambda x: (fn(x, mx.array(targets), label_smoothing=smoothing) * mx.array(w)).sum()

    fast_loss = ops.cross_entropy(mx.array(logits), mx.array(targets), smoothing)
    fast_grad = mx.compile(mx.grad(weighted(ops.cross_entropy)))(mx.array(logits))
    ref_loss = nn.losses.cross_entropy(mx.array(logits), mx.array(targets), label_smoothing=smoothing)
    ref_grad = mx.grad(weighted(nn.losses.cross_entropy))(mx.array(logits))
    np.testing.assert_allclose(f64(fast_loss), f64(ref_loss), atol=4e-6, rtol=1e-6)
    # the references differ from each other by a few ulps: the gradient is held to the float64
    # value, as close as MLX's and PyTorch's own
    tl = torch.tensor(logits, requires_grad=True)
    tloss = F.cross_entropy(tl.view(-1, 257), torch.tensor(targets, dtype=torch.long).view(-1),
                            label_smoothing=smoothing, reduction="none").view(6, 9)
    (tloss * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(f64(fast_loss), tloss.detach().double().numpy(), atol=4e-6, rtol=1e-6)
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    exact = w[..., None] * (p - (1 - smoothing) * onehot - smoothing / 257)
    worst_reference = max(np.abs(f64(ref_grad) - exact).max(), np.abs(tl.grad.double().numpy() - exact).max())
    assert np.abs(f64(fast_grad) - exact).max() <= max(worst_reference, 4 * EPS)


# ---------------------------------------------------------------------------- linear, norms


def test_linear_matches_addmm_with_weight_gradients_laid_out_like_the_weights(rng):
    x = mx.array(rng.normal(0, 1, (3, 5, 16)).astype(np.float32))
    w = mx.array(rng.normal(0, 1, (24, 16)).astype(np.float32))
    b = mx.array(rng.normal(0, 1, (24,)).astype(np.float32))
    g = mx.array(rng.normal(0, 1, (3, 5, 24)).astype(np.float32))
    for bias in (b, None):
        args = [x, w] + ([bias] if bias is not None else [])
        fast_out, fast_grads = mx.vjp(lambda *a: ops.linear(*a), args, [g])
        ref_out, ref_grads = native(lambda *a: mx.vjp(lambda *a: ops.linear(*a), list(a), [g]))(*args)
        np.testing.assert_allclose(f64(fast_out[0]), f64(ref_out[0]), atol=1e-5)
        for got, want in zip(fast_grads, ref_grads):
            assert got.shape == want.shape
            np.testing.assert_allclose(f64(got), f64(want), atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 33, 96), (130, 768)])
def test_layer_norm_matches_float64_native_and_torch_with_gradients(rng, shape, torch):
    F = torch.nn.functional
    # an offset mean (GPT-2's residual stream has one) is what a one-pass variance gets wrong
    x = (rng.normal(0, 3, shape) + 5.0).astype(np.float32)
    w = rng.normal(1, 0.5, shape[-1:]).astype(np.float32)
    b = rng.normal(0, 0.5, shape[-1:]).astype(np.float32)
    g = rng.normal(0, 1, shape).astype(np.float32)
    eps = 1e-5
    X = x.astype(np.float64)
    xhat = (X - X.mean(-1, keepdims=True)) / np.sqrt(X.var(-1, keepdims=True) + eps)
    want = xhat * w + b

    def run(fn):
        args = [mx.array(a) for a in (x, w, b)]
        out, grads = mx.vjp(lambda *a: fn(*a), args, [mx.array(g)])
        return [f64(out[0])] + [f64(t) for t in grads]

    fast = mx.compile(lambda: run(lambda x, w, b: ops.layer_norm(x, w, b, eps)))()
    ref = native(lambda: run(lambda x, w, b: ops.layer_norm(x, w, b, eps)))()
    assert np.abs(fast[0] - want).max() <= np.abs(ref[0] - want).max() + 2 * EPS * np.abs(want).max()
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    F.layer_norm(tx, shape[-1:], tw, tb, eps).backward(torch.tensor(g, dtype=torch.float64))
    for got, native_got, exact in zip(fast[1:], ref[1:], (tx.grad, tw.grad, tb.grad)):
        exact = exact.numpy()
        scale = np.abs(exact).max()
        assert np.abs(got - exact).max() <= np.abs(native_got - exact).max() + 16 * EPS * scale
    # without a bias, and without an affine transform (MLX's own kernel then)
    np.testing.assert_allclose(f64(ops.layer_norm(mx.array(x), mx.array(w), None, eps)), xhat * w, atol=1e-5)
    np.testing.assert_allclose(f64(ops.layer_norm(mx.array(x), None, None, eps)), xhat, atol=1e-5)


def test_layer_norm_of_a_few_rows():
    # decoding normalizes one row at a time: the C++ kernel where it loads, else MLX's own
    x, w, b = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(1, 1, 768), (768,), (768,)]))
    want = mx.fast.layer_norm(x, w, b, 1e-5)
    np.testing.assert_allclose(np.array(ops.layer_norm(x, w, b, 1e-5)), np.array(want), atol=2e-6)
    with ops.pure_mlx_ops():
        assert mx.array_equal(ops.layer_norm(x, w, b, 1e-5), want)
    # float32 rows through a bfloat16 affine (a LoRA base kept in bfloat16): MLX's own
    w16, b16 = w.astype(mx.bfloat16), b.astype(mx.bfloat16)
    assert mx.array_equal(ops.layer_norm(x, w16, b16, 1e-5), mx.fast.layer_norm(x, w16, b16, 1e-5))


def test_squared_norm_is_accurate_for_large_arrays(rng):
    for shape in [(0,), (3,), (7, 5), (9000, 768)]:
        x = rng.normal(0, 1, shape).astype(np.float32)
        want = (x.astype(np.float64) ** 2).sum()
        assert abs(ops.squared_norm(mx.array(x)).item() - want) <= 1e-5 * max(want, 1e-30)


# ---------------------------------------------------------------------------- attention


def qkv(rng, B=2, nh=3, T=17, S=17, hs=8):
    q = rng.normal(0, 1, (B, nh, T, hs)).astype(np.float32)
    k = rng.normal(0, 1, (B, nh, S, hs)).astype(np.float32)
    v = rng.normal(0, 1, (B, nh, S, hs)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("T,S", [(17, 17), (5, 17), (1, 17)])
def test_attention_matches_native_sdpa_and_torch(rng, T, S, torch):
    F = torch.nn.functional
    q, k, v = qkv(rng, T=T, S=S)
    scale = 1 / np.sqrt(8)
    causal = T > 1
    fast = f64(attn.attention(mx.array(q), mx.array(k), mx.array(v), scale, causal))
    ref = f64(native(lambda q, k, v: attn.attention(q, k, v, scale, causal))(mx.array(q), mx.array(k), mx.array(v)))
    np.testing.assert_allclose(fast, ref, atol=2e-6)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    want = F.scaled_dot_product_attention(torch.tensor(q).double(), torch.tensor(k).double(), torch.tensor(v).double(),
                                          attn_mask=mask if causal else None).numpy()
    np.testing.assert_allclose(fast, want, atol=2e-6)


@pytest.mark.parametrize("T,S", [(300, 300), (200, 260)])
def test_attention_by_query_blocks_equals_one_block(rng, T, S):
    q, k, v = qkv(rng, B=1, nh=2, T=T, S=S)
    g = rng.normal(0, 1, q.shape).astype(np.float32)
    args = [mx.array(a) for a in (q, k, v)]

    def run(block):
        old, attn.QUERY_BLOCK = attn.QUERY_BLOCK, block
        try:
            return mx.vjp(lambda q, k, v: attn.attention(q, k, v, 0.3, True), args, [mx.array(g)])
        finally:
            attn.QUERY_BLOCK = old

    (blocked,), blocked_grads = run(128)
    (whole,), whole_grads = run(10**6)
    np.testing.assert_allclose(f64(blocked), f64(whole), atol=1e-6)
    for a, b in zip(blocked_grads, whole_grads):
        np.testing.assert_allclose(f64(a), f64(b), atol=1e-5)


def test_attention_gradients_match_torch(rng, torch):
    F = torch.nn.functional
    q, k, v = qkv(rng)
    g = rng.normal(0, 1, q.shape).astype(np.float32)
    scale = 1 / np.sqrt(8)

    def fast_grads(q, k, v, g):
        return mx.vjp(lambda q, k, v: attn.attention(q, k, v, scale, True), [q, k, v], [g])[1]

    grads = mx.compile(fast_grads)(*(mx.array(a) for a in (q, k, v, g)))
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(torch.tensor(g, dtype=torch.float64))
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(f64(got), want.numpy(), atol=1e-5)


def test_attention_is_causal(rng):
    q, k, v = qkv(rng)
    out = f64(attn.attention(mx.array(q), mx.array(k), mx.array(v), 0.35, True))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 9:] += 5.0
    v2[:, :, 9:] -= 3.0
    out2 = f64(attn.attention(mx.array(q), mx.array(k2), mx.array(v2), 0.35, True))
    np.testing.assert_array_equal(out[:, :, :9], out2[:, :, :9])
    assert not np.allclose(out[:, :, 9:], out2[:, :, 9:])


def test_causal_mask_is_aligned_to_the_last_query():
    m = np.array(attn.causal_mask(2, 4))
    assert m.tolist() == [[0, 0, 0, -np.inf], [0, 0, 0, 0]]


# ---------------------------------------------------------------------------- the model end to end


def test_gpt_logits_and_gradients_equal_the_native_path():
    cfg = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = build(cfg, seed=3)
    x = mx.random.randint(0, 101, (3, 32), key=mx.random.key(4))
    y = mx.random.randint(0, 101, (3, 32), key=mx.random.key(5))

    def loss(model, x, y):
        return ops.cross_entropy(model(x), y).mean()

    fast_logits = model(x)
    fast_loss, fast_grads = nn.value_and_grad(model, loss)(model, x, y)
    with ops.native_ops():
        ref_logits = model(x)
        ref_loss, ref_grads = nn.value_and_grad(model, loss)(model, x, y)
        mx.eval(ref_logits, ref_loss, ref_grads)
    np.testing.assert_allclose(f64(fast_logits), f64(ref_logits), atol=1e-5)
    assert abs(fast_loss.item() - ref_loss.item()) < 1e-5
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(fast_grads), tree_flatten(ref_grads)):
        np.testing.assert_allclose(f64(a), f64(b), atol=1e-6, err_msg=name)


def test_cached_decoding_equals_the_full_forward():
    model = build(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=1)
    x = mx.random.randint(0, 50, (1, 12), key=mx.random.key(2))
    full = f64(model(x))
    cache = model.make_cache()
    steps = [f64(model(x[:, :5], cache))] + [f64(model(x[:, i:i + 1], cache)) for i in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
