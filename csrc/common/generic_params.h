// Plain parameter structs for the four generic kernels (moments, affine_apply, backward_sums,
// backward_apply). Torch-free and CUDA-free: the .cpp glue fills them, the .cu launchers and the
// CPU-shim drivers read them. Pointers are raw; tensors are described as (N, C, L) planes.
#pragma once
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

// Statistics / coefficients are (N, C) contiguous float32 arrays on the CUDA side.
struct MomentsParams {
  const void* x = nullptr;  // input, element type given by the dtype argument of the entry point
  float* mean = nullptr;    // out: plane mean
  float* m2 = nullptr;      // out: sum over the plane of (x - mean)^2
  PlaneShape shape;
  int threads = 0;           // threads per block: 0 = default (256); else a power of two in [32, 256]
  void* workspace = nullptr; // zero-initialised, size from moments_workspace_bytes(); left zeroed
};

struct BackwardSumsParams {
  const void* dy = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  float* sum_dy = nullptr;      // out: sum dy
  float* sum_dy_xmu = nullptr;  // out: sum dy * (x - mean)
  PlaneShape shape;
  int threads = 0;
  void* workspace = nullptr;
};

// y = scale * (x - mean) + shift, per plane.
struct AffineApplyParams {
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  void* y = nullptr;  // same layout and dtype as x
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
  PlaneShape shape;
  int threads = 0;
};

}  // namespace nf
