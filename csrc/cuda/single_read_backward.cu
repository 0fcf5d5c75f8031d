// The single-read backward (kernels/single_read.cuh): backward_sums (plain or ReLU-masked) + BIN /
// IEBN coefficient backward + backward_apply in one cooperative launch, for float, __half and
// __nv_bfloat16 inputs. No torch header here.
#include "cuda/single_read_capacity.cuh"
#include "cuda/single_read_launchers.h"

namespace nf {

template <typename T, class Math>
static int64_t backward_partials(const BackwardSumsParams& p, const void* dx, const BatchCoefParams<float>& c) {
  SingleReadLaunch L;
  if (!plan_single_read_backward<T, Math>(p, dx, c, &L)) return -1;
  const auto k = single_read_backward_kernel_for<T, Math>(p.mask_scale != nullptr);
  const int64_t cap = p.mask_scale != nullptr ? cooperative_capacity(k.second, L.threads, L.smem_bytes)
                                              : cooperative_capacity(k.first, L.threads, L.smem_bytes);
  return L.pl.blocks > cap ? -1 : static_cast<int64_t>(L.partial_floats);
}

template <typename T, class Math>
static cudaError_t backward(const BackwardSumsParams& p, void* dx, const BatchCoefParams<float>& c,
                            cudaStream_t stream) {
  SingleReadLaunch L;
  if (!plan_single_read_backward<T, Math>(p, dx, c, &L)) return cudaErrorInvalidValue;
  return launch_single_read_backward<T, Math>(L, p, dx, c, stream);
}

template <class Math>
static int64_t backward_partials(const BackwardSumsParams& p, const void* dx, const BatchCoefParams<float>& c,
                                 DType dtype) {
  switch (dtype) {
    case DType::f32:
      return backward_partials<float, Math>(p, dx, c);
    case DType::f16:
      return backward_partials<__half, Math>(p, dx, c);
    case DType::bf16:
      return backward_partials<__nv_bfloat16, Math>(p, dx, c);
    default:
      return -1;
  }
}

template <class Math>
static cudaError_t backward(const BackwardSumsParams& p, void* dx, const BatchCoefParams<float>& c, DType dtype,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return backward<float, Math>(p, dx, c, stream);
    case DType::f16:
      return backward<__half, Math>(p, dx, c, stream);
    case DType::bf16:
      return backward<__nv_bfloat16, Math>(p, dx, c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t cuda_single_read_backward_partials(const BackwardSumsParams& p, const void* dx, const BatchCoefParams<float>& c,
                                           bool iebn, DType dtype) {
  return iebn ? backward_partials<coef::IebnMath<float>>(p, dx, c, dtype)
              : backward_partials<coef::BinMath<float>>(p, dx, c, dtype);
}

cudaError_t cuda_single_read_backward(const BackwardSumsParams& p, void* dx, const BatchCoefParams<float>& c,
                                      bool iebn, DType dtype, cudaStream_t stream) {
  return iebn ? backward<coef::IebnMath<float>>(p, dx, c, dtype, stream)
              : backward<coef::BinMath<float>>(p, dx, c, dtype, stream);
}

}  // namespace nf
