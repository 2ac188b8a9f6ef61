"""The C++ CPU kernels (mlx_gpt/cpu/ext) against float64, the pure-MLX path and PyTorch.

"Exact to float32 rounding" is checked as: no further from the float64 value than a few units in
the last place of the value (or of its row's scale where the formula itself cancels). Inputs
include odd sizes (no multiple of the vector width), shapes large enough to be split over
threads, and non-contiguous views; gradients are taken under ``mx.compile`` inside
``value_and_grad`` as the train step takes them.
"""

import os
import shutil
import subprocess
import sys
import threading

import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import native
from mlx_gpt.cpu import attention as attn
from mlx_gpt.cpu import accelerate, extension, ops
from mlx_gpt.models.gpt import GPTConfig, build

from conftest import ROOT

EPS = np.finfo(np.float32).eps

kernels = extension.load()
needs_kernels = pytest.mark.skipif(kernels is None, reason=f"C++ kernels not available: {extension.status()}")


def f64(a) -> np.ndarray:
    return np.array(a, dtype=np.float64)


def within_ulps(got, exact, ulps: float, scale=None) -> float:
    """Largest error in units of 2**-23 of max(|exact|, scale); asserts it is at most ``ulps``."""
    ref = np.abs(exact) if scale is None else np.maximum(np.abs(exact), scale)
    err = (np.abs(f64(got) - exact) / np.maximum(ref, np.finfo(np.float32).tiny)).max() / EPS
    assert err <= ulps, f"{err:.2f} ulps"
    return err


def views(rng, shape):
    """The same values as a contiguous array, a transposed view and a strided slice."""
    x = rng.normal(0, 1, shape).astype(np.float32)
    wide = mx.array(np.repeat(x, 2, axis=-1))[..., ::2]
    if x.ndim == 1:
        return x, [mx.array(x), wide]
    t = mx.array(np.ascontiguousarray(np.swapaxes(x, -1, -2))).swapaxes(-1, -2)
    return x, [mx.array(x), t, wide]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_the_kernels_build_where_a_compiler_cmake_and_nanobind_are_present():
    if sys.platform != "linux" or os.environ.get(native.DISABLE_ENV):
        pytest.skip("the extension is built for MLX's CPU backend on Linux")
    try:
        import nanobind  # noqa: F401
    except ImportError:
        pytest.skip("nanobind is not installed")
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("no cmake or C++ compiler")
    assert kernels is not None, extension.status()
    assert extension.status().startswith("C++ extension")


# ---------------------------------------------------------------------------- GELU


def gelu64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_grad64(x):
    x = np.asarray(x, np.float64)
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * du


@needs_kernels
@pytest.mark.parametrize("shape", [(7,), (3, 5, 1001), (64, 3072)])
def test_gelu_values_and_gradients_match_float64(rng, shape):
    x, arrays = views(rng, shape)
    x = x * 4
    g = rng.normal(0, 1, shape).astype(np.float32)
    for a in arrays:
        a = a * 4
        # relative to max(|value|, 1): GELU cancels to tiny values for large negative x
        within_ulps(kernels.gelu_approx(a), gelu64(x), 4, scale=1.0)
        dx = mx.vjp(kernels.gelu_approx, [a], [mx.array(g)])[1][0]
        within_ulps(dx, g * gelu_grad64(x), 8, scale=np.abs(g) * np.maximum(np.abs(x), 1))


@needs_kernels
def test_gelu_special_values_and_jvp():
    x = mx.array([np.inf, np.nan, 0.0, -100.0, 100.0], dtype=mx.float32)
    out = f64(kernels.gelu_approx(x))
    assert out[0] == np.inf and np.isnan(out[1]) and out[2] == 0 and out[3] == 0 and out[4] == 100
    a = mx.array(np.linspace(-6, 6, 101, dtype=np.float32))
    t = mx.ones_like(a)
    within_ulps(mx.jvp(kernels.gelu_approx, [a], [t])[1][0], gelu_grad64(np.array(a)), 8, scale=1.0)


# ---------------------------------------------------------------------------- layer norm


