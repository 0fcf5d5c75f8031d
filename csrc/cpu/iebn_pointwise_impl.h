// Bodies of the IEBN one-value-per-plane kernels (iebn_pointwise_kernels.h), compiled once per
// build with NF_CPU_NS defined, after the torch headers.
//
// Work decomposition, fixed by the shape (results are bitwise the same for any thread count):
// * the maps (y, dx): rows of C elements, several rows per at::parallel_for task; a row's last
//   partial vector is done as its last whole vector again (same inputs, same values) when C >= W.
// * the reduction: column blocks of kCols channels, each task walking every row of its block
//   (a vector of channels over kRows rows at a time), accumulators in the acc type over kRows
//   rows, then added in double; a block's tail lanes load zeros, whose terms are exactly 0.
//
// Per element, with the per-channel tables below (v: the value before the ReLU):
//   g = sigmoid(gate_weight x + gate_bias),  xm = x - mean,  v = (g xm) scale + shift
//   d = relu ? (v > 0 ? dy : 0) : dy,  dg = d g,  xh = xm rstd,  s = dg (1 - g) xh
// sums over the batch: sum d (bias), sum dg xh (weight), sum dg, sum s, sum s x;
//   grad_gate_bias = weight sum s, grad_gate_weight = weight sum s x,
//   dx = (weight gate_weight) s + (weight rstd) (dg - [sum dg / N + xm rstd sum dg xh / N])
// (the bracket: the batch statistics' own gradient, when they are x's, as batch norm's backward).
#pragma once

#include <cmath>
#include <vector>

#include "cpu/generic_plan_impl.h"
#include "cpu/iebn_pointwise_kernels.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

constexpr int64_t kCols = 64;  // channels per reduction task
constexpr int64_t kRows = 64;  // rows summed in the acc type before a double addition

template <class S>
struct PointwiseKern : KernTypes<S> {
  NF_CPU_KERN_TYPES(S);

  // Per-channel tables, one row of C each: the forward reads the first six, the backward all.
  enum Table { kMean, kRstd, kScale, kShift, kGateW, kGateB, kDx1, kDx2, kDx3, kDx4, kTables };

  // exp_u20: at::vec's faster exp (20 ulp, ~2e-6 relative; float64: the exact one), the one ATen's own
  // softmax kernels take; with Sleef's 1-ulp exp the apply map took 1.7x as long. Its AVX2 float
  // build clamps the argument with min / max, which turn a NaN into a bound (a gate of 0: a diverged
  // gate parameter would give y = bias and zero gradients, silently): NaN lanes are put back.
  static V sigmoid(const V& t) { return V::blendv(V(1) / (V(1) + t.neg().exp_u20()), t, t != t); }

  // v (the value before the ReLU) and the g, xm it is made of: one function for the forward and the
  // backward's mask, so the two agree on v's sign bit for bit.
  static V pre(const V& xv, const V* k, V& g, V& xm) {
    g = sigmoid(at::vec::fmadd(k[kGateW], xv, k[kGateB]));
    xm = xv - k[kMean];
    return affine(g * xm, k[kScale], k[kShift]);
  }

  // The tables every direction reads: mean, rstd, scale = weight rstd, shift = bias, the gate; `rows`
  // of C in all (the backward's dx rows follow, filled from its sums).
  static std::vector<acc_t> tables(const PointwiseArgs& a, int rows) {
    const int64_t C = a.C;
    std::vector<acc_t> t(rows * C);
    auto in = [](const void* p) { return static_cast<const acc_t*>(p); };
    for (int64_t c = 0; c < C; ++c) {
      const acc_t w = a.weight ? in(a.weight)[c] : acc_t(1);
      t[kMean * C + c] = in(a.mean)[c];
      t[kRstd * C + c] = in(a.rstd)[c];
      t[kScale * C + c] = w * in(a.rstd)[c];
      t[kShift * C + c] = a.bias ? in(a.bias)[c] : acc_t(0);
      t[kGateW * C + c] = in(a.gate_weight)[c];
      t[kGateB * C + c] = in(a.gate_bias)[c];
    }
    return t;
  }

  // (kCount a constant: a loop of run-time length kept the tables in a stack array, reloaded per
  // vector, ~25% of the apply map's time)
  template <int kCount>
  static void load_tables(V* k, const acc_t* t, int64_t C, int64_t c) {
    for (int j = 0; j < kCount; ++j) k[j] = V::loadu(t + j * C + c);
  }
  template <int kCount>
  static void load_tables_n(V* k, const acc_t* t, int64_t C, int64_t c, int64_t n) {
    for (int j = 0; j < kCount; ++j) k[j] = va::load_n(t + j * C + c, n);
  }

