// The CPU coefficient ops (registered in coefficient_ops_cpu.cpp): the steps of
// common/coefficient_ops.h for the CPU, and CoefficientOps, the op entry points on them, which the
// CPU layer directions (layer_directions_cpu.cpp) also call directly (same checks, no dispatch).
// The formulas are those of common/coefficients{,_ilm}.h, shared with the CUDA kernels. BIN, IEBN
// and AssocNorm: vectorised over channels, arithmetic in the statistics' dtype (float32 or
// float64); ILM-Norm: scalar loops in double per sample.
#pragma once

#include "common/coefficient_ops.h"
#include "cpu/coefficients_kernels.h"

namespace nf_cpu {

// The steps of common/coefficient_ops.h: float32 or float64 statistics, arithmetic in their type.
struct CoefficientSteps {
  using Tensor = at::Tensor;
  using BackwardOutputs = nf_coef_glue::BackwardOutputs;
  using ForwardOutputs = nf_coef_glue::ForwardOutputs;

  template <class F>
  static void dispatch(const char* op, const Tensor& mean, const Tensor& m2, F&& f) {
    nf_coef_glue::check_stats(op, mean, m2);  // before the dtype dispatch: a clear message for bad dtypes
    if (mean.scalar_type() == at::kDouble)
      f(double{});
    else
      f(float{});
  }

  template <class S>
  static ForwardOutputs batch_forward(const char*, nf::BatchCoefParams<S>& p, const Tensor& mean, bool iebn) {
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    if (p.N > 0) {
      if (iebn)
        NF_CPU_CALL(iebn_forward, p);
      else
        NF_CPU_CALL(bin_forward, p);
    }
    if (p.count_batch()) *p.num_batches_tracked += 1;  // every check passed: the call succeeds
    return o;
  }

  template <class S>
  static BackwardOutputs batch_backward(const char*, nf::BatchCoefParams<S>& p, const Tensor& mean, bool iebn) {
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean, iebn);
    if (p.N == 0) return o;  // the parameter gradients are zeros (empty_grad)
    if (iebn)
      NF_CPU_CALL(iebn_backward, p);
    else
      NF_CPU_CALL(bin_backward, p);
    return o;
  }

  template <class S>
  static ForwardOutputs assoc_forward(const char*, nf::AssocCoefParams<S>& p, const Tensor& mean) {
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_forward, p);
    return o;
  }

  template <class S>
  static BackwardOutputs assoc_backward(const char*, nf::AssocCoefParams<S>& p, const Tensor& mean) {
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean);
    if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_backward, p);
    return o;
  }

  // (C > 0 always: ilm_params refuses groups of fewer than two values)
  template <class S>
  static ForwardOutputs ilm_forward(const char*, nf::IlmCoefParams<S>& p, const Tensor& mean) {
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    if (p.N > 0) NF_CPU_CALL(ilm_forward, p);
    return o;
  }

  template <class S>
  static BackwardOutputs ilm_backward(const char*, nf::IlmCoefParams<S>& p, const Tensor& mean) {
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean);
    if (p.N > 0) NF_CPU_CALL(ilm_backward, p);
    return o;
  }
};

using CoefficientOps = nf_coef_glue::CoefficientOps<CoefficientSteps>;

}  // namespace nf_cpu
