// Single-read layer directions (issue 14): a BIN / IEBN layer's whole forward (moments ->
// coefficients -> affine map, ReLU fused or not) or whole backward (backward_sums -> coefficient
// backward -> backward_apply) as ONE cooperative launch that reads each activation once. Every
// block loads its tile of x (backward: of dy and x) into registers, reduces it, and keeps it
// there across grid-wide barriers until the coefficients are known; then it writes y (dx) from
// the registers. Memory traffic: 2 passes forward (read x, write y) and 3 backward (read dy and
// x, write dx), the design's floor, against 3 + 5 for the generic kernels.
//
// It applies when the tensor fits on chip: the plan's blocks (one per tile) must all be resident
// at once (cudaLaunchCooperativeKernel refuses a grid that is not). Channels-last inputs with
// 16-byte vectors (C a multiple of 16 / sizeof(T), aligned), the layout of a CNN trained in bf16;
// the glue runs the generic kernels for anything else.
//
// Phases, separated by grid-wide barriers (NF_GRID_SYNC):
//   1. load the tile into registers; per-channel partial state of the block's rows (column_reduce);
//      write it (one split per plane: the plane's result) -- barrier --
//   2. split planes only: the item's split-0 block merges the splits in order 0..S-1 and writes
//      the plane's result -- barrier --
//   3. the coefficient kernel's tiles (coefficients_batch.cuh, kCg: reads through L2), tile t by
//      block t mod grid (running statistics, num_batches_tracked: as the coefficient kernel)
//      -- barrier --
//   4. the affine map from the registers, coefficients read with __ldcg (written this launch).
// Deterministic: fixed merge orders, no float atomics. The plan differs from the generic
// reduction's (its splits are set by the register budget), so results agree with the 3-launch
// path to rounding, not bitwise.
//
// Plain CUDA, no torch headers; runs under the CPU shim (launch_cooperative, all blocks at once).
#pragma once
#include <type_traits>
#include <utility>

#include "kernels/layer_steps.cuh"  // plan_step_coef; coefficients_batch.cuh, plane_reduce.cuh
#include "kernels/plane_apply.cuh"

