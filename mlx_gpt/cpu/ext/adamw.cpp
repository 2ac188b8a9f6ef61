// The AdamW update of one parameter as one primitive: the parameter and its moments read and
// written in one pass (in place when nothing else holds them), where MLX's graph of the update
// makes a pass and an array for each of its operations.
#include <cmath>
#include <stdexcept>

#include "common.h"
#include "parallel.h"
#include "primitives.h"

namespace mlx_gpt {

namespace {

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

}  // namespace

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

void AdamWUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // the parameter and moments are overwritten in place when no one else holds them
  for (int i = 0; i < 3; ++i) {
    auto& in = inputs[i == 0 ? 0 : i + 1];
    if (in.is_donatable() && in.flags().row_contiguous && in.data_size() == in.size())
      outputs[i].copy_shared_buffer(in);
    else
      allocate(outputs[i]);
  }
  dispatch(stream(), inputs, outputs,
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

}  // namespace mlx_gpt
