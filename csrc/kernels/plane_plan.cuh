// Host-side launch planning shared by the four generic kernels. Pure functions of the shape,
// the vector width and the block size -- never of the device or of timing -- so a given shape
// always reduces in the same order (bitwise reproducible) on any GPU and under the CPU shim.
#pragma once
#include <cstddef>
#include <cstdint>
#include "common/generic_params.h"
#include "kernels/cuda_compat.cuh"

namespace nf {

constexpr int kDefaultThreads = 256;
// Blocks we aim for when a tensor has few planes: ~8 resident 256-thread blocks on each of the
// 132 SMs of an H100. Fewer work items than this => planes are split across blocks.
constexpr int64_t kTargetBlocks = 1024;
// A split must give each thread at least this many vectors, or the merge costs more than it saves.
constexpr int64_t kMinVecsPerThread = 4;
// Planes of at most this many vectors are handled by a sub-warp group instead of a whole block.
constexpr int64_t kGroupModeMaxVecs = NF_WARP * 8;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// 0 -> default; otherwise must be a power of two in [32, NF_MAX_THREADS].
inline bool resolve_threads(int requested, int* threads) {
  const int t = requested == 0 ? kDefaultThreads : requested;
  if (t < NF_WARP || t > NF_MAX_THREADS || (t & (t - 1)) != 0) return false;
  *threads = t;
  return true;
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte vectors are used when every pointer is 16-byte aligned and, channels-last, every row
// starts on a 16-byte boundary (C a multiple of the vector: a thread's channels are one vector).
// Contiguous planes need not start on one: the kernels read the unaligned head and tail of a
// plane as scalars and the rest as vectors (ContigRuns). Requiring L to be a multiple of the
// vector, as this did until 2026-12-07, left ResNet's 7x7 planes (and 14x14 in 16-bit types) to
// scalar loads: 49-98 bytes a warp-wide request instead of up to 512, a third to half of each
// 32-byte sector unused (tests/csrc/test_cuda_shim_traffic.py measures both).
inline int choose_vec(const PlaneShape& s, int elem_bytes, const void* a, const void* b = nullptr,
                      const void* c = nullptr) {
  const int v = 16 / elem_bytes;
  const bool rows_aligned = s.layout == Layout::Contiguous || s.C % v == 0;
  return (rows_aligned && aligned16(a) && aligned16(b) && aligned16(c)) ? v : 1;
}

// ---- contiguous: P = N*C planes of L contiguous elements ----------------------------------------
// Work item = (plane, split). Small planes: `group` (1..32, power of two) lanes per plane, several
// planes per block, merged by warp shuffles. Large planes: the whole block per item, and `splits`
// blocks per plane when there are too few planes to fill the GPU.
struct ContigPlan {
  int64_t planes = 0;
  int32_t L = 0;
  int32_t vec = 1;
  int32_t threads = 0;
  int32_t group = 0;
  int32_t splits = 1;
  int32_t seg = 0;  // elements per split, a multiple of vec
  int64_t blocks = 0;
};

// The elements [begin, end) of a contiguous plane (plane-relative indices; `base`: the plane's
// first element's index in the tensor, whose start is 16-byte aligned) as a scalar head up to the
// first element on a VEC boundary, VEC-vectors [head_end, body_end), and a scalar tail. Head and
// tail (at most VEC - 1 elements each) are taken together, one element a lane: edge(j), j <
// edges(). With VEC == 1, or a plane segment that starts and ends on a boundary, they are empty.
struct ContigRuns {
  int begin, head_end, body_end, end;
  NF_HOST_DEVICE int edges() const { return (head_end - begin) + (end - body_end); }
  NF_HOST_DEVICE int edge(int j) const {
    return j < head_end - begin ? begin + j : body_end + (j - (head_end - begin));
  }
};

template <int VEC>
NF_HOST_DEVICE ContigRuns contig_runs(int64_t base, int begin, int end) {
  const int mis = static_cast<int>((base + begin) % VEC);
  const int aligned = begin + (mis != 0 ? VEC - mis : 0);
  const int head_end = aligned < end ? aligned : end;
  return ContigRuns{begin, head_end, head_end + (end - head_end) / VEC * VEC, end};
}

inline ContigPlan plan_contig(int64_t P, int64_t L, int vec, int threads) {
  ContigPlan pl;
  pl.planes = P;
  pl.L = static_cast<int32_t>(L);
  pl.vec = vec;
  pl.threads = threads;
  const int64_t nvec = ceil_div(L, vec);
  if (nvec <= kGroupModeMaxVecs) {
    int g = next_pow2(ceil_div(nvec, kMinVecsPerThread));
    pl.group = g < NF_WARP ? g : NF_WARP;
    pl.seg = pl.L;
    pl.blocks = ceil_div(P, threads / pl.group);
  } else {
    pl.group = threads;
    const int64_t by_fill = ceil_div(kTargetBlocks, P);
    const int64_t by_work = nvec / (threads * kMinVecsPerThread);
    int64_t s = by_fill < by_work ? by_fill : by_work;
    if (s < 1) s = 1;
    const int64_t seg = ceil_div(nvec, s) * vec;
    pl.seg = static_cast<int32_t>(seg);
    pl.splits = static_cast<int32_t>(ceil_div(L, seg));
    pl.blocks = P * pl.splits;
  }
  return pl;
}

// ---- channels-last: N samples of an (L, C) row-major matrix ---------------------------------------
// A block covers a tile of `ctile` channels (lanes_c threads x vec channels, coalesced along C)
// and `rows` = threads / lanes_c rows at a time; `splits` blocks share the L rows of a tile.
struct ClPlan {
  int64_t N = 0;
  int32_t C = 0, L = 0;
  int32_t vec = 1;
  int32_t threads = 0;
  int32_t lanes_c = 0;
  int32_t rows = 0;
  int32_t ctile = 0;   // channels per tile = lanes_c * vec
  int32_t ctiles = 0;  // tiles per sample
  int32_t splits = 1;
  int32_t seg = 0;  // rows per split
  int64_t blocks = 0;
};

inline ClPlan plan_cl(int64_t N, int64_t C, int64_t L, int vec, int threads) {
  ClPlan pl;
  pl.N = N;
  pl.C = static_cast<int32_t>(C);
  pl.L = static_cast<int32_t>(L);
  pl.vec = vec;
  pl.threads = threads;
  const int lanes = next_pow2(ceil_div(C, vec));
  pl.lanes_c = lanes < NF_WARP ? lanes : NF_WARP;
  pl.rows = threads / pl.lanes_c;
  pl.ctile = pl.lanes_c * vec;
  pl.ctiles = static_cast<int32_t>(ceil_div(C, pl.ctile));
  const int64_t items = N * pl.ctiles;
  const int64_t by_fill = ceil_div(kTargetBlocks, items);
  const int64_t by_work = L / (pl.rows * kMinVecsPerThread);
  int64_t s = by_fill < by_work ? by_fill : by_work;
  if (s < 1) s = 1;
  const int64_t seg = ceil_div(L, s);
  pl.seg = static_cast<int32_t>(seg);
  pl.splits = static_cast<int32_t>(ceil_div(L, seg));
  pl.blocks = items * pl.splits;
  return pl;
}

// ---- device side: where a thread of a channels-last block sits in its plan ----------------------
// Block b is split `b % splits` of item `b / splits` (sample n, channel tile); a thread holds VEC
// consecutive channels from c0 (lane tx) and walks rows ty, ty + rows, ... of its split. Read by
// every channels-last kernel (cl_reduce_block, cl_apply_kernel, the single-read kernels).
struct ClThread {
  int tx, ty, cl, c0, split;
  int64_t item, n, stat0, sample;  // sample: element offset of (n, row 0, channel c0)
  bool active;
};

template <int VEC>
NF_DEVICE ClThread cl_thread(const ClPlan& pl) {
  ClThread t;
  const int tid = threadIdx.x;
  t.tx = tid & (pl.lanes_c - 1);
  t.ty = tid / pl.lanes_c;
  const int64_t b = blockIdx.x;
  t.item = b / pl.splits;
  t.split = static_cast<int>(b - t.item * pl.splits);
  t.n = t.item / pl.ctiles;
  t.cl = t.tx * VEC;
  t.c0 = static_cast<int>(t.item - t.n * pl.ctiles) * pl.ctile + t.cl;
  t.active = t.c0 < pl.C;  // C % VEC == 0: the whole vector is in range
  t.stat0 = t.n * pl.C + t.c0;
  t.sample = t.n * pl.L * static_cast<int64_t>(pl.C) + t.c0;
  return t;
}

// ---- workspace of the split reductions (nf::Workspace, common/generic_params.h) ------------------
// One uint32 arrival counter per split item, and `splits` partial states per item.

inline Workspace workspace_contig(const ContigPlan& pl, int state_floats) {
  Workspace w;
  if (pl.splits > 1) {
    w.counter_count = static_cast<size_t>(pl.planes);
    w.partial_floats = static_cast<size_t>(pl.planes) * pl.splits * state_floats;
  }
  return w;
}

inline Workspace workspace_cl(const ClPlan& pl, int state_floats) {
  Workspace w;
  if (pl.splits > 1) {
    w.counter_count = static_cast<size_t>(pl.N) * pl.ctiles;
    w.partial_floats = w.counter_count * pl.splits * pl.ctile * state_floats;
  }
  return w;
}

}  // namespace nf
