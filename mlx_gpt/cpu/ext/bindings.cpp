// Python bindings: the module mlx_gpt.cpu.extension loads as _mlx_gpt_ext.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "primitives.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_mlx_gpt_ext, m) {
  m.doc() = "CPU kernels for mlx_gpt as MLX primitives";
  m.def("gelu_approx", &mlx_gpt::gelu_approx, "x"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("layer_norm", &mlx_gpt::layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("rms_norm", &mlx_gpt::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("softmax", &mlx_gpt::softmax, "x"_a, "scale"_a = 1.0f, "causal"_a = false, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("attention", &mlx_gpt::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a = true, "starts"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none());
  m.def("cache_attention", &mlx_gpt::cache_attention, "q"_a, "k"_a, "v"_a, "length"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("cross_entropy", &mlx_gpt::cross_entropy, "logits"_a, "targets"_a, "smoothing"_a = 0.0f, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("adamw_update", &mlx_gpt::adamw_update, "parameter"_a, "gradient"_a, "m"_a, "v"_a, "lr"_a, "step"_a,
        "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a, "bias_correction"_a = true, nb::kw_only(),
        "stream"_a = nb::none());
}
