// The layer steps and layer directions (schemas in ops.cpp) as compositions of the component ops,
// written once over where the components come from:
//   <layer>_moments_coefficients        = moments -> <layer>_coefficients                 (BIN, IEBN)
//   <layer>_sums_coefficients_backward  = backward_sums -> <layer>_coefficients_backward  (BIN, IEBN)
//   <layer>_layer_forward               = BIN / IEBN: the step above -> affine_apply
//                                         AssocNorm / ILM-Norm: moments -> <layer>_coefficients -> affine_apply
//   <layer>_layer_backward              = BIN / IEBN: the step above -> backward_apply
//                                         AssocNorm / ILM-Norm: backward_sums -> <layer>_coefficients_backward
//                                         -> backward_apply
// `Via` supplies the components (static functions named as the ops, with the ops' signatures, and
// bin_step / iebn_step / bin_step_backward / iebn_step_backward, the BIN / IEBN layer steps):
// * layer_steps.cpp's `Dispatched` calls the ops through the dispatcher; registered as
//   CompositeExplicitAutograd, for every device without kernels of its own. A device's own step
//   kernel (CUDA: the fused small-layer step) then runs inside its directions.
// * cpu/layer_directions_cpu.cpp's `Cpu` calls the CPU kernels directly: one dispatch per
//   direction instead of three or four (issue 13, host cost; docs/performance.md).
// Same kernels in the same order either way, so the results are bitwise those of the ops called
// one by one (tests/csrc/test_layer_direction_ops.py), and so are the refusals.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "common/coefficients_glue.h"  // check_running_not_input
#include "common/op_handles.h"

namespace nf_compose {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Seven = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Eight = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <class Via>
struct Compositions {
  // ---- BIN / IEBN layer steps

  static Four bin_moments_coefficients(const Tensor& x, const Tensor& gate, const OptTensor& weight,
                                       const OptTensor& bias, const OptTensor& running_mean,
                                       const OptTensor& running_var, bool training, double momentum, double eps,
                                       const OptTensor& num_batches_tracked) {
    nf_coef_glue::check_running_not_input("bin_coefficients", x, running_mean, running_var, training);
    auto [mean, m2] = Via::moments(x);
    auto [scale, shift] = Via::bin_coefficients(mean, m2, nf_ops::plane_size(x), gate, weight, bias, running_mean,
                                                running_var, training, momentum, eps, num_batches_tracked);
    return {std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
  }

  static Four iebn_moments_coefficients(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
                                        const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                        double momentum, double eps, const OptTensor& num_batches_tracked) {
    nf_coef_glue::check_running_not_input("iebn_coefficients", x, running_mean, running_var, training);
    auto [mean, m2] = Via::moments(x);
    auto [scale, shift] =
        Via::iebn_coefficients(mean, m2, nf_ops::plane_size(x), gate_weight, gate_bias, weight, bias, running_mean,
                               running_var, training, momentum, eps, num_batches_tracked);
    return {std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
  }

  static Six bin_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                            const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double eps, const OptTensor& scale,
                                            const OptTensor& shift) {
    auto [g1, g2] = Via::backward_sums(dy, x, mean, scale, shift);
    return Via::bin_coefficients_backward(g1, g2, mean, m2, nf_ops::plane_size(x), gate, weight, bias, running_mean,
                                          running_var, training, eps);
  }

  static Seven iebn_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                               const Tensor& m2, const Tensor& gate_weight, const Tensor& gate_bias,
                                               const OptTensor& weight, const OptTensor& bias,
                                               const OptTensor& running_mean, const OptTensor& running_var,
                                               bool training, double eps, const OptTensor& scale,
                                               const OptTensor& shift) {
    auto [g1, g2] = Via::backward_sums(dy, x, mean, scale, shift);
    return Via::iebn_coefficients_backward(g1, g2, mean, m2, nf_ops::plane_size(x), gate_weight, gate_bias, weight,
                                           bias, running_mean, running_var, training, eps);
  }

  // ---- layer directions: the step (Via::*_step: a device's own step kernel where Via dispatches),
  // then the full-size op

  static Five bin_layer_forward(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                double momentum, double eps, const OptTensor& num_batches_tracked, bool relu) {
    auto [mean, m2, scale, shift] =
        Via::bin_step(x, gate, weight, bias, running_mean, running_var, training, momentum, eps, num_batches_tracked);
    Tensor y = Via::affine_apply(x, mean, scale, shift, relu);
    return {std::move(y), std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
  }

  static Five iebn_layer_forward(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
                                 const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                                 const OptTensor& running_var, bool training, double momentum, double eps,
                                 const OptTensor& num_batches_tracked, bool relu) {
    auto [mean, m2, scale, shift] = Via::iebn_step(x, gate_weight, gate_bias, weight, bias, running_mean,
                                                   running_var, training, momentum, eps, num_batches_tracked);
    Tensor y = Via::affine_apply(x, mean, scale, shift, relu);
    return {std::move(y), std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
  }

  static Four bin_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                 const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                 double eps, const OptTensor& scale, const OptTensor& shift) {
    auto [c_dy, c_x, c_0, g_gate, g_weight, g_bias] = Via::bin_step_backward(
        dy, x, mean, m2, gate, weight, bias, running_mean, running_var, training, eps, scale, shift);
    Tensor dx = Via::backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift);
    return {std::move(dx), std::move(g_gate), std::move(g_weight), std::move(g_bias)};
  }

