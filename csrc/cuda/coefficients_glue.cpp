// CUDA coefficient ops (entry points in common/coefficient_ops.h): checks and outputs from
// common/coefficients_glue.h, device guard and current stream, then one kernel launch per op
// (kernels/coefficients_*.cuh via cuda/coefficients.cu). Statistics are float32 on the GPU
// (docs/architecture.md).
//
// Every op checks all its arguments first, then takes the device guard, allocates and launches:
// nothing is allocated, guarded or launched for a call that raises. (On the first GPU run, the
// error paths that raised with a guard alive crashed the process; those that raised before it did
// not. The order is right regardless; tests/csrc/test_cuda_errors.py runs those error paths on a
// GPU, each in a process of its own, so a crash there fails one test and names it.)
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
using nf_coef_glue::ForwardOutputs;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// One AssocNorm sample's statistics and auto-encoder live in shared memory: refuse, with the
// sizes named, what the device cannot hold (else the launch fails with "invalid argument").
void check_assoc_smem(const char* op, const nf::AssocCoefParams<float>& p, bool backward, const Tensor& mean) {
  // (plan_assoc_coef's 32-bit limits, said here, before any allocation, not as a failed launch)
  TORCH_CHECK(p.C <= (1 << 28) && p.M * p.G <= (1 << 28), "normfuse.", op, ": ", p.C, " channels, ", p.G,
              " groups and embed_dim ", p.M, " exceed the CUDA kernels' 32-bit indexing (at most 2^28 channels "
              "and 2^28 encoder entries); use the torch backend");
  int limit = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, mean.get_device());
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  const size_t bytes = sizeof(float) * nf::assoc_smem_floats(p.G, p.M, backward);
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "normfuse.", op, ": num_groups = ", p.G, " and embed_dim = ", p.M,
              " need ", bytes, " bytes of shared memory per block, more than this GPU's ", limit,
              "; use fewer groups or a smaller embed_dim, or the torch backend");
}

// Likewise for one ILM-Norm sample's key-group, group and hidden-unit vectors.
void check_ilm_smem(const char* op, const nf::IlmCoefParams<float>& p, bool backward, const Tensor& mean) {
  // (plan_ilm_coef's 32-bit limits, said here, before any allocation, not as a failed launch)
  TORCH_CHECK(p.C <= (1 << 28) && p.E * p.K <= (1 << 27), "normfuse.", op, ": ", p.C, " channels, K = ", p.K,
              " key groups and E = ", p.E, " hidden units exceed the CUDA kernels' 32-bit indexing (at most 2^28 "
              "channels and 2^27 meta-network entries); use the torch backend");
  int limit = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, mean.get_device());
  TORCH_CHECK(err == cudaSuccess, "normfuse.", op, ": cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  const size_t bytes = sizeof(float) * nf::ilm_smem_floats(p.G, p.K, p.E, backward);
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "normfuse.", op, ": num_groups = ", p.G, ", K = ", p.K,
              " key groups and E = ", p.E, " hidden units need ", bytes,
              " bytes of shared memory per block, more than this GPU's ", limit, "; use the torch backend");
}

// The steps of common/coefficient_ops.h: float32 statistics only.
struct Cuda {
  template <class F>
  static void dispatch(const char* op, const Tensor& mean, const Tensor&, F&& f) {
    TORCH_CHECK(mean.is_cuda(), "normfuse.", op, " (CUDA kernel): statistics are on ", mean.device());
    TORCH_CHECK(mean.scalar_type() == at::kFloat, "normfuse.", op,
                ": the CUDA kernels take float32 statistics, got ", mean.scalar_type(),
                " (float64 runs on the CPU backend)");
    f(float{});
  }

  static ForwardOutputs batch_forward(const char* op, nf::BatchCoefParams<float>& p, const Tensor& mean, bool iebn) {
    const c10::cuda::CUDAGuard guard(mean.device());  // after every check (see the file comment)
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // The kernel also counts the batch (num_batches_tracked += 1 in training): no extra launch.
    // Empty statistics launch no kernel but a count-only one (launch_batch_coef_forward).
    check_launch(iebn ? nf::launch_iebn_coefficients(p, stream) : nf::launch_bin_coefficients(p, stream), op);
    return o;
  }

  static BackwardOutputs batch_backward(const char* op, nf::BatchCoefParams<float>& p, const Tensor& mean,
                                        bool iebn) {
    const c10::cuda::CUDAGuard guard(mean.device());
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean, iebn);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(iebn ? nf::launch_iebn_coefficients_backward(p, stream)
                      : nf::launch_bin_coefficients_backward(p, stream),
                 op);
    return o;
  }

  static ForwardOutputs assoc_forward(const char* op, nf::AssocCoefParams<float>& p, const Tensor& mean) {
    check_assoc_smem(op, p, false, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    check_launch(nf::launch_assoc_coefficients(p, c10::cuda::getCurrentCUDAStream()), op);
    return o;
  }

  static BackwardOutputs assoc_backward(const char* op, nf::AssocCoefParams<float>& p, const Tensor& mean) {
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

  static ForwardOutputs ilm_forward(const char* op, nf::IlmCoefParams<float>& p, const Tensor& mean) {
    check_ilm_smem(op, p, false, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    const ForwardOutputs o = nf_coef_glue::forward_outputs(p, mean);
    check_launch(nf::launch_ilm_coefficients(p, c10::cuda::getCurrentCUDAStream()), op);
    return o;
  }

  static BackwardOutputs ilm_backward(const char* op, nf::IlmCoefParams<float>& p, const Tensor& mean) {
    check_ilm_smem(op, p, true, mean);
    const c10::cuda::CUDAGuard guard(mean.device());
    BackwardOutputs o = nf_coef_glue::backward_outputs(p, mean);
    if (p.N == 0) return o;  // (C > 0: ilm_params refuses groups of fewer than two values)
    const Tensor ws = at::empty({p.N * p.partials_per_sample()}, mean.options());
    p.workspace = ws.data_ptr<float>();
    const Tensor counters = nf_glue::zeroed_counters(mean, p.N);  // as the AssocNorm backward's
    p.counters = counters.data_ptr<int>();
    check_launch(nf::launch_ilm_coefficients_backward(p, c10::cuda::getCurrentCUDAStream()), op);
    return o;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CUDA, m) {
  nf_coef_glue::CoefficientOps<Cuda>::register_all(m);
  nf_coef_glue::CoefficientOps<Cuda>::register_ilm(m);
}
