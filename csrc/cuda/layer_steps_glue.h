// The CUDA BIN / IEBN layer steps' glue that the whole-direction ops reuse (defined in
// cuda/layer_steps_cuda.cpp; used by cuda/layer_directions_cuda.cpp): a step's checks, in the
// component ops' order and with their messages, separated from its launches, so that an op can
// check everything first and then choose how to run it (the step's launches, or the single-read
// kernel that also applies the map). Torch glue only (.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <optional>

#include "common/coefficients_params.h"
#include "common/generic_params.h"

namespace nf_cuda_glue {

// A checked forward step: statistics allocated, coefficient params filled but for the outputs
// (nf_coef_glue::forward_outputs sets scale / shift), nothing launched or mutated yet.
struct ForwardStep {
  const char* coef_op = nullptr;  // "bin_coefficients" / "iebn_coefficients" (error messages)
  nf::PlaneShape sh;
  at::Tensor mean, m2;
  nf::BatchCoefParams<float> p;
  bool iebn = false;
};

// gate_bias: IEBN's (null for BIN). Checks as moments then <layer>_coefficients.
ForwardStep check_forward_step(const char* coef_op, const at::Tensor& x, const at::Tensor& gate,
                               const at::Tensor* gate_bias, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double momentum,
                               double eps, const std::optional<at::Tensor>& num_batches_tracked);
// Under the device guard, outputs set: moments + coefficients (one launch for a small layer).
void run_forward_step(ForwardStep& s, const at::Tensor& x, cudaStream_t stream);

// A checked backward step: gradient sums allocated, coefficient params filled but for the
// outputs (nf_coef_glue::backward_outputs).
struct BackwardStep {
  const char* coef_op = nullptr;
  nf::PlaneShape sh;
  at::Tensor g1, g2;
  nf::BatchCoefParams<float> p;
  bool iebn = false;
  bool masked = false;  // the forward's scale / shift given: the fused ReLU's mask
};

// Checks as backward_sums then <layer>_coefficients_backward.
BackwardStep check_backward_step(const char* coef_op, const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& gate,
                                 const at::Tensor* gate_bias, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training, double eps,
                                 const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift);
// Under the device guard, outputs set: backward_sums + coefficient backward.
void run_backward_step(BackwardStep& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                       cudaStream_t stream);

}  // namespace nf_cuda_glue
