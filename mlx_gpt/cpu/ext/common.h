// What every primitive's eval_cpu does: allocate its outputs, check dtypes, and queue its loop on
// the stream the way MLX's own CPU kernels are queued.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_gpt {

namespace mx = mlx::core;

inline float* allocate(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return out.data<float>();
}

inline void require_float32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + " must be float32");
}

[[noreturn]] inline void no_gpu(const char* what) {
  throw std::runtime_error(std::string(what) + " runs on the CPU only");
}

// one past the last key that query row r of t sees among s keys: all of them, or (causal) those up
// to the query's own position, the mask aligned to the last query
inline int64_t visible(int64_t r, int64_t t, int64_t s, bool causal) {
  if (!causal) return s;
  int64_t n = r + s - t + 1;
  return n < 0 ? 0 : (n > s ? s : n);
}

inline void set_outputs(mx::cpu::CommandEncoder& encoder, mx::array& out) {
  encoder.set_output_array(out);
}

inline void set_outputs(mx::cpu::CommandEncoder& encoder, std::vector<mx::array>& outputs) {
  for (auto& a : outputs) encoder.set_output_array(a);
}

// Queue `task` on the primitive's stream; `outputs` is its one output or all of them.
template <class Outputs, class F>
void dispatch(const mx::Stream& stream, const std::vector<mx::array>& inputs, Outputs& outputs, F&& task) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) encoder.set_input_array(a);
  set_outputs(encoder, outputs);
  encoder.dispatch(std::forward<F>(task));
}

}  // namespace mlx_gpt
