#include "primitives.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "vecmath.h"

namespace mlx_gpt {

namespace {

constexpr int64_t kGrain = 16384;  // elements below which a loop is not worth splitting

int64_t rows_per_share(int64_t row_length) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_length, 1));
}

// ------------------------------------------------------------------------------------- GELU

// 0.5 x (1 + tanh(u)) == x sigmoid(z) with z = 2u = x (K1 + K2 x**2); sigmoid from e = e**-|z|
constexpr float kK1 = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kK2 = kK1 * 0.044715f;

void gelu_forward(const float* x, float* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float v = x[i];
    float z = v * (kK1 + kK2 * (v * v));
    float e = exp_nonpositive(-std::fabs(z));
    y[i] = v * ((v >= 0.0f ? 1.0f : e) / (1.0f + e));
  }
}

// d/dx x s(z) = s + x z' s (1 - s), with s (1 - s) = e / (1 + e)**2 for either sign of z
void gelu_backward(const float* x, const float* g, float* dx, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float v = x[i];
    float z = v * (kK1 + kK2 * (v * v));
    float e = exp_nonpositive(-std::fabs(z));
    float e1 = 1.0f + e;
    float dz = kK1 + (3.0f * kK2) * (v * v);
    dx[i] = g[i] * ((v >= 0.0f ? 1.0f : e) / e1 + (v * dz) * (e / (e1 * e1)));
  }
}

// ------------------------------------------------------------------------------- layer norm

void layer_norm_rows(const float* x, const float* w, const float* b, float eps, int64_t c, float* y, float* mean,
                     float* rstd, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    float m = sum(xr, c) / c;
    for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] - m;  // centred first: two-pass variance
    float var = dot(yr, yr, c) / c;
    float s = 1.0f / std::sqrt(var + eps);
    for (int64_t j = 0; j < c; ++j) yr[j] = (yr[j] * s) * w[j] + b[j];
    mean[r] = m;
    rstd[r] = s;
  }
}

// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)); the weight's and bias's gradients are
// column sums of g xhat and g, accumulated per share in `dw`, `db`
void layer_norm_grad_rows(const float* x, const float* w, const float* g, const float* mean, const float* rstd,
                          int64_t c, float* dx, float* dw, float* db, int64_t begin, int64_t end) {
  std::vector<float> xhat(c);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    const float* gr = g + r * c;
    float* dxr = dx + r * c;
    float m = mean[r], s = rstd[r];
    for (int64_t j = 0; j < c; ++j) {
      xhat[j] = (xr[j] - m) * s;
      dxr[j] = gr[j] * w[j];  // g w, overwritten below
      dw[j] += gr[j] * xhat[j];
      db[j] += gr[j];
    }
    float a = sum(dxr, c) / c;
    float bb = dot(dxr, xhat.data(), c) / c;
    for (int64_t j = 0; j < c; ++j) dxr[j] = s * ((dxr[j] - a) - xhat[j] * bb);
  }
}

// --------------------------------------------------------------------------------- RMS norm

void rms_norm_rows(const float* x, const float* w, float eps, int64_t c, float* y, float* rstd, int64_t begin,
                   int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    float s = 1.0f / std::sqrt(dot(xr, xr, c) / c + eps);
    for (int64_t j = 0; j < c; ++j) yr[j] = (xr[j] * s) * w[j];
    rstd[r] = s;
  }
}

// dx = rstd (g w - xhat mean(g w xhat)); the weight's gradient is the column sums of g xhat,
// accumulated per share in `dw`
void rms_norm_grad_rows(const float* x, const float* w, const float* g, const float* rstd, int64_t c, float* dx,
                        float* dw, int64_t begin, int64_t end) {
  std::vector<float> xhat(c);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    const float* gr = g + r * c;
    float* dxr = dx + r * c;
    float s = rstd[r];
    for (int64_t j = 0; j < c; ++j) {
      xhat[j] = xr[j] * s;
      dxr[j] = gr[j] * w[j];  // g w, overwritten below
      dw[j] += gr[j] * xhat[j];
    }
    float bb = dot(dxr, xhat.data(), c) / c;
    for (int64_t j = 0; j < c; ++j) dxr[j] = s * (dxr[j] - xhat[j] * bb);
  }
}