def layer_norm64(x, w, b, eps):
    x = np.asarray(x, np.float64)
    d = x - x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((d * d).mean(-1, keepdims=True) + eps)
    return d * rstd * w + b, d * rstd, rstd


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 131), (4, 64, 768)])
def test_layer_norm_values_and_gradients_match_float64(rng, shape):
    c = shape[-1]
    x, arrays = views(rng, shape)
    x = x * 3 + 1.5  # an offset the two-pass variance must not lose
    w = rng.normal(1, 0.3, c).astype(np.float32)
    b = rng.normal(0, 0.3, c).astype(np.float32)
    g = rng.normal(0, 1, shape).astype(np.float32)
    y64, xhat, rstd = layer_norm64(x, w, b, 1e-5)
    gw = g * w
    dx64 = rstd * (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True))
    rows = int(np.prod(shape[:-1]))
    for a in arrays:
        a = a * 3 + 1.5

        def f(a, w, b):
            return kernels.layer_norm(a, w, b, 1e-5)

        y, (dx, dw, db) = mx.vjp(f, [a, mx.array(w), mx.array(b)], [mx.array(g)])
        y = y[0]
        within_ulps(y, y64, 16, scale=np.abs(w) + np.abs(b))
        within_ulps(dx, dx64, 64, scale=np.abs(gw).max(-1, keepdims=True) * rstd)
        # column sums over rows: a float32 sum of `rows` terms
        within_ulps(dw, (g * xhat).reshape(-1, c).sum(0), 4 * rows, scale=np.abs(g * xhat).reshape(-1, c).max(0))
        within_ulps(db, g.reshape(-1, c).sum(0), 4 * rows, scale=np.abs(g).reshape(-1, c).max(0))


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 131), (4, 64, 768)])
def test_rms_norm_values_and_gradients_match_float64(rng, shape):
    c = shape[-1]
    x, arrays = views(rng, shape)
    w = rng.normal(1, 0.3, c).astype(np.float32)
    g = rng.normal(0, 1, shape).astype(np.float32)
    x64 = np.asarray(x, np.float64)
    rstd = 1 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5)
    xhat = x64 * rstd
    gw = g * w
    dx64 = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdims=True))
    rows = int(np.prod(shape[:-1]))
    for a in arrays:
        y, (dx, dw) = mx.vjp(lambda a, w: kernels.rms_norm(a, w, 1e-5), [a, mx.array(w)], [mx.array(g)])
        within_ulps(y[0], xhat * w, 16, scale=np.abs(w))
        within_ulps(dx, dx64, 64, scale=np.abs(gw).max(-1, keepdims=True) * rstd)
        within_ulps(dw, (g * xhat).reshape(-1, c).sum(0), 4 * rows, scale=np.abs(g * xhat).reshape(-1, c).max(0))


# ---------------------------------------------------------------------------- softmax


def softmax64(s, scale=1.0, causal=False):
    s = np.asarray(s, np.float64) * scale
    if causal:
        t, n = s.shape[-2:]
        s = s + np.where(np.arange(n)[None] > np.arange(n - t, n)[:, None], -np.inf, 0)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@needs_kernels
@pytest.mark.parametrize("shape,scale,causal", [((5, 33), 1.0, False), ((2, 3, 17, 17), 0.125, True),
                                                ((2, 3, 5, 41), 0.7, True), ((4, 6, 256, 256), 0.125, True)])
def test_softmax_values_and_gradients_match_float64(rng, shape, scale, causal):
    x, arrays = views(rng, shape)
    x = x * 6
    g = rng.normal(0, 1, shape).astype(np.float32)
    p64 = softmax64(x, scale, causal)
    dx64 = scale * p64 * (g - (g * p64).sum(-1, keepdims=True))
    for a in arrays:
        a = a * 6
        p, (dx,) = mx.vjp(lambda a: kernels.softmax(a, scale, causal), [a], [mx.array(g)])
        within_ulps(p[0], p64, 8, scale=p64.max(-1, keepdims=True))
        within_ulps(dx, dx64, 16, scale=scale * p64 * np.abs(g).max(-1, keepdims=True) + 1e-30)
        # the Jacobian is symmetric: the JVP is the same product
        within_ulps(mx.jvp(lambda a: kernels.softmax(a, scale, causal), [a], [mx.array(g)])[1][0], dx64, 16,
                    scale=scale * p64 * np.abs(g).max(-1, keepdims=True) + 1e-30)


