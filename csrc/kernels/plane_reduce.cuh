// Per-plane reductions: moments (mean, m2) and backward_sums (sum dy, sum dy*(x-mean); dy masked
// by the forward's ReLU when the forward's scale and shift are given: affine_relu.cuh).
// One kernel skeleton per layout, parametrised by an Op that says what is accumulated.
// Every merge happens in a fixed order (shuffle butterflies, shared-memory trees, the last block
// of a split plane merging the partials 0..S-1): no float atomics, results are reproducible.
#pragma once
#include "kernels/affine_relu.cuh"
#include "kernels/cuda_compat.cuh"
#include "kernels/numerics.cuh"
#include "kernels/plane_plan.cuh"

namespace nf {

// ---- Ops ------------------------------------------------------------------------------------------
// An Op provides: State (empty = value-initialised), Ctx (per-plane constants), kInputs,
// kStateFloats, context(), accumulate_run (VEC values of one plane), accumulate_channels (one
// value for each of VEC channels), merge, shfl, store/load/load_cg, write.

struct MomentsOp {
  using State = Welford;
  struct Ctx {
    float shift = 0.f;
  };
  static constexpr int kInputs = 1;
  static constexpr int kStateFloats = 3;
  float* mean;
  float* m2;

  // The shift is the plane's first element (design.md sec. 2; 0 if that is not finite): every
  // split and every layout uses the same one, so partials are all relative to the same origin.
  template <typename T>
  NF_DEVICE Ctx context(const T* plane_first, int64_t) const {
    return Ctx{coef::finite_or_zero(to_float(plane_first[0]))};  // -Inf first: -Inf mean, not NaN
  }
  template <int VEC>
  NF_DEVICE static void accumulate_run(State& s, const Ctx& c, const float (&a)[VEC], const float (&)[VEC]) {
    float d[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] = a[k] - c.shift;
    welford_add<VEC>(s, d);
  }
  // All VEC channels of a thread have seen the same rows, so they share count and reciprocal.
  template <int VEC>
  NF_DEVICE static void accumulate_channels(State (&s)[VEC], const Ctx (&c)[VEC], const float (&a)[VEC],
                                            const float (&)[VEC]) {
    const float n = s[0].n + 1.f;
    const float inv = fast_div(1.f, n);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = a[k] - c[k].shift;
      const float delta = d - s[k].mean;
      s[k].mean = coef::merged_mean(s[k].mean, d, delta, inv);  // Inf-safe
      s[k].m2 += delta * (d - s[k].mean);
      s[k].n = n;
    }
  }
  NF_DEVICE static void merge(State& a, const State& b) { chan_merge(a, b); }
  NF_DEVICE static State shfl(const State& s, int lane_mask) { return shfl_xor(s, lane_mask); }
  NF_DEVICE static void store(float* p, const State& s) {
    p[0] = s.n;
    p[1] = s.mean;
    p[2] = s.m2;
  }
  NF_DEVICE static State load(const float* p) {
    State s;
    s.n = p[0];
    s.mean = p[1];
    s.m2 = p[2];
    return s;
  }
  NF_DEVICE static State load_cg(const float* p) {
    State s;
    s.n = __ldcg(p);
    s.mean = __ldcg(p + 1);
    s.m2 = __ldcg(p + 2);
    return s;
  }
  NF_DEVICE void write(int64_t i, const State& s, const Ctx& c) const {
    mean[i] = c.shift + s.mean;  // the only place the offset comes back: one rounding
    m2[i] = s.m2;
  }
};

struct Sums {
  float g1 = 0.f, g2 = 0.f;
};

struct BackwardSumsOp {
  using State = Sums;
  struct Ctx {
    float mean = 0.f;
  };
  static constexpr int kInputs = 2;  // in0 = dy, in1 = x
  static constexpr int kStateFloats = 2;
  const float* mean;
  float* sum_dy;
  float* sum_dy_xmu;