// ---------------------------------------------------------------------------------- softmax

// keys row `r` of a (rows, s) softmax sees: all of them, or the causal prefix
inline int64_t visible_keys(int64_t r, int64_t t, int64_t s, bool causal) {
  if (!causal) return s;
  int64_t v = r % t + s - t + 1;
  return v < 0 ? 0 : (v > s ? s : v);
}

void softmax_rows(const float* x, float* p, float scale, bool causal, int64_t t, int64_t s, int64_t begin,
                  int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * s;
    float* pr = p + r * s;
    int64_t n = visible_keys(r, t, s, causal);
    if (n > 0) {
      float m = max(xr, n) * scale;  // scale > 0
      for (int64_t j = 0; j < n; ++j) pr[j] = exp_nonpositive(xr[j] * scale - m);
      float total = sum(pr, n);
      for (int64_t j = 0; j < n; ++j) pr[j] = pr[j] / total;
    }
    for (int64_t j = n; j < s; ++j) pr[j] = 0.0f;
  }
}

void softmax_grad_rows(const float* p, const float* g, float* dx, float scale, int64_t s, int64_t begin,
                       int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* pr = p + r * s;
    const float* gr = g + r * s;
    float* dxr = dx + r * s;
    float pg = dot(pr, gr, s);
    for (int64_t j = 0; j < s; ++j) dxr[j] = scale * (pr[j] * (gr[j] - pg));
  }
}

// ---------------------------------------------------------------------------- cross-entropy

// also keeps each row's max and sum of e**(x - max): softmax = e**(x - max) / sum, exactly as a
// softmax kernel computes it (e**(x - logsumexp) would carry the rounding of logsumexp)
void cross_entropy_rows(const float* logits, const int32_t* targets, float smoothing, int64_t v, float* loss,
                        float* row_max, float* row_sum, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = logits + r * v;
    float m = max(xr, v);
    float total = sum_of(v, [xr, m](int64_t j) { return exp_nonpositive(xr[j] - m); });
    float l = m + std::log(total);
    int32_t t = targets[r];
    float picked = (t >= 0 && t < v) ? xr[t] : NAN;
    float out = l - (1.0f - smoothing) * picked;
    if (smoothing != 0.0f) out -= smoothing * (sum(xr, v) / v);
    loss[r] = out;
    row_max[r] = m;
    row_sum[r] = total;
  }
}

// d loss / d logits = cotangent (softmax - (1 - s) onehot(target) - s / V)
void cross_entropy_grad_rows(const float* logits, const int32_t* targets, const float* row_max,
                             const float* row_sum, const float* cot, float smoothing, int64_t v, float* dx,
                             int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = logits + r * v;
    float* dxr = dx + r * v;
    float c = cot[r], m = row_max[r], total = row_sum[r], off = c * (smoothing / v);
    for (int64_t j = 0; j < v; ++j) dxr[j] = c * (exp_nonpositive(xr[j] - m) / total) - off;
    int32_t t = targets[r];
    if (t >= 0 && t < v) dxr[t] -= (1.0f - smoothing) * c;
  }
}

// ------------------------------------------------------------------------------------ AdamW

struct AdamWCoefficients {
  float beta1, beta2, eps, decay;  // decay: 1 - lr * weight_decay
  float step_size;                 // lr / (1 - beta1**t)
  float correction2;               // sqrt(1 - beta2**t)
};

// torch.optim.AdamW's arithmetic, element by element: p *= 1 - lr wd; m = lerp(m, g, 1 - b1);
// v = b2 v + (1 - b2) g g; p -= step_size m / (sqrt(v) / sqrt(1 - b2**t) + eps)
void adamw_rows(const float* p, const float* g, const float* m, const float* v, const AdamWCoefficients& k,
                float* p_out, float* m_out, float* v_out, int64_t begin, int64_t end) {
  const float w1 = 1.0f - k.beta1, w2 = 1.0f - k.beta2;
  for (int64_t i = begin; i < end; ++i) {
    float gi = g[i];
    float mi = m[i] + w1 * (gi - m[i]);
    float vi = k.beta2 * v[i] + w2 * (gi * gi);
    float denom = std::sqrt(vi) / k.correction2 + k.eps;
    p_out[i] = p[i] * k.decay + (-k.step_size) * (mi / denom);
    m_out[i] = mi;
    v_out[i] = vi;
  }
}

