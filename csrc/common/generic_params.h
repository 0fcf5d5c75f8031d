// Plain parameter structs for the four generic kernels (moments, affine_apply, backward_sums,
// backward_apply). Torch-free and CUDA-free: the .cpp glue fills them, the .cu launchers and the
// CPU-shim drivers read them. Pointers are raw; tensors are described as (N, C, L) planes.
#pragma once
#include <cstddef>
#include <cstdint>

namespace nf {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// How element (n, c, l) is addressed (docs/architecture.md, "Tensors"):
//   Contiguous:   (n * C + c) * L + l        planes are contiguous rows of L elements
//   ChannelsLast: (n * L + l) * C + c        C innermost
enum class Layout : int { Contiguous = 0, ChannelsLast = 1 };

struct PlaneShape {
  int64_t N = 0, C = 0, L = 0;
  Layout layout = Layout::Contiguous;
};

// The CUDA kernels index within a plane (channels-last: within a sample's rows) and walk its
// splits in 32-bit ints: a split's end, begin + seg, stays below 2^31 when L <= 2^30 (a billion
// elements per (n, c) plane). The torch glue (cuda_plane_shape) and every launcher refuse more:
// with L up to INT32_MAX, the last split's end wrapped negative and the contiguous kernels read
// and wrote past the plane (found by review, 2026-12-07; no torch input could reach it).
constexpr int64_t kMaxPlaneLength = int64_t(1) << 30;
inline bool extents_ok(const PlaneShape& s) { return s.L <= kMaxPlaneLength && s.C <= INT32_MAX; }

// Scratch of a split reduction (CUDA only; kernels/plane_reduce.cuh), as two buffers so that the
// glue can keep the counters zeroed across calls and take the partials from the caching allocator
// without a memset launch (see cuda/persistent_counters.h):
//   counters: `counter_count` uint32 arrival counters, zero on entry, left zero by the kernel;
//   partials: `partial_floats` floats of per-block partial states, any content on entry (the kernel
//             reads only partials it wrote in the same launch).
// Both counts are 0 when the launch splits no plane (then both pointers may be null).
struct Workspace {
  size_t counter_count = 0;
  size_t partial_floats = 0;
};

// Statistics / coefficients are (N, C) contiguous float32 arrays on the CUDA side.
struct MomentsParams {
  const void* x = nullptr;  // input, element type given by the dtype argument of the entry point
  float* mean = nullptr;    // out: plane mean
  float* m2 = nullptr;      // out: sum over the plane of (x - mean)^2
  PlaneShape shape;
  int threads = 0;  // threads per block: 0 = default (256); else a power of two in [32, 256]
  // Split reductions only, sizes from moments_workspace(): see Workspace above.
  unsigned* counters = nullptr;  // zeroed on entry, left zeroed
  float* partials = nullptr;     // any content
};

struct BackwardSumsParams {
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  float* sum_dy = nullptr;      // out: sum dy
  float* sum_dy_xmu = nullptr;  // out: sum dy * (x - mean)
  // The fused ReLU's mask: the forward's scale and shift ((N, C), as AffineApplyParams'). Given,
  // every dy is replaced by dy where (x - mean) * scale + shift > 0 (recomputed exactly as
  // affine_apply computes it), else 0. Both null: no mask. One of them alone is an error.
  const float* mask_scale = nullptr;
  const float* mask_shift = nullptr;
  PlaneShape shape;
  int threads = 0;
  unsigned* counters = nullptr;  // as in MomentsParams, sizes from backward_sums_workspace()
  float* partials = nullptr;
};

// y = scale * (x - mean) + shift, per plane; with relu, max(y, 0) (NaN stays NaN).
struct AffineApplyParams {
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  void* y = nullptr;  // same layout and dtype as x
  bool relu = false;
  PlaneShape shape;
  int threads = 0;
};

// dx = c_dy * dy + c_x * (x - mean) + c_0, per plane.
struct BackwardApplyParams {
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* c_dy = nullptr;
  const float* c_x = nullptr;
  const float* c_0 = nullptr;
  void* dx = nullptr;
  // The fused ReLU's mask, as in BackwardSumsParams. Only the c_dy * dy term is masked: c_x and
  // c_0 carry the gradient through the statistics, which every element feeds.
  const float* mask_scale = nullptr;
  const float* mask_shift = nullptr;
  PlaneShape shape;
  int threads = 0;
};

}  // namespace nf
