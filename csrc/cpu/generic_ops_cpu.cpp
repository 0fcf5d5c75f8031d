// CPU implementations of the four generic ops (moments, affine_apply, backward_sums,
// backward_apply) for float64/float32/bfloat16/float16, contiguous and channels-last: argument
// checks, output allocation and the choice between the AVX2 and the portable build of the
// kernels (generic_kernels.h; the kernels themselves are generic_reduce_*_impl.h and
// generic_apply_impl.h).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>

#include "common/torch_glue.h"
#include "cpu/generic_kernels.h"
#include "cpu/generic_ops_cpu.h"

// AVX2 kernels where ATen itself would use AVX2 (or AVX-512) kernels: the CPU has AVX2 and FMA
// and ATEN_CPU_CAPABILITY does not ask for less. F16C comes with every AVX2 CPU; checked anyway.
bool nf_cpu::use_avx2() {
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
  static const bool ok = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

namespace {

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "normfuse.", op, " (CPU kernel): input is on ", x.device());
}

nf_cpu::GenericArgs args_for(const at::Tensor& x, const nf::PlaneShape& sh) {
  nf_cpu::GenericArgs a;
  a.shape = sh;
  a.dtype = nf_glue::kernel_dtype(x.scalar_type());
  a.x = x.const_data_ptr();
  return a;
}

// The fused ReLU's mask for the backward ops: the forward's scale and shift (checked by
// nf_glue::relu_mask_given) when given, else none.
void set_mask(nf_cpu::GenericArgs& a, bool masked, const c10::optional<at::Tensor>& scale,
              const c10::optional<at::Tensor>& shift) {
  if (!masked) return;
  a.mask_scale = scale->const_data_ptr();
  a.mask_shift = shift->const_data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nf_cpu::moments_cpu(const at::Tensor& x) {
  check_cpu(x, "moments");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "moments");
  at::Tensor mean = nf_glue::empty_stats(x, sh), m2 = nf_glue::empty_stats(x, sh);
  if (sh.N * sh.C == 0) return {mean, m2};
  if (sh.L == 0) {  // mean of nothing is undefined, a sum of nothing is 0 (as torch.mean / sum)
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    return {mean, m2};
  }
  nf_cpu::GenericArgs a = args_for(x, sh);
  a.mean_out = mean.mutable_data_ptr();
  a.m2_out = m2.mutable_data_ptr();
  NF_CPU_CALL(moments, a);
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> nf_cpu::backward_sums_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& mean,
                                                             const std::optional<at::Tensor>& scale,
                                                             const std::optional<at::Tensor>& shift) {
  check_cpu(x, "backward_sums");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "backward_sums");
  nf_glue::check_like_input(dy, x, sh, "backward_sums", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_sums", "mean");
  const bool masked = nf_glue::relu_mask_given(scale, shift, x, sh, "backward_sums");
  at::Tensor g1 = nf_glue::empty_stats(x, sh), g2 = nf_glue::empty_stats(x, sh);
  if (sh.N * sh.C == 0) return {g1, g2};
  if (sh.L == 0) {
    g1.zero_();
    g2.zero_();
    return {g1, g2};
  }
  nf_cpu::GenericArgs a = args_for(x, sh);
  a.dy = dy.const_data_ptr();
  a.mean = mean.const_data_ptr();
  a.sum_dy = g1.mutable_data_ptr();
  a.sum_dy_xmu = g2.mutable_data_ptr();
  set_mask(a, masked, scale, shift);
  NF_CPU_CALL(backward_sums, a);
  return {g1, g2};
}

at::Tensor nf_cpu::affine_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                    const at::Tensor& shift, bool relu) {
  check_cpu(x, "affine_apply");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "affine_apply");
  nf_glue::check_stats(mean, x, sh, "affine_apply", "mean");
  nf_glue::check_stats(scale, x, sh, "affine_apply", "scale");
  nf_glue::check_stats(shift, x, sh, "affine_apply", "shift");
  at::Tensor y = nf_glue::empty_output(x);
  if (x.numel() == 0) return y;
  nf_cpu::GenericArgs a = args_for(x, sh);
  a.mean = mean.const_data_ptr();
  a.scale = scale.const_data_ptr();
  a.shift = shift.const_data_ptr();
  a.relu = relu;
  a.out = y.mutable_data_ptr();
  NF_CPU_CALL(affine_apply, a);
  return y;
}

at::Tensor nf_cpu::backward_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& c_dy, const at::Tensor& c_x, const at::Tensor& c_0,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift) {
  check_cpu(x, "backward_apply");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "backward_apply");
  nf_glue::check_like_input(dy, x, sh, "backward_apply", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_apply", "mean");
  nf_glue::check_stats(c_dy, x, sh, "backward_apply", "c_dy");
  nf_glue::check_stats(c_x, x, sh, "backward_apply", "c_x");
  nf_glue::check_stats(c_0, x, sh, "backward_apply", "c_0");
  const bool masked = nf_glue::relu_mask_given(scale, shift, x, sh, "backward_apply");
  at::Tensor dx = nf_glue::empty_output(x);
  if (x.numel() == 0) return dx;
  nf_cpu::GenericArgs a = args_for(x, sh);
  a.dy = dy.const_data_ptr();
  a.mean = mean.const_data_ptr();
  a.c_dy = c_dy.const_data_ptr();
  a.c_x = c_x.const_data_ptr();
  a.c_0 = c_0.const_data_ptr();
  a.out = dx.mutable_data_ptr();
  set_mask(a, masked, scale, shift);
  NF_CPU_CALL(backward_apply, a);
  return dx;
}

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("moments", &nf_cpu::moments_cpu);
  m.impl("affine_apply", &nf_cpu::affine_apply_cpu);
  m.impl("backward_sums", &nf_cpu::backward_sums_cpu);
  m.impl("backward_apply", &nf_cpu::backward_apply_cpu);
}
