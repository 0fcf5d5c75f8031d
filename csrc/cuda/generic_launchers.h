// Non-template entry points of the generic CUDA kernels, for the torch glue (.cpp). They switch on
// the dtype and call the templates of csrc/kernels/plane_{reduce,apply}.cuh, explicitly
// instantiated in generic_launchers.cu. float64 is not supported (cudaErrorInvalidValue).
#pragma once
#include <cuda_runtime_api.h>

#include "common/generic_params.h"

namespace nf {

// Counters (zeroed) and partials (any content) the launch needs in p.counters / p.partials (both
// counts 0: none; see nf::Workspace). Depends on the pointers' alignment (vector width), so fill
// the data pointers of the params before asking.
Workspace cuda_moments_workspace(const MomentsParams& p, DType dtype);
Workspace cuda_backward_sums_workspace(const BackwardSumsParams& p, DType dtype);

cudaError_t cuda_moments(const MomentsParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_backward_sums(const BackwardSumsParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_affine_apply(const AffineApplyParams& p, DType dtype, cudaStream_t stream);
cudaError_t cuda_backward_apply(const BackwardApplyParams& p, DType dtype, cudaStream_t stream);

}  // namespace nf
