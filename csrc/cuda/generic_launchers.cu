// Explicit instantiations of the generic kernels' launchers (float, __half, __nv_bfloat16) and
// the dtype switch the glue calls. No torch header here: this TU compiles in seconds.
#include "cuda/generic_launchers.h"
#include "kernels/plane_apply.cuh"
#include "kernels/plane_reduce.cuh"

namespace nf {

#define NF_INSTANTIATE(T)                                                                  \
  template Workspace moments_workspace<T>(const MomentsParams&);                         \
  template cudaError_t launch_moments<T>(const MomentsParams&, cudaStream_t);             \
  template Workspace backward_sums_workspace<T>(const BackwardSumsParams&);              \
  template cudaError_t launch_backward_sums<T>(const BackwardSumsParams&, cudaStream_t);  \
  template cudaError_t launch_affine_apply<T>(const AffineApplyParams&, cudaStream_t);    \
  template cudaError_t launch_backward_apply<T>(const BackwardApplyParams&, cudaStream_t);

NF_INSTANTIATE(float)
NF_INSTANTIATE(__half)
NF_INSTANTIATE(__nv_bfloat16)
#undef NF_INSTANTIATE

#define NF_DTYPE_SWITCH(dtype, fail, FN, ...) \
  switch (dtype) {                            \
    case DType::f32:                          \
      return FN<float>(__VA_ARGS__);          \
    case DType::f16:                          \
      return FN<__half>(__VA_ARGS__);         \
    case DType::bf16:                         \
      return FN<__nv_bfloat16>(__VA_ARGS__);  \
    default:                                  \
      return fail;                            \
  }

Workspace cuda_moments_workspace(const MomentsParams& p, DType dtype) {
  NF_DTYPE_SWITCH(dtype, Workspace{}, moments_workspace, p)
}
Workspace cuda_backward_sums_workspace(const BackwardSumsParams& p, DType dtype) {
  NF_DTYPE_SWITCH(dtype, Workspace{}, backward_sums_workspace, p)
}
cudaError_t cuda_moments(const MomentsParams& p, DType dtype, cudaStream_t stream) {
  NF_DTYPE_SWITCH(dtype, cudaErrorInvalidValue, launch_moments, p, stream)
}
cudaError_t cuda_backward_sums(const BackwardSumsParams& p, DType dtype, cudaStream_t stream) {
  NF_DTYPE_SWITCH(dtype, cudaErrorInvalidValue, launch_backward_sums, p, stream)
}
cudaError_t cuda_affine_apply(const AffineApplyParams& p, DType dtype, cudaStream_t stream) {
  NF_DTYPE_SWITCH(dtype, cudaErrorInvalidValue, launch_affine_apply, p, stream)
}
cudaError_t cuda_backward_apply(const BackwardApplyParams& p, DType dtype, cudaStream_t stream) {
  NF_DTYPE_SWITCH(dtype, cudaErrorInvalidValue, launch_backward_apply, p, stream)
}

}  // namespace nf
