// Torch glue of the generic CUDA kernels: checks, output/workspace allocation on the caching
// allocator, device guard and current stream, dtype -> launcher. Compiled by the host compiler;
// the kernels themselves are in csrc/kernels (via generic_launchers.cu). Each op is one kernel
// launch: the split reductions' counters are persistent and need no memset per call
// (cuda/persistent_counters.h), their partials come from at::empty.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/torch_glue.h"
#include "cuda/generic_glue.h"
#include "cuda/generic_launchers.h"
#include "cuda/persistent_counters.h"

namespace nf_cuda_glue {

void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "normfuse.", op, " (CUDA kernel): input is on ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, "normfuse.", op,
              ": float64 is not supported by the CUDA kernels (use float32, float16 or bfloat16 on the GPU, "
              "or the CPU backend for float64)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "normfuse.", op, ": unsupported dtype ", x.scalar_type());
}

// The kernels index within a plane (and walk its splits) in 32-bit ints: begin + seg and the
// loop steps stay below 2^31 when L <= 2^30 (nf::kMaxPlaneLength; the launchers refuse more too).
nf::PlaneShape cuda_plane_shape(const at::Tensor& x, const char* op) {
  const nf::PlaneShape sh = nf_glue::plane_shape(x, op);
  TORCH_CHECK(sh.L <= nf::kMaxPlaneLength, "normfuse.", op, ": the CUDA kernels support planes of at most 2^30 ",
              "elements (prod of the spatial sizes), got ", sh.L);
  TORCH_CHECK(sh.C <= std::numeric_limits<int32_t>::max(), "normfuse.", op, ": at most 2^31 - 1 channels, got ",
              sh.C);
  return sh;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

nf::MomentsParams moments_params(const at::Tensor& x, const nf::PlaneShape& sh, at::Tensor& mean, at::Tensor& m2) {
  nf::MomentsParams p;
  p.x = x.const_data_ptr();
  p.mean = mean.mutable_data_ptr<float>();
  p.m2 = m2.mutable_data_ptr<float>();
  p.shape = sh;
  return p;
}

void run_moments(const at::Tensor& x, const nf::PlaneShape& sh, at::Tensor& mean, at::Tensor& m2) {
  if (sh.N * sh.C == 0) return;
  if (sh.L == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    return;
  }
  nf::MomentsParams p = moments_params(x, sh, mean, m2);
  const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
  const Scratch ws = scratch(x, nf::cuda_moments_workspace(p, dt), p);
  check_launch(nf::cuda_moments(p, dt, c10::cuda::getCurrentCUDAStream()), "moments");
}

nf::BackwardSumsParams backward_sums_params(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, bool masked,
                                            const nf::PlaneShape& sh, at::Tensor& g1, at::Tensor& g2) {
  nf::BackwardSumsParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.mean = mean.const_data_ptr<float>();
  p.sum_dy = g1.mutable_data_ptr<float>();
  p.sum_dy_xmu = g2.mutable_data_ptr<float>();
  if (masked) {
    p.mask_scale = scale->const_data_ptr<float>();
    p.mask_shift = shift->const_data_ptr<float>();
  }
  p.shape = sh;
  return p;
}

void run_backward_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool masked,
                       const nf::PlaneShape& sh, at::Tensor& g1, at::Tensor& g2) {
  if (sh.N * sh.C == 0) return;
  if (sh.L == 0) {
    g1.zero_();
    g2.zero_();
    return;
  }
  nf::BackwardSumsParams p = backward_sums_params(dy, x, mean, scale, shift, masked, sh, g1, g2);
  const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
  const Scratch ws = scratch(x, nf::cuda_backward_sums_workspace(p, dt), p);
  check_launch(nf::cuda_backward_sums(p, dt, c10::cuda::getCurrentCUDAStream()), "backward_sums");
}

void run_affine_apply(const at::Tensor& x, const nf::PlaneShape& sh, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, bool relu, at::Tensor& y) {
  if (x.numel() == 0) return;
  nf::AffineApplyParams p;
  p.x = x.const_data_ptr();
  p.mean = mean.const_data_ptr<float>();
  p.scale = scale.const_data_ptr<float>();
  p.shift = shift.const_data_ptr<float>();
  p.y = y.mutable_data_ptr();
  p.relu = relu;
  p.shape = sh;
  check_launch(nf::cuda_affine_apply(p, nf_glue::kernel_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()),
               "affine_apply");
}

