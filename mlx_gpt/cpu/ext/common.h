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

// Queue `task` on the primitive's stream.
template <class F>
void dispatch(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array*> outputs,
              F&& task) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) encoder.set_input_array(a);
  for (auto* a : outputs) encoder.set_output_array(*a);
  encoder.dispatch(std::forward<F>(task));
}

}  // namespace mlx_gpt
