// The generic CUDA ops' torch glue that other CUDA glue reuses (defined in
// cuda/generic_ops_cuda.cpp): the input checks (same messages), the params of the two reductions
// and their scratch, and the four ops' launches after their checks, so the fused layer steps and
// the layer directions (cuda/layer_steps_cuda.cpp, cuda/layer_directions_cuda.cpp) check and
// launch exactly as the generic ops do. Torch glue only (.cpp): never include from a .cu / .cuh.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime_api.h>

#include <optional>

#include "common/generic_params.h"
#include "cuda/persistent_counters.h"

namespace nf_cuda_glue {

// CUDA, float32 / float16 / bfloat16 (float64 refused with a clear message).
void check_cuda_input(const at::Tensor& x, const char* op);
// nf_glue::plane_shape plus the CUDA kernels' size limits.
nf::PlaneShape cuda_plane_shape(const at::Tensor& x, const char* op);
void check_launch(cudaError_t err, const char* op);

// Params of the two reductions, data pointers set (`mean` / `m2`, `g1` / `g2`: the outputs).
nf::MomentsParams moments_params(const at::Tensor& x, const nf::PlaneShape& sh, at::Tensor& mean, at::Tensor& m2);
nf::BackwardSumsParams backward_sums_params(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, bool masked,
                                            const nf::PlaneShape& sh, at::Tensor& g1, at::Tensor& g2);
// The two maps after their checks (under the device guard): write `y` / `dx` (x's layout and
// dtype), one launch (none for empty shapes). `masked`: the forward's scale / shift are given.
void run_affine_apply(const at::Tensor& x, const nf::PlaneShape& sh, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, bool relu, at::Tensor& y);
void run_backward_apply(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& c_dy,
                        const at::Tensor& c_x, const at::Tensor& c_0, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, bool masked, const nf::PlaneShape& sh,
                        at::Tensor& dx);

// The reductions after their checks (under the device guard): fill `mean`, `m2` / `g1`, `g2`
// ((N, C) float32), one launch (none for empty shapes).
void run_moments(const at::Tensor& x, const nf::PlaneShape& sh, at::Tensor& mean, at::Tensor& m2);
void run_backward_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool masked,
                       const nf::PlaneShape& sh, at::Tensor& g1, at::Tensor& g2);

// Scratch of a split reduction: persistent zeroed counters (no launch; the kernel leaves them
// zeroed) and partials from the caching allocator (no launch; any content will do). Holds the
// tensors to keep alive until the launch is enqueued; sets nothing when `w` has no counters.
struct Scratch {
  at::Tensor counters, partials;
};

template <class Params>
Scratch scratch(const at::Tensor& x, const nf::Workspace& w, Params& p) {
  Scratch s;
  if (w.counter_count == 0) return s;
  s.counters = nf_glue::zeroed_counters(x, static_cast<int64_t>(w.counter_count));
  p.counters = static_cast<unsigned*>(s.counters.mutable_data_ptr());
  if (w.partial_floats != 0) {
    s.partials = at::empty({static_cast<int64_t>(w.partial_floats)}, x.options().dtype(at::kFloat));
    p.partials = s.partials.mutable_data_ptr<float>();
  }
  return s;
}

}  // namespace nf_cuda_glue
