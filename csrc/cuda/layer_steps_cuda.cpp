// CUDA kernels of the four BIN / IEBN layer steps (schemas in ops.cpp; the composition every other
// device runs is layer_steps.cpp, which this overrides for CUDA tensors):
//   <layer>_moments_coefficients        = moments -> <layer>_coefficients
//   <layer>_sums_coefficients_backward  = backward_sums -> <layer>_coefficients_backward
// A small layer (kernels/layer_steps.cuh: kFusedStepMaxTiles, kFusedStepMaxPlanes) runs as ONE
// launch, the reduction whose grid-wide last block computes the coefficients; any other layer as
// the two component launches. Either way the results are bitwise the component ops' (same
// reduction order: the epilogue runs the coefficient kernel's tiles with its plan).
//
// Checks: the component ops' own, in the composition's order and with their op names (so the
// same errors): moments / backward_sums (cuda/generic_glue.h), then bin/iebn_coefficients[_backward]
// (common/coefficients_glue.h). All of them run before the device guard and before anything is
// launched or mutated: a failing call leaves the running statistics and the batch counter alone.
//
// NORMFUSE_FUSED_STEPS (read at the first call): "auto" or unset = the threshold, "1" = fuse every
// non-empty layer, "0" = never fuse (tests and the bench compare the two paths); at run time
// normfuse._C.fused_steps(mode) sets it (bench/steps_probe.py interleaves both).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "common/coefficients_glue.h"
#include "common/torch_glue.h"
#include "cuda/generic_glue.h"
#include "cuda/layer_steps_glue.h"
#include "cuda/layer_steps_launchers.h"
#include "kernels/coefficients_launch.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Seven = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

enum class Fuse { Never, Always, Auto };

// -1: not read yet; else a Fuse. Settable at run time (nf_glue::set_fused_steps) so that the
// bench can interleave both paths in one process.
std::atomic<int> g_fuse_mode{-1};

Fuse fuse_mode() {
  int mode = g_fuse_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* e = std::getenv("NORMFUSE_FUSED_STEPS");
    mode = static_cast<int>(Fuse::Auto);
    if (e != nullptr && std::strcmp(e, "0") == 0) mode = static_cast<int>(Fuse::Never);
    else if (e != nullptr && std::strcmp(e, "1") == 0) mode = static_cast<int>(Fuse::Always);
    else if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0)
      TORCH_WARN("normfuse: NORMFUSE_FUSED_STEPS must be 0, 1 or auto, got '", e, "'; using auto");
    int unread = -1;  // only if still unread: a concurrent set_fused_steps wins over the environment
    if (!g_fuse_mode.compare_exchange_strong(unread, mode, std::memory_order_relaxed)) mode = unread;
  }
  return static_cast<Fuse>(mode);
}

bool fuse(const nf::PlaneShape& sh) {
  if (sh.N * sh.C * sh.L == 0) return false;  // empty: the component ops' special cases
  switch (fuse_mode()) {
    case Fuse::Never:
      return false;
    case Fuse::Always:
      return true;
    default:
      return nf::cuda_step_small(sh, 0);
  }
}

// ---- forward ------------------------------------------------------------------------------------

}  // namespace

