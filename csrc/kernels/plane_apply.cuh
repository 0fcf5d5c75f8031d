// Per-plane affine maps over full tensors: affine_apply (y = scale*(x-mean)+shift, or its ReLU)
// and backward_apply (dx = c_dy*dy + c_x*(x-mean) + c_0, dy masked by the forward's ReLU when the
// forward's scale and shift are given: affine_relu.cuh). Same work decomposition as the reductions
// (plane_plan.cuh): each thread loads its plane's / channels' coefficients once and streams
// 16-byte vectors, so there is no per-element index division.
#pragma once
#include "kernels/affine_relu.cuh"
#include "kernels/cuda_compat.cuh"
#include "kernels/numerics.cuh"
#include "kernels/plane_plan.cuh"

namespace nf {

struct AffineOp {
  struct Ctx {
    float mean = 0.f, scale = 0.f, shift = 0.f;
  };
  static constexpr int kInputs = 1;
  const float* mean;
  const float* scale;
  const float* shift;
  NF_DEVICE Ctx context(int64_t i) const { return Ctx{mean[i], scale[i], shift[i]}; }
  NF_DEVICE static float apply(const Ctx& c, float x, float) { return affine_value(x, c.mean, c.scale, c.shift); }
};

// affine_apply(relu=True): relu(v) of the very v AffineOp computes.
struct AffineReluOp : AffineOp {
  NF_DEVICE static float apply(const Ctx& c, float x, float u) { return relu(AffineOp::apply(c, x, u)); }
};

struct BackwardApplyOp {
  struct Ctx {
    float mean = 0.f, c_dy = 0.f, c_x = 0.f, c_0 = 0.f;
  };
  static constexpr int kInputs = 2;  // in0 = dy, in1 = x
  const float* mean;
  const float* c_dy;
  const float* c_x;
  const float* c_0;
  NF_DEVICE Ctx context(int64_t i) const { return Ctx{mean[i], c_dy[i], c_x[i], c_0[i]}; }
  NF_DEVICE static float apply(const Ctx& c, float dy, float x) {
    return fmaf(c.c_dy, dy, fmaf(c.c_x, x - c.mean, c.c_0));
  }
};

template <typename T, int VEC, class Op>
NF_DEVICE void apply_vec(const Op&, const typename Op::Ctx& c, const T* p0, const T* p1, T* q) {
  float a[VEC], b[VEC], y[VEC];
  load_floats<T, VEC>(p0, a);
  if constexpr (Op::kInputs == 2) load_floats<T, VEC>(p1, b);
#pragma unroll
  for (int k = 0; k < VEC; ++k) y[k] = Op::apply(c, a[k], Op::kInputs == 2 ? b[k] : 0.f);
  store_floats<T, VEC>(q, y);
}

template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    contig_apply_kernel(Op op, ContigPlan pl, const T* __restrict__ in0, const T* __restrict__ in1,
                        T* __restrict__ out) {
  const int tid = threadIdx.x;
  const int lane = tid & (pl.group - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (pl.threads / pl.group) + tid / pl.group;
  const int64_t plane = item / pl.splits;
  if (plane >= pl.planes) return;  // no barriers below
  const int split = static_cast<int>(item - plane * pl.splits);
  const typename Op::Ctx c = op.context(plane);
  const int64_t base = plane * pl.L;
  const T* p0 = in0 + base;
  const T* p1 = Op::kInputs == 2 ? in1 + base : nullptr;
  T* q = out + base;
  const int begin = split * pl.seg;
  const ContigRuns r = contig_runs<VEC>(base, begin, min(pl.L, begin + pl.seg));
  // The unaligned head and tail, one element a lane; two per iteration, as below (a plane's edges
  // are up to 2 x (VEC - 1) elements for a group of as few as 2 lanes: one at a time, their round
  // trips would outlast the vectors').
  for (int j = lane; j < r.edges(); j += 2 * pl.group) {
    const int e0 = r.edge(j);
    apply_vec<T, 1>(op, c, p0 + e0, Op::kInputs == 2 ? p1 + e0 : nullptr, q + e0);
    if (j + pl.group < r.edges()) {
      const int e1 = r.edge(j + pl.group);
      apply_vec<T, 1>(op, c, p0 + e1, Op::kInputs == 2 ? p1 + e1 : nullptr, q + e1);
    }
  }
  const int end = r.body_end;
  const int step = pl.group * VEC;
  int i = r.head_end + lane * VEC;
  for (; i + step < end; i += 2 * step) {
    apply_vec<T, VEC>(op, c, p0 + i, Op::kInputs == 2 ? p1 + i : nullptr, q + i);
    apply_vec<T, VEC>(op, c, p0 + i + step, Op::kInputs == 2 ? p1 + i + step : nullptr, q + i + step);
  }
  if (i < end) apply_vec<T, VEC>(op, c, p0 + i, Op::kInputs == 2 ? p1 + i : nullptr, q + i);
}

template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(NF_MAX_THREADS)
    cl_apply_kernel(Op op, ClPlan pl, const T* __restrict__ in0, const T* __restrict__ in1, T* __restrict__ out) {
  const ClThread t = cl_thread<VEC>(pl);
  if (!t.active) return;  // no barriers below
  typename Op::Ctx c[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) c[k] = op.context(t.stat0 + k);
  const int r0 = t.split * pl.seg;
  const int r1 = min(pl.L, r0 + pl.seg);
  const int64_t stride = static_cast<int64_t>(pl.rows) * pl.C;
  const int64_t off = t.sample + static_cast<int64_t>(r0 + t.ty) * pl.C;
  const T* p0 = in0 + off;
  const T* p1 = Op::kInputs == 2 ? in1 + off : nullptr;
  T* q = out + off;
  int l = r0 + t.ty;
  if constexpr (Op::kInputs == 1) {
    // One input (affine_apply): two rows per iteration, two independent loads in flight per
    // thread (see cl_reduce_block); load_floats_cg keeps ptxas from sinking the second load
    // below the first store.
    for (; l + pl.rows < r1; l += 2 * pl.rows) {
      float a0[VEC], a1[VEC], y0[VEC], y1[VEC];
      load_floats_cg<T, VEC>(p0, a0);
      load_floats_cg<T, VEC>(p0 + stride, a1);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        y0[k] = Op::apply(c[k], a0[k], 0.f);
        y1[k] = Op::apply(c[k], a1[k], 0.f);
      }
      store_floats<T, VEC>(q, y0);
      store_floats<T, VEC>(q + stride, y1);
      p0 += 2 * stride;
      q += 2 * stride;
    }
  }
  for (; l < r1; l += pl.rows) {  // two inputs; the last row of one
    float a[VEC], bb[VEC], y[VEC];
    load_floats<T, VEC>(p0, a);
    if constexpr (Op::kInputs == 2) load_floats<T, VEC>(p1, bb);
    if constexpr (is_relu_masked<Op>) {
      op.template apply_channels<VEC>(c, a, bb, y, l);  // reloads per row
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = Op::apply(c[k], a[k], Op::kInputs == 2 ? bb[k] : 0.f);
    }
    store_floats<T, VEC>(q, y);
    p0 += stride;
    if constexpr (Op::kInputs == 2) p1 += stride;
    q += stride;
  }
}

template <typename T, class Op>
cudaError_t launch_apply(const Op& op, const PlaneShape& s, int threads_req, const T* in0, const T* in1, T* out,
                         cudaStream_t stream) {
  int threads;
  if (!resolve_threads(threads_req, &threads)) return cudaErrorInvalidValue;
  if (s.N * s.C * s.L == 0) return cudaSuccess;
  if (!extents_ok(s)) return cudaErrorInvalidValue;
  constexpr int V = kVec16<T>;
  const int vec = choose_vec(s, sizeof(T), in0, in1, out);
  if (s.layout == Layout::Contiguous) {
    const ContigPlan pl = plan_contig(s.N * s.C, s.L, vec, threads);
    if (pl.blocks > INT32_MAX) return cudaErrorInvalidValue;
    auto kernel = vec == V ? &contig_apply_kernel<T, V, Op> : &contig_apply_kernel<T, 1, Op>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), 0, stream, op, pl, in0, in1, out);
  } else {
    const ClPlan pl = plan_cl(s.N, s.C, s.L, vec, threads);
    if (pl.blocks > INT32_MAX) return cudaErrorInvalidValue;
    auto kernel = vec == V ? &cl_apply_kernel<T, V, Op> : &cl_apply_kernel<T, 1, Op>;
    NF_LAUNCH(kernel, dim3(static_cast<unsigned>(pl.blocks)), dim3(threads), 0, stream, op, pl, in0, in1, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_affine_apply(const AffineApplyParams& p, cudaStream_t stream) {
  const AffineOp op{p.mean, p.scale, p.shift};
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  if (p.relu) return launch_apply<T>(AffineReluOp{op}, p.shape, p.threads, x, static_cast<const T*>(nullptr), y, stream);
  return launch_apply<T>(op, p.shape, p.threads, x, static_cast<const T*>(nullptr), y, stream);
}

template <typename T>
cudaError_t launch_backward_apply(const BackwardApplyParams& p, cudaStream_t stream) {
  const BackwardApplyOp op{p.mean, p.c_dy, p.c_x, p.c_0};
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  if ((p.mask_scale == nullptr) != (p.mask_shift == nullptr)) return cudaErrorInvalidValue;
  if (p.mask_scale != nullptr)
    return launch_apply<T>(ReluMasked<BackwardApplyOp>{op, p.mask_scale, p.mask_shift}, p.shape, p.threads, dy, x,
                           dx, stream);
  return launch_apply<T>(op, p.shape, p.threads, dy, x, dx, stream);
}

}  // namespace nf
