// The single-read forward (kernels/single_read.cuh): moments + BIN / IEBN coefficients + affine
// map in one cooperative launch, for float, __half and __nv_bfloat16 inputs. No torch header
// here. The backward is single_read_backward.cu (a separate TU: the two compile in parallel).
#include "cuda/single_read_capacity.cuh"
#include "cuda/single_read_launchers.h"

namespace nf {

template <typename T, class Math>
static int64_t forward_partials(const MomentsParams& p, const void* y, bool relu, const BatchCoefParams<float>& c) {
  SingleReadLaunch L;
  if (!plan_single_read_forward<T, Math>(p, y, c, &L)) return -1;
  if (L.pl.blocks > cooperative_capacity(single_read_forward_kernel_for<T, Math>(relu), L.threads, L.smem_bytes))
    return -1;
  return static_cast<int64_t>(L.partial_floats);
}

template <typename T, class Math>
static cudaError_t forward(const MomentsParams& p, void* y, bool relu, const BatchCoefParams<float>& c,
                           cudaStream_t stream) {
  SingleReadLaunch L;
  if (!plan_single_read_forward<T, Math>(p, y, c, &L)) return cudaErrorInvalidValue;
  return launch_single_read_forward<T, Math>(L, p, y, relu, c, stream);
}

template <class Math>
static int64_t forward_partials(const MomentsParams& p, const void* y, bool relu, const BatchCoefParams<float>& c,
                                DType dtype) {
  switch (dtype) {
    case DType::f32:
      return forward_partials<float, Math>(p, y, relu, c);
    case DType::f16:
      return forward_partials<__half, Math>(p, y, relu, c);
    case DType::bf16:
      return forward_partials<__nv_bfloat16, Math>(p, y, relu, c);
    default:
      return -1;
  }
}

template <class Math>
static cudaError_t forward(const MomentsParams& p, void* y, bool relu, const BatchCoefParams<float>& c, DType dtype,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return forward<float, Math>(p, y, relu, c, stream);
    case DType::f16:
      return forward<__half, Math>(p, y, relu, c, stream);
    case DType::bf16:
      return forward<__nv_bfloat16, Math>(p, y, relu, c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t cuda_single_read_forward_partials(const MomentsParams& p, const void* y, bool relu,
                                          const BatchCoefParams<float>& c, bool iebn, DType dtype) {
  return iebn ? forward_partials<coef::IebnMath<float>>(p, y, relu, c, dtype)
              : forward_partials<coef::BinMath<float>>(p, y, relu, c, dtype);
}

cudaError_t cuda_single_read_forward(const MomentsParams& p, void* y, bool relu, const BatchCoefParams<float>& c,
                                     bool iebn, DType dtype, cudaStream_t stream) {
  return iebn ? forward<coef::IebnMath<float>>(p, y, relu, c, dtype, stream)
              : forward<coef::BinMath<float>>(p, y, relu, c, dtype, stream);
}

}  // namespace nf