def attention64(q, k, v, g, scale, causal):
    """softmax(scale q k^T, masked) v and its gradients for q, k, v, in float64."""
    q, k, v, g = (f64(a) for a in (q, k, v, g))
    s = scale * q @ np.swapaxes(k, -1, -2)
    if causal:
        t, n = s.shape[-2:]
        s = np.where(np.arange(n)[None] > np.arange(n - t, n)[:, None], -np.inf, s)
    p = softmax64(s)
    dp = g @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return p @ v, scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ g


def heads(rng, batch, n_head, length, hs, parts):
    """``parts`` arrays (batch, n_head, length, hs) split out of one (batch, length, parts * C) projection,
    as attention receives them: views whose rows are parts * C apart."""
    x = mx.array(rng.normal(0, 1, (batch, length, parts * n_head * hs)).astype(np.float32))
    return [t.reshape(batch, length, n_head, hs).transpose(0, 2, 1, 3) for t in mx.split(x, parts, axis=-1)]


@needs_kernels
@pytest.mark.parametrize("batch,n_head,T,S,hs,causal", [
    (2, 4, 64, 64, 32, True),     # nanoGPT's CPU example
    (2, 6, 256, 256, 64, True),   # its shakespeare-char model: split over threads
    (3, 2, 17, 29, 24, True),     # a prefill after 12 cached positions; hs not a multiple of 16
    (2, 2, 1, 9, 64, True),       # one query
    (1, 3, 5, 5, 16, False),
    (1, 1, 7, 3, 8, False)])
def test_attention_values_and_gradients_match_float64(rng, batch, n_head, T, S, hs, causal):
    (q,) = heads(rng, batch, n_head, T, hs, 1)
    k, v = heads(rng, batch, n_head, S, hs, 2)
    g = rng.normal(0, 1, q.shape).astype(np.float32)
    scale = hs ** -0.5
    exact = attention64(q, k, v, g, scale, causal)
    # the projection's views, the same values contiguous, and q with a strided last axis
    strided_q = mx.array(np.repeat(np.array(q), 2, axis=-1))[..., ::2]
    for args in ([q, k, v], [mx.contiguous(a) for a in (q, k, v)], [strided_q, k, v]):
        f = mx.compile(lambda q, k, v: mx.vjp(lambda q, k, v: kernels.attention(q, k, v, scale, causal),
                                              [q, k, v], [mx.array(g)]))
        (y,), grads = f(*args)
        # a product of float32 rows against float64: a few ulps of the largest term of each head
        for got, want in zip([y, *grads], exact):
            within_ulps(got, want, 32, scale=np.abs(want).max(axis=(-2, -1), keepdims=True))
    # stored as (B, T, nh, hs), read as (B, nh, T, hs) like any array
    np.testing.assert_array_equal(np.array(y.transpose(0, 2, 1, 3).reshape(batch, T, -1)),
                                  np.array(y).transpose(0, 2, 1, 3).reshape(batch, T, -1))


@needs_kernels
@pytest.mark.parametrize("T,length", [(1, 23), (3, 23), (1, 40), (1, 1), (2, 2)])
def test_cache_attention_reads_only_the_written_positions(rng, T, length):
    batch, n_head, capacity, hs = 2, 3, 40, 16
    (q,) = heads(rng, batch, n_head, T, hs, 1)
    k, v = (np.array(a) for a in heads(rng, batch, n_head, capacity, hs, 2))
    exact = attention64(q, k[:, :, :length], v[:, :, :length], np.zeros(q.shape, np.float32), hs ** -0.5, True)[0]
    k[:, :, length:] = v[:, :, length:] = np.nan  # not written yet: never read
    f = mx.compile(lambda q, k, v, n: kernels.cache_attention(q, k, v, n, hs ** -0.5))
    y = f(q, mx.array(k), mx.array(v), mx.array(length, mx.int32))
    within_ulps(y, exact, 32, scale=np.abs(exact).max(axis=(-2, -1), keepdims=True))
    with pytest.raises(ValueError, match="no gradient"):
        mx.grad(lambda q: kernels.cache_attention(q, mx.array(k), mx.array(v), mx.array(length, mx.int32),
                                                  1.0).sum())(q)