namespace nf {

// Rows a thread keeps in registers: one 16-byte vector each, of x forward, of dy and x backward.
// Budgeted for two resident 256-thread blocks per SM (__launch_bounds__ below: <= 128 registers)
// without spills on sm_80 and sm_90 (.ci/check_cuda_build.py checks): float32 16 rows forward, 7
// backward; 16-bit types, whose 8 channels per thread carry 8 running states, 12 and 6. On a
// 132-SM GPU that holds 2 * 256 * 16 * 16 B * 132 = 17 MB of float32 x forward, 13 MB of bf16
// (backward, dy and x together: 15 MB and 13 MB).
// UNMEASURED: whether this pays against L2-resident 3 + 3 launches, and where, is for the GPU
// bench (bench/steps_probe.py times both); the path is off by default until then.
template <typename T, bool kBackward>
constexpr int kSingleReadRows = sizeof(T) == 4 ? (kBackward ? 7 : 16) : (kBackward ? 6 : 12);
constexpr int kSingleReadBlocksPerSM = 2;
// Rows of the (N, C) statistics each thread has in flight in the coefficient tiles (for_column_rows,
// kernels/coefficients_batch.cuh): 1, the plain loop. More would spill these kernels past their
// 128 registers (4 rows: up to 32 B of stack on sm_90).
constexpr int kCoefRows = 1;

// The channels-last reduction plan with one split per `rows * R` rows at most, so a thread holds
// its share of a split in R registers vectors.
inline ClPlan plan_single_read(int64_t N, int64_t C, int64_t L, int vec, int threads, int R) {
  ClPlan pl = plan_cl(N, C, L, vec, threads);
  const int64_t cap = static_cast<int64_t>(pl.rows) * R;
  const int64_t splits = ceil_div(L, cap);
  const int64_t seg = ceil_div(L, splits);
  pl.seg = static_cast<int32_t>(seg);
  pl.splits = static_cast<int32_t>(ceil_div(L, seg));
  pl.blocks = N * pl.ctiles * pl.splits;
  return pl;
}

// Partial states of the split planes: (item, split, channel of the tile) x K floats, as the
// generic reduction's workspace_cl (no counters: the barriers order everything).
inline size_t single_read_partial_floats(const ClPlan& pl, int state_floats) {
  return pl.splits > 1 ? static_cast<size_t>(pl.N) * pl.ctiles * pl.splits * pl.ctile * state_floats : 0;
}

// The registers hold raw 16-byte words (uint4: 4 registers), converted only where used: held as
// Pack<__nv_bfloat16, 8>, nvcc may keep each 16-bit element in a register of its own, which
// doubled the data registers and spilled on sm_90. unpack (numerics.cuh) converts them.
template <typename T, int VEC>
NF_DEVICE uint4 load_raw(const T* p) {
  static_assert(sizeof(T) * VEC == sizeof(uint4), "16-byte vectors only");
  NF_TRACE_ACCESS(p, sizeof(uint4), false);
  return *reinterpret_cast<const uint4*>(p);
}

// Phase 1's end: the block's per-channel states merged over its rows; written as the plane's
// result (one split) or as this split's partial.
template <class Op, int VEC>
NF_DEVICE void publish_partial(const Op& op, const ClPlan& pl, const ClThread& t, typename Op::State (&st)[VEC],
                               const typename Op::Ctx (&ctx)[VEC], float* partials, float* smem) {
  constexpr int K = Op::kStateFloats;
  column_reduce<Op, VEC>(st, smem, pl.lanes_c, t.ty);
  if (t.ty != 0 || !t.active) return;
  if (pl.splits == 1) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) op.write(t.stat0 + k, st[k], ctx[k]);
  } else {
    float* part = partials + (t.item * pl.splits + t.split) * pl.ctile * K;
#pragma unroll
    for (int k = 0; k < VEC; ++k) Op::store(part + (t.cl + k) * K, st[k]);
  }
}

// Phase 2 (split planes): the item's split-0 block merges the partials in split order.
template <class Op, int VEC>
NF_DEVICE void merge_splits(const Op& op, const ClPlan& pl, const ClThread& t, const typename Op::Ctx (&ctx)[VEC],
                            const float* partials, float* smem) {
  constexpr int K = Op::kStateFloats;
  if (t.split != 0) return;  // uniform per block: no barrier is skipped by only some threads
  typename Op::State acc[VEC] = {};
  if (t.active) {
    const float* part = partials + t.item * pl.splits * pl.ctile * K;
    for (int s = t.ty; s < pl.splits; s += pl.rows) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) Op::merge(acc[k], Op::load_cg(part + (s * pl.ctile + t.cl + k) * K));
    }
  }
  column_reduce<Op, VEC>(acc, smem, pl.lanes_c, t.ty);
  if (t.ty == 0 && t.active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) op.write(t.stat0 + k, acc[k], ctx[k]);
  }
}

// Phases 1-2 of either direction (Op: MomentsOp, BackwardSumsOp or its ReLU-masked form) and the
// barrier after them. reg0 / reg1: the thread's rows of input 0 / input 1 (input 1 only when
// Op::kInputs == 2).
template <typename T, int VEC, int R, class Op>
NF_DEVICE void load_and_reduce(const Op& op, const ClPlan& pl, const ClThread& t, const T* __restrict__ in0,
                               const T* __restrict__ in1, uint4 (&reg0)[R], uint4 (&reg1)[R],
                               float* partials, float* smem) {
  typename Op::State st[VEC] = {};
  typename Op::Ctx ctx[VEC] = {};
  if (t.active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) ctx[k] = op.context(in0 + t.sample + k, t.stat0 + k);
    const int r0 = t.split * pl.seg, r1 = min(pl.L, r0 + pl.seg);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int l = r0 + t.ty + j * pl.rows;
      if (l < r1) {
        const int64_t off = t.sample + static_cast<int64_t>(l) * pl.C;
        float a[VEC], b[VEC];
        reg0[j] = load_raw<T, VEC>(in0 + off);
        unpack<T, VEC>(reg0[j], a);
        if constexpr (Op::kInputs == 2) {
          reg1[j] = load_raw<T, VEC>(in1 + off);
          unpack<T, VEC>(reg1[j], b);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) b[k] = 0.f;
        }
        if constexpr (is_relu_masked<Op>)
          op.template accumulate_channels<VEC>(st, ctx, a, b, l);
        else
          Op::template accumulate_channels<VEC>(st, ctx, a, b);
      }
    }
  }
  publish_partial<Op, VEC>(op, pl, t, st, ctx, partials, smem);
  NF_GRID_SYNC();
  if (pl.splits > 1) {
    merge_splits<Op, VEC>(op, pl, t, ctx, partials, smem);
    NF_GRID_SYNC();
  }
}