  template <typename T>
  NF_DEVICE Ctx context(const T*, int64_t i) const {
    return Ctx{mean[i]};
  }
  template <int VEC>
  NF_DEVICE static void accumulate_run(State& s, const Ctx& c, const float (&dy)[VEC], const float (&x)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s.g1 += dy[k];
      s.g2 += dy[k] * (x[k] - c.mean);
    }
  }
  template <int VEC>
  NF_DEVICE static void accumulate_channels(State (&s)[VEC], const Ctx (&c)[VEC], const float (&dy)[VEC],
                                            const float (&x)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s[k].g1 += dy[k];
      s[k].g2 += dy[k] * (x[k] - c[k].mean);
    }
  }
  NF_DEVICE static void merge(State& a, const State& b) {
    a.g1 += b.g1;
    a.g2 += b.g2;
  }
  NF_DEVICE static State shfl(const State& s, int lane_mask) {
    State r;
    r.g1 = shfl_xor(s.g1, lane_mask);
    r.g2 = shfl_xor(s.g2, lane_mask);
    return r;
  }
  NF_DEVICE static void store(float* p, const State& s) {
    p[0] = s.g1;
    p[1] = s.g2;
  }
  NF_DEVICE static State load(const float* p) {
    State s;
    s.g1 = p[0];
    s.g2 = p[1];
    return s;
  }
  NF_DEVICE static State load_cg(const float* p) {
    State s;
    s.g1 = __ldcg(p);
    s.g2 = __ldcg(p + 1);
    return s;
  }
  NF_DEVICE void write(int64_t i, const State& s, const Ctx&) const {
    sum_dy[i] = s.g1;
    sum_dy_xmu[i] = s.g2;
  }
};

// ---- block-level merges ------------------------------------------------------------------------------

// Butterfly over `width` lanes (power of two <= 32); every lane ends with a merged value.
template <class Op>
NF_DEVICE typename Op::State warp_reduce(typename Op::State s, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) Op::merge(s, Op::shfl(s, off));
  return s;
}

// Whole-block merge; the result is valid in thread 0. `smem` holds NF_WARP * kStateFloats floats.
template <class Op>
NF_DEVICE typename Op::State block_reduce(typename Op::State s, float* smem) {
  constexpr int K = Op::kStateFloats;
  const int lane = threadIdx.x % NF_WARP, warp = threadIdx.x / NF_WARP;
  s = warp_reduce<Op>(s, NF_WARP);
  if (lane == 0) Op::store(smem + warp * K, s);
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / NF_WARP;
    s = lane < nwarps ? Op::load(smem + lane * K) : typename Op::State{};
    s = warp_reduce<Op>(s, NF_WARP);
  }
  __syncthreads();  // smem is reused by the caller
  return s;
}

// Channels-last: merge the `rows` threads that share a channel lane (tx), tree over ty in shared
// memory. Result valid in the ty == 0 threads. `smem` holds threads * VEC * kStateFloats floats.
template <class Op, int VEC>
NF_DEVICE void column_reduce(typename Op::State (&s)[VEC], float* smem, int lanes_c, int ty) {
  constexpr int K = Op::kStateFloats;
  const int tid = threadIdx.x;
#pragma unroll
  for (int k = 0; k < VEC; ++k) Op::store(smem + (tid * VEC + k) * K, s[k]);
  __syncthreads();
  for (int half = blockDim.x / lanes_c / 2; half > 0; half >>= 1) {
    if (ty < half) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        Op::merge(s[k], Op::load(smem + ((tid + half * lanes_c) * VEC + k) * K));
        Op::store(smem + (tid * VEC + k) * K, s[k]);
      }
    }
    __syncthreads();
  }
}

// Last-block-done protocol of a split item: publish this block's partial (done by the caller),
// count arrivals; the block that arrives last sees every partial. Returns true in that block.
NF_DEVICE bool arrive_last(unsigned* counter, unsigned splits, unsigned* flag_smem) {
  __syncthreads();  // all partial stores of this block are issued (each writer fenced)
  if (threadIdx.x == 0) {
    const unsigned prev = atomicAdd(counter, 1u);
    *flag_smem = (prev == splits - 1) ? 1u : 0u;
  }
  __syncthreads();
  const bool last = *flag_smem != 0u;
  if (last) __threadfence();  // order our reads of the partials after the counter observation
  return last;
}

// ---- kernels ---------------------------------------------------------------------------------------------
// Each kernel is a block body (a device function, so that the fused layer steps of
// kernels/layer_steps.cuh can run more after it in the same block) and a thin __global__ wrapper.
// A body returns uniformly per block.

