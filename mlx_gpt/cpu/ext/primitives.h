// MLX primitives for the CPU hot paths of a GPT step: tanh-GELU, layer and RMS norm, softmax (causal
// masking fused), attention, and cross-entropy, each with the primitive of its backward pass,
// and the AdamW update.
//
// The ops take float32 arrays of any layout (they are made row-contiguous first) and run on the
// CPU only: mlx_gpt picks them when the default device is the CPU and uses MLX's own kernels
// elsewhere.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "common.h"

namespace mlx_gpt {

namespace mx = mlx::core;

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3))), elementwise
mx::array gelu_approx(const mx::array& x, mx::StreamOrDevice s = {});

// (x - mean) / sqrt(var + eps) * weight + bias over the last axis
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s = {});

// x / sqrt(mean(x**2) + eps) * weight over the last axis
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

// softmax(scale * x) over the last axis (scale > 0); with `causal`, row i of each (T, S) matrix sees only the
// keys j <= i + S - T (the mask aligned to the last query) and is 0 elsewhere
mx::array softmax(const mx::array& x, float scale, bool causal, mx::StreamOrDevice s = {});

// softmax(scale q k^T [+ causal mask]) v for q (B, nh, T, hs) and k, v (B, nh, S, hs), S >= T, the
// mask aligned to the last query. The inputs may be any views whose last axis is contiguous (the
// heads of a (B, T, 3 nh hs) projection); the result is laid out as (B, T, nh, hs), so that the
// transpose back to (B, T, C) is free. With `starts` (B, T) int32 (packed rows: T == S, causal), query
// i sees only keys starts[b, i] .. i, the tokens of its own example: starts restart where an
// example begins and never decrease along a row.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    const std::optional<mx::array>& starts = std::nullopt, mx::StreamOrDevice s = {});

// attention over a fixed-capacity cache: k, v (B, nh, S, hs) hold `length` (an int32 scalar array,
// read when the kernel runs) written positions and then unwritten ones, and the T queries are the
// last T written positions, each seeing the keys up to its own. Only the written keys are read.
// Decoding only: it has no gradient.
mx::array cache_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& length,
                          float scale, mx::StreamOrDevice s = {});

// logsumexp(logits) - (1 - smoothing) logits[target] - smoothing mean(logits), per row; a target
// outside [0, V) gives NaN
mx::array cross_entropy(const mx::array& logits, const mx::array& targets, float smoothing,
                        mx::StreamOrDevice s = {});

// One AdamW update of a parameter, as torch.optim.AdamW makes it: returns (parameter, m, v).
// `lr` and `step` are scalar arrays (the schedule's rate, the 1-based update count); the
// parameter first decays by lr * weight_decay; with `bias_correction` the moments are divided by
// 1 - beta1**step and 1 - beta2**step.
std::vector<mx::array> adamw_update(const mx::array& parameter, const mx::array& gradient, const mx::array& m,
                                    const mx::array& v, const mx::array& lr, const mx::array& step, float beta1,
                                    float beta2, float eps, float weight_decay, bool bias_correction,
                                    mx::StreamOrDevice s = {});

