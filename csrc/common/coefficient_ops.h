// The coefficient ops' entry points (schemas in csrc/ops.cpp), written once for every device:
// the argument checks and the params struct (common/coefficients_glue.h) are called here, in one
// order for every device. A device (cpu/coefficient_ops_cpu.cpp, cuda/coefficients_glue.cpp)
// supplies these steps:
//
//   dispatch(op, mean, m2, f)             its own checks of the statistics, then f(S{}) with S
//                                         the C++ type of the params (CPU: float or double; CUDA:
//                                         float only)
//   batch_forward(op, p, mean, iebn)      -> ForwardOutputs   p: BatchCoefParams<S>, checked
//   batch_backward(op, p, mean, iebn)     -> BackwardOutputs
//   assoc_forward(op, p, mean)            -> ForwardOutputs   p: AssocCoefParams<S>, checked
//   assoc_backward(op, p, mean)           -> BackwardOutputs
//   ilm_forward(op, p, mean)              -> ForwardOutputs   p: IlmCoefParams<S>, checked
//   ilm_backward(op, p, mean)             -> BackwardOutputs  (only devices that call register_ilm)
//
// A step gets the params with every argument checked and every input pointer set; it allocates the
// outputs (forward_outputs / backward_outputs) and runs its kernel. `op` is the op's name, for
// messages. `iebn` tells IEBN (two gates) from BIN: told, not read off p.gate_bias, which is null
// for IEBN too when C = 0 (an empty tensor's data).
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
    return batch_forward("bin_coefficients", mean, m2, plane_size, gate, nullptr, weight, bias, running_mean,
                         running_var, training, momentum, eps, num_batches_tracked);
  }

  static Tensors6 bin_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                            const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                            const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double eps) {
    const BackwardOutputs o = batch_backward("bin_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size,
                                             gate, nullptr, weight, bias, running_mean, running_var, training, eps);
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2]};
  }

  static Tensors2 iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                    const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                    const OptTensor& bias, const OptTensor& running_mean,
                                    const OptTensor& running_var, bool training, double momentum, double eps,
                                    const OptTensor& num_batches_tracked) {
    return batch_forward("iebn_coefficients", mean, m2, plane_size, gate_weight, &gate_bias, weight, bias,
                         running_mean, running_var, training, momentum, eps, num_batches_tracked);
  }

  static Tensors7 iebn_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                             const Tensor& m2, int64_t plane_size, const Tensor& gate_weight,
                                             const Tensor& gate_bias, const OptTensor& weight,
                                             const OptTensor& bias, const OptTensor& running_mean,
                                             const OptTensor& running_var, bool training, double eps) {
    const BackwardOutputs o =
        batch_backward("iebn_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, gate_weight,
                       &gate_bias, weight, bias, running_mean, running_var, training, eps);
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2], o.grads[3]};
  }

  static Tensors2 assoc_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                     const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
                                     const Tensor& weight, const Tensor& bias, double eps) {
    const char* op = "assoc_coefficients";
    ForwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = assoc_params<decltype(tag)>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                                           weight, bias, eps);
      o = Device::assoc_forward(op, p, mean);
    });
    return {o.scale, o.shift};
  }

  static Tensors8 assoc_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                              const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                              const Tensor& encoder, const Tensor& decoder_mean,
                                              const Tensor& decoder_var, const Tensor& weight, const Tensor& bias,
                                              double eps) {
    const char* op = "assoc_coefficients_backward";
    BackwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = assoc_params<decltype(tag)>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                                           weight, bias, eps);
      set_gradient_sums(p, op, sum_dy, sum_dy_xmu, mean);
      o = Device::assoc_backward(op, p, mean);
    });
    return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2], o.grads[3], o.grads[4]};
  }

  static Tensors2 ilm_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                   const Tensor& encoder, const Tensor& decoder_weight, const Tensor& decoder_bias,
                                   const Tensor& weight, const Tensor& bias, double eps) {
    const char* op = "ilm_coefficients";
    ForwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = ilm_params<decltype(tag)>(op, mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias,
                                         weight, bias, eps);
      o = Device::ilm_forward(op, p, mean);
    });
    return {o.scale, o.shift};
  }

  static Tensors8 ilm_coefficients_backward(const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean,
                                            const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                            const Tensor& encoder, const Tensor& decoder_weight,
                                            const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias,
                                            double eps) {
    const char* op = "ilm_coefficients_backward";
    BackwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = ilm_params<decltype(tag)>(op, mean, m2, plane_size, num_groups, encoder, decoder_weight, decoder_bias,
                                         weight, bias, eps);
      set_gradient_sums(p, op, sum_dy, sum_dy_xmu, mean);
      o = Device::ilm_backward(op, p, mean);
    });
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

  // The ILM-Norm ops (CPU and CUDA kernels; apart from register_all so that a device can have
  // the other layers' kernels without these).
  static void register_ilm(torch::Library& m) {
    m.impl("ilm_coefficients", &ilm_coefficients);
    m.impl("ilm_coefficients_backward", &ilm_coefficients_backward);
  }

 private:
  // BIN and IEBN: `gate_bias` is null for BIN (its one gate is `gate`), IEBN's gate_bias otherwise.
  static Tensors2 batch_forward(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight,
                                const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                                bool training, double momentum, double eps, const OptTensor& num_batches_tracked) {
    ForwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = batch_params<decltype(tag)>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                           running_var, training, momentum, eps);
      set_batch_counter(p, op, num_batches_tracked, mean, running_mean, running_var);
      o = Device::batch_forward(op, p, mean, gate_bias != nullptr);
    });
    return {o.scale, o.shift};
  }

  static BackwardOutputs batch_backward(const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                        const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                        double eps) {
    BackwardOutputs o;
    Device::dispatch(op, mean, m2, [&](auto tag) {
      auto p = batch_params<decltype(tag)>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                           running_var, training, 0.0, eps);
      batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
      o = Device::batch_backward(op, p, mean, gate_bias != nullptr);
    });
    return o;
  }
};

}  // namespace nf_coef_glue
