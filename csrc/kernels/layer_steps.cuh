// BIN / IEBN layer steps in one launch (issue 13, fixed latency): the moments (forward) or
// backward_sums (backward) reduction of kernels/plane_reduce.cuh, whose grid-wide last block then
// runs the coefficient forward / backward of kernels/coefficients_batch.cuh for every channel
// tile, one tile after another: the standalone coefficient kernel's block body, with its plan
// (channels x rows per tile), so the results are bitwise those of the two separate launches.
//
// Protocol (the split reductions' last-block-done, over the whole grid): every block, after its
// reduction body (which has written its planes' results, or for a split plane its partial and,
// in the item's last block, the result), fences (__threadfence, every thread: its own result
// stores are visible device-wide before the arrival), then arrive_last() on one grid counter:
// the block that sees gridDim.x - 1 arrivals before it fences again and reads the others'
// results with __ldcg (coefficients_batch.cuh's load_stat<true>), runs the tiles and resets the
// counter to 0. The counter is the glue's persistent zeroed buffer (one past the split
// counters), left zeroed as every kernel leaves its counters.
//
// Shared memory: the reduction's (its own flag included), or the coefficient tile's trees if
// larger, then one flag word for the grid arrival (past both, so no tile overwrites it while a
// thread of the block still reads it). The tile uses cx * ny <= blockDim.x threads; the others
// only join its barriers (ColumnTile::member()).
//
// When to fuse: fused_step_small() below. Plain CUDA: no torch headers.
#pragma once
#include "kernels/coefficients_batch.cuh"
#include "kernels/plane_reduce.cuh"

