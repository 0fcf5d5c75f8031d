// Entry points of the coefficient kernels (csrc/cuda/coefficients.cu), for the torch glue
// (csrc/cuda/coefficients_glue.cpp). Plain CUDA runtime types only: no torch, no kernel code.
// Each runs one kernel launch on `stream` and returns its launch status.
#pragma once
#include <cuda_runtime_api.h>

#include "common/coefficients_params.h"

namespace nf {

cudaError_t launch_bin_coefficients(const BatchCoefParams<float>& p, cudaStream_t stream);
cudaError_t launch_bin_coefficients_backward(const BatchCoefParams<float>& p, cudaStream_t stream);
cudaError_t launch_iebn_coefficients(const BatchCoefParams<float>& p, cudaStream_t stream);
cudaError_t launch_iebn_coefficients_backward(const BatchCoefParams<float>& p, cudaStream_t stream);
cudaError_t launch_assoc_coefficients(const AssocCoefParams<float>& p, cudaStream_t stream);
// Needs p.workspace (N * p.partials_per_sample() floats, any content) and p.counters (N ints,
// zero on entry, left zero): see cuda/persistent_counters.h.
cudaError_t launch_assoc_coefficients_backward(const AssocCoefParams<float>& p, cudaStream_t stream);
cudaError_t launch_ilm_coefficients(const IlmCoefParams<float>& p, cudaStream_t stream);
// Needs p.workspace and p.counters as the AssocNorm backward.
cudaError_t launch_ilm_coefficients_backward(const IlmCoefParams<float>& p, cudaStream_t stream);

}  // namespace nf
