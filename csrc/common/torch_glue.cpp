#include "common/torch_glue.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#ifdef NORMFUSE_WITH_CUDA
#include <ATen/cuda/EmptyTensor.h>
#endif
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace nf_glue {

at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// (N, *spatial, C) dense, i.e. C innermost, then the spatial dims, then N, element (n, c, l) at
// (n * L + l) * C + c: channels_last, channels_last_3d and rank-3 (L*C, 1, C). Read from the
// strides (dimensions of size 1 may have any), as `x.permute(0, 2.., 1).is_contiguous()` would
// say without building that view on every call.
bool is_channels_last_dense(const at::Tensor& x) {
  int64_t expected = 1;
  bool ok = x.size(1) == 1 || x.stride(1) == expected;
  expected *= x.size(1);
  for (int64_t i = x.dim() - 1; ok && i >= 2; --i) {
    ok = x.size(i) == 1 || x.stride(i) == expected;
    expected *= x.size(i);
  }
  return ok && (x.size(0) == 1 || x.stride(0) == expected);
}

bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus s = at::get_overlap_status(a, b);
  return s == at::MemOverlapStatus::Full || s == at::MemOverlapStatus::Partial;
}

nf::PlaneShape plane_shape(const at::Tensor& x, const char* op, const char* name) {
  const int64_t d = x.dim();
  TORCH_CHECK(d >= 2 && d <= 5, "normfuse.", op, ": ", name, " must have rank 2..5 (N, C, *spatial), got ", d);
  const at::ScalarType t = x.scalar_type();
  // Not at::isFloatingType: that takes the float8 types too, which no kernel reads.
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "normfuse.", op, ": ",
              name, " must be float64, float32, float16 or bfloat16, got ", t);
  nf::PlaneShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.L = 1;
  for (int64_t i = 2; i < d; ++i) s.L *= x.size(i);
  if (x.is_contiguous()) {
    s.layout = nf::Layout::Contiguous;
    return s;
  }
  TORCH_CHECK(is_channels_last_dense(x), "normfuse.", op, ": ", name,
              " must be contiguous or channels-last (C innermost); got strides ", x.strides(),
              " for sizes ", x.sizes(), ". Call .contiguous() first.");
  s.layout = nf::Layout::ChannelsLast;
  return s;
}

void check_like_input(const at::Tensor& t, const at::Tensor& x, const nf::PlaneShape& s, const char* op,
                      const char* name) {
  if (t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type() &&
      t.device() == x.device())
    return;  // the usual case: x's own sizes, strides, dtype and device
  TORCH_CHECK(t.sizes() == x.sizes(), "normfuse.", op, ": ", name, " must have the input's shape ", x.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "normfuse.", op, ": ", name, " must have the input's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "normfuse.", op, ": ", name, " is on ", t.device(), ", input on ",
              x.device());
  const nf::PlaneShape ts = plane_shape(t, op, name);
  // With C == 1 or L == 1 both layouts address memory identically.
  TORCH_CHECK(ts.layout == s.layout || s.C == 1 || s.L == 1, "normfuse.", op, ": ", name,
              " must be in the input's memory layout (both contiguous or both channels-last)");
}

void check_stats(const at::Tensor& t, const at::Tensor& x, const nf::PlaneShape& s, const char* op,
                 const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.C, "normfuse.", op, ": ", name,
              " must have shape (N, C) = (", s.N, ", ", s.C, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_dtype(x.scalar_type()), "normfuse.", op, ": ", name, " must be ",
              acc_dtype(x.scalar_type()), " for a ", x.scalar_type(), " input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "normfuse.", op, ": ", name, " is on ", t.device(), ", input on ",
              x.device());
  TORCH_CHECK(t.is_contiguous(), "normfuse.", op, ": ", name, " must be contiguous");
}

bool relu_mask_given(const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                     const at::Tensor& x, const nf::PlaneShape& s, const char* op) {
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  TORCH_CHECK(has_scale == has_shift, "normfuse.", op, ": scale and shift (the forward's coefficients, ",
              "for the fused ReLU's mask) must both be given or both be None, got ", has_scale ? "scale" : "shift",
              " only");
  if (!has_scale) return false;
  check_stats(*scale, x, s, op, "scale");
  check_stats(*shift, x, s, op, "shift");
  return true;
}

// torch.use_deterministic_algorithms(True) with fill_uninitialized_memory: at::empty fills new
// tensors with NaN (so a kernel that misses an element shows); keep that, through at::empty.
static bool deterministic_fill() {
  const auto& ctx = at::globalContext();
  return ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory();
}

at::Tensor empty_dense(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like) {
  if (deterministic_fill()) return at::empty(sizes, like.options().dtype(dtype));
  if (like.is_cpu()) return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
#ifdef NORMFUSE_WITH_CUDA
  if (like.is_cuda()) return at::detail::empty_cuda(sizes, dtype, like.device(), std::nullopt);
#endif
  return at::empty(sizes, like.options().dtype(dtype));
}

at::Tensor empty_stats(const at::Tensor& x, const nf::PlaneShape& s) {
  return empty_dense({s.N, s.C}, acc_dtype(x.scalar_type()), x);
}

at::Tensor empty_output(const at::Tensor& x) {
  if (deterministic_fill()) return at::empty_like(x);
  if (x.is_cpu()) return at::detail::empty_strided_cpu(x.sizes(), x.strides(), x.scalar_type());
#ifdef NORMFUSE_WITH_CUDA
  if (x.is_cuda()) return at::detail::empty_strided_cuda(x.sizes(), x.strides(), x.scalar_type(), x.device());
#endif
  return at::empty_like(x);
}

nf::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return nf::DType::f32;
    case at::kHalf:
      return nf::DType::f16;
    case at::kBFloat16:
      return nf::DType::bf16;
    case at::kDouble:
      return nf::DType::f64;
    default:
      TORCH_CHECK(false, "normfuse: unsupported dtype ", t);
  }
}

}  // namespace nf_glue
