// CPU ops of IEBN with one value per plane (iebn_pointwise_kernels.h): argument checks, outputs and
// the choice between the AVX2 and the portable build. Called by the whole-layer op
// (csrc/layer_directions.cpp) for a 2-d input on the CPU; registered as ops so that they are
// testable and traceable on their own (schemas in ops.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/coefficients_glue.h"
#include "common/torch_glue.h"
#include "cpu/iebn_pointwise_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// x: (N, C) contiguous on the CPU; mean and rstd: (C,) of x's acc dtype; the parameters like them.
nf_cpu::PointwiseArgs checked_args(const char* op, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                                   const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                   const OptTensor& bias) {
  TORCH_CHECK(x.device().is_cpu(), "normfuse.", op, " (CPU kernel): input is on ", x.device());
  TORCH_CHECK(x.dim() == 2, "normfuse.", op, ": input must be 2-d (N, C), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "normfuse.", op, ": input must be contiguous");
  nf_glue::plane_shape(x, op);  // the dtype check and its message
  const int64_t C = x.size(1);
  const at::ScalarType acc = nf_glue::acc_dtype(x.scalar_type());
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == C && mean.scalar_type() == acc && mean.device() == x.device() &&
                  mean.is_contiguous(),
              "normfuse.", op, ": mean must be a contiguous ", acc, " tensor of shape (", C, ",) on ", x.device(),
              ", got ", mean.scalar_type(), " ", mean.sizes(), " on ", mean.device());
  using nf_coef_glue::param_ptr;
  nf_cpu::PointwiseArgs a;
  a.N = x.size(0);
  a.C = C;
  a.dtype = nf_glue::kernel_dtype(x.scalar_type());
  a.x = x.const_data_ptr();
  a.mean = mean.const_data_ptr();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "iebn_pointwise", [&] {
    a.rstd = param_ptr<scalar_t>(op, "rstd", rstd, {C}, mean);
    a.gate_weight = param_ptr<scalar_t>(op, "gate_weight", gate_weight, {C}, mean);
    a.gate_bias = param_ptr<scalar_t>(op, "gate_bias", gate_bias, {C}, mean);
    a.weight = nf_coef_glue::opt_param_ptr<scalar_t>(op, "weight", weight, C, mean);
    a.bias = nf_coef_glue::opt_param_ptr<scalar_t>(op, "bias", bias, C, mean);
  });
  return a;
}

Tensor iebn_pointwise_apply_cpu(const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& gate_weight,
                                const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias, bool relu) {
  nf_cpu::PointwiseArgs a =
      checked_args("iebn_pointwise_apply", x, mean, rstd, gate_weight, gate_bias, weight, bias);
  Tensor y = nf_glue::empty_output(x);
  if (x.numel() == 0) return y;
  a.out = y.mutable_data_ptr();
  a.relu = relu;
  NF_CPU_CALL(iebn_pointwise_apply, a);
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> iebn_pointwise_backward_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& gate_weight,
    const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias, bool batch_stats, bool relu) {
  const char* op = "iebn_pointwise_backward";
  nf_cpu::PointwiseArgs a = checked_args(op, x, mean, rstd, gate_weight, gate_bias, weight, bias);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device() &&
                  dy.is_contiguous(),
              "normfuse.", op, ": grad_output must be a contiguous ", x.scalar_type(), " tensor of shape ", x.sizes(),
              " on ", x.device(), " like input, got ", dy.scalar_type(), " ", dy.sizes(), " on ", dy.device());
  Tensor dx = nf_glue::empty_output(x);
  Tensor grads[4];
  for (Tensor& g : grads) g = nf_glue::empty_dense({a.C}, mean.scalar_type(), x);
  if (a.C == 0) return {dx, grads[0], grads[1], grads[2], grads[3]};
  a.dy = dy.const_data_ptr();
  a.out = x.numel() ? dx.mutable_data_ptr() : nullptr;
  a.relu = relu;
  a.batch_stats = batch_stats;
  a.grad_gate_weight = grads[0].mutable_data_ptr();
  a.grad_gate_bias = grads[1].mutable_data_ptr();
  a.grad_weight = grads[2].mutable_data_ptr();
  a.grad_bias = grads[3].mutable_data_ptr();
  NF_CPU_CALL(iebn_pointwise_backward, a);
  return {dx, grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("iebn_pointwise_apply", &iebn_pointwise_apply_cpu);
  m.impl("iebn_pointwise_backward", &iebn_pointwise_backward_cpu);
}