@needs_kernels
def test_attention_with_the_kernels_equals_the_pure_mlx_path(rng):
    q, k, v = (mx.array(rng.normal(0, 1, (2, 3, 300, 16)).astype(np.float32)) for _ in range(3))
    g = mx.array(rng.normal(0, 1, (2, 3, 300, 16)).astype(np.float32))

    def run():
        f = mx.compile(lambda q, k, v: mx.vjp(lambda q, k, v: attn.attention(q, k, v, 0.25, True), [q, k, v], [g]))
        return f(q, k, v)

    fast, fast_grads = run()
    with ops.pure_mlx_ops():
        ref, ref_grads = run()
    np.testing.assert_allclose(f64(fast[0]), f64(ref[0]), atol=2e-6)
    for a, b in zip(fast_grads, ref_grads):
        np.testing.assert_allclose(f64(a), f64(b), atol=1e-5)


# ---------------------------------------------------------------------------- cross-entropy


def cross_entropy64(x, t, s):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(x, t[..., None], -1)[..., 0]
    p = np.exp(x - lse[..., None])
    onehot = np.zeros_like(x)
    np.put_along_axis(onehot, t[..., None], 1.0, -1)
    return lse - (1 - s) * picked - s * x.mean(-1), p - (1 - s) * onehot - s / x.shape[-1]


@needs_kernels
@pytest.mark.parametrize("shape,smoothing", [((3, 11), 0.0), ((2, 5, 1001), 0.1), ((256, 50257), 0.0)])
def test_cross_entropy_values_and_gradients_match_float64(rng, shape, smoothing):
    x, arrays = views(rng, shape)
    x = x * 3
    t = rng.integers(0, shape[-1], shape[:-1])
    c = rng.uniform(0.5, 1.5, shape[:-1]).astype(np.float32)
    loss64, grad64 = cross_entropy64(x, t, smoothing)
    for a, dtype in zip(arrays, [mx.int32, mx.int64, mx.uint32]):
        a = a * 3

        def f(a):
            return kernels.cross_entropy(a, mx.array(t).astype(dtype), smoothing)

        loss, (dx,) = mx.vjp(f, [a], [mx.array(c)])
        within_ulps(loss[0], loss64, 8, scale=np.log(shape[-1]))
        # p - s / V cancels: errors are relative to the terms, not to their difference
        p = grad64 + smoothing / shape[-1]
        within_ulps(dx, c[..., None] * grad64, 16, scale=c[..., None] * (np.abs(p) + smoothing / shape[-1]))


@needs_kernels
def test_cross_entropy_of_a_target_out_of_range_is_nan():
    loss = f64(kernels.cross_entropy(mx.zeros((2, 4)), mx.array([1, 4])))
    assert loss[0] == pytest.approx(np.log(4)) and np.isnan(loss[1])


# ---------------------------------------------------------------------------- in a train step


def small_gpt():
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=48)
    model = accelerate(build(cfg, seed=1))
    x = mx.random.randint(0, 97, (3, 31), key=mx.random.key(2))
    y = mx.random.randint(0, 97, (3, 31), key=mx.random.key(3))
    return model, x, y


def compiled_loss_and_grads(model, x, y, label_smoothing=0.0):
    def loss(model, x, y):
        return ops.cross_entropy(model(x), y, label_smoothing).mean()

    loss_and_grad = nn.value_and_grad(model, loss)
    step = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=model.state, outputs=model.state)
    return step(x, y)


