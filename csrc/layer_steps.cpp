// The BIN / IEBN layer steps and layer directions (schemas in ops.cpp), as compositions of the
// component ops:
//   <layer>_moments_coefficients        = moments -> <layer>_coefficients
//   <layer>_sums_coefficients_backward  = backward_sums -> <layer>_coefficients_backward
//   <layer>_layer_forward               = <layer>_moments_coefficients -> affine_apply
//   <layer>_layer_backward              = <layer>_sums_coefficients_backward -> backward_apply
// Registered as CompositeExplicitAutograd, so every device without a kernel of its own runs this.
// CUDA registers its own layer steps (csrc/cuda/layer_steps_cuda.cpp), which, for a small layer,
// compute the coefficients in the last block of the reduction: one launch less per direction
// (issue 13). The layer directions call the steps through the dispatcher, so that kernel still
// runs inside them; a device may register its own direction too (one launch, issue 14).
// The whole-layer ops (layer_autograd.cpp) call the directions, so the fused path is what a module runs.
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
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
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

// ---- layer directions: the step op (through the dispatcher: a device's own step kernel runs), then the
// full-size op. A step's handle is typed with its composite's signature above (the schema's).

Tensor affine_apply(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift, bool relu) {
  static const auto op =
      find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>("normfuse::affine_apply");
  return op.call(x, mean, scale, shift, relu);
}

Tensor backward_apply(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& c_dy, const Tensor& c_x,
                      const Tensor& c_0, const OptTensor& scale, const OptTensor& shift) {
  static const auto op = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const OptTensor&, const OptTensor&)>("normfuse::backward_apply");
  return op.call(dy, x, mean, c_dy, c_x, c_0, scale, shift);
}

Five bin_layer_forward(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                       double eps, const OptTensor& num_batches_tracked, bool relu) {
  static const auto step = find<decltype(bin_moments_coefficients)>("normfuse::bin_moments_coefficients");
  auto [mean, m2, scale, shift] = step.call(x, gate, weight, bias, running_mean, running_var, training, momentum,
                                            eps, num_batches_tracked);
  Tensor y = affine_apply(x, mean, scale, shift, relu);
  return {std::move(y), std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
}

Five iebn_layer_forward(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        bool training, double momentum, double eps, const OptTensor& num_batches_tracked,
                        bool relu) {
  static const auto step = find<decltype(iebn_moments_coefficients)>("normfuse::iebn_moments_coefficients");
  auto [mean, m2, scale, shift] = step.call(x, gate_weight, gate_bias, weight, bias, running_mean, running_var,
                                            training, momentum, eps, num_batches_tracked);
  Tensor y = affine_apply(x, mean, scale, shift, relu);
  return {std::move(y), std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
}

Four bin_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2, const Tensor& gate,
                        const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                        const OptTensor& running_var, bool training, double eps, const OptTensor& scale,
                        const OptTensor& shift) {
  static const auto step =
      find<decltype(bin_sums_coefficients_backward)>("normfuse::bin_sums_coefficients_backward");
  auto [c_dy, c_x, c_0, g_gate, g_weight, g_bias] =
      step.call(dy, x, mean, m2, gate, weight, bias, running_mean, running_var, training, eps, scale, shift);
  Tensor dx = backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift);
  return {std::move(dx), std::move(g_gate), std::move(g_weight), std::move(g_bias)};
}

Five iebn_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                         const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                         const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                         bool training, double eps, const OptTensor& scale, const OptTensor& shift) {
  static const auto step =
      find<decltype(iebn_sums_coefficients_backward)>("normfuse::iebn_sums_coefficients_backward");
  auto [c_dy, c_x, c_0, g_gate_weight, g_gate_bias, g_weight, g_bias] = step.call(
      dy, x, mean, m2, gate_weight, gate_bias, weight, bias, running_mean, running_var, training, eps, scale, shift);
  Tensor dx = backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift);
  return {std::move(dx), std::move(g_gate_weight), std::move(g_gate_bias), std::move(g_weight), std::move(g_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CompositeExplicitAutograd, m) {
  m.impl("bin_moments_coefficients", &bin_moments_coefficients);
  m.impl("iebn_moments_coefficients", &iebn_moments_coefficients);
  m.impl("bin_sums_coefficients_backward", &bin_sums_coefficients_backward);
  m.impl("iebn_sums_coefficients_backward", &iebn_sums_coefficients_backward);
  m.impl("bin_layer_forward", &bin_layer_forward);
  m.impl("iebn_layer_forward", &iebn_layer_forward);
  m.impl("bin_layer_backward", &bin_layer_backward);
  m.impl("iebn_layer_backward", &iebn_layer_backward);
}