mx::Shape leading_shape(const mx::array& x) {
  return mx::Shape(x.shape().begin(), x.shape().end() - 1);
}

int64_t last_dim(const mx::array& x) {
  return x.ndim() == 0 ? 1 : x.shape(-1);
}

}  // namespace

// ------------------------------------------------------------------------------------- ops

mx::array gelu_approx(const mx::array& x, mx::StreamOrDevice s) {
  require_float32(x, "gelu_approx: x");
  auto stream = mx::to_stream(s);
  auto xc = mx::contiguous(x, false, stream);
  return mx::array(xc.shape(), mx::float32, std::make_shared<GeluApprox>(stream), {xc});
}

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s) {
  require_float32(x, "layer_norm: x");
  require_float32(weight, "layer_norm: weight");
  require_float32(bias, "layer_norm: bias");
  if (x.ndim() == 0 || weight.ndim() != 1 || bias.ndim() != 1 || weight.shape(0) != x.shape(-1) ||
      bias.shape(0) != x.shape(-1))
    throw std::invalid_argument("layer_norm: weight and bias must be vectors as long as x's last axis");
  auto stream = mx::to_stream(s);
  auto rows = leading_shape(x);
  auto outs = mx::array::make_arrays(
      {x.shape(), rows, rows}, {mx::float32, mx::float32, mx::float32}, std::make_shared<LayerNorm>(stream, eps),
      {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream), mx::contiguous(bias, false, stream)});
  return outs[0];
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require_float32(x, "rms_norm: x");
  require_float32(weight, "rms_norm: weight");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: weight must be a vector as long as x's last axis");
  auto stream = mx::to_stream(s);
  auto outs = mx::array::make_arrays({x.shape(), leading_shape(x)}, {mx::float32, mx::float32},
                                     std::make_shared<RMSNorm>(stream, eps),
                                     {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream)});
  return outs[0];
}

mx::array softmax(const mx::array& x, float scale, bool causal, mx::StreamOrDevice s) {
  require_float32(x, "softmax: x");
  if (x.ndim() < (causal ? 2 : 1)) throw std::invalid_argument("softmax: x has too few axes");
  if (!(scale > 0.0f)) throw std::invalid_argument("softmax: scale must be positive");
  auto stream = mx::to_stream(s);
  auto xc = mx::contiguous(x, false, stream);
  return mx::array(xc.shape(), mx::float32, std::make_shared<Softmax>(stream, scale, causal), {xc});
}

mx::array cross_entropy(const mx::array& logits, const mx::array& targets, float smoothing, mx::StreamOrDevice s) {
  require_float32(logits, "cross_entropy: logits");
  if (logits.ndim() != targets.ndim() + 1 || leading_shape(logits) != targets.shape())
    throw std::invalid_argument("cross_entropy: targets must have the shape of logits without its last axis");
  if (!mx::issubdtype(targets.dtype(), mx::integer))
    throw std::invalid_argument("cross_entropy: targets must be integers");
  auto stream = mx::to_stream(s);
  auto outs = mx::array::make_arrays(
      {targets.shape(), targets.shape(), targets.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<CrossEntropy>(stream, smoothing),
      {mx::contiguous(logits, false, stream), mx::contiguous(mx::astype(targets, mx::int32, stream), false, stream)});
  return outs[0];
}

std::vector<mx::array> adamw_update(const mx::array& parameter, const mx::array& gradient, const mx::array& m,
                                    const mx::array& v, const mx::array& lr, const mx::array& step, float beta1,
                                    float beta2, float eps, float weight_decay, bool bias_correction,
                                    mx::StreamOrDevice s) {
  for (auto* a : {&parameter, &gradient, &m, &v}) require_float32(*a, "adamw_update: parameter, gradient and moments");
  if (gradient.shape() != parameter.shape() || m.shape() != parameter.shape() || v.shape() != parameter.shape())
    throw std::invalid_argument("adamw_update: gradient and moments must have the parameter's shape");
  if (lr.size() != 1 || step.size() != 1) throw std::invalid_argument("adamw_update: lr and step must be scalars");
  auto stream = mx::to_stream(s);
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, stream); };
  auto scalar = [&](const mx::array& a) { return mx::reshape(mx::astype(a, mx::float32, stream), {}, stream); };
  return mx::array::make_arrays(
      {parameter.shape(), parameter.shape(), parameter.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<AdamWUpdate>(stream, beta1, beta2, eps, weight_decay, bias_correction),
      {c(parameter), c(gradient), c(m), c(v), scalar(lr), scalar(step)});
}