namespace nf {

// ---- the threshold -------------------------------------------------------------------------------
// The epilogue is one block doing the standalone coefficient kernel's tiles one after another, so
// a layer is fused only when that is a few tiles of a small batch: at most kFusedStepMaxTiles
// channel tiles (8 channels each below 1024 channels: C <= 32) and at most kFusedStepMaxPlanes
// (N * C) statistics. Then the epilogue is estimated at a few microseconds (a few dependent L2
// round trips and two or three shared-memory trees of <= 8 levels per tile) against the launch
// and the serial chain it saves (10-14 us per coefficient kernel at C = 64, issue 13).
// UNMEASURED: these two numbers are a guess and must be validated on a GPU with the bench
// (bench/steps_probe.py: fused vs unfused over C = 8..256, N = 8..256, forward + backward; NORMFUSE_FUSED_STEPS=0/1
// forces either path, docs/architecture.md).
constexpr int64_t kFusedStepMaxTiles = 4;
constexpr int64_t kFusedStepMaxPlanes = 4096;

// ---- the epilogue ----------------------------------------------------------------------------------

// Rows each thread has in flight in the epilogue's row loops (for_column_rows): 1, the plain loop,
// not the standalone kernels' 4. The step kernel's register count is the maximum over the
// reduction and the epilogue, and the reduction's occupancy pays for it: 2 rows took most
// instantiations from 40-48 to 60-64 registers (6 -> 4 resident 256-thread blocks per SM), 4 rows
// up to 75. Whether a shorter epilogue is worth that is not measured: steps_probe compares fused
// with unfused (whose standalone kernels keep 4 rows), not row counts.
constexpr int kEpilogueRows = 1;

// All tiles of the coefficient forward (kBackward = false) or backward, in one block.
template <class Math, bool kBackward>
struct CoefEpilogue {
  BatchCoefParams<float> p;
  int cx, ny;
  int64_t tiles;
  NF_DEVICE void run(float* smem) const {
    for (int64_t tile = 0; tile < tiles; ++tile) {  // each tile ends with its smem free again
      if constexpr (kBackward)
        batch_coef_backward_tile<Math, true, kEpilogueRows>(p, cx, ny, tile, smem);
      else
        batch_coef_forward_tile<Math, true, kEpilogueRows>(p, cx, ny, tile, smem);
    }
  }
};

// After a reduction body: fence, arrive, and in the grid's last block run the epilogue.
template <class Epi>
NF_DEVICE void grid_last_block(const Epi& epi, unsigned* grid_counter, float* smem, int flag_off) {
  __threadfence();  // each thread's result stores, device-wide, before this block arrives
  if (!arrive_last(grid_counter, gridDim.x, reinterpret_cast<unsigned*>(smem + flag_off))) return;
  epi.run(smem);
  if (threadIdx.x == 0) *grid_counter = 0u;  // every block has arrived: nobody else touches it
}

template <typename T, int VEC, class Op, class Epi>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    contig_step_kernel(Op op, ContigPlan pl, const T* __restrict__ in0, const T* __restrict__ in1,
                       unsigned* counters, float* partials, Epi epi, unsigned* grid_counter, int flag_off) {
  NF_DYNAMIC_SMEM(float, smem);
  contig_reduce_block<T, VEC, Op>(op, pl, in0, in1, counters, partials, smem);
  grid_last_block(epi, grid_counter, smem, flag_off);
}

template <typename T, int VEC, class Op, class Epi>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    cl_step_kernel(Op op, ClPlan pl, const T* __restrict__ in0, const T* __restrict__ in1, unsigned* counters,
                   float* partials, Epi epi, unsigned* grid_counter, int flag_off) {
  NF_DYNAMIC_SMEM(float, smem);
  cl_reduce_block<T, VEC, Op>(op, pl, in0, in1, counters, partials, smem);
  grid_last_block(epi, grid_counter, smem, flag_off);
}

// ---- host side -------------------------------------------------------------------------------------

// The coefficient plan of the epilogue: the standalone kernel's for the reduction's block size
// (so the glue must give both the same `threads`, 0 = 256 for both).
template <class Math>
inline bool plan_step_coef(const BatchCoefParams<float>& c, int threads, BatchCoefPlan* pl) {
  BatchCoefParams<float> q = c;
  q.threads = threads;
  return plan_batch_coef<Math>(q, pl);
}

// Whether a layer is small enough to fuse (the threshold above). Non-empty shapes only: the
// glue handles empty ones with the separate launches.
inline bool fused_step_small(const PlaneShape& s, int threads_req) {
  int threads;
  if (!coef_threads(threads_req, &threads) || s.N * s.C * s.L == 0) return false;
  BatchCoefParams<float> q;
  q.N = s.N;
  q.C = s.C;
  BatchCoefPlan pl;
  if (!plan_step_coef<coef::BinMath<float>>(q, threads, &pl)) return false;  // the tiling is Math-independent
  return pl.blocks <= kFusedStepMaxTiles && s.N * s.C <= kFusedStepMaxPlanes;
}

// The reduction's workspace and one more counter (the grid's, last).
template <typename T, class Op>
Workspace step_workspace(const PlaneShape& s, int threads_req, const void* in0, const void* in1) {
  Workspace w = reduce_workspace<T, Op>(s, threads_req, in0, in1);
  if (s.N * s.C * s.L != 0) w.counter_count += 1;
  return w;
}

// One launch: the reduction (as launch_reduce) with the coefficient epilogue. Requires
// N * C * L > 0 and `counters` (step_workspace()'s count, zeroed, left zeroed); `partials` where
// the reduction splits. `c`: the coefficient params, with every output set; c.mean / c.m2 (and in
// the backward c.sum_dy / c.sum_dy_xmu) are the reduction's outputs.
template <typename T, class Math, bool kBackward, class Op>
cudaError_t launch_step(const Op& op, const BatchCoefParams<float>& c, const PlaneShape& s, int threads_req,
                        const T* in0, const T* in1, unsigned* counters, float* partials, cudaStream_t stream) {
  int threads;
  if (!resolve_threads(threads_req, &threads) || s.N * s.C * s.L == 0 || counters == nullptr)
    return cudaErrorInvalidValue;
  if (!extents_ok(s) || c.N != s.N || c.C != s.C) return cudaErrorInvalidValue;
  BatchCoefPlan cp;
  if (!plan_step_coef<Math>(c, threads, &cp) || cp.threads() > threads) return cudaErrorInvalidValue;
  const CoefEpilogue<Math, kBackward> epi{c, cp.cx, cp.ny, cp.blocks};
  constexpr int K = Op::kStateFloats;
  constexpr int V = kVec16<T>;
  const size_t coef_floats = cp.smem_bytes / sizeof(float);
  const int vec = choose_vec(s, sizeof(T), in0, in1);
  auto smem_of = [&](size_t reduce_floats, int* flag_off) {
    const size_t f = reduce_floats > coef_floats ? reduce_floats : coef_floats;
    *flag_off = static_cast<int>(f);
    return (f + 4) * sizeof(float);
  };
  int flag_off = 0;
  if (s.layout == Layout::Contiguous) {
    const ContigPlan pl = plan_contig(s.N * s.C, s.L, vec, threads);
    const Workspace w = workspace_contig(pl, K);
    if (pl.blocks > INT32_MAX || (w.counter_count != 0 && partials == nullptr)) return cudaErrorInvalidValue;
    const size_t smem = smem_of(NF_WARP * K + 4, &flag_off);
    auto kernel = vec == V ? &contig_step_kernel<T, V, Op, CoefEpilogue<Math, kBackward>>
                           : &contig_step_kernel<T, 1, Op, CoefEpilogue<Math, kBackward>>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), smem, stream, op, pl, in0, in1,
              counters, partials, epi, counters + w.counter_count, flag_off);
  } else {
    const ClPlan pl = plan_cl(s.N, s.C, s.L, vec, threads);
    const Workspace w = workspace_cl(pl, K);
    if (pl.blocks > INT32_MAX || (w.counter_count != 0 && partials == nullptr)) return cudaErrorInvalidValue;
    const size_t smem = smem_of(static_cast<size_t>(threads) * vec * K + 4, &flag_off);
    auto kernel = vec == V ? &cl_step_kernel<T, V, Op, CoefEpilogue<Math, kBackward>>
                           : &cl_step_kernel<T, 1, Op, CoefEpilogue<Math, kBackward>>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), smem, stream, op, pl, in0, in1,
              counters, partials, epi, counters + w.counter_count, flag_off);
  }
  return cudaGetLastError();
}

