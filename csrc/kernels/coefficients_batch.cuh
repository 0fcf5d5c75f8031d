// BIN and IEBN coefficient kernels, forward and backward: one launch each.
//
// A block covers `cx` consecutive channels (threads x, coalesced along C) and `ny` rows of the
// batch (threads y, striding over the N samples). The batch statistics of a channel are a Chan
// merge over its column, the backward's per-channel sums a plain sum: both reduce in a fixed
// shared-memory tree over y, so results never depend on scheduling (no float atomics). The
// per-plane formulas are common/coefficients.h (BinMath / IebnMath), shared with the CPU ops.
// Plain CUDA: no torch headers.
#pragma once
#include "common/coefficients.h"
#include "kernels/cuda_compat.cuh"

namespace nf {

struct BatchCoefPlan {
  int cx = 1, ny = 1;  // channels per block x rows per block, both powers of two
  int64_t blocks = 0;
  size_t smem_bytes = 0;
  int threads() const { return cx * ny; }
};

inline int coef_pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// Requested threads: 0 = 256, else a power of two in [32, 256]. Returns false if invalid.
inline bool coef_threads(int requested, int* threads) {
  const int t = requested == 0 ? NF_MAX_THREADS : requested;
  if (t < NF_WARP || t > NF_MAX_THREADS || (t & (t - 1)) != 0) return false;
  *threads = t;
  return true;
}

// Blocks wanted before narrowing the channel tile (about one per SM of an H100).
constexpr int64_t kCoefTargetBlocks = 128;

// Up to 32 channels per block (one coalesced 128-byte row per warp), the rest of the threads over
// the batch. Tiles narrow down to 8 channels (still whole 32-byte sectors) while that gives more
// blocks to a grid that would not fill the GPU; rows shrink to the batch so tiny problems do not
// launch idle threads. A pure function of the shape: the same reduction order everywhere.
template <class Math>
inline bool plan_batch_coef(const BatchCoefParams<float>& p, BatchCoefPlan* pl) {
  int threads = 0;
  if (!coef_threads(p.threads, &threads)) return false;
  pl->cx = coef_pow2_at_least(p.C, NF_WARP);
  while (pl->cx > 8 && (p.C + pl->cx - 1) / pl->cx < kCoefTargetBlocks) pl->cx /= 2;
  pl->ny = coef_pow2_at_least(p.N, threads / pl->cx);
  pl->blocks = (p.C + pl->cx - 1) / pl->cx;
  const int floats = Math::kSums > 3 ? Math::kSums : 3;  // Merge = 3 floats
  pl->smem_bytes = sizeof(float) * floats * static_cast<size_t>(pl->threads());
  return true;
}

// Where a thread sits in its tile (channels tile * cx ...), and the column layout of the
// shared-memory trees: value k of thread (x, y) is smem[k * threads + y * cx + x].
// A block may have more threads than the tile (the fused layer steps run the tiles in the
// reduction kernel's block, kernels/layer_steps.cuh): those have y >= ny, are inactive and only
// take part in the barriers.
struct ColumnTile {
  int x, y, cx, ny;
  int64_t c;
  bool active;  // in the tile and c < C; inactive threads still take part in every __syncthreads
  NF_DEVICE bool member() const { return y < ny; }
  NF_DEVICE int idx() const { return y * cx + x; }
  NF_DEVICE int threads() const { return cx * ny; }
};

NF_DEVICE ColumnTile column_tile(int cx, int ny, int64_t C, int64_t tile) {
  ColumnTile t;
  const int tid = static_cast<int>(threadIdx.x);
  t.x = tid & (cx - 1);
  t.y = tid / cx;
  t.cx = cx;
  t.ny = ny;
  t.c = tile * cx + t.x;
  t.active = t.member() && t.c < C;
  return t;
}

// Loads of the (N, C) statistics / gradient sums: plain in the standalone kernels; L2 (__ldcg) in
// the fused layer steps, which read what other blocks of the same launch wrote.
template <bool kCg>
NF_DEVICE float load_stat(const float* p) {
  if constexpr (kCg) return __ldcg(p);
  return *p;
}

// The rows n = t.y, t.y + ny, ... < N of a thread's column, kRowBatch rows at a time: `load(n, v)`
// fills V floats of row n, and every load of a batch is issued before `use(n, v)` runs on its
// first row. Why: the row bodies are chains of dependent arithmetic (merges, divisions), and ptxas
// does not lift the next row's loads above them, so a row-at-a-time loop waits one L2 round trip
// per row (at N = 256, C = 64: 8 rows per thread and pass, 2-3 passes per kernel: the 10-14 us the
// first GPU run measured for these 8-block kernels). Rows are still used one by one, in order:
// the results are bitwise those of the plain loop.
// R = 1 is the plain loop: kernels that cannot spare the registers (the single-read kernels hold
// their tile in 128 of them) take that.
constexpr int kRowBatch = 4;

template <int R, int V, class Load, class Use>
NF_DEVICE void for_column_rows(const ColumnTile& t, int64_t N, Load load, Use use) {
  for (int64_t n0 = t.y; n0 < N; n0 += int64_t{R} * t.ny) {
    float v[R][V];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t n = n0 + int64_t{k} * t.ny;
      if (n < N) {
        load(n, v[k]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] = 0.f;
      }
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int64_t n = n0 + int64_t{k} * t.ny;
      if (n < N) use(n, v[k]);
    }
  }
}