void run_backward_apply(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& c_dy,
                        const at::Tensor& c_x, const at::Tensor& c_0, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, bool masked, const nf::PlaneShape& sh,
                        at::Tensor& dx) {
  if (x.numel() == 0) return;
  nf::BackwardApplyParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.mean = mean.const_data_ptr<float>();
  p.c_dy = c_dy.const_data_ptr<float>();
  p.c_x = c_x.const_data_ptr<float>();
  p.c_0 = c_0.const_data_ptr<float>();
  p.dx = dx.mutable_data_ptr();
  if (masked) {
    p.mask_scale = scale->const_data_ptr<float>();
    p.mask_shift = shift->const_data_ptr<float>();
  }
  p.shape = sh;
  check_launch(nf::cuda_backward_apply(p, nf_glue::kernel_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()),
               "backward_apply");
}

}  // namespace nf_cuda_glue

namespace {

using nf_cuda_glue::check_cuda_input;
using nf_cuda_glue::check_launch;
using nf_cuda_glue::cuda_plane_shape;

std::tuple<at::Tensor, at::Tensor> moments_cuda(const at::Tensor& x) {
  check_cuda_input(x, "moments");
  const nf::PlaneShape sh = cuda_plane_shape(x, "moments");
  const c10::cuda::CUDAGuard guard(x.device());  // after every check (coefficients_glue.cpp)
  at::Tensor mean = nf_glue::empty_stats(x, sh), m2 = nf_glue::empty_stats(x, sh);
  nf_cuda_glue::run_moments(x, sh, mean, m2);
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> backward_sums_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& mean,
                                                      const c10::optional<at::Tensor>& scale,
                                                      const c10::optional<at::Tensor>& shift) {
  check_cuda_input(x, "backward_sums");
  const nf::PlaneShape sh = cuda_plane_shape(x, "backward_sums");
  nf_glue::check_like_input(dy, x, sh, "backward_sums", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_sums", "mean");
  const bool masked = nf_glue::relu_mask_given(scale, shift, x, sh, "backward_sums");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g1 = nf_glue::empty_stats(x, sh), g2 = nf_glue::empty_stats(x, sh);
  nf_cuda_glue::run_backward_sums(dy, x, mean, scale, shift, masked, sh, g1, g2);
  return {g1, g2};
}

at::Tensor affine_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                             const at::Tensor& shift, bool relu) {
  check_cuda_input(x, "affine_apply");
  const nf::PlaneShape sh = cuda_plane_shape(x, "affine_apply");
  nf_glue::check_stats(mean, x, sh, "affine_apply", "mean");
  nf_glue::check_stats(scale, x, sh, "affine_apply", "scale");
  nf_glue::check_stats(shift, x, sh, "affine_apply", "shift");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = nf_glue::empty_output(x);
  nf_cuda_glue::run_affine_apply(x, sh, mean, scale, shift, relu, y);
  return y;
}

at::Tensor backward_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& c_dy, const at::Tensor& c_x, const at::Tensor& c_0, const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift) {
  check_cuda_input(x, "backward_apply");
  const nf::PlaneShape sh = cuda_plane_shape(x, "backward_apply");
  nf_glue::check_like_input(dy, x, sh, "backward_apply", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_apply", "mean");
  nf_glue::check_stats(c_dy, x, sh, "backward_apply", "c_dy");
  nf_glue::check_stats(c_x, x, sh, "backward_apply", "c_x");
  nf_glue::check_stats(c_0, x, sh, "backward_apply", "c_0");
  const bool masked = nf_glue::relu_mask_given(scale, shift, x, sh, "backward_apply");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = nf_glue::empty_output(x);
  nf_cuda_glue::run_backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift, masked, sh, dx);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) {
  m.impl("moments", &moments_cuda);
  m.impl("affine_apply", &affine_apply_cuda);
  m.impl("backward_sums", &backward_sums_cuda);
  m.impl("backward_apply", &backward_apply_cuda);
}