// ---- the two steps ---------------------------------------------------------------------------------

template <typename T>
Workspace moments_step_workspace(const MomentsParams& p) {
  return step_workspace<T, MomentsOp>(p.shape, p.threads, p.x, nullptr);
}

// moments -> <Math> coefficients forward (running statistics and num_batches_tracked included).
// `c.mean` / `c.m2` must be p.mean / p.m2.
template <typename T, class Math>
cudaError_t launch_moments_step(const MomentsParams& p, const BatchCoefParams<float>& c, cudaStream_t stream) {
  if (c.mean != p.mean || c.m2 != p.m2) return cudaErrorInvalidValue;
  return launch_step<T, Math, false>(MomentsOp{p.mean, p.m2}, c, p.shape, p.threads, static_cast<const T*>(p.x),
                                     static_cast<const T*>(nullptr), p.counters, p.partials, stream);
}

template <typename T>
Workspace sums_step_workspace(const BackwardSumsParams& p) {
  return step_workspace<T, BackwardSumsOp>(p.shape, p.threads, p.dy, p.x);
}

// backward_sums (masked when p.mask_scale / mask_shift are given) -> <Math> coefficient backward.
// `c.sum_dy` / `c.sum_dy_xmu` must be p.sum_dy / p.sum_dy_xmu.
template <typename T, class Math>
cudaError_t launch_sums_step(const BackwardSumsParams& p, const BatchCoefParams<float>& c, cudaStream_t stream) {
  if (c.sum_dy != p.sum_dy || c.sum_dy_xmu != p.sum_dy_xmu) return cudaErrorInvalidValue;
  if ((p.mask_scale == nullptr) != (p.mask_shift == nullptr)) return cudaErrorInvalidValue;
  const BackwardSumsOp op{p.mean, p.sum_dy, p.sum_dy_xmu};
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  if (p.mask_scale != nullptr)
    return launch_step<T, Math, true>(ReluMasked<BackwardSumsOp>{op, p.mask_scale, p.mask_shift}, c, p.shape,
                                      p.threads, dy, x, p.counters, p.partials, stream);
  return launch_step<T, Math, true>(op, c, p.shape, p.threads, dy, x, p.counters, p.partials, stream);
}

}  // namespace nf
