#include "primitives.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "vecmath.h"

namespace mlx_gpt {

namespace {

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

// ------------------------------------------------------------------ layer norm and RMS norm

// Layer norm when `b` (the bias) is given, RMS norm (no centring, no bias) when it is null:
// xhat = (x - mean) rstd, y = xhat w + b; `mean` is written only for layer norm.
void norm_rows(const float* x, const float* w, const float* b, float eps, int64_t c, float* y, float* mean,
               float* rstd, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    float m = b ? sum(xr, c) / c : 0.0f;
    for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] - m;  // centred first: two-pass variance
    float s = 1.0f / std::sqrt(dot(yr, yr, c) / c + eps);
    if (b)
      for (int64_t j = 0; j < c; ++j) yr[j] = (yr[j] * s) * w[j] + b[j];
    else
      for (int64_t j = 0; j < c; ++j) yr[j] = (yr[j] * s) * w[j];
    if (mean) mean[r] = m;
    rstd[r] = s;
  }
}

// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), without the mean(g w) term for RMS norm (`db`
// null); the weight's and bias's gradients are column sums of g xhat and g, accumulated per share
// in `dw`, `db`
void norm_grad_rows(const float* x, const float* w, const float* g, const float* mean, const float* rstd, int64_t c,
                    float* dx, float* dw, float* db, int64_t begin, int64_t end) {
  std::vector<float> xhat(c);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * c;
    const float* gr = g + r * c;
    float* dxr = dx + r * c;
    float m = mean ? mean[r] : 0.0f, s = rstd[r];
    for (int64_t j = 0; j < c; ++j) {
      xhat[j] = (xr[j] - m) * s;
      dxr[j] = gr[j] * w[j];  // g w, overwritten below
      dw[j] += gr[j] * xhat[j];
    }
    if (db)
      for (int64_t j = 0; j < c; ++j) db[j] += gr[j];
    float a = db ? sum(dxr, c) / c : 0.0f;
    float bb = dot(dxr, xhat.data(), c) / c;
    for (int64_t j = 0; j < c; ++j) dxr[j] = s * ((dxr[j] - a) - xhat[j] * bb);
  }
}

// ---------------------------------------------------------------------------------- softmax

void softmax_rows(const float* x, float* p, float scale, bool causal, int64_t t, int64_t s, int64_t begin,
                  int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * s;
    float* pr = p + r * s;
    int64_t n = visible(r % t, t, s, causal);  // row r % t of its (t, s) matrix
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

mx::Shape leading_shape(const mx::array& x) {
  return mx::Shape(x.shape().begin(), x.shape().end() - 1);
}

int64_t last_dim(const mx::array& x) {
  return x.ndim() == 0 ? 1 : x.shape(-1);
}

int64_t rows_per_share(int64_t row_length) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_length, 1));
}

int64_t row_count(const mx::array& x) {
  return x.size() / std::max<int64_t>(last_dim(x), 1);
}

// Queue body(begin, end) over [0, n) on the stream, split over the pool in shares of at least
// `grain` items.
template <class Outputs, class F>
void dispatch_split(const mx::Stream& stream, const std::vector<mx::array>& inputs, Outputs& outputs, int64_t n,
                    int64_t grain, F body) {
  dispatch(stream, inputs, outputs, [n, grain, body] {
    Pool::instance().run(n, grain, [&](int, int64_t lo, int64_t hi) { body(lo, hi); });
  });
}

// body(partial, begin, end) over [0, rows) split over the pool, each share adding its rows' column
// sums into `partial` (sums.size() vectors of c floats of its own); sums[i] gets the shares' i-th
// vectors added up.
template <class F>
void split_column_sums(int64_t rows, int64_t c, const std::vector<float*>& sums, F body) {
  auto& pool = Pool::instance();
  const int64_t k = static_cast<int64_t>(sums.size());
  std::vector<float> partial(static_cast<size_t>(pool.max_parts() * k * c), 0.0f);
  std::vector<char> used(pool.max_parts(), 0);
  pool.run(rows, rows_per_share(c), [&](int part, int64_t lo, int64_t hi) {
    used[part] = 1;
    body(partial.data() + part * k * c, lo, hi);
  });
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < c; ++j) sums[i][j] = 0.0f;
    for (int part = 0; part < pool.max_parts(); ++part) {
      if (!used[part]) continue;
      const float* pw = partial.data() + (part * k + i) * c;
      for (int64_t j = 0; j < c; ++j) sums[i][j] += pw[j];
    }
  }
}