class GeluApprox : public mx::UnaryPrimitive {
 public:
  explicit GeluApprox(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { no_gpu(name()); }
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxGptGeluApprox"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

// inputs (x, cotangent) -> the cotangent times GELU'(x)
class GeluApproxGrad : public mx::UnaryPrimitive {
 public:
  explicit GeluApproxGrad(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { no_gpu(name()); }
  const char* name() const override { return "MlxGptGeluApproxGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

// inputs (x, weight[, bias]) -> (y[, mean], rstd): layer norm when `centred` (with a bias), RMS
// norm without; mean and rstd (one per row) feed the backward pass
class Norm : public mx::Primitive {
 public:
  Norm(mx::Stream stream, float eps, bool centred) : mx::Primitive(stream), eps_(eps), centred_(centred) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return centred_ ? "MlxGptLayerNorm" : "MlxGptRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Norm&>(other);
    return eps_ == o.eps_ && centred_ == o.centred_;
  }

 private:
  float eps_;
  bool centred_;
};

// inputs (x, weight, cotangent[, mean], rstd) -> (dx, dweight[, dbias])
class NormGrad : public mx::Primitive {
 public:
  NormGrad(mx::Stream stream, bool centred) : mx::Primitive(stream), centred_(centred) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  const char* name() const override { return centred_ ? "MlxGptLayerNormGrad" : "MlxGptRMSNormGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return centred_ == static_cast<const NormGrad&>(other).centred_;
  }

 private:
  bool centred_;
};

class Softmax : public mx::UnaryPrimitive {
 public:
  Softmax(mx::Stream stream, float scale, bool causal) : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { no_gpu(name()); }
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxGptSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Softmax&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
  bool causal_;
};

// inputs (p, cotangent) -> scale p (cotangent - sum(cotangent p)); the softmax's Jacobian is
// symmetric, so this is both its VJP and its JVP
class SoftmaxGrad : public mx::UnaryPrimitive {
 public:
  SoftmaxGrad(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { no_gpu(name()); }
  const char* name() const override { return "MlxGptSoftmaxGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const SoftmaxGrad&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
};

// inputs (q, k, v[, length or starts]) -> (out, logsumexp of each query's scaled scores); the backward
// pass recomputes the attention weights from the log-sum-exps instead of keeping them. With `length`
// (cache_attention; one, or one a row) only that many keys count, and there is no backward pass;
// with `starts` (packed rows) each query sees only the keys from its example's first.
class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream stream, float scale, bool causal, bool packed = false)
      : mx::Primitive(stream), scale_(scale), causal_(causal), packed_(packed) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxGptAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && packed_ == o.packed_;
  }

 private:
  float scale_;
  bool causal_;
  bool packed_;  // a fourth input: packed rows' starts (else, with four, a cache's length)
};

// inputs (q, k, v, out, logsumexp, cotangent[, starts]) -> (dq, dk, dv)
class AttentionGrad : public mx::Primitive {
 public:
  AttentionGrad(mx::Stream stream, float scale, bool causal, bool packed = false)
      : mx::Primitive(stream), scale_(scale), causal_(causal), packed_(packed) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  const char* name() const override { return "MlxGptAttentionGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttentionGrad&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && packed_ == o.packed_;
  }

 private:
  float scale_;
  bool causal_;
  bool packed_;
};

// inputs (logits, int32 targets) -> (loss, max, sum of e**(logits - max)), one per row
class CrossEntropy : public mx::Primitive {
 public:
  CrossEntropy(mx::Stream stream, float smoothing) : mx::Primitive(stream), smoothing_(smoothing) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxGptCrossEntropy"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return smoothing_ == static_cast<const CrossEntropy&>(other).smoothing_;
  }

 private:
  float smoothing_;
};

// inputs (logits, targets, max, sum, cotangent) -> d loss / d logits
class CrossEntropyGrad : public mx::UnaryPrimitive {
 public:
  CrossEntropyGrad(mx::Stream stream, float smoothing) : mx::UnaryPrimitive(stream), smoothing_(smoothing) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { no_gpu(name()); }
  const char* name() const override { return "MlxGptCrossEntropyGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return smoothing_ == static_cast<const CrossEntropyGrad&>(other).smoothing_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float smoothing_;
};

// inputs (parameter, gradient, m, v, lr, step) -> (parameter, m, v)
class AdamWUpdate : public mx::Primitive {
 public:
  AdamWUpdate(mx::Stream stream, float beta1, float beta2, float eps, float weight_decay, bool bias_correction)
      : mx::Primitive(stream), beta1_(beta1), beta2_(beta2), eps_(eps), weight_decay_(weight_decay),
        bias_correction_(bias_correction) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(name()); }
  const char* name() const override { return "MlxGptAdamWUpdate"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AdamWUpdate&>(other);
    return beta1_ == o.beta1_ && beta2_ == o.beta2_ && eps_ == o.eps_ && weight_decay_ == o.weight_decay_ &&
           bias_correction_ == o.bias_correction_;
  }

 private:
  float beta1_, beta2_, eps_, weight_decay_;
  bool bias_correction_;
};

}  // namespace mlx_gpt