// Sum of K values down each column; afterwards every thread holds its column's totals.
// Pairing (y, y + h) for h = ny/2 .. 1 is fixed, so the result is reproducible.
template <int K>
NF_DEVICE void column_sum(float (&v)[K], float* smem, const ColumnTile& t) {
  const int T = t.threads(), i = t.idx();
  if (t.member()) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * T + i] = v[k];
  }
  __syncthreads();
  for (int h = t.ny / 2; h > 0; h >>= 1) {
    if (t.y < h) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        v[k] += smem[k * T + i + h * t.cx];
        smem[k * T + i] = v[k];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = smem[k * T + t.x];
  __syncthreads();  // smem is free again for the caller
}

// Chan merge of the moments of each column, same tree as column_sum.
NF_DEVICE coef::Merge<float> column_merge(coef::Merge<float> a, float L, float* smem,
                                          const ColumnTile& t) {
  const int T = t.threads(), i = t.idx();
  if (t.member()) {
    smem[i] = a.count;
    smem[T + i] = a.mean;
    smem[2 * T + i] = a.q;
  }
  __syncthreads();
  for (int h = t.ny / 2; h > 0; h >>= 1) {
    if (t.y < h) {
      const int j = i + h * t.cx;
      coef::merge(a, coef::Merge<float>{smem[j], smem[T + j], smem[2 * T + j]}, L);
      smem[i] = a.count;
      smem[T + i] = a.mean;
      smem[2 * T + i] = a.q;
    }
    __syncthreads();
  }
  const coef::Merge<float> total{smem[t.x], smem[T + t.x], smem[2 * T + t.x]};
  __syncthreads();
  return total;
}

// Row loaders for for_column_rows: (mean, m2) of plane (n, c), and those plus the two gradient sums.
template <bool kCg>
NF_DEVICE auto plane_moments(const BatchCoefParams<float>& p, int64_t c) {
  return [&p, c](int64_t n, float(&v)[2]) {
    const int64_t i = n * p.C + c;
    v[0] = load_stat<kCg>(p.mean + i);
    v[1] = load_stat<kCg>(p.m2 + i);
  };
}
template <bool kCg>
NF_DEVICE auto plane_moments_and_sums(const BatchCoefParams<float>& p, int64_t c) {
  return [&p, c](int64_t n, float(&v)[4]) {
    const int64_t i = n * p.C + c;
    v[0] = load_stat<kCg>(p.mean + i);
    v[1] = load_stat<kCg>(p.m2 + i);
    v[2] = load_stat<kCg>(p.sum_dy + i);
    v[3] = load_stat<kCg>(p.sum_dy_xmu + i);
  };
}

// mu_B / r_B of the thread's channel, from the batch (merged over the column, means taken
// relative to the channel's first plane) or from the running statistics. With `update`, row 0
// writes the running-statistics update (one writer per channel).
template <bool kCg, int R>
NF_DEVICE coef::BatchStats<float> column_batch_stats(const BatchCoefParams<float>& p,
                                                     const ColumnTile& t, float* smem,
                                                     bool update) {
  const float L = static_cast<float>(p.L), eps = static_cast<float>(p.eps);
  if (!p.use_batch()) {  // uniform over the grid: no barrier is skipped by only some threads
    return t.active ? coef::running_stats(p.running_mean[t.c], p.running_var[t.c], eps)
                    : coef::BatchStats<float>{0.f, 0.f, 1.f, false};
  }
  coef::Merge<float> acc = coef::merge_empty<float>();
  float shift = 0.f;
  if (t.active) {
    shift = coef::finite_or_zero(load_stat<kCg>(p.mean + t.c));  // (Inf: 0, so the mean stays Inf, not NaN)
    for_column_rows<R, 2>(t, p.N, plane_moments<kCg>(p, t.c),
                       [&](int64_t, const float(&v)[2]) { coef::merge_add(acc, v[0] - shift, v[1], L); });
  }
  const coef::Merge<float> tot = column_merge(acc, L, smem, t);
  if (update && t.active && t.y == 0) {
    coef::update_running(p.running_mean[t.c], p.running_var[t.c], shift, tot.mean, tot.q,
                         tot.count, L, static_cast<float>(p.momentum));
  }
  return coef::batch_stats(shift, tot.mean, tot.q, tot.count, L, eps);
}

