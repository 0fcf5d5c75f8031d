// Helpers shared by the .cpp glue of every op (CPU and CUDA): shape/layout detection, argument
// checks with clear messages, output allocation. Torch is fine here; never include this from a
// .cu / .cuh file.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/generic_params.h"

namespace nf_glue {

// float64 for float64 inputs, float32 otherwise (docs/architecture.md "acc dtype").
at::ScalarType acc_dtype(at::ScalarType input);

// (N, C, L) and layout of `x` (rank 2..5, float64/32/16 or bfloat16, contiguous or channels-last
// as architecture.md defines); raises a RuntimeError naming `op` and the argument `name` otherwise.
nf::PlaneShape plane_shape(const at::Tensor& x, const char* op, const char* name = "input");

// Whether `a` and `b` share memory (at::get_overlap_status: fully or partly). Tensors that are
// not dense ("too hard" to tell) count as not sharing: the ops take dense ones.
bool shares_memory(const at::Tensor& a, const at::Tensor& b);

// `t` (e.g. dy) must have x's shape, dtype, device and addressing.
void check_like_input(const at::Tensor& t, const at::Tensor& x, const nf::PlaneShape& s, const char* op,
                      const char* name);

// Statistics/coefficients: (N, C), contiguous, acc dtype, on x's device.
void check_stats(const at::Tensor& t, const at::Tensor& x, const nf::PlaneShape& s, const char* op,
                 const char* name);

// The backward passes' ReLU mask (fused activation): true when the forward's scale and shift are
// given (both: checked as statistics), false when neither is; one without the other raises.
bool relu_mask_given(const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                     const at::Tensor& x, const nf::PlaneShape& s, const char* op);

// An uninitialised contiguous tensor of `dtype` on like's device, straight from the device's
// allocator (at::detail::empty_cpu / empty_cuda: the caching allocator, current stream), without
// at::empty's dispatcher round trip: ~0.15 us of a ~0.2 us allocation on the CPU, paid a dozen
// times in a small layer's step (issue 13, host cost).
at::Tensor empty_dense(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like);

// x is (N, *spatial, C) dense (channels_last, channels_last_3d, rank-3 (L*C, 1, C)), read from the
// strides, dims of size 1 free: what normfuse/_checks.py's is_channels_last says, without a view.
// (A contiguous tensor with C or every spatial dim of size 1 is both.)
bool is_channels_last_dense(const at::Tensor& x);

// (N, C) tensor in the acc dtype of x, on x's device.
at::Tensor empty_stats(const at::Tensor& x, const nf::PlaneShape& s);

// Same sizes, strides, dtype and device as x (dense, so these are the strides empty_like would
// give), from the device's allocator as empty_dense.
at::Tensor empty_output(const at::Tensor& x);

nf::DType kernel_dtype(at::ScalarType t);

}  // namespace nf_glue