namespace nf_cuda_glue {

ForwardStep check_forward_step(const char* coef_op, const Tensor& x, const Tensor& gate, const Tensor* gate_bias,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum, double eps,
                               const OptTensor& num_batches_tracked) {
  check_cuda_input(x, "moments");
  ForwardStep s;
  s.coef_op = coef_op;
  s.sh = cuda_plane_shape(x, "moments");
  // The statistics first (the coefficient checks compare against them); allocating is no side effect.
  s.mean = nf_glue::empty_stats(x, s.sh);
  s.m2 = nf_glue::empty_stats(x, s.sh);
  s.p = nf_coef_glue::batch_params<float>(coef_op, s.mean, s.m2, s.sh.L, gate, gate_bias, weight, bias, running_mean,
                                          running_var, training, momentum, eps);
  nf_coef_glue::set_batch_counter(s.p, coef_op, num_batches_tracked, s.mean, running_mean, running_var);
  nf_coef_glue::check_running_not_input(coef_op, x, running_mean, running_var, training);
  s.iebn = gate_bias != nullptr;
  return s;
}

void run_forward_step(ForwardStep& s, const Tensor& x, cudaStream_t stream) {
  if (fuse(s.sh)) {
    nf::MomentsParams m = moments_params(x, s.sh, s.mean, s.m2);
    const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
    const Scratch ws = scratch(x, nf::cuda_moments_step_workspace(m, dt), m);
    check_launch(nf::cuda_moments_step(m, s.p, s.iebn, dt, stream), s.coef_op);
  } else {
    run_moments(x, s.sh, s.mean, s.m2);
    check_launch(s.iebn ? nf::launch_iebn_coefficients(s.p, stream) : nf::launch_bin_coefficients(s.p, stream),
                 s.coef_op);
  }
}

}  // namespace nf_cuda_glue

namespace {

Four moments_coefficients(const char* coef_op, const Tensor& x, const Tensor& gate, const Tensor* gate_bias,
                          const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                          const OptTensor& running_var, bool training, double momentum, double eps,
                          const OptTensor& num_batches_tracked) {
  nf_cuda_glue::ForwardStep s = nf_cuda_glue::check_forward_step(
      coef_op, x, gate, gate_bias, weight, bias, running_mean, running_var, training, momentum, eps,
      num_batches_tracked);
  const c10::cuda::CUDAGuard guard(x.device());  // after every check (coefficients_glue.cpp)
  const nf_coef_glue::ForwardOutputs o = nf_coef_glue::forward_outputs(s.p, s.mean);
  nf_cuda_glue::run_forward_step(s, x, c10::cuda::getCurrentCUDAStream());
  return {s.mean, s.m2, o.scale, o.shift};
}

Four bin_moments_coefficients(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var, bool training,
                              double momentum, double eps, const OptTensor& num_batches_tracked) {
  return moments_coefficients("bin_coefficients", x, gate, nullptr, weight, bias, running_mean, running_var, training,
                              momentum, eps, num_batches_tracked);
}

Four iebn_moments_coefficients(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum, double eps,
                               const OptTensor& num_batches_tracked) {
  return moments_coefficients("iebn_coefficients", x, gate_weight, &gate_bias, weight, bias, running_mean,
                              running_var, training, momentum, eps, num_batches_tracked);
}

// ---- backward -----------------------------------------------------------------------------------

}  // namespace

namespace nf_cuda_glue {

BackwardStep check_backward_step(const char* coef_op, const Tensor& dy, const Tensor& x, const Tensor& mean,
                                 const Tensor& m2, const Tensor& gate, const Tensor* gate_bias,
                                 const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                                 const OptTensor& running_var, bool training, double eps, const OptTensor& scale,
                                 const OptTensor& shift) {
  check_cuda_input(x, "backward_sums");
  BackwardStep s;
  s.coef_op = coef_op;
  s.sh = cuda_plane_shape(x, "backward_sums");
  nf_glue::check_like_input(dy, x, s.sh, "backward_sums", "grad_output");
  nf_glue::check_stats(mean, x, s.sh, "backward_sums", "mean");
  s.masked = nf_glue::relu_mask_given(scale, shift, x, s.sh, "backward_sums");
  s.g1 = nf_glue::empty_stats(x, s.sh);
  s.g2 = nf_glue::empty_stats(x, s.sh);
  s.p = nf_coef_glue::batch_params<float>(coef_op, mean, m2, s.sh.L, gate, gate_bias, weight, bias, running_mean,
                                          running_var, training, 0.0, eps);
  nf_coef_glue::batch_backward_params(s.p, coef_op, s.g1, s.g2, mean);
  s.iebn = gate_bias != nullptr;
  return s;
}

void run_backward_step(BackwardStep& s, const Tensor& dy, const Tensor& x, const Tensor& mean, const OptTensor& scale,
                       const OptTensor& shift, cudaStream_t stream) {
  if (fuse(s.sh)) {
    nf::BackwardSumsParams b = backward_sums_params(dy, x, mean, scale, shift, s.masked, s.sh, s.g1, s.g2);
    const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
    const Scratch ws = scratch(x, nf::cuda_sums_step_workspace(b, dt), b);
    check_launch(nf::cuda_sums_step(b, s.p, s.iebn, dt, stream), s.coef_op);
  } else {
    run_backward_sums(dy, x, mean, scale, shift, s.masked, s.sh, s.g1, s.g2);
    check_launch(s.iebn ? nf::launch_iebn_coefficients_backward(s.p, stream)
                        : nf::launch_bin_coefficients_backward(s.p, stream),
                 s.coef_op);
  }
}

}  // namespace nf_cuda_glue

