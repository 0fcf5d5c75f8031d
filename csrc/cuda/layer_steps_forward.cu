// The fused forward layer steps (kernels/layer_steps.cuh): moments + BIN / IEBN coefficients in
// one launch, for float, __half and __nv_bfloat16 inputs. No torch header here. The backward is
// layer_steps_backward.cu (a separate TU: the two compile in parallel).
#include "cuda/layer_steps_launchers.h"
#include "kernels/layer_steps.cuh"

namespace nf {

bool cuda_step_small(const PlaneShape& s, int threads) { return fused_step_small(s, threads); }

Workspace cuda_moments_step_workspace(const MomentsParams& p, DType dtype) {
  switch (dtype) {
    case DType::f32:
      return moments_step_workspace<float>(p);
    case DType::f16:
      return moments_step_workspace<__half>(p);
    case DType::bf16:
      return moments_step_workspace<__nv_bfloat16>(p);
    default:
      return Workspace{};
  }
}

template <class Math>
static cudaError_t moments_step(const MomentsParams& p, const BatchCoefParams<float>& c, DType dtype,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return launch_moments_step<float, Math>(p, c, stream);
    case DType::f16:
      return launch_moments_step<__half, Math>(p, c, stream);
    case DType::bf16:
      return launch_moments_step<__nv_bfloat16, Math>(p, c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cuda_moments_step(const MomentsParams& p, const BatchCoefParams<float>& c, bool iebn, DType dtype,
                              cudaStream_t stream) {
  return iebn ? moments_step<coef::IebnMath<float>>(p, c, dtype, stream)
              : moments_step<coef::BinMath<float>>(p, c, dtype, stream);
}

}  // namespace nf
