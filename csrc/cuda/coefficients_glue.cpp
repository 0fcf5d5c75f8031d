// Torch glue of the CUDA coefficient kernels: checks, output allocation on the caching allocator,
// device guard and current stream, then one kernel launch per op (kernels/coefficients_*.cuh via
// cuda/coefficients.cu). Statistics are float32 on the GPU (docs/architecture.md).
//
// Every op checks all its arguments first, then takes the device guard, allocates and launches:
// nothing is allocated, guarded or launched for a call that raises. (On the first GPU run, the
// error paths that raised with a guard alive crashed the process; those that raised before it did
// not. The order is right regardless; scripts/run_gpu_suite.sh's crash probe re-runs them with
// C++ stack traces on fatal signals, should anything there still crash.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/coefficients_glue.h"
#include "cuda/persistent_counters.h"
#include "kernels/coefficients_launch.cuh"

namespace {

using at::Tensor;
using nf_coef::OptTensor;

void check_cuda_stats(const char* op, const Tensor& mean) {
  TORCH_CHECK(mean.is_cuda(), "normfuse.", op, " (CUDA kernel): statistics are on ", mean.device());
  TORCH_CHECK(mean.scalar_type() == at::kFloat, "normfuse.", op,
              ": the CUDA kernels take float32 statistics, got ", mean.scalar_type(),
              " (float64 runs on the CPU backend)");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// One AssocNorm sample's statistics and auto-encoder live in shared memory: refuse, with the
// sizes named, what the device cannot hold (else the launch fails with "invalid argument").
void check_assoc_smem(const char* op, const nf::AssocCoefParams<float>& p, bool backward, const Tensor& mean) {
  int limit = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, mean.get_device());
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  const size_t bytes = sizeof(float) * nf::assoc_smem_floats(p.G, p.M, backward);
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "normfuse.", op, ": num_groups = ", p.G, " and embed_dim = ", p.M,
              " need ", bytes, " bytes of shared memory per block, more than this GPU's ", limit,
              "; use fewer groups or a smaller embed_dim, or the torch backend");
}

template <bool kIebn>
std::tuple<Tensor, Tensor> batch_forward(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                         const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight,
                                         const OptTensor& bias, const OptTensor& running_mean,
                                         const OptTensor& running_var, bool training, double momentum, double eps,
                                         const OptTensor& num_batches_tracked) {
  check_cuda_stats(op, mean);
  auto p = nf_coef::batch_params<float>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                        running_var, training, momentum, eps);
  nf_coef::set_batch_counter(p, op, num_batches_tracked, mean);
  const c10::cuda::CUDAGuard guard(mean.device());  // after every check (see the file comment)
  Tensor scale = nf_coef::empty_stats(mean), shift = nf_coef::empty_stats(mean);
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The kernel also counts the batch (num_batches_tracked += 1 in training): no extra launch.
  // Empty statistics launch no kernel: a count-only one (launch_batch_coef_forward).
  check_launch(kIebn ? nf::launch_iebn_coefficients(p, stream) : nf::launch_bin_coefficients(p, stream), op);
  return {scale, shift};
}