template <typename T, int VEC, class Op>
NF_DEVICE void contig_reduce_block(const Op& op, const ContigPlan& pl, const T* __restrict__ in0,
                                   const T* __restrict__ in1, unsigned* counters, float* partials,
                                   float* smem /* [NF_WARP * K] + flag */) {
  using State = typename Op::State;
  using Ctx = typename Op::Ctx;
  constexpr int K = Op::kStateFloats;
  const int tid = threadIdx.x;
  const int lane = tid & (pl.group - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (pl.threads / pl.group) + tid / pl.group;
  const int64_t plane = item / pl.splits;
  const int split = static_cast<int>(item - plane * pl.splits);
  const bool valid = plane < pl.planes;

  State st{};
  Ctx ctx{};
  if (valid) {
    const T* p0 = in0 + plane * pl.L;
    const T* p1 = Op::kInputs == 2 ? in1 + plane * pl.L : nullptr;
    ctx = op.context(p0, plane);
    const int begin = split * pl.seg;
    const ContigRuns r = contig_runs<VEC>(plane * pl.L, begin, min(pl.L, begin + pl.seg));
    // The unaligned head and tail, one element a lane, two loads in flight as below.
    for (int j = lane; j < r.edges(); j += 2 * pl.group) {
      const bool second = j + pl.group < r.edges();
      float u0[1], v0[1], u1[1], v1[1];
      load_floats<T, 1>(p0 + r.edge(j), u0);
      if (second) load_floats<T, 1>(p0 + r.edge(j + pl.group), u1);
      if constexpr (Op::kInputs == 2) {
        load_floats<T, 1>(p1 + r.edge(j), v0);
        if (second) load_floats<T, 1>(p1 + r.edge(j + pl.group), v1);
      }
      Op::template accumulate_run<1>(st, ctx, u0, v0);
      if (second) Op::template accumulate_run<1>(st, ctx, u1, v1);
    }
    const int end = r.body_end;
    const int step = pl.group * VEC;
    float a0[VEC], b0[VEC], a1[VEC], b1[VEC];
    int i = r.head_end + lane * VEC;
    // Two independent loads in flight per iteration before the dependent arithmetic.
    for (; i + step < end; i += 2 * step) {
      load_floats<T, VEC>(p0 + i, a0);
      load_floats<T, VEC>(p0 + i + step, a1);
      if constexpr (Op::kInputs == 2) {
        load_floats<T, VEC>(p1 + i, b0);
        load_floats<T, VEC>(p1 + i + step, b1);
      }
      Op::template accumulate_run<VEC>(st, ctx, a0, b0);
      Op::template accumulate_run<VEC>(st, ctx, a1, b1);
    }
    if (i < end) {
      load_floats<T, VEC>(p0 + i, a0);
      if constexpr (Op::kInputs == 2) load_floats<T, VEC>(p1 + i, b0);
      Op::template accumulate_run<VEC>(st, ctx, a0, b0);
    }
  }

  if (pl.splits == 1 && pl.group <= NF_WARP) {  // groups of at most a warp: shuffles only
    st = warp_reduce<Op>(st, pl.group);
    if (valid && lane == 0) op.write(plane, st, ctx);
    return;
  }
  st = block_reduce<Op>(st, smem);
  if (pl.splits == 1) {
    if (tid == 0) op.write(plane, st, ctx);
    return;
  }
  float* part = partials + plane * pl.splits * K;
  if (tid == 0) {
    Op::store(part + split * K, st);
    __threadfence();
  }
  if (!arrive_last(counters + plane, pl.splits, reinterpret_cast<unsigned*>(smem + NF_WARP * K))) return;
  State acc{};
  for (int s = tid; s < pl.splits; s += blockDim.x) Op::merge(acc, Op::load_cg(part + s * K));
  acc = block_reduce<Op>(acc, smem);
  if (tid == 0) {
    op.write(plane, acc, ctx);
    counters[plane] = 0u;  // leave the counters zeroed for the next launch
  }
}

template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    contig_reduce_kernel(Op op, ContigPlan pl, const T* __restrict__ in0, const T* __restrict__ in1,
                         unsigned* counters, float* partials) {
  NF_DYNAMIC_SMEM(float, smem);
  contig_reduce_block<T, VEC, Op>(op, pl, in0, in1, counters, partials, smem);
}

template <typename T, int VEC, class Op>
NF_DEVICE void cl_reduce_block(const Op& op, const ClPlan& pl, const T* __restrict__ in0, const T* __restrict__ in1,
                               unsigned* counters, float* partials,
                               float* smem /* [threads * VEC * K] + flag */) {
  using State = typename Op::State;
  using Ctx = typename Op::Ctx;
  constexpr int K = Op::kStateFloats;
  const ClThread t = cl_thread<VEC>(pl);
  const int ty = t.ty, split = t.split, cl = t.cl;  // cl: the thread's first channel in the tile
  const int64_t item = t.item, stat0 = t.stat0, sample = t.sample;
  const bool active = t.active;

  State st[VEC] = {};
  Ctx ctx[VEC] = {};
  if (active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) ctx[k] = op.context(in0 + sample + k, stat0 + k);
    const int r0 = split * pl.seg;
    const int r1 = min(pl.L, r0 + pl.seg);
    const int64_t stride = static_cast<int64_t>(pl.rows) * pl.C;
    const T* p0 = in0 + sample + static_cast<int64_t>(r0 + ty) * pl.C;
    const T* p1 = Op::kInputs == 2 ? in1 + sample + static_cast<int64_t>(r0 + ty) * pl.C : nullptr;
    float a[VEC], bb[VEC];
    int l = r0 + ty;
    if constexpr (Op::kInputs == 1) {
      // One input (moments): two rows per iteration, so that a thread has two independent 16-byte
      // loads in flight before the dependent arithmetic, as the two-input ops have (dy and x) and
      // the contiguous kernel has. Rows are accumulated in the same order: results are unchanged.
      float a1[VEC];
      for (; l + pl.rows < r1; l += 2 * pl.rows) {
        load_floats<T, VEC>(p0, a);
        load_floats<T, VEC>(p0 + stride, a1);
        Op::template accumulate_channels<VEC>(st, ctx, a, bb);
        Op::template accumulate_channels<VEC>(st, ctx, a1, bb);
        p0 += 2 * stride;
      }
    }
    for (; l < r1; l += pl.rows) {  // two inputs; the last row of one
      load_floats<T, VEC>(p0, a);
      if constexpr (Op::kInputs == 2) load_floats<T, VEC>(p1, bb);
      if constexpr (is_relu_masked<Op>)
        op.template accumulate_channels<VEC>(st, ctx, a, bb, l);  // reloads per row (affine_relu.cuh)
      else
        Op::template accumulate_channels<VEC>(st, ctx, a, bb);
      p0 += stride;
      if constexpr (Op::kInputs == 2) p1 += stride;
    }
  }
  column_reduce<Op, VEC>(st, smem, pl.lanes_c, ty);
  if (pl.splits == 1) {
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) op.write(stat0 + k, st[k], ctx[k]);
    }
    return;
  }
  float* part = partials + item * pl.splits * pl.ctile * K;
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) Op::store(part + (split * pl.ctile + cl + k) * K, st[k]);
    __threadfence();
  }
  unsigned* flag = reinterpret_cast<unsigned*>(smem + blockDim.x * VEC * K);
  if (!arrive_last(counters + item, pl.splits, flag)) return;
  State acc[VEC] = {};
  if (active) {
    for (int s = ty; s < pl.splits; s += pl.rows) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) Op::merge(acc[k], Op::load_cg(part + (s * pl.ctile + cl + k) * K));
    }
  }
  column_reduce<Op, VEC>(acc, smem, pl.lanes_c, ty);
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) op.write(stat0 + k, acc[k], ctx[k]);
  }
  if (threadIdx.x == 0) counters[item] = 0u;
}

