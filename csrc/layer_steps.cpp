// The layer steps and layer directions (schemas in ops.cpp) as compositions of the component ops
// called through the dispatcher (common/layer_compositions.h), registered as
// CompositeExplicitAutograd: every device without a kernel of its own runs this. CUDA registers
// its own layer steps (csrc/cuda/layer_steps_cuda.cpp), which, for a small layer, compute the
// coefficients in the last block of the reduction: one launch less per direction (issue 13); the
// directions call the steps through the dispatcher, so that kernel still runs inside them, and
// CUDA registers its own BIN / IEBN directions too (one launch when the activation fits on chip,
// issue 14). The CPU registers the same compositions calling its kernels directly
// (cpu/layer_directions_cpu.cpp). The whole-layer ops (layer_autograd.cpp) call the directions.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/layer_compositions.h"
#include "common/op_handles.h"

namespace {

using nf_compose::Compositions;
using nf_compose::Eight;
using nf_compose::Five;
using nf_compose::Four;
using nf_compose::OptTensor;
using nf_compose::Pair;
using nf_compose::Seven;
using nf_compose::Six;
using nf_ops::find;
using at::Tensor;

// The component ops through the dispatcher (handles typed with the schemas' C++ signatures, which
// are these functions' own, looked up once).
struct Dispatched {
  static Pair moments(const Tensor& x) {
    static const auto op = find<decltype(moments)>("normfuse::moments");
    return op.call(x);
  }

  static Tensor affine_apply(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift,
                             bool relu) {
    static const auto op = find<decltype(affine_apply)>("normfuse::affine_apply");
    return op.call(x, mean, scale, shift, relu);
  }

  static Pair backward_sums(const Tensor& dy, const Tensor& x, const Tensor& mean, const OptTensor& scale,
                            const OptTensor& shift) {
    static const auto op = find<decltype(backward_sums)>("normfuse::backward_sums");
    return op.call(dy, x, mean, scale, shift);
  }

  static Tensor backward_apply(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& c_dy,
                               const Tensor& c_x, const Tensor& c_0, const OptTensor& scale, const OptTensor& shift) {
    static const auto op = find<decltype(backward_apply)>("normfuse::backward_apply");
    return op.call(dy, x, mean, c_dy, c_x, c_0, scale, shift);
  }

  static Pair bin_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum, double eps,
                               const OptTensor& num_batches_tracked) {
    static const auto op = find<decltype(bin_coefficients)>("normfuse::bin_coefficients");
    return op.call(mean, m2, plane_size, gate, weight, bias, running_mean, running_var, training, momentum, eps,
                   num_batches_tracked);
  }

  static Pair iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate_weight,
                                const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                double momentum, double eps, const OptTensor& num_batches_tracked) {
    static const auto op = find<decltype(iebn_coefficients)>("normfuse::iebn_coefficients");
    return op.call(mean, m2, plane_size, gate_weight, gate_bias, weight, bias, running_mean, running_var, training,
                   momentum, eps, num_batches_tracked);
  }

  static Six bin_coefficients_backward(const Tensor& g1, const Tensor& g2, const Tensor& mean, const Tensor& m2,
                                       int64_t plane_size, const Tensor& gate, const OptTensor& weight,
                                       const OptTensor& bias, const OptTensor& running_mean,
                                       const OptTensor& running_var, bool training, double eps) {
    static const auto op = find<decltype(bin_coefficients_backward)>("normfuse::bin_coefficients_backward");
    return op.call(g1, g2, mean, m2, plane_size, gate, weight, bias, running_mean, running_var, training, eps);
  }

  static Seven iebn_coefficients_backward(const Tensor& g1, const Tensor& g2, const Tensor& mean, const Tensor& m2,
                                          int64_t plane_size, const Tensor& gate_weight, const Tensor& gate_bias,
                                          const OptTensor& weight, const OptTensor& bias,
                                          const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                          double eps) {
    static const auto op = find<decltype(iebn_coefficients_backward)>("normfuse::iebn_coefficients_backward");
    return op.call(g1, g2, mean, m2, plane_size, gate_weight, gate_bias, weight, bias, running_mean, running_var,
                   training, eps);
  }

  static Pair assoc_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                 const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
                                 const Tensor& weight, const Tensor& bias, double eps) {
    static const auto op = find<decltype(assoc_coefficients)>("normfuse::assoc_coefficients");
    return op.call(mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps);
  }

  static Pair ilm_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                               const Tensor& encoder, const Tensor& decoder_weight, const Tensor& decoder_bias,
                               const Tensor& weight, const Tensor& bias, double eps) {
    static const auto op = find<decltype(ilm_coefficients)>("normfuse::ilm_coefficients");
    return op.call(mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight, bias, eps);
  }

  static Eight assoc_coefficients_backward(const Tensor& g1, const Tensor& g2, const Tensor& mean, const Tensor& m2,
                                           int64_t plane_size, int64_t num_groups, const Tensor& encoder,
                                           const Tensor& decoder_mean, const Tensor& decoder_var,
                                           const Tensor& weight, const Tensor& bias, double eps) {
    static const auto op = find<decltype(assoc_coefficients_backward)>("normfuse::assoc_coefficients_backward");
    return op.call(g1, g2, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps);
  }

  static Eight ilm_coefficients_backward(const Tensor& g1, const Tensor& g2, const Tensor& mean, const Tensor& m2,
                                         int64_t plane_size, int64_t num_groups, const Tensor& encoder,
                                         const Tensor& decoder_weight, const Tensor& decoder_bias,
                                         const Tensor& weight, const Tensor& bias, double eps) {
    static const auto op = find<decltype(ilm_coefficients_backward)>("normfuse::ilm_coefficients_backward");
    return op.call(g1, g2, mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight, bias,
                   eps);
  }

  // The BIN / IEBN layer steps as ops (a device's own step kernel runs), typed with their
  // compositions' signatures (the schemas').
  using C = Compositions<Dispatched>;

  template <class... A>
  static Four bin_step(const A&... a) {
    static const auto op = find<decltype(C::bin_moments_coefficients)>("normfuse::bin_moments_coefficients");
    return op.call(a...);
  }

  template <class... A>
  static Four iebn_step(const A&... a) {
    static const auto op = find<decltype(C::iebn_moments_coefficients)>("normfuse::iebn_moments_coefficients");
    return op.call(a...);
  }

  template <class... A>
  static Six bin_step_backward(const A&... a) {
    static const auto op =
        find<decltype(C::bin_sums_coefficients_backward)>("normfuse::bin_sums_coefficients_backward");
    return op.call(a...);
  }

  template <class... A>
  static Seven iebn_step_backward(const A&... a) {
    static const auto op =
        find<decltype(C::iebn_sums_coefficients_backward)>("normfuse::iebn_sums_coefficients_backward");
    return op.call(a...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CompositeExplicitAutograd, m) {
  nf_compose::register_compositions<Dispatched>(m);
}
