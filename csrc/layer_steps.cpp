// The BIN / IEBN layer steps (schemas in ops.cpp), as compositions of the component ops:
//   <layer>_moments_coefficients        = moments -> <layer>_coefficients
//   <layer>_sums_coefficients_backward  = backward_sums -> <layer>_coefficients_backward
// Registered as CompositeExplicitAutograd, so every device without a kernel of its own runs this;
// CUDA registers its own (csrc/cuda/layer_steps_cuda.cpp), which, for a small layer, computes the
// coefficients in the last block of the reduction: one launch less per direction (issue 13).
// The whole-layer ops (layer_autograd.cpp) call these steps, so the fused path is what a module runs.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_handles.h"

namespace {

using nf_ops::find;
using nf_ops::plane_size;

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Seven = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Pair moments(const Tensor& x) {
  static const auto op = find<Pair(const Tensor&)>("normfuse::moments");
  return op.call(x);
}

Pair backward_sums(const Tensor& dy, const Tensor& x, const Tensor& mean, const OptTensor& scale,
                   const OptTensor& shift) {
  static const auto op =
      find<Pair(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>(
          "normfuse::backward_sums");
  return op.call(dy, x, mean, scale, shift);
}

Four bin_moments_coefficients(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var, bool training,
                              double momentum, double eps, const OptTensor& num_batches_tracked) {
  static const auto op =
      find<Pair(const Tensor&, const Tensor&, int64_t, const Tensor&, const OptTensor&, const OptTensor&,
                const OptTensor&, const OptTensor&, bool, double, double, const OptTensor&)>(
          "normfuse::bin_coefficients");
  auto [mean, m2] = moments(x);
  auto [scale, shift] = op.call(mean, m2, plane_size(x), gate, weight, bias, running_mean, running_var, training,
                                momentum, eps, num_batches_tracked);
  return {std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
}

Four iebn_moments_coefficients(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum, double eps,
                               const OptTensor& num_batches_tracked) {
  static const auto op =
      find<Pair(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const OptTensor&,
                const OptTensor&, const OptTensor&, const OptTensor&, bool, double, double, const OptTensor&)>(
          "normfuse::iebn_coefficients");
  auto [mean, m2] = moments(x);
  auto [scale, shift] = op.call(mean, m2, plane_size(x), gate_weight, gate_bias, weight, bias, running_mean,
                                running_var, training, momentum, eps, num_batches_tracked);
  return {std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
}

Six bin_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                   const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                   double eps, const OptTensor& scale, const OptTensor& shift) {
  static const auto op =
      find<Six(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, const Tensor&, const OptTensor&,
               const OptTensor&, const OptTensor&, const OptTensor&, bool, double)>(
          "normfuse::bin_coefficients_backward");
  auto [g1, g2] = backward_sums(dy, x, mean, scale, shift);
  return op.call(g1, g2, mean, m2, plane_size(x), gate, weight, bias, running_mean, running_var, training, eps);
}

Seven iebn_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                      const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                      const OptTensor& bias, const OptTensor& running_mean,
                                      const OptTensor& running_var, bool training, double eps,
                                      const OptTensor& scale, const OptTensor& shift) {
  static const auto op =
      find<Seven(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&,
                 const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double)>(
          "normfuse::iebn_coefficients_backward");
  auto [g1, g2] = backward_sums(dy, x, mean, scale, shift);
  return op.call(g1, g2, mean, m2, plane_size(x), gate_weight, gate_bias, weight, bias, running_mean, running_var,
                 training, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CompositeExplicitAutograd, m) {
  m.impl("bin_moments_coefficients", &bin_moments_coefficients);
  m.impl("iebn_moments_coefficients", &iebn_moments_coefficients);
  m.impl("bin_sums_coefficients_backward", &bin_sums_coefficients_backward);
  m.impl("iebn_sums_coefficients_backward", &iebn_sums_coefficients_backward);
}