// ---- forward -----------------------------------------------------------------------------------------
// op: the moments' outputs (c.mean / c.m2 are the same arrays, read by the coefficient tiles).

template <typename T, int VEC, class Math, bool kRelu>
__global__ void __launch_bounds__(NF_MAX_THREADS, kSingleReadBlocksPerSM)
    single_read_forward_kernel(MomentsOp op, ClPlan pl, const T* __restrict__ x, T* __restrict__ y,
                               BatchCoefParams<float> c, int cx, int ny, int64_t tiles, float* partials) {
  constexpr int R = kSingleReadRows<T, false>;
  NF_DYNAMIC_SMEM(float, smem);
  const ClThread t = cl_thread<VEC>(pl);
  uint4 xr[R];
  load_and_reduce<T, VEC, R>(op, pl, t, x, static_cast<const T*>(nullptr), xr, xr, partials, smem);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x)  // each tile leaves smem free
    batch_coef_forward_tile<Math, true, kCoefRows>(c, cx, ny, tile, smem);
  NF_GRID_SYNC();
  if (!t.active) return;
  float mean[VEC], scale[VEC], shift[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mean[k] = __ldcg(c.mean + t.stat0 + k);
    scale[k] = __ldcg(c.scale + t.stat0 + k);
    shift[k] = __ldcg(c.shift + t.stat0 + k);
  }
  const int r0 = t.split * pl.seg, r1 = min(pl.L, r0 + pl.seg);
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int l = r0 + t.ty + j * pl.rows;
    if (l < r1) {
      float a[VEC], out[VEC];
      unpack<T, VEC>(xr[j], a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float v = affine_value(a[k], mean[k], scale[k], shift[k]);  // affine_apply's arithmetic
        out[k] = kRelu ? relu(v) : v;
      }
      store_floats<T, VEC>(y + t.sample + static_cast<int64_t>(l) * pl.C, out);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------
// op: BackwardSumsOp (its outputs are c.sum_dy / c.sum_dy_xmu), or ReluMasked<BackwardSumsOp>
// with the forward's scale and shift, whose mask then also applies to the dy term of dx.

template <typename T, int VEC, class Math, class Op>
__global__ void __launch_bounds__(NF_MAX_THREADS, kSingleReadBlocksPerSM)
    single_read_backward_kernel(Op op, ClPlan pl, const T* __restrict__ dy, const T* __restrict__ x,
                                T* __restrict__ dx, BatchCoefParams<float> c, int cx, int ny, int64_t tiles,
                                float* partials) {
  constexpr int R = kSingleReadRows<T, true>;
  constexpr bool kRelu = is_relu_masked<Op>;
  NF_DYNAMIC_SMEM(float, smem);
  const ClThread t = cl_thread<VEC>(pl);
  uint4 dyr[R], xr[R];
  load_and_reduce<T, VEC, R>(op, pl, t, dy, x, dyr, xr, partials, smem);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    batch_coef_backward_tile<Math, true, kCoefRows>(c, cx, ny, tile, smem);
  NF_GRID_SYNC();
  if (!t.active) return;
  using ApplyOp = std::conditional_t<kRelu, ReluMasked<BackwardApplyOp>, BackwardApplyOp>;
  ApplyOp aop{};
  if constexpr (kRelu) {
    aop.scale = op.scale;
    aop.shift = op.shift;
    aop.zero = op.zero;
  }
  typename ApplyOp::Ctx ctx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t i = t.stat0 + k;
    const BackwardApplyOp::Ctx b{c.mean[i], __ldcg(c.c_dy + i), __ldcg(c.c_x + i), __ldcg(c.c_0 + i)};
    if constexpr (kRelu)
      ctx[k] = typename ApplyOp::Ctx{b, op.scale + i, op.shift + i};
    else
      ctx[k] = b;
  }
  const int r0 = t.split * pl.seg, r1 = min(pl.L, r0 + pl.seg);
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int l = r0 + t.ty + j * pl.rows;
    if (l < r1) {
      float g[VEC], a[VEC], out[VEC];
      unpack<T, VEC>(dyr[j], g);
      unpack<T, VEC>(xr[j], a);
      if constexpr (kRelu) {
        aop.template apply_channels<VEC>(ctx, g, a, out, l);  // backward_apply's masked arithmetic
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = BackwardApplyOp::apply(ctx[k], g[k], a[k]);
      }
      store_floats<T, VEC>(dx + t.sample + static_cast<int64_t>(l) * pl.C, out);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------

// A launch's geometry: the reduction plan, the coefficient plan (the standalone kernel's, for this
// block size), the dynamic shared memory (the larger of the two phases' needs) and the partials.
struct SingleReadLaunch {
  ClPlan pl;
  BatchCoefPlan cp;
  int threads = 0;
  size_t smem_bytes = 0;
  size_t partial_floats = 0;
};

// False when the single-read kernels do not take this input at all: not channels-last, empty,
// no 16-byte vectors (C % (16 / sizeof(T)) != 0 or a misaligned pointer), or c does not match.
// Whether the blocks fit on the device is a separate question (cuda/single_read_capacity.cuh).
template <typename T, class Math, class Op>
inline bool plan_single_read_launch(const PlaneShape& s, int threads_req, int R, const BatchCoefParams<float>& c,
                                    const void* in0, const void* in1, const void* out, SingleReadLaunch* L) {
  if (s.layout != Layout::ChannelsLast || s.N * s.C * s.L == 0 || !extents_ok(s)) return false;
  if (c.N != s.N || c.C != s.C || !resolve_threads(threads_req, &L->threads)) return false;
  constexpr int V = kVec16<T>;
  if (choose_vec(s, sizeof(T), in0, in1, out) != V) return false;
  L->pl = plan_single_read(s.N, s.C, s.L, V, L->threads, R);
  if (L->pl.blocks > INT32_MAX) return false;
  if (!plan_step_coef<Math>(c, L->threads, &L->cp) || L->cp.threads() > L->threads) return false;
  constexpr int K = Op::kStateFloats;
  const size_t reduce_floats = static_cast<size_t>(L->threads) * V * K;
  const size_t coef_floats = L->cp.smem_bytes / sizeof(float);
  L->smem_bytes = (reduce_floats > coef_floats ? reduce_floats : coef_floats) * sizeof(float);
  L->partial_floats = single_read_partial_floats(L->pl, K);
  return true;
}

template <typename T, class Math>
inline bool plan_single_read_forward(const MomentsParams& p, const void* y, const BatchCoefParams<float>& c,
                                     SingleReadLaunch* L) {
  return plan_single_read_launch<T, Math, MomentsOp>(p.shape, p.threads, kSingleReadRows<T, false>, c, p.x, nullptr, y, L);
}

template <typename T, class Math>
inline bool plan_single_read_backward(const BackwardSumsParams& p, const void* dx, const BatchCoefParams<float>& c,
                                      SingleReadLaunch* L) {
  return plan_single_read_launch<T, Math, BackwardSumsOp>(p.shape, p.threads, kSingleReadRows<T, true>, c, p.dy, p.x, dx,
                                                          L);
}

template <typename T, class Math>
auto single_read_forward_kernel_for(bool relu) {
  constexpr int V = kVec16<T>;
  return relu ? &single_read_forward_kernel<T, V, Math, true> : &single_read_forward_kernel<T, V, Math, false>;
}

template <typename T, class Math>
auto single_read_backward_kernel_for(bool masked) {
  constexpr int V = kVec16<T>;
  using Masked = ReluMasked<BackwardSumsOp>;
  // Two different kernel types: returned as a pair, the caller picks.
  return std::make_pair(&single_read_backward_kernel<T, V, Math, BackwardSumsOp>,
                        &single_read_backward_kernel<T, V, Math, Masked>);
}

// One cooperative launch of a planned forward: p as for launch_moments (p.partials: L.partial_floats
// floats when non-zero; counters unused), y: the output (x's layout and dtype), c: the coefficient
// params (c.mean / c.m2 == p.mean / p.m2, scale / shift set). cudaErrorCooperativeLaunchTooLarge
// when the device cannot hold the grid (nothing launched or written).
template <typename T, class Math>
cudaError_t launch_single_read_forward(const SingleReadLaunch& L, const MomentsParams& p, void* y, bool relu,
                                       const BatchCoefParams<float>& c, cudaStream_t stream) {
  if (c.mean != p.mean || c.m2 != p.m2 || (L.partial_floats != 0 && p.partials == nullptr)) return cudaErrorInvalidValue;
  const auto kernel = single_read_forward_kernel_for<T, Math>(relu);
  return NF_LAUNCH_COOPERATIVE(kernel, dim3(static_cast<unsigned>(L.pl.blocks)), dim3(L.threads), L.smem_bytes,
                               stream, MomentsOp{p.mean, p.m2}, L.pl, static_cast<const T*>(p.x), static_cast<T*>(y),
                               c, L.cp.cx, L.cp.ny, L.cp.blocks, p.partials);
}

// The backward: p as for launch_backward_sums (masked when p.mask_scale / mask_shift are set; the
// mask then applies to dx's dy term too), dx the output, c.sum_dy / c.sum_dy_xmu == p.sum_dy /
// p.sum_dy_xmu and the c_* / gradient outputs set.
template <typename T, class Math>
cudaError_t launch_single_read_backward(const SingleReadLaunch& L, const BackwardSumsParams& p, void* dx,
                                        const BatchCoefParams<float>& c, cudaStream_t stream) {
  if (c.sum_dy != p.sum_dy || c.sum_dy_xmu != p.sum_dy_xmu || c.mean != p.mean) return cudaErrorInvalidValue;
  if ((p.mask_scale == nullptr) != (p.mask_shift == nullptr)) return cudaErrorInvalidValue;
  if (L.partial_floats != 0 && p.partials == nullptr) return cudaErrorInvalidValue;
  const BackwardSumsOp op{p.mean, p.sum_dy, p.sum_dy_xmu};
  const auto k = single_read_backward_kernel_for<T, Math>(p.mask_scale != nullptr);
  const dim3 grid(static_cast<unsigned>(L.pl.blocks)), block(L.threads);
  const T* dyp = static_cast<const T*>(p.dy);
  const T* xp = static_cast<const T*>(p.x);
  if (p.mask_scale != nullptr)
    return NF_LAUNCH_COOPERATIVE(k.second, grid, block, L.smem_bytes, stream,
                                 ReluMasked<BackwardSumsOp>{op, p.mask_scale, p.mask_shift, 0}, L.pl, dyp, xp,
                                 static_cast<T*>(dx), c, L.cp.cx, L.cp.ny, L.cp.blocks, p.partials);
  return NF_LAUNCH_COOPERATIVE(k.first, grid, block, L.smem_bytes, stream, op, L.pl, dyp, xp, static_cast<T*>(dx), c,
                               L.cp.cx, L.cp.ny, L.cp.blocks, p.partials);
}

}  // namespace nf