// c_dy, c_x, c_0, grad_gate, grad_gate_bias (undefined for BIN), grad_weight, grad_bias
template <bool kIebn>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_backward(
    const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2,
    int64_t plane_size, const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  check_cuda_stats(op, mean);
  auto p = nf_coef::batch_params<float>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                        running_var, training, 0.0, eps);
  nf_coef::batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = p.C;
  Tensor c_dy = nf_coef::empty_stats(mean), c_x = nf_coef::empty_stats(mean), c_0 = nf_coef::empty_stats(mean);
  Tensor g_gate = nf_coef::empty_grad({C}, mean), g_gate_bias, g_weight = nf_coef::empty_grad({C}, mean),
         g_bias = nf_coef::empty_grad({C}, mean);
  if (gate_bias) g_gate_bias = nf_coef::empty_grad({C}, mean);
  p.c_dy = c_dy.data_ptr<float>();
  p.c_x = c_x.data_ptr<float>();
  p.c_0 = c_0.data_ptr<float>();
  p.grad_gate = g_gate.data_ptr<float>();
  p.grad_gate_bias = gate_bias ? g_gate_bias.data_ptr<float>() : nullptr;
  p.grad_weight = g_weight.data_ptr<float>();
  p.grad_bias = g_bias.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(kIebn ? nf::launch_iebn_coefficients_backward(p, stream)
                     : nf::launch_bin_coefficients_backward(p, stream),
               op);
  return {c_dy, c_x, c_0, g_gate, g_gate_bias, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> bin_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                            const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double momentum, double eps,
                                            const OptTensor& num_batches_tracked) {
  return batch_forward<false>("bin_coefficients", mean, m2, plane_size, gate, nullptr, weight, bias, running_mean,
                              running_var, training, momentum, eps, num_batches_tracked);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bin_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double eps) {
  auto [c_dy, c_x, c_0, g_gate, unused, g_weight, g_bias] =
      batch_backward<false>("bin_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, gate, nullptr,
                            weight, bias, running_mean, running_var, training, eps);
  return {c_dy, c_x, c_0, g_gate, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                             const Tensor& gate_weight, const Tensor& gate_bias,
                                             const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& running_mean, const OptTensor& running_var,
                                             bool training, double momentum, double eps,
                                             const OptTensor& num_batches_tracked) {
  return batch_forward<true>("iebn_coefficients", mean, m2, plane_size, gate_weight, &gate_bias, weight, bias,
                             running_mean, running_var, training, momentum, eps, num_batches_tracked);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> iebn_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  return batch_backward<true>("iebn_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, gate_weight,
                              &gate_bias, weight, bias, running_mean, running_var, training, eps);
}

std::tuple<Tensor, Tensor> assoc_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                              int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                                              const Tensor& decoder_var, const Tensor& weight, const Tensor& bias,
                                              double eps) {
  const char* op = "assoc_coefficients";
  check_cuda_stats(op, mean);
  auto p = nf_coef::assoc_params<float>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                                        weight, bias, eps);
  check_assoc_smem(op, p, false, mean);
  const c10::cuda::CUDAGuard guard(mean.device());
  Tensor scale = nf_coef::empty_stats(mean), shift = nf_coef::empty_stats(mean);
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  check_launch(nf::launch_assoc_coefficients(p, c10::cuda::getCurrentCUDAStream()), op);
  return {scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> assoc_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
    const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "assoc_coefficients_backward";
  check_cuda_stats(op, mean);
  auto p = nf_coef::assoc_params<float>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                                        weight, bias, eps);
  nf_coef::check_like_stats(op, "sum_dy", sum_dy, mean);
  nf_coef::check_like_stats(op, "sum_dy_xmu", sum_dy_xmu, mean);
  check_assoc_smem(op, p, true, mean);
  const c10::cuda::CUDAGuard guard(mean.device());
  Tensor c_dy = nf_coef::empty_stats(mean), c_x = nf_coef::empty_stats(mean), c_0 = nf_coef::empty_stats(mean);
  Tensor g_enc = nf_coef::empty_grad(encoder.sizes(), mean),
         g_dec_mean = nf_coef::empty_grad(decoder_mean.sizes(), mean),
         g_dec_var = nf_coef::empty_grad(decoder_var.sizes(), mean),
         g_weight = nf_coef::empty_grad(weight.sizes(), mean), g_bias = nf_coef::empty_grad(bias.sizes(), mean);
  p.sum_dy = sum_dy.data_ptr<float>();
  p.sum_dy_xmu = sum_dy_xmu.data_ptr<float>();
  p.c_dy = c_dy.data_ptr<float>();
  p.c_x = c_x.data_ptr<float>();
  p.c_0 = c_0.data_ptr<float>();
  p.grad_encoder = g_enc.data_ptr<float>();
  p.grad_decoder_mean = g_dec_mean.data_ptr<float>();
  p.grad_decoder_var = g_dec_var.data_ptr<float>();
  p.grad_weight = g_weight.data_ptr<float>();
  p.grad_bias = g_bias.data_ptr<float>();
  if (p.N == 0 || p.C == 0) return {c_dy, c_x, c_0, g_enc, g_dec_mean, g_dec_var, g_weight, g_bias};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Per-sample gradient partials (no initialisation needed) from the caching allocator.
  Tensor ws = at::empty({p.N * p.partials_per_sample()}, mean.options());
  p.workspace = ws.data_ptr<float>();
  // Arrival counters of the reduction tree over samples: zeroed, left zeroed by the kernel, so
  // persistent (no memset launch: cuda/persistent_counters.h).
  const Tensor counters = nf_glue::zeroed_counters(mean, p.N);
  p.counters = counters.data_ptr<int>();
  check_launch(nf::launch_assoc_coefficients_backward(p, stream), op);
  return {c_dy, c_x, c_0, g_enc, g_dec_mean, g_dec_var, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) {
  m.impl("bin_coefficients", &bin_coefficients);
  m.impl("bin_coefficients_backward", &bin_coefficients_backward);
  m.impl("iebn_coefficients", &iebn_coefficients);
  m.impl("iebn_coefficients_backward", &iebn_coefficients_backward);
  m.impl("assoc_coefficients", &assoc_coefficients);
  m.impl("assoc_coefficients_backward", &assoc_coefficients_backward);
}
