// Non-template entry points of the generic CUDA kernels, for the torch glue (.cpp). They switch on
// the dtype and call the templates of csrc/kernels/plane_{reduce,apply}.cuh, explicitly
// instantiated in generic_launchers.cu. float64 is not supported (cudaErrorInvalidValue).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/generic_params.h"

namespace nf {

// Bytes of zero-initialised workspace the launch needs (0: none). Depends on the pointers'
// alignment (vector width), so fill the params before asking.
size_t cuda_moments_workspace_bytes(const MomentsParams& p, DType dtype);
size_t cuda_backward_sums_workspace_bytes(const BackwardSumsParams& p, DType dtype);

cudaError_t cuda_moments(const MomentsParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_backward_sums(const BackwardSumsParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_affine_apply(const AffineApplyParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_backward_apply(const BackwardApplyParams& p, DType dtype, cudaStream_t stream);

}  // namespace nf