  static Five iebn_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                  const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                  const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                                  bool training, double eps, const OptTensor& scale, const OptTensor& shift) {
    auto [c_dy, c_x, c_0, g_gate_weight, g_gate_bias, g_weight, g_bias] =
        Via::iebn_step_backward(dy, x, mean, m2, gate_weight, gate_bias, weight, bias, running_mean, running_var,
                                training, eps, scale, shift);
    Tensor dx = Via::backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift);
    return {std::move(dx), std::move(g_gate_weight), std::move(g_gate_bias), std::move(g_weight), std::move(g_bias)};
  }

  // AssocNorm / ILM-Norm: their meta networks' parameters are (encoder, decoder_mean or
  // decoder_weight, decoder_var or decoder_bias), then the affine weight and bias.

  static Five assoc_layer_forward(const Tensor& x, int64_t num_groups, const Tensor& encoder,
                                  const Tensor& decoder_mean, const Tensor& decoder_var, const Tensor& weight,
                                  const Tensor& bias, double eps, bool relu) {
    return meta_forward<Via::assoc_coefficients>(x, num_groups, encoder, decoder_mean, decoder_var, weight, bias,
                                                 eps, relu);
  }

  static Five ilm_layer_forward(const Tensor& x, int64_t num_groups, const Tensor& encoder,
                                const Tensor& decoder_weight, const Tensor& decoder_bias, const Tensor& weight,
                                const Tensor& bias, double eps, bool relu) {
    return meta_forward<Via::ilm_coefficients>(x, num_groups, encoder, decoder_weight, decoder_bias, weight, bias,
                                               eps, relu);
  }

  static Six assoc_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                  int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                                  const Tensor& decoder_var, const Tensor& weight, const Tensor& bias, double eps,
                                  const OptTensor& scale, const OptTensor& shift) {
    return meta_backward<Via::assoc_coefficients_backward>(dy, x, mean, m2, num_groups, encoder, decoder_mean,
                                                           decoder_var, weight, bias, eps, scale, shift);
  }

  static Six ilm_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                int64_t num_groups, const Tensor& encoder, const Tensor& decoder_weight,
                                const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias, double eps,
                                const OptTensor& scale, const OptTensor& shift) {
    return meta_backward<Via::ilm_coefficients_backward>(dy, x, mean, m2, num_groups, encoder, decoder_weight,
                                                         decoder_bias, weight, bias, eps, scale, shift);
  }

 private:
  template <auto coefficients>
  static Five meta_forward(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_a,
                           const Tensor& decoder_b, const Tensor& weight, const Tensor& bias, double eps, bool relu) {
    auto [mean, m2] = Via::moments(x);
    auto [scale, shift] =
        coefficients(mean, m2, nf_ops::plane_size(x), num_groups, encoder, decoder_a, decoder_b, weight, bias, eps);
    Tensor y = Via::affine_apply(x, mean, scale, shift, relu);
    return {std::move(y), std::move(mean), std::move(m2), std::move(scale), std::move(shift)};
  }

  template <auto coefficients_backward>
  static Six meta_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                           int64_t num_groups, const Tensor& encoder, const Tensor& decoder_a,
                           const Tensor& decoder_b, const Tensor& weight, const Tensor& bias, double eps,
                           const OptTensor& scale, const OptTensor& shift) {
    auto [g1, g2] = Via::backward_sums(dy, x, mean, scale, shift);
    auto [c_dy, c_x, c_0, g_encoder, g_decoder_a, g_decoder_b, g_weight, g_bias] = coefficients_backward(
        g1, g2, mean, m2, nf_ops::plane_size(x), num_groups, encoder, decoder_a, decoder_b, weight, bias, eps);
    Tensor dx = Via::backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift);
    return {std::move(dx), std::move(g_encoder), std::move(g_decoder_a), std::move(g_decoder_b), std::move(g_weight),
            std::move(g_bias)};
  }
};

// Every step and direction op of `Via`'s compositions, for one dispatch key.
template <class Via>
void register_compositions(torch::Library& m) {
  using C = Compositions<Via>;
  m.impl("bin_moments_coefficients", &C::bin_moments_coefficients);
  m.impl("iebn_moments_coefficients", &C::iebn_moments_coefficients);
  m.impl("bin_sums_coefficients_backward", &C::bin_sums_coefficients_backward);
  m.impl("iebn_sums_coefficients_backward", &C::iebn_sums_coefficients_backward);
  m.impl("bin_layer_forward", &C::bin_layer_forward);
  m.impl("iebn_layer_forward", &C::iebn_layer_forward);
  m.impl("bin_layer_backward", &C::bin_layer_backward);
  m.impl("iebn_layer_backward", &C::iebn_layer_backward);
  m.impl("assoc_layer_forward", &C::assoc_layer_forward);
  m.impl("ilm_layer_forward", &C::ilm_layer_forward);
  m.impl("assoc_layer_backward", &C::assoc_layer_backward);
  m.impl("ilm_layer_backward", &C::ilm_layer_backward);
}

}  // namespace nf_compose