template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    cl_reduce_kernel(Op op, ClPlan pl, const T* __restrict__ in0, const T* __restrict__ in1,
                     unsigned* counters, float* partials) {
  NF_DYNAMIC_SMEM(float, smem);
  cl_reduce_block<T, VEC, Op>(op, pl, in0, in1, counters, partials, smem);
}

// ---- host launchers ------------------------------------------------------------------------------------

template <typename T, class Op>
Workspace reduce_workspace(const PlaneShape& s, int threads_req, const void* in0, const void* in1) {
  int threads;
  if (!resolve_threads(threads_req, &threads) || s.N * s.C * s.L == 0) return Workspace{};
  const int vec = choose_vec(s, sizeof(T), in0, in1);
  return s.layout == Layout::Contiguous
             ? workspace_contig(plan_contig(s.N * s.C, s.L, vec, threads), Op::kStateFloats)
             : workspace_cl(plan_cl(s.N, s.C, s.L, vec, threads), Op::kStateFloats);
}

// Requires L > 0 (the glue handles empty planes). Where reduce_workspace() reports counters,
// `counters` (that many, zeroed; left zeroed on exit) and `partials` (that many floats, any
// content) must be given.
template <typename T, class Op>
cudaError_t launch_reduce(const Op& op, const PlaneShape& s, int threads_req, const T* in0, const T* in1,
                          unsigned* counters, float* partials, cudaStream_t stream) {
  int threads;
  if (!resolve_threads(threads_req, &threads)) return cudaErrorInvalidValue;
  if (s.N * s.C * s.L == 0) return cudaSuccess;
  if (!extents_ok(s)) return cudaErrorInvalidValue;
  constexpr int K = Op::kStateFloats;
  constexpr int V = kVec16<T>;
  // The channels-last kernel's dynamic shared memory (below) launches without an opt-in.
  static_assert((static_cast<size_t>(NF_MAX_THREADS) * V * K + 4) * sizeof(float) <= 48 * 1024,
                "cl_reduce_kernel would need more than 48 KiB of dynamic shared memory");
  const int vec = choose_vec(s, sizeof(T), in0, in1);
  auto missing = [&](const Workspace& ws) {
    return ws.counter_count != 0 && (counters == nullptr || partials == nullptr);
  };
  if (s.layout == Layout::Contiguous) {
    const ContigPlan pl = plan_contig(s.N * s.C, s.L, vec, threads);
    if (pl.blocks > INT32_MAX || missing(workspace_contig(pl, K))) return cudaErrorInvalidValue;
    const size_t smem = (NF_WARP * K + 4) * sizeof(float);
    auto kernel = vec == V ? &contig_reduce_kernel<T, V, Op> : &contig_reduce_kernel<T, 1, Op>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), smem, stream, op, pl, in0, in1,
              counters, partials);
  } else {
    const ClPlan pl = plan_cl(s.N, s.C, s.L, vec, threads);
    if (pl.blocks > INT32_MAX || missing(workspace_cl(pl, K))) return cudaErrorInvalidValue;
    const size_t smem = (static_cast<size_t>(threads) * vec * K + 4) * sizeof(float);
    auto kernel = vec == V ? &cl_reduce_kernel<T, V, Op> : &cl_reduce_kernel<T, 1, Op>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), smem, stream, op, pl, in0, in1,
              counters, partials);
  }
  return cudaGetLastError();
}