// ------------------------------------------------------------------------------ primitives

void GeluApprox::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& x = inputs[0];
  float* y = allocate(out);
  dispatch(stream(), inputs, {&out}, [x = x.data<float>(), y, n = static_cast<int64_t>(x.size())] {
    Pool::instance().run(n, kGrain, [&](int, int64_t b, int64_t e) { gelu_forward(x, y, b, e); });
  });
}

void GeluApprox::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(name()); }

std::vector<mx::array> GeluApprox::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                       const std::vector<int>&, const std::vector<mx::array>&) {
  auto g = mx::contiguous(cotangents[0], false, stream());
  return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GeluApproxGrad>(stream()), {primals[0], g})};
}

std::vector<mx::array> GeluApprox::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                       const std::vector<int>& argnums) {
  return vjp(primals, tangents, argnums, {});
}

void GeluApproxGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  float* dx = allocate(out);
  dispatch(stream(), inputs, {&out},
           [x = inputs[0].data<float>(), g = inputs[1].data<float>(), dx, n = static_cast<int64_t>(out.size())] {
             Pool::instance().run(n, kGrain, [&](int, int64_t b, int64_t e) { gelu_backward(x, g, dx, b, e); });
           });
}

void GeluApproxGrad::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(name()); }

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t c = last_dim(inputs[0]);
  int64_t rows = inputs[0].size() / std::max<int64_t>(c, 1);
  float* y = allocate(outputs[0]);
  float* mean = allocate(outputs[1]);
  float* rstd = allocate(outputs[2]);
  dispatch(stream(), inputs, {&outputs[0], &outputs[1], &outputs[2]},
           [x = inputs[0].data<float>(), w = inputs[1].data<float>(), b = inputs[2].data<float>(), eps = eps_, c,
            rows, y, mean, rstd] {
             Pool::instance().run(rows, rows_per_share(c), [&](int, int64_t lo, int64_t hi) {
               layer_norm_rows(x, w, b, eps, c, y, mean, rstd, lo, hi);
             });
           });
}

void LayerNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

std::vector<mx::array> LayerNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto g = mx::contiguous(cotangents[0], false, stream());
  auto grads = mx::array::make_arrays({x.shape(), w.shape(), w.shape()}, {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<LayerNormGrad>(stream()), {x, w, g, outputs[1], outputs[2]});
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(grads[a]);
  return out;
}

void LayerNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t c = last_dim(inputs[0]);
  int64_t rows = inputs[0].size() / std::max<int64_t>(c, 1);
  float* dx = allocate(outputs[0]);
  float* dw = allocate(outputs[1]);
  float* db = allocate(outputs[2]);
  dispatch(stream(), inputs, {&outputs[0], &outputs[1], &outputs[2]},
           [x = inputs[0].data<float>(), w = inputs[1].data<float>(), g = inputs[2].data<float>(),
            mean = inputs[3].data<float>(), rstd = inputs[4].data<float>(), c, rows, dx, dw, db] {
             auto& pool = Pool::instance();
             // per-share column sums, added up after the loop
             std::vector<float> partial(static_cast<size_t>(pool.max_parts()) * 2 * c, 0.0f);
             std::vector<char> used(pool.max_parts(), 0);
             pool.run(rows, rows_per_share(c), [&](int part, int64_t lo, int64_t hi) {
               used[part] = 1;
               float* pw = partial.data() + part * 2 * c;
               layer_norm_grad_rows(x, w, g, mean, rstd, c, dx, pw, pw + c, lo, hi);
             });
             for (int64_t j = 0; j < c; ++j) dw[j] = db[j] = 0.0f;
             for (int part = 0; part < pool.max_parts(); ++part) {
               if (!used[part]) continue;
               const float* pw = partial.data() + part * 2 * c;
               for (int64_t j = 0; j < c; ++j) {
                 dw[j] += pw[j];
                 db[j] += pw[c + j];
               }
             }
           });
}

void LayerNormGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

void RMSNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t c = last_dim(inputs[0]);
  int64_t rows = inputs[0].size() / std::max<int64_t>(c, 1);
  float* y = allocate(outputs[0]);
  float* rstd = allocate(outputs[1]);
  dispatch(stream(), inputs, {&outputs[0], &outputs[1]},
           [x = inputs[0].data<float>(), w = inputs[1].data<float>(), eps = eps_, c, rows, y, rstd] {
             Pool::instance().run(rows, rows_per_share(c), [&](int, int64_t lo, int64_t hi) {
               rms_norm_rows(x, w, eps, c, y, rstd, lo, hi);
             });
           });
}

void RMSNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

std::vector<mx::array> RMSNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto g = mx::contiguous(cotangents[0], false, stream());
  auto grads = mx::array::make_arrays({x.shape(), w.shape()}, {mx::float32, mx::float32},
                                      std::make_shared<RMSNormGrad>(stream()), {x, w, g, outputs[1]});
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(grads[a]);
  return out;
}

void RMSNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t c = last_dim(inputs[0]);
  int64_t rows = inputs[0].size() / std::max<int64_t>(c, 1);
  float* dx = allocate(outputs[0]);
  float* dw = allocate(outputs[1]);
  dispatch(stream(), inputs, {&outputs[0], &outputs[1]},
           [x = inputs[0].data<float>(), w = inputs[1].data<float>(), g = inputs[2].data<float>(),
            rstd = inputs[3].data<float>(), c, rows, dx, dw] {
             auto& pool = Pool::instance();
             // per-share column sums, added up after the loop
             std::vector<float> partial(static_cast<size_t>(pool.max_parts()) * c, 0.0f);
             std::vector<char> used(pool.max_parts(), 0);
             pool.run(rows, rows_per_share(c), [&](int part, int64_t lo, int64_t hi) {
               used[part] = 1;
               rms_norm_grad_rows(x, w, g, rstd, c, dx, partial.data() + part * c, lo, hi);
             });
             for (int64_t j = 0; j < c; ++j) dw[j] = 0.0f;
             for (int part = 0; part < pool.max_parts(); ++part) {
               if (!used[part]) continue;
               const float* pw = partial.data() + part * c;
               for (int64_t j = 0; j < c; ++j) dw[j] += pw[j];
             }
           });
}

void RMSNormGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& x = inputs[0];
  int64_t s = last_dim(x);
  int64_t t = causal_ ? x.shape(-2) : 1;
  int64_t rows = x.size() / std::max<int64_t>(s, 1);
  float* p = allocate(out);
  dispatch(stream(), inputs, {&out},
           [x = x.data<float>(), p, scale = scale_, causal = causal_, t, s, rows] {
             Pool::instance().run(rows, rows_per_share(s), [&](int, int64_t lo, int64_t hi) {
               softmax_rows(x, p, scale, causal, t, s, lo, hi);
             });
           });
}

void Softmax::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(name()); }

std::vector<mx::array> Softmax::vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>&, const std::vector<mx::array>& outputs) {
  auto g = mx::contiguous(cotangents[0], false, stream());
  return {mx::array(outputs[0].shape(), mx::float32, std::make_shared<SoftmaxGrad>(stream(), scale_), {outputs[0], g})};
}

std::vector<mx::array> Softmax::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                    const std::vector<int>&) {
  auto p = softmax(primals[0], scale_, causal_, stream());
  auto t = mx::contiguous(tangents[0], false, stream());
  return {mx::array(p.shape(), mx::float32, std::make_shared<SoftmaxGrad>(stream(), scale_), {p, t})};
}

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  int64_t s = last_dim(out);
  int64_t rows = out.size() / std::max<int64_t>(s, 1);
  float* dx = allocate(out);
  dispatch(stream(), inputs, {&out},
           [p = inputs[0].data<float>(), g = inputs[1].data<float>(), dx, scale = scale_, s, rows] {
             Pool::instance().run(rows, rows_per_share(s), [&](int, int64_t lo, int64_t hi) {
               softmax_grad_rows(p, g, dx, scale, s, lo, hi);
             });
           });
}

