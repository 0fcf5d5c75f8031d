// CPU ops bin_coefficients / iebn_coefficients and their backward (docs/architecture.md): argument
// checks, outputs, and the call of the kernels (coefficients_batch_impl.h, vectorised over
// channels, AVX2 or portable build: coefficients_kernels.h). The formulas are those of
// common/coefficients.h, shared with the CUDA kernels. Arithmetic in the statistics' dtype.
#include <torch/library.h>

#include <tuple>

#include "common/coefficients_glue.h"
#include "cpu/coefficients_kernels.h"

namespace {

using at::Tensor;
using nf::BatchCoefParams;
using nf_coef::OptTensor;

enum class Layer { Bin, Iebn };

template <class S>
void forward_cpu(Layer layer, const BatchCoefParams<S>& p) {
  if (layer == Layer::Bin)
    NF_CPU_CALL(bin_forward, p);
  else
    NF_CPU_CALL(iebn_forward, p);
}

template <class S>
void backward_cpu(Layer layer, const BatchCoefParams<S>& p) {
  if (layer == Layer::Bin)
    NF_CPU_CALL(bin_backward, p);
  else
    NF_CPU_CALL(iebn_backward, p);
}

// ---- op entry points --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> forward_op(Layer layer, const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                      const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight,
                                      const OptTensor& bias, const OptTensor& running_mean,
                                      const OptTensor& running_var, bool training, double momentum, double eps,
                                      const OptTensor& num_batches_tracked) {
  nf_coef::check_stats(op, mean, m2);  // before the dtype dispatch: a clear message for bad dtypes
  Tensor scale = nf_coef::empty_stats(mean), shift = nf_coef::empty_stats(mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::batch_params<scalar_t>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                             running_var, training, momentum, eps);
    nf_coef::set_batch_counter(p, op, num_batches_tracked, mean);
    p.scale = scale.data_ptr<scalar_t>();
    p.shift = shift.data_ptr<scalar_t>();
    if (p.N > 0) forward_cpu(layer, p);
    if (p.count_batch()) *p.num_batches_tracked += 1;  // every check passed: the call succeeds
  });
  return {scale, shift};
}

// Returns c_dy, c_x, c_0, grad_gate, grad_gate_bias (undefined for BIN), grad_weight, grad_bias.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_op(
    Layer layer, const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2,
    int64_t plane_size, const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  const int64_t C = nf_coef::check_stats(op, mean, m2).second;
  Tensor c_dy = nf_coef::empty_stats(mean), c_x = nf_coef::empty_stats(mean), c_0 = nf_coef::empty_stats(mean);
  Tensor g_gate = nf_coef::empty_grad({C}, mean), g_gate_bias, g_weight = nf_coef::empty_grad({C}, mean),
         g_bias = nf_coef::empty_grad({C}, mean);
  if (gate_bias) g_gate_bias = nf_coef::empty_grad({C}, mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::batch_params<scalar_t>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                             running_var, training, 0.0, eps);
    nf_coef::batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
    p.c_dy = c_dy.data_ptr<scalar_t>();
    p.c_x = c_x.data_ptr<scalar_t>();
    p.c_0 = c_0.data_ptr<scalar_t>();
    p.grad_gate = g_gate.data_ptr<scalar_t>();
    p.grad_gate_bias = gate_bias ? g_gate_bias.data_ptr<scalar_t>() : nullptr;
    p.grad_weight = g_weight.data_ptr<scalar_t>();
    p.grad_bias = g_bias.data_ptr<scalar_t>();
    if (p.N > 0) backward_cpu(layer, p);
  });
  return {c_dy, c_x, c_0, g_gate, g_gate_bias, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> bin_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                            const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double momentum, double eps,
                                            const OptTensor& num_batches_tracked) {
  return forward_op(Layer::Bin, "bin_coefficients", mean, m2, plane_size, gate, nullptr, weight, bias,
                    running_mean, running_var, training, momentum, eps, num_batches_tracked);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bin_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double eps) {
  auto [c_dy, c_x, c_0, g_gate, unused, g_weight, g_bias] =
      backward_op(Layer::Bin, "bin_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, gate,
                                     nullptr, weight, bias, running_mean, running_var, training, eps);
  return {c_dy, c_x, c_0, g_gate, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                             const Tensor& gate_weight, const Tensor& gate_bias,
                                             const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& running_mean, const OptTensor& running_var,
                                             bool training, double momentum, double eps,
                                             const OptTensor& num_batches_tracked) {
  return forward_op(Layer::Iebn, "iebn_coefficients", mean, m2, plane_size, gate_weight, &gate_bias, weight,
                    bias, running_mean, running_var, training, momentum, eps, num_batches_tracked);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> iebn_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  return backward_op(Layer::Iebn, "iebn_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size,
                                         gate_weight, &gate_bias, weight, bias, running_mean, running_var, training,
                                         eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("bin_coefficients", &bin_coefficients);
  m.impl("bin_coefficients_backward", &bin_coefficients_backward);
  m.impl("iebn_coefficients", &iebn_coefficients);
  m.impl("iebn_coefficients_backward", &iebn_coefficients_backward);
}
