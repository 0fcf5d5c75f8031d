// Non-template entry points of the single-read layer directions (kernels/single_read.cuh), for
// the torch glue (cuda/layer_steps_cuda.cpp): a BIN / IEBN layer's whole forward or backward as
// one cooperative launch, when its activation fits on chip. Instantiated in
// single_read_forward.cu / single_read_backward.cu (float, __half, __nv_bfloat16 inputs; float
// statistics). No torch headers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/coefficients_params.h"
#include "common/generic_params.h"

namespace nf {

// The partial floats a single-read launch of this call needs (0 or more), or -1 when the single
// read does not apply: the kernels do not take the input (not channels-last, empty, no 16-byte
// vectors) or the current device cannot hold all of its blocks at once (or has no cooperative
// launch). Arguments as for the launches below; data pointers set (alignment decides).
int64_t cuda_single_read_forward_partials(const MomentsParams& p, const void* y, bool relu,
                                          const BatchCoefParams<float>& c, bool iebn, DType dtype);
int64_t cuda_single_read_backward_partials(const BackwardSumsParams& p, const void* dx, const BatchCoefParams<float>& c,
                                           bool iebn, DType dtype);

// moments + bin/iebn_coefficients + affine_apply(relu) in one launch: p as for moments (p.partials:
// the count above, when non-zero), c with c.mean / c.m2 == p.mean / p.m2 and scale / shift set;
// y: x's layout and dtype.
cudaError_t cuda_single_read_forward(const MomentsParams& p, void* y, bool relu, const BatchCoefParams<float>& c,
                                     bool iebn, DType dtype, cudaStream_t stream);
// backward_sums (masked when p.mask_scale / mask_shift are set) + coefficient backward +
// backward_apply (same mask) in one launch: c.sum_dy / c.sum_dy_xmu == p.sum_dy / p.sum_dy_xmu,
// c.mean == p.mean, the c_* and gradient outputs set; dx: x's layout and dtype.
cudaError_t cuda_single_read_backward(const BackwardSumsParams& p, void* dx, const BatchCoefParams<float>& c,
                                      bool iebn, DType dtype, cudaStream_t stream);

}  // namespace nf
