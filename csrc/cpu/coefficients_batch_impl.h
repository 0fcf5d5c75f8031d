// Bodies of the BIN / IEBN coefficient kernels (coefficients_kernels.h), compiled once per build:
// include after the torch headers, with NF_CPU_NS defined.
//
// The formulas are those of common/coefficients.h (BinMath, IebnMath, batch statistics), written
// here on at::vec vectors of W channels. The unit of work is a tile of up to kTile channels (256
// floats / 128 doubles; the last vector of C masked): each pass streams the tile's part of the
// (N, C) rows in order, n = 0..N-1 (row by row: sequential memory, none of the cache-set
// conflicts that walking a column down rows of a power-of-two stride runs into), with the tile's
// per-channel state (batch statistics, parameters, the channel sums) in small arrays that stay
// in L1. A channel's sums run over n in order whatever the thread count, so results do not depend
// on it. Arithmetic in the statistics' type (float for float32 statistics, double for float64);
// float32 results stay within the tests' 1e-6 of the float64 reference.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/coefficients_params.h"
#include "cpu/vec_io.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace batch_detail {

// Loads / stores of a whole vector of channels, or of its first n lanes (the last vector of C).
template <class T>
struct Full {
  using V = Vectorized<T>;
  using U = V;
  V ld(const T* p) const { return V::loadu(p); }
  void st(T* p, const V& v) const { v.store(p); }
};
template <class T>
struct Part {
  using V = Vectorized<T>;
  using U = V;
  int64_t n;
  V ld(const T* p) const { return VA<T>::load_n(p, n); }
  void st(T* p, const V& v) const { VA<T>::store_n(p, v, n); }
};
// One channel at a time, in scalars.
template <class T>
struct Scal {
  using U = T;
  T ld(const T* p) const { return *p; }
  void st(T* p, T v) const { *p = v; }
};

template <class T>
struct BatchKern {
  using V = Vectorized<T>;
  using P = nf::BatchCoefParams<T>;
  static constexpr int64_t W = V::size();
  // Channels per tile: 256 floats / 128 doubles (32 vectors); a tile's per-channel state (a few
  // arrays of 32 vectors) stays in L1 while the passes stream its rows.
  static constexpr int64_t kVecs = 32, kTile = kVecs * W;

  static V rsqrt(const V& v) { return V(T(1)) / v.sqrt(); }
  static V sigmoid(const V& z) { return V(T(1)) / (V(T(1)) + z.neg().exp()); }
  // nf::coef::finite_or_zero on a vector: a non-finite shift would turn Inf into NaN
  static V finite_or_zero(const V& v) { return V::blendv(V(T(0)), v, (v - v) == V(T(0))); }

  // body(v, io) for the vectors of a tile: io = Full for the whole ones, Part for a last partial one.
  template <class F>
  static inline void vectors(int64_t nfull, int64_t last, const F& body) {
    for (int64_t v = 0; v < nfull; ++v) body(v, Full<T>{});
    if (last) body(nfull, Part<T>{last});
  }

