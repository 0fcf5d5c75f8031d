// Non-template entry points of the fused BIN / IEBN layer steps (kernels/layer_steps.cuh), for
// the torch glue (cuda/layer_steps_cuda.cpp): one launch each, a reduction whose last block
// computes the coefficients. Instantiated in layer_steps_forward.cu / layer_steps_backward.cu
// (float, __half, __nv_bfloat16 inputs; float statistics). float64: cudaErrorInvalidValue.
#pragma once
#include <cuda_runtime_api.h>

#include "common/coefficients_params.h"
#include "common/generic_params.h"

namespace nf {

// Whether a layer of this shape is small enough to fuse (kFusedStepMaxTiles / kFusedStepMaxPlanes
// in kernels/layer_steps.cuh); false for empty shapes. `threads`: as the params' (0 = 256).
bool cuda_step_small(const PlaneShape& s, int threads);

// Counters (zeroed; one more than the reduction alone: the grid's) and partials of one launch.
// Fill the data pointers first (the vector width depends on their alignment).
Workspace cuda_moments_step_workspace(const MomentsParams& p, DType dtype);
Workspace cuda_sums_step_workspace(const BackwardSumsParams& p, DType dtype);

// moments + bin/iebn_coefficients (c.mean / c.m2 == p.mean / p.m2; running statistics and
// num_batches_tracked updated as the coefficient kernel does). Requires N * C * L > 0.
cudaError_t cuda_moments_step(const MomentsParams& p, const BatchCoefParams<float>& c, bool iebn, DType dtype,
                              cudaStream_t stream);
// backward_sums (masked when p.mask_scale / mask_shift are set) + bin/iebn_coefficients_backward
// (c.sum_dy / c.sum_dy_xmu == p.sum_dy / p.sum_dy_xmu). Requires N * C * L > 0.
cudaError_t cuda_sums_step(const BackwardSumsParams& p, const BatchCoefParams<float>& c, bool iebn, DType dtype,
                           cudaStream_t stream);

}  // namespace nf
