// The six coefficient ops' entry points (schemas in csrc/ops.cpp), written once for every device.
// A device (cpu/coefficient_ops_cpu.cpp, cuda/coefficients_glue.cpp) supplies four steps, each
// taking the op's name for messages and the arguments in schema order:
//
//   batch_forward(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
//                 running_var, training, momentum, eps, num_batches_tracked) -> (scale, shift)
//   batch_backward(op, sum_dy, sum_dy_xmu, mean, m2, plane_size, gate, gate_bias, weight, bias,
//                  running_mean, running_var, training, eps) -> BackwardOutputs
//   assoc_forward(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
//                 weight, bias, eps) -> (scale, shift)
//   assoc_backward(op, sum_dy, sum_dy_xmu, mean, m2, plane_size, num_groups, encoder,
//                  decoder_mean, decoder_var, weight, bias, eps) -> BackwardOutputs
//
// `gate_bias` is null for BIN (its one gate is `gate`) and IEBN's gate_bias otherwise: that
// Tensor pointer is what tells the two layers apart below this point (not the params struct's
// gate_bias data pointer, which is null for IEBN too when C = 0).
#pragma once
#include <torch/library.h>

#include <tuple>

#include "common/coefficients_glue.h"

namespace nf_coef_glue {

using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <class Device>
struct CoefficientOps {
  static Tensors2 bin_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                   const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                                   const OptTensor& running_var, bool training, double momentum, double eps,
                                   const OptTensor& num_batches_tracked) {
    return Device::batch_forward("bin_coefficients", mean, m2, plane_size, gate, nullptr, weight, bias, running_mean,
                                 running_var, training, momentum, eps, num_batches_tracked);
  }

  static Tensors6 bin_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                            const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                            const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double eps) {
    const BackwardOutputs o = Device::batch_backward("bin_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2,
                                                     plane_size, gate, nullptr, weight, bias, running_mean,
                                                     running_var, training, eps);
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2]};
  }

  static Tensors2 iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                    const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                    const OptTensor& bias, const OptTensor& running_mean,
                                    const OptTensor& running_var, bool training, double momentum, double eps,
                                    const OptTensor& num_batches_tracked) {
    return Device::batch_forward("iebn_coefficients", mean, m2, plane_size, gate_weight, &gate_bias, weight, bias,
                                 running_mean, running_var, training, momentum, eps, num_batches_tracked);
  }

  static Tensors7 iebn_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                             const Tensor& m2, int64_t plane_size, const Tensor& gate_weight,
                                             const Tensor& gate_bias, const OptTensor& weight,
                                             const OptTensor& bias, const OptTensor& running_mean,
                                             const OptTensor& running_var, bool training, double eps) {
    const BackwardOutputs o = Device::batch_backward("iebn_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2,
                                                     plane_size, gate_weight, &gate_bias, weight, bias,
                                                     running_mean, running_var, training, eps);
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2], o.grads[3]};
  }

  static Tensors2 assoc_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                     const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
                                     const Tensor& weight, const Tensor& bias, double eps) {
    return Device::assoc_forward("assoc_coefficients", mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                 decoder_var, weight, bias, eps);
  }

  static Tensors8 assoc_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                              const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                              const Tensor& encoder, const Tensor& decoder_mean,
                                              const Tensor& decoder_var, const Tensor& weight, const Tensor& bias,
                                              double eps) {
    const BackwardOutputs o =
        Device::assoc_backward("assoc_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, num_groups,
                               encoder, decoder_mean, decoder_var, weight, bias, eps);
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2], o.grads[3], o.grads[4]};
  }

  static void register_all(torch::Library& m) {
    m.impl("bin_coefficients", &bin_coefficients);
    m.impl("bin_coefficients_backward", &bin_coefficients_backward);
    m.impl("iebn_coefficients", &iebn_coefficients);
    m.impl("iebn_coefficients_backward", &iebn_coefficients_backward);
    m.impl("assoc_coefficients", &assoc_coefficients);
    m.impl("assoc_coefficients_backward", &assoc_coefficients_backward);
  }
};

}  // namespace nf_coef_glue