  // out[n, :] = f(x[n, :], dy[n, :], tables at the columns) for every row, kCount tables read.
  template <int kCount, class F>
  static void map_rows(const PointwiseArgs& a, const acc_t* t, F f) {
    const int64_t N = a.N, C = a.C;
    at::parallel_for(0, N, std::max<int64_t>(1, kTask / C), [&](int64_t r0, int64_t r1) {
      const S* x = static_cast<const S*>(a.x);
      const S* dy = static_cast<const S*>(a.dy);
      S* out = static_cast<S*>(a.out);
      V k[kCount];
      auto full = [&](int64_t base, int64_t c) {
        load_tables<kCount>(k, t, C, c);
        io::store(out + base + c, f(io::load(x + base + c), dy ? io::load(dy + base + c) : V(0), k));
      };
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) full(base, c);
        if (c == C) continue;
        if (C >= W) {
          full(base, C - W);
        } else {
          const int64_t n = C - c;
          load_tables_n<kCount>(k, t, C, c, n);
          io::store_n(out + base + c, f(io::load_n(x + base + c, n), dy ? io::load_n(dy + base + c, n) : V(0), k), n);
        }
      }
    });
  }

  template <bool kRelu>
  static void apply(const PointwiseArgs& a) {
    const std::vector<acc_t> t = tables(a, kGateB + 1);
    map_rows<kGateB + 1>(a, t.data(), [](const V& xv, const V&, const V* k) {
      V g, xm;
      const V v = pre(xv, k, g, xm);
      return kRelu ? relu(v) : v;
    });
  }

  enum Sum { kD, kDgXh, kDg, kSum, kSumX, kSums };

  // The five sums per channel (double), kSums rows of C. A task's block is walked a vector of
  // channels at a time over kRows rows (their lines stay in L1 for the block's next vector), the
  // tables and the five accumulators in registers.
  template <bool kRelu>
  static std::vector<double> sums(const PointwiseArgs& a, const acc_t* t) {
    const int64_t N = a.N, C = a.C, blocks = (C + kCols - 1) / kCols;
    std::vector<double> total(kSums * C, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const S* x = static_cast<const S*>(a.x);
      const S* dy = static_cast<const S*>(a.dy);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kCols, c1 = std::min(C, c0 + kCols);
        for (int64_t r0 = 0; r0 < N; r0 += kRows) {
          const int64_t r1 = std::min(N, r0 + kRows);
          for (int64_t c = c0; c < c1; c += W) {
            const int64_t n = std::min<int64_t>(W, c1 - c);  // n < W: zeros beyond, whose terms are 0
            V k[kGateB + 1];
            if (n == W)
              load_tables<kGateB + 1>(k, t, C, c);
            else
              load_tables_n<kGateB + 1>(k, t, C, c, n);
            V acc[kSums];
            for (auto& v : acc) v = V(0);
            for (int64_t r = r0; r < r1; ++r) {
              const V xv = n == W ? io::load(x + r * C + c) : io::load_n(x + r * C + c, n);
              const V dv = n == W ? io::load(dy + r * C + c) : io::load_n(dy + r * C + c, n);
              V g, xm;
              const V v = pre(xv, k, g, xm);
              const V d = kRelu ? gate(dv, v) : dv;
              const V dg = d * g, xh = xm * k[kRstd], s = dg * (V(1) - g) * xh;
              acc[kD] = acc[kD] + d;
              acc[kDgXh] = at::vec::fmadd(dg, xh, acc[kDgXh]);
              acc[kDg] = acc[kDg] + dg;
              acc[kSum] = acc[kSum] + s;
              acc[kSumX] = at::vec::fmadd(s, xv, acc[kSumX]);
            }
            for (int i = 0; i < kSums; ++i) {
              acc_t lanes[W];
              acc[i].store(lanes);
              for (int64_t j = 0; j < n; ++j) total[i * C + c + j] += static_cast<double>(lanes[j]);
            }
          }
        }
      }
    });
    return total;
  }

  template <bool kRelu>
  static void backward(const PointwiseArgs& a) {
    const int64_t N = a.N, C = a.C;
    std::vector<acc_t> t = tables(a, kTables);
    const std::vector<double> s = sums<kRelu>(a, t.data());
    auto out = [](void* p) { return static_cast<acc_t*>(p); };
    for (int64_t c = 0; c < C; ++c) {
      const double w = a.weight ? static_cast<const acc_t*>(a.weight)[c] : 1.0;
      out(a.grad_bias)[c] = static_cast<acc_t>(s[kD * C + c]);
      out(a.grad_weight)[c] = static_cast<acc_t>(s[kDgXh * C + c]);
      out(a.grad_gate_bias)[c] = static_cast<acc_t>(w * s[kSum * C + c]);
      out(a.grad_gate_weight)[c] = static_cast<acc_t>(w * s[kSumX * C + c]);
      const double rstd = t[kRstd * C + c];
      t[kDx1 * C + c] = static_cast<acc_t>(w * t[kGateW * C + c]);
      t[kDx2 * C + c] = static_cast<acc_t>(w * rstd);
      t[kDx3 * C + c] = a.batch_stats ? static_cast<acc_t>(s[kDg * C + c] / N) : acc_t(0);
      t[kDx4 * C + c] = a.batch_stats ? static_cast<acc_t>(rstd * s[kDgXh * C + c] / N) : acc_t(0);
    }
    if (!a.out) return;
    map_rows<kTables>(a, t.data(), [](const V& xv, const V& dv, const V* k) {
      V g, xm;
      const V v = pre(xv, k, g, xm);
      const V dg = (kRelu ? gate(dv, v) : dv) * g;
      const V s = dg * (V(1) - g) * (xm * k[kRstd]);
      return at::vec::fmadd(k[kDx1], s, k[kDx2] * (dg - at::vec::fmadd(xm, k[kDx4], k[kDx3])));
    });
  }
};

}  // namespace

void iebn_pointwise_apply(const PointwiseArgs& a) {
  dispatch(a.dtype, [&](auto tag) {
    if (a.relu)
      PointwiseKern<decltype(tag)>::template apply<true>(a);
    else
      PointwiseKern<decltype(tag)>::template apply<false>(a);
  });
}

void iebn_pointwise_backward(const PointwiseArgs& a) {
  dispatch(a.dtype, [&](auto tag) {
    if (a.relu)
      PointwiseKern<decltype(tag)>::template backward<true>(a);
    else
      PointwiseKern<decltype(tag)>::template backward<false>(a);
  });
}

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
