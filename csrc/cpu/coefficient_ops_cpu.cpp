// CPU coefficient ops (docs/architecture.md; entry points in common/coefficient_ops.h): checks and
// outputs from common/coefficients_glue.h, then the kernels (coefficients_{batch,assoc}_impl.h,
// vectorised over channels, AVX2 or portable build: coefficients_kernels.h). The formulas are
// those of common/coefficients.h, shared with the CUDA kernels. Arithmetic in the statistics'
// dtype (float32 or float64).
#include <torch/library.h>

#include "common/coefficient_ops.h"
#include "cpu/coefficients_kernels.h"

namespace {

using at::Tensor;
using nf_coef_glue::BackwardOutputs;
using nf_coef_glue::OptTensor;

struct Cpu {
  static std::tuple<Tensor, Tensor> batch_forward(const char* op, const Tensor& mean, const Tensor& m2,
                                                  int64_t plane_size, const Tensor& gate, const Tensor* gate_bias,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& running_mean, const OptTensor& running_var,
                                                  bool training, double momentum, double eps,
                                                  const OptTensor& num_batches_tracked) {
    nf_coef_glue::check_stats(op, mean, m2);  // before the dtype dispatch: a clear message for bad dtypes
    nf_coef_glue::ForwardOutputs o;
    nf_coef_glue::dispatch_stats(mean, [&](auto tag) {
      using S = decltype(tag);
      auto p = nf_coef_glue::batch_params<S>(op, mean, m2, plane_size, gate, gate_bias, weight, bias,
                                             running_mean, running_var, training, momentum, eps);
      nf_coef_glue::set_batch_counter(p, op, num_batches_tracked, mean);
      o = nf_coef_glue::forward_outputs(p, mean);
      if (p.N > 0) {
        if (gate_bias)
          NF_CPU_CALL(iebn_forward, p);
        else
          NF_CPU_CALL(bin_forward, p);
      }
      if (p.count_batch()) *p.num_batches_tracked += 1;  // every check passed: the call succeeds
    });
    return {o.scale, o.shift};
  }

  static BackwardOutputs batch_backward(const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                        const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                        double eps) {
    nf_coef_glue::check_stats(op, mean, m2);
    BackwardOutputs o;
    nf_coef_glue::dispatch_stats(mean, [&](auto tag) {
      using S = decltype(tag);
      auto p = nf_coef_glue::batch_params<S>(op, mean, m2, plane_size, gate, gate_bias, weight, bias,
                                             running_mean, running_var, training, 0.0, eps);
      nf_coef_glue::batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
      o = nf_coef_glue::backward_outputs(p, mean, gate_bias != nullptr);
      if (p.N == 0) return;  // the parameter gradients are zeros (empty_grad)
      if (gate_bias)
        NF_CPU_CALL(iebn_backward, p);
      else
        NF_CPU_CALL(bin_backward, p);
    });
    return o;
  }

  static std::tuple<Tensor, Tensor> assoc_forward(const char* op, const Tensor& mean, const Tensor& m2,
                                                  int64_t plane_size, int64_t num_groups, const Tensor& encoder,
                                                  const Tensor& decoder_mean, const Tensor& decoder_var,
                                                  const Tensor& weight, const Tensor& bias, double eps) {
    nf_coef_glue::check_stats(op, mean, m2);
    nf_coef_glue::ForwardOutputs o;
    nf_coef_glue::dispatch_stats(mean, [&](auto tag) {
      using S = decltype(tag);
      auto p = nf_coef_glue::assoc_params<S>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                             decoder_var, weight, bias, eps);
      o = nf_coef_glue::forward_outputs(p, mean);
      if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_forward, p);
    });
    return {o.scale, o.shift};
  }

  static BackwardOutputs assoc_backward(const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                        const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
                                        const Tensor& weight, const Tensor& bias, double eps) {
    nf_coef_glue::check_stats(op, mean, m2);
    BackwardOutputs o;
    nf_coef_glue::dispatch_stats(mean, [&](auto tag) {
      using S = decltype(tag);
      auto p = nf_coef_glue::assoc_params<S>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                             decoder_var, weight, bias, eps);
      nf_coef_glue::set_gradient_sums(p, op, sum_dy, sum_dy_xmu, mean);
      o = nf_coef_glue::backward_outputs(p, mean);
      if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_backward, p);
    });
    return o;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) { nf_coef_glue::CoefficientOps<Cpu>::register_all(m); }