// One channel tile of the forward (the block body of batch_coef_forward_kernel, and of the fused
// layer step's epilogue, which loops it over all tiles). It also counts the batch (a module's
// num_batches_tracked += 1 in training): one thread of tile 0, so a layer forward stays 3
// launches. Nothing else reads the counter. `smem`: plan_batch_coef's smem_bytes.
template <class Math, bool kCg, int R = kRowBatch>
NF_DEVICE void batch_coef_forward_tile(const BatchCoefParams<float>& p, int cx, int ny, int64_t tile, float* smem) {
  if (p.count_batch() && tile == 0 && threadIdx.x == 0) *p.num_batches_tracked += 1;
  const ColumnTile t = column_tile(cx, ny, p.C, tile);
  const coef::BatchStats<float> st = column_batch_stats<kCg, R>(p, t, smem, p.update_running());
  if (!t.active) return;
  const typename Math::Channel ch = Math::load(p, t.c, st);
  for_column_rows<R, 2>(t, p.N, plane_moments<kCg>(p, t.c), [&](int64_t n, const float(&v)[2]) {
    const int64_t i = n * p.C + t.c;
    float scale, shift;
    Math::forward(ch, v[0], Math::plane(ch, v[0], v[1]), scale, shift);
    p.scale[i] = scale;
    p.shift[i] = shift;
  });
}

template <class Math>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    batch_coef_forward_kernel(BatchCoefParams<float> p, int cx, int ny) {
  NF_DYNAMIC_SMEM(float, smem);
  batch_coef_forward_tile<Math, false>(p, cx, ny, blockIdx.x, smem);
}

// Backward, one channel tile: batch statistics again (never updating the running ones), the
// per-channel sums over the batch, then per plane c_dy, c_x, c_0. Parameter gradients are written
// by row 0. The block body of batch_coef_backward_kernel and of the fused step's epilogue.
template <class Math, bool kCg, int R = kRowBatch>
NF_DEVICE void batch_coef_backward_tile(const BatchCoefParams<float>& p, int cx, int ny, int64_t tile, float* smem) {
  const ColumnTile t = column_tile(cx, ny, p.C, tile);
  const coef::BatchStats<float> st = column_batch_stats<kCg, R>(p, t, smem, false);
  typename Math::Channel ch{};
  float s[Math::kSums] = {};
  if (t.active) {
    ch = Math::load(p, t.c, st);
    for_column_rows<R, 4>(t, p.N, plane_moments_and_sums<kCg>(p, t.c), [&](int64_t, const float(&v)[4]) {
      Math::accumulate(ch, v[0], Math::plane(ch, v[0], v[1]), v[2], v[3], s);
    });
  }
  column_sum(s, smem, t);
  if (!t.active) return;
  if (t.y == 0) Math::store_grads(p, t.c, ch, s);
  const typename Math::Final f = Math::finalize(ch, s, static_cast<float>(p.N));
  // the plane values again: cheaper than keeping them (registers / memory)
  for_column_rows<R, 4>(t, p.N, plane_moments_and_sums<kCg>(p, t.c), [&](int64_t n, const float(&v)[4]) {
    const int64_t i = n * p.C + t.c;
    float c_dy, c_x, c_0;
    Math::backward(ch, f, v[0], Math::plane(ch, v[0], v[1]), v[2], v[3], c_dy, c_x, c_0);
    p.c_dy[i] = c_dy;
    p.c_x[i] = c_x;
    p.c_0[i] = c_0;
  });
}

template <class Math>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    batch_coef_backward_kernel(BatchCoefParams<float> p, int cx, int ny) {
  NF_DYNAMIC_SMEM(float, smem);
  batch_coef_backward_tile<Math, false>(p, cx, ny, blockIdx.x, smem);
}

template <class Math>
cudaError_t launch_batch_coef_forward(const BatchCoefParams<float>& p, cudaStream_t stream) {
  BatchCoefPlan pl;
  if (!plan_batch_coef<Math>(p, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) {
    if (!p.count_batch()) return cudaSuccess;
    // Nothing to compute, but the batch still counts: one block whose threads are all inactive
    // (C = 0: no statistic is read or written), thread 0 increments the counter.
    BatchCoefParams<float> q = p;
    q.N = q.C = 0;
    if (!plan_batch_coef<Math>(q, &pl)) return cudaErrorInvalidValue;
    NF_LAUNCH(batch_coef_forward_kernel<Math>, dim3(1), dim3(static_cast<unsigned>(pl.threads())),
              pl.smem_bytes, stream, q, pl.cx, pl.ny);
    return cudaGetLastError();
  }
  NF_LAUNCH(batch_coef_forward_kernel<Math>, dim3(static_cast<unsigned>(pl.blocks)),
            dim3(static_cast<unsigned>(pl.threads())), pl.smem_bytes, stream, p, pl.cx, pl.ny);
  return cudaGetLastError();
}

template <class Math>
cudaError_t launch_batch_coef_backward(const BatchCoefParams<float>& p, cudaStream_t stream) {
  BatchCoefPlan pl;
  if (!plan_batch_coef<Math>(p, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  NF_LAUNCH(batch_coef_backward_kernel<Math>, dim3(static_cast<unsigned>(pl.blocks)),
            dim3(static_cast<unsigned>(pl.threads())), pl.smem_bytes, stream, p, pl.cx, pl.ny);
  return cudaGetLastError();
}

}  // namespace nf
