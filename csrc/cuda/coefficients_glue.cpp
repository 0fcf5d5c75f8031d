// CUDA coefficient ops (entry points in common/coefficient_ops.h): checks and outputs from
// common/coefficients_glue.h, device guard and current stream, then one kernel launch per op
// (kernels/coefficients_*.cuh via cuda/coefficients.cu). Statistics are float32 on the GPU
// (docs/architecture.md).
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

#include "common/coefficient_ops.h"
#include "cuda/persistent_counters.h"
#include "kernels/coefficients_launch.cuh"

namespace {

using at::Tensor;
using nf_coef_glue::BackwardOutputs;
using nf_coef_glue::OptTensor;

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

struct Cuda {
  static std::tuple<Tensor, Tensor> batch_forward(const char* op, const Tensor& mean, const Tensor& m2,
                                                  int64_t plane_size, const Tensor& gate, const Tensor* gate_bias,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  const OptTensor& running_mean, const OptTensor& running_var,
                                                  bool training, double momentum, double eps,
                                                  const OptTensor& num_batches_tracked) {
    check_cuda_stats(op, mean);
    auto p = nf_coef_glue::batch_params<float>(op, mean, m2, plane_size, gate, gate_bias, weight, bias,
                                               running_mean, running_var, training, momentum, eps);
    nf_coef_glue::set_batch_counter(p, op, num_batches_tracked, mean);
    const c10::cuda::CUDAGuard guard(mean.device());  // after every check (see the file comment)
    const nf_coef_glue::ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // The kernel also counts the batch (num_batches_tracked += 1 in training): no extra launch.
    // Empty statistics launch no kernel but a count-only one (launch_batch_coef_forward).
    check_launch(gate_bias ? nf::launch_iebn_coefficients(p, stream) : nf::launch_bin_coefficients(p, stream), op);
    return {o.scale, o.shift};
  }

  static BackwardOutputs batch_backward(const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& mean, const Tensor& m2, int64_t plane_size, const Tensor& gate,
                                        const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                                        double eps) {
    check_cuda_stats(op, mean);
    auto p = nf_coef_glue::batch_params<float>(op, mean, m2, plane_size, gate, gate_bias, weight, bias,
                                               running_mean, running_var, training, 0.0, eps);
    nf_coef_glue::batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean, gate_bias != nullptr);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(gate_bias ? nf::launch_iebn_coefficients_backward(p, stream)
                             : nf::launch_bin_coefficients_backward(p, stream),
                 op);
    return o;
  }

  static std::tuple<Tensor, Tensor> assoc_forward(const char* op, const Tensor& mean, const Tensor& m2,
                                                  int64_t plane_size, int64_t num_groups, const Tensor& encoder,
                                                  const Tensor& decoder_mean, const Tensor& decoder_var,
                                                  const Tensor& weight, const Tensor& bias, double eps) {
    check_cuda_stats(op, mean);
    auto p = nf_coef_glue::assoc_params<float>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                               decoder_var, weight, bias, eps);
    check_assoc_smem(op, p, false, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    const nf_coef_glue::ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    check_launch(nf::launch_assoc_coefficients(p, c10::cuda::getCurrentCUDAStream()), op);
    return {o.scale, o.shift};
  }

  static BackwardOutputs assoc_backward(const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                        const Tensor& mean, const Tensor& m2, int64_t plane_size, int64_t num_groups,
                                        const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
                                        const Tensor& weight, const Tensor& bias, double eps) {
    check_cuda_stats(op, mean);
    auto p = nf_coef_glue::assoc_params<float>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                               decoder_var, weight, bias, eps);
    nf_coef_glue::set_gradient_sums(p, op, sum_dy, sum_dy_xmu, mean);
    check_assoc_smem(op, p, true, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean);
    if (p.N == 0 || p.C == 0) return o;
    // Per-sample gradient partials (no initialisation needed) from the caching allocator.
    const Tensor ws = at::empty({p.N * p.partials_per_sample()}, mean.options());
    p.workspace = ws.data_ptr<float>();
    // Arrival counters of the reduction tree over samples: zeroed, left zeroed by the kernel, so
    // persistent (no memset launch: cuda/persistent_counters.h).
    const Tensor counters = nf_glue::zeroed_counters(mean, p.N);
    p.counters = counters.data_ptr<int>();
    check_launch(nf::launch_assoc_coefficients_backward(p, c10::cuda::getCurrentCUDAStream()), op);
    return o;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) { nf_coef_glue::CoefficientOps<Cuda>::register_all(m); }