  // Runs f(c0, nfull, last) for every tile of channels [c0, c0 + nfull W + last); each channel is
  // done by one task, its sums over n = 0..N-1 in order, so results do not depend on the number
  // of threads.
  template <class F>
  static void for_tiles(int64_t N, int64_t C, const F& f) {
    const int64_t tiles = at::divup(C, kTile);
    at::parallel_for(0, tiles, std::max<int64_t>(1, 16384 / (kTile * std::max<int64_t>(N, 1))), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t c0 = t * kTile, w = std::min(kTile, C - c0);
        f(c0, w / W, w % W);
      }
    });
  }

  // mu_B (as shift + mean relative to it) and r_B of a tile, from two passes over the batch
  // (means relative to the first plane's, then the centred sum), or the running statistics;
  // updates the running ones when asked.
  struct Stats {
    V shift[kVecs], mrel[kVecs], r[kVecs];
  };
  static void stats(const P& p, int64_t c0, int64_t nfull, int64_t last, bool update, Stats& s) {
    const T eps = static_cast<T>(p.eps);
    const int64_t N = p.N, C = p.C;
    const T* mean = p.mean + c0;
    const T* m2 = p.m2 + c0;
    T* run_mean = p.running_mean ? p.running_mean + c0 : nullptr;
    T* run_var = p.running_var ? p.running_var + c0 : nullptr;
    if (!p.use_batch()) {
      vectors(nfull, last, [&](int64_t v, auto io) {
        s.shift[v] = io.ld(run_mean + v * W);
        s.mrel[v] = V(T(0));
        s.r[v] = rsqrt(io.ld(run_var + v * W) + V(eps));
      });
      return;
    }
    const T L = static_cast<T>(p.L), count = static_cast<T>(N), mom = static_cast<T>(p.momentum);
    V q[kVecs], d2[kVecs];
    vectors(nfull, last, [&](int64_t v, auto io) {
      s.shift[v] = finite_or_zero(io.ld(mean + v * W));
      s.mrel[v] = q[v] = d2[v] = V(T(0));
    });
    for (int64_t i = 0; i < N; ++i) {
      const T* row = mean + i * C;
      vectors(nfull, last, [&](int64_t v, auto io) { s.mrel[v] += io.ld(row + v * W) - s.shift[v]; });
    }
    vectors(nfull, last, [&](int64_t v, auto) { s.mrel[v] = s.mrel[v] / V(count); });
    for (int64_t i = 0; i < N; ++i) {
      const T* row = mean + i * C;
      const T* qrow = m2 + i * C;
      vectors(nfull, last, [&](int64_t v, auto io) {
        const V e = (io.ld(row + v * W) - s.shift[v]) - s.mrel[v];
        q[v] += io.ld(qrow + v * W);
        d2[v] += e * e;
      });
    }
    vectors(nfull, last, [&](int64_t v, auto io) {
      const V q_total = q[v] + V(L) * d2[v];
      if (update) {  // nn.BatchNorm's exponential average, unbiased variance
        io.st(run_mean + v * W, io.ld(run_mean + v * W) * V(T(1) - mom) + V(mom) * (s.shift[v] + s.mrel[v]));
        io.st(run_var + v * W, io.ld(run_var + v * W) * V(T(1) - mom) + V(mom) * (q_total / V(count * L - T(1))));
      }
      s.r[v] = rsqrt(q_total / V(count * L) + V(eps));
    });
  }

  // ---- BIN --------------------------------------------------------------------------------------
  //   scale = gamma (rho r_B + (1 - rho) r_I)        shift = beta + gamma rho r_B (m - mu_B)
  // r_I = (q / L + eps)^-1/2, 0 for one-element planes (kL1: no square root at all).

  static void bin_forward(const P& p) { p.L == 1 ? bin_forward_tiles<true>(p) : bin_forward_tiles<false>(p); }

  template <bool kL1>
  static void bin_forward_tiles(const P& p) {
    const T inv_L = T(1) / static_cast<T>(p.L), eps = static_cast<T>(p.eps);
    for_tiles(p.N, p.C, [&](int64_t c0, int64_t nfull, int64_t last) {
      const int64_t N = p.N, C = p.C;
      const T *mean = p.mean + c0, *m2 = p.m2 + c0, *gate_p = p.gate + c0;
      const T* weight = p.weight ? p.weight + c0 : nullptr;
      const T* bias = p.bias ? p.bias + c0 : nullptr;
      T *scale = p.scale + c0, *shift = p.shift + c0;
      Stats s;
      stats(p, c0, nfull, last, p.update_running(), s);
      // scale = gamma mix, shift = beta + gg (m - mu_B): mix = a (+ om r_I), gg = gamma rho r_B
      V gamma[kVecs], beta[kVecs], a[kVecs], om[kVecs], gg[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        const V gate = io.ld(gate_p + v * W);
        gamma[v] = weight ? io.ld(weight + v * W) : V(T(1));
        beta[v] = bias ? io.ld(bias + v * W) : V(T(0));
        a[v] = gate * s.r[v];
        om[v] = V(T(1)) - gate;
        gg[v] = (gamma[v] * gate) * s.r[v];
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          V mix = a[v];
          if constexpr (!kL1) mix = a[v] + om[v] * rsqrt(io.ld(m2 + o + v * W) * V(inv_L) + V(eps));
          io.st(scale + o + v * W, gamma[v] * mix);
          io.st(shift + o + v * W, beta[v] + gg[v] * ((io.ld(mean + o + v * W) - s.shift[v]) - s.mrel[v]));
        });
      }
    });
  }

  // Per channel four sums over the batch (gamma and rho factored out):
  //   s0 = sum g1                          -> grad_bias, grad mu_B
  //   s1 = sum g2 mix + g1 rho r_B dev     -> grad_weight
  //   s2 = sum g2 (r_B - r_I) + g1 r_B dev -> grad_gate / gamma
  //   s3 = sum g2 + g1 dev                 -> grad r_B / (gamma rho)
  // then per plane c_dy = scale, c_x = 2 grad_q, c_0 = grad_m / L.
  static void bin_backward(const P& p) { p.L == 1 ? bin_backward_tiles<true>(p) : bin_backward_tiles<false>(p); }

  template <bool kL1>
  static void bin_backward_tiles(const P& p) {
    const T L = static_cast<T>(p.L), inv_L = T(1) / L, eps = static_cast<T>(p.eps), count = static_cast<T>(p.N);
    const bool batch = p.use_batch();
    for_tiles(p.N, p.C, [&](int64_t c0, int64_t nfull, int64_t last) {
      const int64_t N = p.N, C = p.C, K = (nfull + (last > 0)) * W;
      const T *mean = p.mean + c0, *m2 = p.m2 + c0, *g1p = p.sum_dy + c0, *g2p = p.sum_dy_xmu + c0;
      const T* gate_p = p.gate + c0;
      const T* weight = p.weight ? p.weight + c0 : nullptr;
      T *c_dy = p.c_dy + c0, *c_x = p.c_x + c0, *c_0 = p.c_0 + c0;
      T *gbias = p.grad_bias + c0, *gweight = p.grad_weight + c0, *ggate = p.grad_gate + c0;
      // the tile's r_I, kept from the sums pass for the output pass
      const Scratch<T> pv_buf(kL1 ? 0 : N * K);
      T* pv = pv_buf.data();
      Stats s;
      stats(p, c0, nfull, last, false, s);
      V gate[kVecs], gamma[kVecs], om[kVecs], a[kVecs], s0[kVecs], s1[kVecs], s2[kVecs], s3[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        gate[v] = io.ld(gate_p + v * W);
        gamma[v] = weight ? io.ld(weight + v * W) : V(T(1));
        om[v] = V(T(1)) - gate[v];
        a[v] = gate[v] * s.r[v];
        s0[v] = s1[v] = s2[v] = s3[v] = V(T(0));
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          const int64_t k = o + v * W;
          const V g1 = io.ld(g1p + k), g2 = io.ld(g2p + k), rb = s.r[v];
          const V dev = (io.ld(mean + k) - s.shift[v]) - s.mrel[v];
          V r_i(T(0)), mix = a[v];
          if constexpr (!kL1) {
            r_i = rsqrt(io.ld(m2 + k) * V(inv_L) + V(eps));
            r_i.store(pv + i * K + v * W);
            mix = a[v] + om[v] * r_i;
          }
          s0[v] += g1;
          s1[v] += g2 * mix + g1 * a[v] * dev;
          s2[v] += g2 * (rb - r_i) + g1 * rb * dev;
          s3[v] += g2 + g1 * dev;
        });
      }
      // gradients reaching mu_B and Q_B (zero in eval mode): grad_m += gmu + 2 L gq dev, grad_q += gq
      V gmu[kVecs], gq2l[kVecs], inst[kVecs], cx[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        io.st(gbias + v * W, s0[v]);
        io.st(gweight + v * W, s1[v]);
        io.st(ggate + v * W, gamma[v] * s2[v]);
        V gq(T(0));
        gmu[v] = V(T(0));
        if (batch) {
          const V rb = s.r[v];
          const V grad_var = gamma[v] * gate[v] * s3[v] * V(T(-0.5)) * rb * rb * rb;
          gmu[v] = (gamma[v].neg() * gate[v] * rb * s0[v]) / V(count);
          gq = grad_var / V(count * L);
        }
        gq2l[v] = V(T(2) * L) * gq;
        cx[v] = gq;  // grad_q without the instance part
        inst[v] = gamma[v] * om[v];
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          const int64_t k = o + v * W;
          const V dev = (io.ld(mean + k) - s.shift[v]) - s.mrel[v];
          if constexpr (kL1) {
            io.st(c_dy + k, gamma[v] * a[v]);
            io.st(c_x + k, V(T(2)) * cx[v]);
            io.st(c_0 + k, (gmu[v] + gq2l[v] * dev) * V(inv_L));
          } else {
            const V g1 = io.ld(g1p + k), g2 = io.ld(g2p + k), r_i = V::loadu(pv + i * K + v * W);
            const V grad_q = g2 * inst[v] * V(T(-0.5)) * r_i * r_i * r_i * V(inv_L) + cx[v];
            const V grad_m = g1.neg() * inst[v] * r_i + gmu[v] + gq2l[v] * dev;
            io.st(c_dy + k, gamma[v] * (a[v] + om[v] * r_i));
            io.st(c_x + k, V(T(2)) * grad_q);
            io.st(c_0 + k, grad_m * V(inv_L));
          }
        });
      }
    });
  }

  // ---- IEBN -------------------------------------------------------------------------------------
  //   delta = sigmoid(m gate_weight + gate_bias)
  //   scale = gamma delta r_B        shift = beta + scale (m - mu_B)

  static void iebn_forward(const P& p) {
    for_tiles(p.N, p.C, [&](int64_t c0, int64_t nfull, int64_t last) {
      const int64_t N = p.N, C = p.C;
      const T *mean = p.mean + c0, *gw_p = p.gate + c0, *gb_p = p.gate_bias + c0;
      const T* weight = p.weight ? p.weight + c0 : nullptr;
      const T* bias = p.bias ? p.bias + c0 : nullptr;
      T *scale = p.scale + c0, *shift = p.shift + c0;
      Stats s;
      stats(p, c0, nfull, last, p.update_running(), s);
      V gw[kVecs], gb[kVecs], gamma[kVecs], beta[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        gw[v] = io.ld(gw_p + v * W);
        gb[v] = io.ld(gb_p + v * W);
        gamma[v] = weight ? io.ld(weight + v * W) : V(T(1));
        beta[v] = bias ? io.ld(bias + v * W) : V(T(0));
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          const int64_t k = o + v * W;
          const V m = io.ld(mean + k);
          const V sc = gamma[v] * sigmoid(m * gw[v] + gb[v]) * s.r[v];
          io.st(scale + k, sc);
          io.st(shift + k, beta[v] + sc * ((m - s.shift[v]) - s.mrel[v]));
        });
      }
    });
  }

  // gs = g2 + g1 dev (the gradient of scale, directly and through the shift), dd = delta':
  //   s0 = sum g1 -> grad_bias           s1 = sum gs delta -> grad_weight / r_B, grad r_B / gamma
  //   s2 = sum gs dd -> grad_gate_bias   s3 = sum gs dd m -> grad_gate_weight (both / (gamma r_B))
  //   s4 = sum g1 delta -> grad mu_B = -gamma r_B s4
  static void iebn_backward(const P& p) {
    const T L = static_cast<T>(p.L), inv_L = T(1) / L, count = static_cast<T>(p.N);
    const bool batch = p.use_batch();
    for_tiles(p.N, p.C, [&](int64_t c0, int64_t nfull, int64_t last) {
      const int64_t N = p.N, C = p.C, K = (nfull + (last > 0)) * W;
      const T *mean = p.mean + c0, *g1p = p.sum_dy + c0, *g2p = p.sum_dy_xmu + c0;
      const T *gw_p = p.gate + c0, *gb_p = p.gate_bias + c0;
      const T* weight = p.weight ? p.weight + c0 : nullptr;
      T *c_dy = p.c_dy + c0, *c_x = p.c_x + c0, *c_0 = p.c_0 + c0;
      T *gbias = p.grad_bias + c0, *gweight = p.grad_weight + c0, *ggb = p.grad_gate_bias + c0,
        *ggw = p.grad_gate + c0;
      const Scratch<T> pv_buf(N * K);  // the tile's delta, kept from the sums pass for the output pass
      T* pv = pv_buf.data();
      Stats s;
      stats(p, c0, nfull, last, false, s);
      const V one(T(1));
      V gw[kVecs], gb[kVecs], gamma[kVecs], s0[kVecs], s1[kVecs], s2[kVecs], s3[kVecs], s4[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        gw[v] = io.ld(gw_p + v * W);
        gb[v] = io.ld(gb_p + v * W);
        gamma[v] = weight ? io.ld(weight + v * W) : V(T(1));
        s0[v] = s1[v] = s2[v] = s3[v] = s4[v] = V(T(0));
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          const int64_t k = o + v * W;
          const V m = io.ld(mean + k), g1 = io.ld(g1p + k), g2 = io.ld(g2p + k);
          const V d = sigmoid(m * gw[v] + gb[v]);
          d.store(pv + i * K + v * W);
          const V gs = g2 + g1 * ((m - s.shift[v]) - s.mrel[v]), gdd = gs * d * (one - d);
          s0[v] += g1;
          s1[v] += gs * d;
          s2[v] += gdd;
          s3[v] += gdd * m;
          s4[v] += g1 * d;
        });
      }
      V gmu[kVecs], gq[kVecs], gr[kVecs];
      vectors(nfull, last, [&](int64_t v, auto io) {
        const V r = s.r[v];
        gr[v] = gamma[v] * r;
        io.st(gbias + v * W, s0[v]);
        io.st(gweight + v * W, r * s1[v]);
        io.st(ggb + v * W, gr[v] * s2[v]);
        io.st(ggw + v * W, gr[v] * s3[v]);
        gmu[v] = gq[v] = V(T(0));
        if (batch) {
          const V grad_var = gamma[v] * s1[v] * V(T(-0.5)) * r * r * r;
          gmu[v] = (gamma[v].neg() * r * s4[v]) / V(count);
          gq[v] = grad_var / V(count * L);
        }
      });
      for (int64_t i = 0; i < N; ++i) {
        const int64_t o = i * C;
        vectors(nfull, last, [&](int64_t v, auto io) {
          const int64_t k = o + v * W;
          const V m = io.ld(mean + k), g1 = io.ld(g1p + k), g2 = io.ld(g2p + k);
          const V d = V::loadu(pv + i * K + v * W), dev = (m - s.shift[v]) - s.mrel[v];
          const V grad_logit = (g2 + g1 * dev) * gamma[v] * s.r[v] * d * (one - d);
          io.st(c_dy + k, gamma[v] * d * s.r[v]);
          io.st(c_x + k, V(T(2)) * gq[v]);
          io.st(c_0 + k, (grad_logit * gw[v] + gmu[v] + V(T(2) * L) * gq[v] * dev) * V(inv_L));
        });
      }
    });
  }
};

}  // namespace batch_detail

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
