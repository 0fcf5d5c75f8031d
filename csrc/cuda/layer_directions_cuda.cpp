// CUDA kernels of the BIN / IEBN whole-direction ops (schemas in ops.cpp; every other device runs
// the composition in layer_steps.cpp):
//   <layer>_layer_forward  = <layer>_moments_coefficients -> affine_apply(relu)
//   <layer>_layer_backward = <layer>_sums_coefficients_backward -> backward_apply (masked alike)
// With the single read on (NORMFUSE_SINGLE_READ=auto, or normfuse._C.single_read("auto")), a
// channels-last input whose blocks all fit on the GPU at once runs each direction as ONE
// cooperative launch that reads x (dy and x) once (kernels/single_read.cuh, issue 14); anything
// else, and everything while it is off (the default until a GPU bench has shown where it pays),
// runs the layer step's launches and then the apply kernel, as the composition does.
//
// Checks: the layer step's (cuda/layer_steps_glue.h), every one before anything is launched or
// mutated; the apply needs none of its own (its inputs are this op's own outputs and x, checked).
// normfuse._C.single_read_launches() counts the single-read launches, so tests and the bench can
// tell which path ran.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
#include "cuda/single_read_launchers.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// -1: not read yet; 0: off; 1: auto (whenever it applies). Settable at run time
// (nf_glue::set_single_read) so that the bench can interleave both paths in one process.
std::atomic<int> g_single_read{-1};
std::atomic<int64_t> g_single_read_launches{0};

bool single_read_on() {
  int mode = g_single_read.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* e = std::getenv("NORMFUSE_SINGLE_READ");
    int from_env = 0;
    if (e != nullptr && std::strcmp(e, "auto") == 0) from_env = 1;
    else if (e != nullptr && *e != '\0' && std::strcmp(e, "0") != 0)
      TORCH_WARN("normfuse: NORMFUSE_SINGLE_READ must be 0 or auto, got '", e, "'; using 0");
    // Only if still unread: a concurrent set_single_read wins over the environment.
    g_single_read.compare_exchange_strong(mode, from_env, std::memory_order_relaxed);
    mode = g_single_read.load(std::memory_order_relaxed);
  }
  return mode == 1;
}