void SoftmaxGrad::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(name()); }

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t v = last_dim(inputs[0]);
  int64_t rows = outputs[0].size();
  float* loss = allocate(outputs[0]);
  float* row_max = allocate(outputs[1]);
  float* row_sum = allocate(outputs[2]);
  dispatch(stream(), inputs, {&outputs[0], &outputs[1], &outputs[2]},
           [x = inputs[0].data<float>(), t = inputs[1].data<int32_t>(), s = smoothing_, v, rows, loss, row_max,
            row_sum] {
             Pool::instance().run(rows, rows_per_share(v), [&](int, int64_t lo, int64_t hi) {
               cross_entropy_rows(x, t, s, v, loss, row_max, row_sum, lo, hi);
             });
           });
}

void CrossEntropy::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

std::vector<mx::array> CrossEntropy::vjp(const std::vector<mx::array>& primals,
                                         const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                         const std::vector<mx::array>& outputs) {
  std::vector<mx::array> out;
  for (int a : argnums) {
    if (a == 0) {
      auto c = mx::contiguous(cotangents[0], false, stream());
      out.push_back(mx::array(primals[0].shape(), mx::float32,
                              std::make_shared<CrossEntropyGrad>(stream(), smoothing_),
                              {primals[0], primals[1], outputs[1], outputs[2], c}));
    } else {
      out.push_back(mx::zeros_like(primals[1], stream()));
    }
  }
  return out;
}

void CrossEntropyGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  int64_t v = last_dim(out);
  int64_t rows = out.size() / std::max<int64_t>(v, 1);
  float* dx = allocate(out);
  dispatch(stream(), inputs, {&out},
           [x = inputs[0].data<float>(), t = inputs[1].data<int32_t>(), m = inputs[2].data<float>(),
            total = inputs[3].data<float>(), cot = inputs[4].data<float>(), s = smoothing_, v, rows, dx] {
             Pool::instance().run(rows, rows_per_share(v), [&](int, int64_t lo, int64_t hi) {
               cross_entropy_grad_rows(x, t, m, total, cot, s, v, dx, lo, hi);
             });
           });
}

void CrossEntropyGrad::eval_gpu(const std::vector<mx::array>&, mx::array&) { no_gpu(name()); }

void AdamWUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // the parameter and moments are overwritten in place when no one else holds them
  for (int i = 0; i < 3; ++i) {
    auto& in = inputs[i == 0 ? 0 : i + 1];
    if (in.is_donatable() && in.flags().row_contiguous && in.data_size() == in.size())
      outputs[i].copy_shared_buffer(in);
    else
      allocate(outputs[i]);
  }
  dispatch(stream(), inputs, {&outputs[0], &outputs[1], &outputs[2]},
           [p = inputs[0].data<float>(), g = inputs[1].data<float>(), m = inputs[2].data<float>(),
            v = inputs[3].data<float>(), lr = inputs[4].data<float>(), step = inputs[5].data<float>(),
            p_out = outputs[0].data<float>(), m_out = outputs[1].data<float>(), v_out = outputs[2].data<float>(),
            n = static_cast<int64_t>(outputs[0].size()), b1 = beta1_, b2 = beta2_, eps = eps_, wd = weight_decay_,
            bc = bias_correction_] {
             // the scalars are read here, once the stream has computed them; the corrections in
             // double, as PyTorch computes them from Python floats
             double rate = *lr, t = *step;
             double c1 = bc ? 1.0 - std::pow(static_cast<double>(b1), t) : 1.0;
             double c2 = bc ? 1.0 - std::pow(static_cast<double>(b2), t) : 1.0;
             AdamWCoefficients k{b1, b2, eps, static_cast<float>(1.0 - rate * wd), static_cast<float>(rate / c1),
                                 static_cast<float>(std::sqrt(c2))};
             Pool::instance().run(n, kGrain, [&](int, int64_t lo, int64_t hi) {
               adamw_rows(p, g, m, v, k, p_out, m_out, v_out, lo, hi);
             });
           });
}

void AdamWUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu(name()); }

}  // namespace mlx_gpt