template <typename T>
Workspace moments_workspace(const MomentsParams& p) {
  return reduce_workspace<T, MomentsOp>(p.shape, p.threads, p.x, nullptr);
}

template <typename T>
cudaError_t launch_moments(const MomentsParams& p, cudaStream_t stream) {
  return launch_reduce<T>(MomentsOp{p.mean, p.m2}, p.shape, p.threads, static_cast<const T*>(p.x), nullptr,
                          p.counters, p.partials, stream);
}

template <typename T>
Workspace backward_sums_workspace(const BackwardSumsParams& p) {
  return reduce_workspace<T, BackwardSumsOp>(p.shape, p.threads, p.dy, p.x);
}

// The mask changes neither the plan nor the partial state (ReluMasked<BackwardSumsOp> is a
// BackwardSumsOp): backward_sums_workspace() holds for both.
template <typename T>
cudaError_t launch_backward_sums(const BackwardSumsParams& p, cudaStream_t stream) {
  const BackwardSumsOp op{p.mean, p.sum_dy, p.sum_dy_xmu};
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  if ((p.mask_scale == nullptr) != (p.mask_shift == nullptr)) return cudaErrorInvalidValue;
  if (p.mask_scale != nullptr)
    return launch_reduce<T>(ReluMasked<BackwardSumsOp>{op, p.mask_scale, p.mask_shift}, p.shape, p.threads, dy, x,
                            p.counters, p.partials, stream);
  return launch_reduce<T>(op, p.shape, p.threads, dy, x, p.counters, p.partials, stream);
}

}  // namespace nf