// the gradients a vjp was asked for, of all its primitive computes
std::vector<mx::array> selected(const std::vector<mx::array>& grads, const std::vector<int>& argnums) {
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(grads[a]);
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------- ops

mx::array gelu_approx(const mx::array& x, mx::StreamOrDevice s) {
  require_float32(x, "gelu_approx: x");
  auto stream = mx::to_stream(s);
  auto xc = mx::contiguous(x, false, stream);
  return mx::array(xc.shape(), mx::float32, std::make_shared<GeluApprox>(stream), {xc});
}

// layer norm with a bias, RMS norm without
mx::array norm(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias, float eps,
               mx::StreamOrDevice s) {
  const char* types = bias ? "layer_norm: x, weight and bias" : "rms_norm: x and weight";
  const char* shapes_error = bias ? "layer_norm: weight and bias must be vectors as long as x's last axis"
                                  : "rms_norm: weight must be a vector as long as x's last axis";
  std::vector<mx::array> inputs{x, weight};
  if (bias) inputs.push_back(*bias);
  for (auto& a : inputs) {
    require_float32(a, types);
    if (&a != &inputs[0] && (x.ndim() == 0 || a.ndim() != 1 || a.shape(0) != x.shape(-1)))
      throw std::invalid_argument(shapes_error);
  }
  auto stream = mx::to_stream(s);
  for (auto& a : inputs) a = mx::contiguous(a, false, stream);
  auto rows = leading_shape(x);
  std::vector<mx::Shape> shapes{x.shape(), rows, rows};
  if (!bias) shapes.pop_back();  // no mean
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                std::make_shared<Norm>(stream, eps, bias.has_value()), inputs)[0];
}

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s) {
  return norm(x, weight, bias, eps, s);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  return norm(x, weight, std::nullopt, eps, s);
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

// ------------------------------------------------------------------------------ primitives

void GeluApprox::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  dispatch_split(stream(), inputs, out, out.size(), kGrain,
                 [x = inputs[0].data<float>(), y = allocate(out)](int64_t b, int64_t e) { gelu_forward(x, y, b, e); });
}

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
  dispatch_split(stream(), inputs, out, out.size(), kGrain,
                 [x = inputs[0].data<float>(), g = inputs[1].data<float>(), dx = allocate(out)](int64_t b, int64_t e) {
                   gelu_backward(x, g, dx, b, e);
                 });
}

void Norm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t c = last_dim(inputs[0]);
  dispatch_split(stream(), inputs, outputs, row_count(inputs[0]), rows_per_share(c),
                 [x = inputs[0].data<float>(), w = inputs[1].data<float>(), eps = eps_, c, y = allocate(outputs[0]),
                  b = centred_ ? inputs[2].data<float>() : nullptr, mean = centred_ ? allocate(outputs[1]) : nullptr,
                  rstd = allocate(outputs.back())](int64_t lo, int64_t hi) {
                   norm_rows(x, w, b, eps, c, y, mean, rstd, lo, hi);
                 });
}

std::vector<mx::array> Norm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  std::vector<mx::array> inputs{primals[0], primals[1], mx::contiguous(cotangents[0], false, stream())};
  inputs.insert(inputs.end(), outputs.begin() + 1, outputs.end());  // [mean,] rstd
  std::vector<mx::Shape> shapes;
  for (auto& p : primals) shapes.push_back(p.shape());
  return selected(mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                         std::make_shared<NormGrad>(stream(), centred_), inputs),
                  argnums);
}

void NormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs,
           [x = inputs[0].data<float>(), w = inputs[1].data<float>(), g = inputs[2].data<float>(),
            mean = centred_ ? inputs[3].data<float>() : nullptr, rstd = inputs.back().data<float>(),
            c = last_dim(inputs[0]), rows = row_count(inputs[0]), dx = allocate(outputs[0]), dw = allocate(outputs[1]),
            db = centred_ ? allocate(outputs[2]) : nullptr] {
             std::vector<float*> sums{dw};
             if (db) sums.push_back(db);
             split_column_sums(rows, c, sums, [&](float* partial, int64_t lo, int64_t hi) {
               norm_grad_rows(x, w, g, mean, rstd, c, dx, partial, db ? partial + c : nullptr, lo, hi);
             });
           });
}

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& x = inputs[0];
  int64_t s = last_dim(x);
  dispatch_split(stream(), inputs, out, row_count(x), rows_per_share(s),
                 [x = x.data<float>(), p = allocate(out), scale = scale_, causal = causal_,
                  t = causal_ ? x.shape(-2) : 1, s](int64_t lo, int64_t hi) {
                   softmax_rows(x, p, scale, causal, t, s, lo, hi);
                 });
}

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
  dispatch_split(stream(), inputs, out, row_count(out), rows_per_share(s),
                 [p = inputs[0].data<float>(), g = inputs[1].data<float>(), dx = allocate(out), scale = scale_,
                  s](int64_t lo, int64_t hi) { softmax_grad_rows(p, g, dx, scale, s, lo, hi); });
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  int64_t v = last_dim(inputs[0]);
  dispatch_split(stream(), inputs, outputs, outputs[0].size(), rows_per_share(v),
                 [x = inputs[0].data<float>(), t = inputs[1].data<int32_t>(), s = smoothing_, v,
                  loss = allocate(outputs[0]), row_max = allocate(outputs[1]),
                  row_sum = allocate(outputs[2])](int64_t lo, int64_t hi) {
                   cross_entropy_rows(x, t, s, v, loss, row_max, row_sum, lo, hi);
                 });
}

std::vector<mx::array> CrossEntropy::vjp(const std::vector<mx::array>& primals,
                                         const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                         const std::vector<mx::array>& outputs) {
  auto c = mx::contiguous(cotangents[0], false, stream());
  auto dx = mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyGrad>(stream(), smoothing_),
                      {primals[0], primals[1], outputs[1], outputs[2], c});
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(a == 0 ? dx : mx::zeros_like(primals[1], stream()));  // targets: none
  return out;
}

void CrossEntropyGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  int64_t v = last_dim(out);
  dispatch_split(stream(), inputs, out, row_count(out), rows_per_share(v),
                 [x = inputs[0].data<float>(), t = inputs[1].data<int32_t>(), m = inputs[2].data<float>(),
                  total = inputs[3].data<float>(), cot = inputs[4].data<float>(), s = smoothing_, v,
                  dx = allocate(out)](int64_t lo, int64_t hi) {
                   cross_entropy_grad_rows(x, t, m, total, cot, s, v, dx, lo, hi);
                 });
}

}  // namespace mlx_gpt
