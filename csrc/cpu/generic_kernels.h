// Raw-pointer entry points of the four generic CPU kernels (moments, affine_apply, backward_sums,
// backward_apply). The kernel bodies (generic_reduce_moments_impl.h, generic_reduce_sums_impl.h,
// generic_apply_impl.h; shared parts in generic_plan_impl.h) are compiled twice:
//   generic_kernels_avx2.cpp     at::vec with CPU_CAPABILITY_AVX2 (AVX2 + FMA + F16C), x86-64 only
//   generic_kernels_default.cpp  at::vec's portable implementation, for every other CPU
// and generic_ops_cpu.cpp (the torch glue) picks one at run time from ATen's CPU capability
// (so ATEN_CPU_CAPABILITY=default forces the portable one, as for ATen's own kernels).
#pragma once
#include <cstdint>

#include "common/generic_params.h"

namespace nf_cpu {

// Statistics and coefficients are (N, C) contiguous arrays of the acc type (double for float64
// input, float otherwise); x, dy, out are addressed as `shape.layout` says.
struct GenericArgs {
  nf::PlaneShape shape;
  nf::DType dtype = nf::DType::f32;
  const void* x = nullptr;
  const void* dy = nullptr;    // backward_sums, backward_apply
  const void* mean = nullptr;  // input of every op but moments
  // affine_apply: y = scale * (x - mean) + shift, or with relu: y = v > 0 ? v : 0 (NaN stays NaN)
  // where v is that affine value in the acc type
  const void* scale = nullptr;
  const void* shift = nullptr;
  bool relu = false;
  // backward_sums, backward_apply: the fused ReLU's mask, both null (no mask) or both set (the
  // forward's scale and shift): every dy is replaced by v > 0 ? dy : 0, v recomputed from x, mean,
  // mask_scale, mask_shift with affine_apply's arithmetic (KernTypes::affine). backward_apply
  // masks its dy term only.
  const void* mask_scale = nullptr;
  const void* mask_shift = nullptr;
  // backward_apply: dx = c_dy * dy + c_x * (x - mean) + c_0
  const void* c_dy = nullptr;
  const void* c_x = nullptr;
  const void* c_0 = nullptr;
  void* out = nullptr;  // affine_apply: y;  backward_apply: dx.  Same layout as x
  // moments outputs
  void* mean_out = nullptr;  // plane mean
  void* m2_out = nullptr;    // sum over the plane of (x - mean)^2
  // backward_sums outputs
  void* sum_dy = nullptr;      // sum dy
  void* sum_dy_xmu = nullptr;  // sum dy * (x - mean)
};

#define NF_CPU_DECLARE_GENERIC(ns)                 \
  namespace ns {                                   \
  void moments(const GenericArgs& a);              \
  void affine_apply(const GenericArgs& a);         \
  void backward_sums(const GenericArgs& a);        \
  void backward_apply(const GenericArgs& a);       \
  }

// True where the AVX2 builds run: the CPU has AVX2, FMA and F16C and ATen's own CPU capability
// (ATEN_CPU_CAPABILITY) is AVX2 or more. Defined in generic_ops_cpu.cpp.
bool use_avx2();

NF_CPU_DECLARE_GENERIC(portable)
// The AVX2 build needs `#pragma GCC target` (GCC; clang builds use the portable kernels only).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define NF_CPU_HAVE_AVX2_KERNELS 1
NF_CPU_DECLARE_GENERIC(avx2)
#endif

// Calls ns::fn(p) with ns = avx2 where use_avx2(), else portable (every kernel family's glue).
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
#define NF_CPU_CALL(fn, p) (::nf_cpu::use_avx2() ? ::nf_cpu::avx2::fn(p) : ::nf_cpu::portable::fn(p))
#else
#define NF_CPU_CALL(fn, p) (::nf_cpu::portable::fn(p))
#endif

}  // namespace nf_cpu