@needs_kernels
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_compiled_gpt_step_with_the_kernels_equals_the_pure_mlx_step(label_smoothing):
    model, x, y = small_gpt()
    loss, grads = compiled_loss_and_grads(model, x, y, label_smoothing)
    with ops.pure_mlx_ops():
        ref_loss, ref_grads = compiled_loss_and_grads(model, x, y, label_smoothing)
    assert abs(loss.item() - ref_loss.item()) <= 4e-6 * abs(ref_loss.item())
    flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    for key, g in flat.items():
        ref = f64(ref_flat[key])
        np.testing.assert_allclose(f64(g), ref, atol=2e-5 * max(np.abs(ref).max(), 1e-3), err_msg=key)


@needs_kernels
def test_kernels_give_the_same_results_on_two_streams_at_once(rng):
    # each stream runs on a thread of its own; a busy thread pool must not mix their rows
    x = mx.array(rng.normal(0, 1, (512, 1536)).astype(np.float32))
    want = [kernels.gelu_approx(x), kernels.softmax(x, 0.5, False)]
    mx.eval(want)
    results = [None, None]

    def work(i):
        with mx.stream(mx.new_stream(mx.cpu)):
            outs = []
            for _ in range(20):
                outs = [kernels.gelu_approx(x), kernels.softmax(x, 0.5, False)]
                mx.eval(outs)
            results[i] = outs

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outs in results:
        for got, ref in zip(outs, want):
            assert mx.array_equal(got, ref)


# ---------------------------------------------------------------------------- the fallback


def test_environment_variable_turns_the_kernels_off_and_the_pure_path_agrees():
    code = (
        "import mlx_gpt, mlx.core as mx\n"
        "from mlx_gpt.cpu import extension, ops\n"
        "x = mx.linspace(-5, 5, 1001)\n"
        "print(extension.status())\n"
        "print(extension.load() is None, ops.gelu_approx(x).sum().item())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), native.DISABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status, result = out.stdout.strip().splitlines()
    assert status == f"pure MLX ({native.DISABLE_ENV} is set)"
    off, total = result.split()
    assert off == "True"
    x = mx.linspace(-5, 5, 1001)
    assert abs(float(total) - ops.gelu_approx(x).sum().item()) <= 1e-5 * abs(float(total))


# ---------------------------------------------------------------------------- AdamW


@needs_kernels
@pytest.mark.parametrize("shape,decay", [((37, 129), 0.1), ((1001,), 0.0)])
def test_adamw_update_follows_torch_adamw_over_several_steps(rng, shape, decay):
    torch = pytest.importorskip("torch")
    p0 = rng.normal(0, 1, shape).astype(np.float32)
    grads = [rng.normal(0, 1e-2, shape).astype(np.float32) for _ in range(5)]
    lrs = [1e-2, 8e-3, 5e-3, 3e-3, 1e-3]
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=decay)
    p, m, v = mx.array(p0), mx.zeros(shape), mx.zeros(shape)
    pure = (mx.array(p0), mx.zeros(shape), mx.zeros(shape))
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for group in topt.param_groups:
            group["lr"] = lr
        tp.grad = torch.tensor(g)
        topt.step()
        args = (mx.array(g), mx.array(lr), mx.array(t, mx.uint64), (0.9, 0.95), 1e-8, decay, True)
        p, m, v = ops.adamw_update(p, args[0], m, v, *args[1:])
        with ops.pure_mlx_ops():
            pure = ops.adamw_update(pure[0], args[0], pure[1], pure[2], *args[1:])
        state = topt.state[tp]
        # m sums gradients of either sign: its rounding is relative to the gradients' scale
        np.testing.assert_allclose(f64(m), state["exp_avg"].double().numpy(), rtol=1e-6, atol=1e-6 * 1e-2)
        np.testing.assert_allclose(f64(v), state["exp_avg_sq"].double().numpy(), rtol=1e-6, atol=1e-16)
        # a weight moves by about lr per update, rounded in float32 by either side, and each
        # update rounds the weight itself (an ulp or two of it per update)
        tol = dict(rtol=2 * t * EPS, atol=2e-6 * lr / 1e-2)
        np.testing.assert_allclose(f64(p), tp.detach().double().numpy(), **tol)
        np.testing.assert_allclose(f64(p), f64(pure[0]), **tol)