// A single-read launch's error. Nothing has been launched or written when it fails, so a grid
// the device turns down after all (the cached capacity is the occupancy API's; MPS or a green
// context can hold fewer blocks) falls back to the generic launches; anything else is an error.
bool single_read_launched(cudaError_t err, const char* op) {
  if (err == cudaSuccess) {
    g_single_read_launches.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  (void)cudaGetLastError();  // this launch's error: not left for the next launch check to report
  if (err == cudaErrorCooperativeLaunchTooLarge) return false;
  nf_cuda_glue::check_launch(err, op);
  return false;  // not reached: check_launch throws
}

Tensor empty_partials(const Tensor& x, int64_t floats) {
  return floats > 0 ? at::empty({floats}, x.options().dtype(at::kFloat)) : Tensor();
}

float* data_or_null(Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; }

// ---- forward ------------------------------------------------------------------------------------

// The one-launch forward when it is on and applies; false (nothing done) otherwise.
bool single_read_forward(nf_cuda_glue::ForwardStep& s, const Tensor& x, Tensor& y, bool relu, cudaStream_t stream) {
  if (!single_read_on() || s.sh.layout != nf::Layout::ChannelsLast || x.numel() == 0) return false;
  nf::MomentsParams m = nf_cuda_glue::moments_params(x, s.sh, s.mean, s.m2);
  const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
  const int64_t floats = nf::cuda_single_read_forward_partials(m, y.const_data_ptr(), relu, s.p, s.iebn, dt);
  if (floats < 0) return false;
  Tensor partials = empty_partials(x, floats);
  m.partials = data_or_null(partials);
  return single_read_launched(nf::cuda_single_read_forward(m, y.mutable_data_ptr(), relu, s.p, s.iebn, dt, stream),
                              s.iebn ? "iebn_layer_forward (single read)" : "bin_layer_forward (single read)");
}

Five layer_forward(const char* coef_op, const Tensor& x, const Tensor& gate, const Tensor* gate_bias,
                   const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, bool training, double momentum, double eps,
                   const OptTensor& num_batches_tracked, bool relu) {
  nf_cuda_glue::ForwardStep s = nf_cuda_glue::check_forward_step(
      coef_op, x, gate, gate_bias, weight, bias, running_mean, running_var, training, momentum, eps,
      num_batches_tracked);
  const c10::cuda::CUDAGuard guard(x.device());
  const nf_coef_glue::ForwardOutputs o = nf_coef_glue::forward_outputs(s.p, s.mean);
  Tensor y = nf_glue::empty_output(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!single_read_forward(s, x, y, relu, stream)) {
    nf_cuda_glue::run_forward_step(s, x, stream);
    nf_cuda_glue::run_affine_apply(x, s.sh, s.mean, o.scale, o.shift, relu, y);
  }
  return {y, s.mean, s.m2, o.scale, o.shift};
}

Five bin_layer_forward(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                       double eps, const OptTensor& num_batches_tracked, bool relu) {
  return layer_forward("bin_coefficients", x, gate, nullptr, weight, bias, running_mean, running_var, training,
                       momentum, eps, num_batches_tracked, relu);
}

Five iebn_layer_forward(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                        bool training, double momentum, double eps, const OptTensor& num_batches_tracked, bool relu) {
  return layer_forward("iebn_coefficients", x, gate_weight, &gate_bias, weight, bias, running_mean, running_var,
                       training, momentum, eps, num_batches_tracked, relu);
}

// ---- backward -----------------------------------------------------------------------------------

bool single_read_backward(nf_cuda_glue::BackwardStep& s, const Tensor& dy, const Tensor& x, const Tensor& mean,
                          const OptTensor& scale, const OptTensor& shift, Tensor& dx, cudaStream_t stream) {
  if (!single_read_on() || s.sh.layout != nf::Layout::ChannelsLast || x.numel() == 0) return false;
  nf::BackwardSumsParams b = nf_cuda_glue::backward_sums_params(dy, x, mean, scale, shift, s.masked, s.sh, s.g1, s.g2);
  const nf::DType dt = nf_glue::kernel_dtype(x.scalar_type());
  const int64_t floats = nf::cuda_single_read_backward_partials(b, dx.const_data_ptr(), s.p, s.iebn, dt);
  if (floats < 0) return false;
  Tensor partials = empty_partials(x, floats);
  b.partials = data_or_null(partials);
  return single_read_launched(nf::cuda_single_read_backward(b, dx.mutable_data_ptr(), s.p, s.iebn, dt, stream),
                              s.iebn ? "iebn_layer_backward (single read)" : "bin_layer_backward (single read)");
}

// (dx, parameter gradients: BIN's gate, weight, bias; IEBN's gate weight, gate bias, weight, bias)
std::pair<Tensor, nf_coef_glue::BackwardOutputs> layer_backward(
    const char* coef_op, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2, const Tensor& gate,
    const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double eps, const OptTensor& scale, const OptTensor& shift) {
  nf_cuda_glue::BackwardStep s = nf_cuda_glue::check_backward_step(
      coef_op, dy, x, mean, m2, gate, gate_bias, weight, bias, running_mean, running_var, training, eps, scale, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  nf_coef_glue::BackwardOutputs o = nf_coef_glue::backward_outputs(s.p, mean, s.iebn);
  Tensor dx = nf_glue::empty_output(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!single_read_backward(s, dy, x, mean, scale, shift, dx, stream)) {
    nf_cuda_glue::run_backward_step(s, dy, x, mean, scale, shift, stream);
    nf_cuda_glue::run_backward_apply(dy, x, mean, o.c_dy, o.c_x, o.c_0, scale, shift, s.masked, s.sh, dx);
  }
  return {dx, std::move(o)};
}

Four bin_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2, const Tensor& gate,
                        const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                        const OptTensor& running_var, bool training, double eps, const OptTensor& scale,
                        const OptTensor& shift) {
  auto [dx, o] = layer_backward("bin_coefficients_backward", dy, x, mean, m2, gate, nullptr, weight, bias,
                                running_mean, running_var, training, eps, scale, shift);
  return {dx, o.grads[0], o.grads[1], o.grads[2]};
}

Five iebn_layer_backward(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2,
                         const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                         const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                         bool training, double eps, const OptTensor& scale, const OptTensor& shift) {
  auto [dx, o] = layer_backward("iebn_coefficients_backward", dy, x, mean, m2, gate_weight, &gate_bias, weight, bias,
                                running_mean, running_var, training, eps, scale, shift);
  return {dx, o.grads[0], o.grads[1], o.grads[2], o.grads[3]};
}

}  // namespace

namespace nf_glue {

// normfuse._C.single_read (csrc/python_layer_step.cpp): the mode ("0" or "auto"), and set it.
const char* single_read() { return single_read_on() ? "auto" : "0"; }

bool set_single_read(const char* mode) {
  int m;
  if (std::strcmp(mode, "0") == 0) m = 0;
  else if (std::strcmp(mode, "auto") == 0) m = 1;
  else return false;
  g_single_read.store(m, std::memory_order_relaxed);
  return true;
}

int64_t single_read_launches() { return g_single_read_launches.load(std::memory_order_relaxed); }

}  // namespace nf_glue

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) {
  m.impl("bin_layer_forward", &bin_layer_forward);
  m.impl("iebn_layer_forward", &iebn_layer_forward);
  m.impl("bin_layer_backward", &bin_layer_backward);
  m.impl("iebn_layer_backward", &iebn_layer_backward);
}
