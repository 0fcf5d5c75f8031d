// Shared part of the generic CPU kernels' bodies (the CPU side of kernels/plane_plan.cuh): the
// work decomposition's constants, the Mom struct, the kernel types and the dtype dispatch. The
// bodies are generic_reduce_moments_impl.h and generic_reduce_sums_impl.h (the reductions, as
// kernels/plane_reduce.cuh) and generic_apply_impl.h (the elementwise maps, as
// kernels/plane_apply.cuh), compiled once per build (generic_kernels.h): include them after the
// torch headers, with NF_CPU_NS defined.
//
// Work decomposition (fixed by the shape, never by the thread count, so results are bitwise the
// same for any number of threads):
// * contiguous: a plane of L <= kSeg elements is one unit of work (several planes per
//   at::parallel_for task: grain kTask / L); a longer plane is cut into segments of kSeg elements
//   whose partial results merge in index order. L == 1 is a flat elementwise pass. Moments of
//   short planes (L <= kSmall) go W planes at a time (fixed groups), sharing the horizontal sums.
// * channels-last: a unit is a segment of rows (C elements each) of one sample; segments of a
//   sample merge in index order. Inside a segment, chunks of R rows are walked by column blocks
//   of up to 4 vectors of channels with the accumulators in registers, or, for wide rows, row by
//   row with the accumulators in L1 arrays (memory is read sequentially): moments from
//   C >= kWideMoments, backward sums from C >= kWideC (the two-pass moments re-read a chunk that
//   sits in L1, where register blocks win up to C ~ 512; the one-pass sums stream).
// * maps (affine_apply, backward_apply): a plane's / row's last partial vector is done as its
//   last whole vector again (same inputs, same values), no masked store, when it has W elements.
//
// Numerics (csrc/README.md): every plane is shifted by its first element; moments are exact
// two-pass mean / m2 over chunks that sit in L1 (a contiguous run of kChunk elements, or R
// channels-last rows), in the acc type, merged with Chan's formula in double once per chunk
// (vectorised over the channels for channels-last). Backward sums: acc-type sums over a chunk,
// added in double once per chunk. Reduced types are computed in float.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>  // C10_ALWAYS_INLINE

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/coefficients.h"  // nf::coef::chan_merge
#include "cpu/generic_kernels.h"
#include "cpu/vec_io.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

constexpr int64_t kTask = 32768;     // elements per at::parallel_for task, at least
constexpr int64_t kSeg = 32768;      // longest unsplit contiguous plane / channels-last segment
constexpr int64_t kChunk = 2048;     // contiguous: exact two-pass chunk (8 KiB of float)
constexpr int64_t kRowChunk = 4096;  // channels-last: elements per chunk of rows

// Wide channels-last rows (cl_rows_moments, cl_rows_sums): the chunk is walked row by row
// (sequential memory), with the per-channel accumulators in padded L1 arrays instead of registers.
// Same sums per channel, rows in the same order as the column blocks (a channel's result is the
// same either way up to the association of the row sums; the choice depends only on C). Thresholds
// measured with `python -m bench.cpu_ops --layouts cl` (AMD EPYC, 1 thread): register blocks took
// the moments of C = 64..256 from 1.4-2.7x a copy to 0.8-1.2x, and lose from C ~ 1024; the
// backward sums gain nothing from them beyond C = 64.
constexpr int64_t kWideC = 64;          // backward sums
constexpr int64_t kWideMoments = 1024;  // moments

// Moments relative to the plane's shift: (count, mean - shift, m2), merged in double.
struct Mom {
  double n = 0, mean = 0, m2 = 0;
};

inline void chan_merge(Mom& a, const Mom& b) { nf::coef::chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2, 1.0); }

// Channels-last chunk rows: R C ~ kRowChunk, at least `lo` rows (merges amortised), at most `cap`.
inline int64_t chunk_rows(int64_t C, int64_t L, int64_t lo, int64_t cap) {
  return std::max<int64_t>(1, std::min({L, cap, std::max(lo, kRowChunk / C)}));
}

// Rows per channels-last segment: a multiple of the chunk rows, ~kSeg elements.
inline int64_t seg_rows(int64_t C, int64_t R) { return R * std::max<int64_t>(1, kSeg / (R * C)); }

// The types of the kernels for element type S: loads / stores of S (IO), the acc type, its
// vectors and their helpers (cpu/vec_io.h).
template <class S>
struct KernTypes {
  using io = IO<S>;
  using acc_t = acc_type<S>;
  using V = Vectorized<acc_t>;
  using va = VA<acc_t>;
  static constexpr int64_t W = V::size();

  // affine_apply's map from xm = x - mean: v = xm scale + shift. The fused ReLU's mask in the
  // backward ops recomputes v with this very function, so it agrees with the forward's sign bit
  // for bit (at::vec::fmadd: one fused multiply-add in the AVX2 build, a * b + c in the portable one).
  static V affine(const V& xm, const V& s, const V& b) { return at::vec::fmadd(xm, s, b); }
  // v > 0 ? v : 0 (+0 for v <= 0, NaN stays NaN): v with the bits of the lanes where v <= 0 cleared
  static V relu(const V& v) { return v ^ (v & (v <= V(0))); }
  // v > 0 ? g : 0 (0 for NaN v): the ReLU's derivative (0 at 0, as torch's) applied to g
  static V gate(const V& g, const V& v) { return g & (v > V(0)); }
};
// KernTypes<S>'s names, in a kernel struct that derives from it (a base that depends on S does not
// put its names in scope by itself).
#define NF_CPU_KERN_TYPES(S)                                                         \
  using Base = KernTypes<S>;                                                         \
  using typename Base::io, typename Base::acc_t, typename Base::V, typename Base::va; \
  using Base::W, Base::affine, Base::relu, Base::gate

template <class F>
void dispatch(nf::DType t, F&& f) {
  switch (t) {
    case nf::DType::f64:
      f(double{});
      break;
    case nf::DType::f32:
      f(float{});
      break;
    case nf::DType::f16:
      f(c10::Half{});
      break;
    case nf::DType::bf16:
      f(c10::BFloat16{});
      break;
  }
}

}  // namespace
}  // namespace NF_CPU_NS
}  // namespace nf_cpu
