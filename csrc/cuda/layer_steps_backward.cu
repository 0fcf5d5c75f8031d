// The fused backward layer steps (kernels/layer_steps.cuh): backward_sums (plain or ReLU-masked)
// + BIN / IEBN coefficient backward in one launch, for float, __half and __nv_bfloat16 inputs.
// No torch header here.
#include "cuda/layer_steps_launchers.h"
#include "kernels/layer_steps.cuh"

namespace nf {

Workspace cuda_sums_step_workspace(const BackwardSumsParams& p, DType dtype) {
  switch (dtype) {
    case DType::f32:
      return sums_step_workspace<float>(p);
    case DType::f16:
      return sums_step_workspace<__half>(p);
    case DType::bf16:
      return sums_step_workspace<__nv_bfloat16>(p);
    default:
      return Workspace{};
  }
}

template <class Math>
static cudaError_t sums_step(const BackwardSumsParams& p, const BatchCoefParams<float>& c, DType dtype,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return launch_sums_step<float, Math>(p, c, stream);
    case DType::f16:
      return launch_sums_step<__half, Math>(p, c, stream);
    case DType::bf16:
      return launch_sums_step<__nv_bfloat16, Math>(p, c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cuda_sums_step(const BackwardSumsParams& p, const BatchCoefParams<float>& c, bool iebn, DType dtype,
                           cudaStream_t stream) {
  return iebn ? sums_step<coef::IebnMath<float>>(p, c, dtype, stream)
              : sums_step<coef::BinMath<float>>(p, c, dtype, stream);
}

}  // namespace nf