namespace {

nf_coef_glue::BackwardOutputs sums_coefficients_backward(const char* coef_op, const Tensor& dy, const Tensor& x,
                                                         const Tensor& mean, const Tensor& m2, const Tensor& gate,
                                                         const Tensor* gate_bias, const OptTensor& weight,
                                                         const OptTensor& bias, const OptTensor& running_mean,
                                                         const OptTensor& running_var, bool training, double eps,
                                                         const OptTensor& scale, const OptTensor& shift) {
  nf_cuda_glue::BackwardStep s = nf_cuda_glue::check_backward_step(
      coef_op, dy, x, mean, m2, gate, gate_bias, weight, bias, running_mean, running_var, training, eps, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  nf_coef_glue::BackwardOutputs o = nf_coef_glue::backward_outputs(s.p, mean, s.iebn);
  nf_cuda_glue::run_backward_step(s, dy, x, mean, scale, shift, c10::cuda::getCurrentCUDAStream());
  return o;
}

Six bin_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                   const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                   double eps, const OptTensor& scale, const OptTensor& shift) {
  const auto o = sums_coefficients_backward("bin_coefficients_backward", dy, x, mean, m2, gate, nullptr, weight, bias,
                                            running_mean, running_var, training, eps, scale, shift);
  return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2]};
}

Seven iebn_sums_coefficients_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                                      const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                                      const OptTensor& bias, const OptTensor& running_mean,
                                      const OptTensor& running_var, bool training, double eps,
                                      const OptTensor& scale, const OptTensor& shift) {
  const auto o = sums_coefficients_backward("iebn_coefficients_backward", dy, x, mean, m2, gate_weight, &gate_bias,
                                            weight, bias, running_mean, running_var, training, eps, scale, shift);
  return {o.c_dy, o.c_x, o.c_0, o.grads[0], o.grads[1], o.grads[2], o.grads[3]};
}

}  // namespace

namespace nf_glue {

// normfuse._C.fused_steps (csrc/python_layer_step.cpp): the mode ("0", "1", "auto"), and set it.
const char* fused_steps() {
  switch (fuse_mode()) {
    case Fuse::Never:
      return "0";
    case Fuse::Always:
      return "1";
    default:
      return "auto";
  }
}

bool set_fused_steps(const char* mode) {
  Fuse f;
  if (std::strcmp(mode, "0") == 0) f = Fuse::Never;
  else if (std::strcmp(mode, "1") == 0) f = Fuse::Always;
  else if (std::strcmp(mode, "auto") == 0) f = Fuse::Auto;
  else return false;
  g_fuse_mode.store(static_cast<int>(f), std::memory_order_relaxed);
  return true;
}

}  // namespace nf_glue

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) {
  m.impl("bin_moments_coefficients", &bin_moments_coefficients);
  m.impl("iebn_moments_coefficients", &iebn_moments_coefficients);
  m.impl("bin_sums_coefficients_backward", &bin_sums_coefficients_backward);
  m.impl("iebn_sums_coefficients_backward", &iebn_sums_coefficients_backward);
}
