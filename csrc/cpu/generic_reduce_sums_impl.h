// Backward sums (sum dy, sum dy (x - mean)) of the generic CPU kernels: the second half of the
// reductions (the CPU side of kernels/plane_reduce.cuh; work decomposition and numerics in
// generic_plan_impl.h).
#pragma once

#include "cpu/generic_plan_impl.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

// sum dy and sum dy (x - mean) of every plane, for element type S (backward_sums() below).
// kMask: dy masked by the fused ReLU, i.e. v > 0 ? dy : 0 with v = affine(x - mean, scale, shift)
// (KernTypes::affine, as affine_apply computes it); scale and shift are (N, C) like the mean.
// Without it, scale and shift are null and never read, and the code is the unmasked one.
template <class S, bool kMask>
struct SumsKern : KernTypes<S> {
  NF_CPU_KERN_TYPES(S);

  // dy, masked by the ReLU (kMask) from xm = x - mean and the plane's / channels' scale and shift
  static inline V mdy(const V& g, const V& xm, const V& s, const V& b) {
    if constexpr (kMask)
      return gate(g, affine(xm, s, b));
    else
      return g;
  }
  // p[i] where there is a mask, else 0 (p is null then)
  static inline acc_t at_(const acc_t* p, int64_t i) {
    if constexpr (kMask)
      return p[i];
    else
      return acc_t(0);
  }

  // g1 = sum dy, g2 = sum dy (x - mean) of a run: acc-type sums per chunk, added in double.
  static inline void chunk_sums(const S* dy, const S* x, int64_t n, const V& vm, const V& vs, const V& vb, acc_t& s1,
                                acc_t& s2) {
    const int64_t nv = n - n % W, tail = n % W;
    V a0(0), a1(0), a2(0), a3(0), b0(0), b1(0), b2(0), b3(0);
    // one vector at j into the accumulators a, b (each vector's temporaries die here: with four
    // vectors' dy and x - mean alive at once, 8 accumulators spill on AVX2's 16 registers)
    auto step = [&](int64_t j, V& a, V& b) {
      const V d = io::load(x + j) - vm;
      const V g = mdy(io::load(dy + j), d, vs, vb);
      a += g;
      b = at::vec::fmadd(g, d, b);
    };
    int64_t i = 0;
    for (; i + 4 * W <= nv; i += 4 * W) {
      step(i, a0, b0);
      step(i + W, a1, b1);
      step(i + 2 * W, a2, b2);
      step(i + 3 * W, a3, b3);
    }
    for (; i < nv; i += W) step(i, a0, b0);
    if (tail) {  // dy's zero lanes cancel x's
      const V d = io::load_n(x + i, tail) - vm;
      const V g = mdy(io::load_n(dy + i, tail), d, vs, vb);
      a1 += g;
      b1 = at::vec::fmadd(g, d, b1);
    }
    s1 = va::hsum((a0 + a1) + (a2 + a3));
    s2 = va::hsum((b0 + b1) + (b2 + b3));
  }

  static void run_sums(const S* dy, const S* x, int64_t n, acc_t m, acc_t s, acc_t b, double& g1, double& g2) {
    const V vm(m), vs(s), vb(b);
    g1 = g2 = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      acc_t s1, s2;
      chunk_sums(dy + c0, x + c0, std::min(kChunk, n - c0), vm, vs, vb, s1, s2);
      g1 += static_cast<double>(s1);
      g2 += static_cast<double>(s2);
    }
  }

  static void sums_contig(const S* dy, const S* x, const acc_t* mean, const acc_t* sc, const acc_t* sh, int64_t P,
                          int64_t L, acc_t* o1, acc_t* o2) {
    if (L == 1) {  // g1 = dy, g2 = dy (x - mean)
      at::parallel_for(0, P, kTask, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + W <= e; i += W) {
          const V d = io::load(x + i) - V::loadu(mean + i);
          V g = io::load(dy + i);
          if constexpr (kMask) g = mdy(g, d, V::loadu(sc + i), V::loadu(sh + i));
          g.store(o1 + i);
          (g * d).store(o2 + i);
        }
        if (i < e) {
          const int64_t n = e - i;
          const V d = io::load_n(x + i, n) - va::load_n(mean + i, n);
          V g = io::load_n(dy + i, n);
          if constexpr (kMask) g = mdy(g, d, va::load_n(sc + i, n), va::load_n(sh + i, n));
          va::store_n(o1 + i, g, n);
          va::store_n(o2 + i, g * d, n);
        }
      });
      return;
    }
    const int64_t S_ = at::divup(L, kSeg);
    if (S_ == 1) {
      at::parallel_for(0, P, std::max<int64_t>(1, kTask / L), [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          if (L <= kChunk) {
            acc_t s1, s2;
            chunk_sums(dy + p * L, x + p * L, L, V(mean[p]), V(at_(sc, p)), V(at_(sh, p)), s1, s2);
            o1[p] = s1;
            o2[p] = s2;
          } else {
            double g1, g2;
            run_sums(dy + p * L, x + p * L, L, mean[p], at_(sc, p), at_(sh, p), g1, g2);
            o1[p] = static_cast<acc_t>(g1);
            o2[p] = static_cast<acc_t>(g2);
          }
        }
      });
      return;
    }
    std::vector<double> part(P * S_ * 2);
    at::parallel_for(0, P * S_, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / S_, lo = (t % S_) * kSeg;
        run_sums(dy + p * L + lo, x + p * L + lo, std::min(kSeg, L - lo), mean[p], at_(sc, p), at_(sh, p), part[2 * t],
                 part[2 * t + 1]);
      }
    });
    for (int64_t p = 0; p < P; ++p) {
      double g1 = 0, g2 = 0;
      for (int64_t s = 0; s < S_; ++s) {
        g1 += part[2 * (p * S_ + s)];
        g2 += part[2 * (p * S_ + s) + 1];
      }
      o1[p] = static_cast<acc_t>(g1);
      o2[p] = static_cast<acc_t>(g2);
    }
  }

  // m, ms, mb: the channels' mean, scale, shift (ms, mb read with kMask only), padded to whole vectors.
  // Forced inline: next to the masked variants GCC no longer inlined the plain one into sums_cl.
  template <int B, bool Partial>
  static C10_ALWAYS_INLINE void cl_block_sums(const S* dyb, const S* xb, int64_t C, int64_t rows, const acc_t* m, const acc_t* ms,
                                   const acc_t* mb, int64_t tail, acc_t* s1, acc_t* s2) {
    constexpr int U = B >= 4 ? 1 : 4 / B;  // rows at a time, separate accumulators
    auto ld = [&](const S* p) { return Partial ? io::load_n(p, tail) : io::load(p); };
    V vm[B], vs[B], vb[B], a[U][B], b[U][B];
    for (int j = 0; j < B; ++j) {
      vm[j] = V::loadu(m + j * W);
      vs[j] = kMask ? V::loadu(ms + j * W) : V(0);
      vb[j] = kMask ? V::loadu(mb + j * W) : V(0);
      for (int u = 0; u < U; ++u) a[u][j] = b[u][j] = V(0);
    }
    auto step = [&](int u, int64_t r) {
      for (int j = 0; j < B; ++j) {
        const V d = ld(xb + r * C + j * W) - vm[j];
        const V g = mdy(ld(dyb + r * C + j * W), d, vs[j], vb[j]);
        a[u][j] += g;
        b[u][j] = at::vec::fmadd(g, d, b[u][j]);
      }
    };
    int64_t r = 0;
    for (; r + U <= rows; r += U)
      for (int u = 0; u < U; ++u) step(u, r + u);
    for (; r < rows; ++r) step(0, r);
    for (int j = 0; j < B; ++j) {
      V ta = a[0][j], tb = b[0][j];
      for (int u = 1; u < U; ++u) {
        ta += a[u][j];
        tb += b[u][j];
      }
      ta.store(s1 + j * W);
      tb.store(s2 + j * W);
    }
  }

  static inline void cl_rows_sums(const S* dyb, const S* xb, int64_t C, int64_t rows, const acc_t* m, const acc_t* ms,
                                  const acc_t* mb, acc_t* s1, acc_t* s2) {
    // the mask's scale and shift of channels c..c+W (null without kMask)
    auto vs = [&](int64_t c) { return kMask ? V::loadu(ms + c) : V(0); };
    auto vb = [&](int64_t c) { return kMask ? V::loadu(mb + c) : V(0); };
    const int64_t vC = C - C % W, tail = C % W;
    std::fill(s1, s1 + vC + (tail ? W : 0), acc_t(0));
    std::fill(s2, s2 + vC + (tail ? W : 0), acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const S* d = dyb + r * C;
      const S* xr = xb + r * C;
      int64_t c = 0;
      for (; c < vC; c += W) {
        const V xm = io::load(xr + c) - V::loadu(m + c);
        const V g = mdy(io::load(d + c), xm, vs(c), vb(c));
        (V::loadu(s1 + c) + g).store(s1 + c);
        at::vec::fmadd(g, xm, V::loadu(s2 + c)).store(s2 + c);
      }
      if (tail) {
        const V xm = io::load_n(xr + c, tail) - V::loadu(m + c);
        const V g = mdy(io::load_n(d + c, tail), xm, vs(c), vb(c));
        (V::loadu(s1 + c) + g).store(s1 + c);
        at::vec::fmadd(g, xm, V::loadu(s2 + c)).store(s2 + c);
      }
    }
  }

  static void sums_cl(const S* dy, const S* x, const acc_t* mean, const acc_t* sc, const acc_t* sh, int64_t N,
                      int64_t C, int64_t L, acc_t* o1, acc_t* o2) {
    // one pass: the chunk only bounds how many rows a float sum runs over
    const int64_t R = std::min<int64_t>(L, 32), SR = seg_rows(C, R), S_ = at::divup(L, SR);
    const int64_t vC = C - C % W, tail = C % W, Cp = C + W;
    std::vector<double> part(S_ > 1 ? N * S_ * 2 * C : 0);
    at::parallel_for(0, N * S_, std::max<int64_t>(1, kTask / (std::min(L, SR) * C)), [&](int64_t tb, int64_t te) {
      std::vector<acc_t> abuf((kMask ? 5 : 3) * Cp, acc_t(0));
      std::vector<double> dbuf(2 * C);
      acc_t *m = abuf.data(), *s1 = m + Cp, *s2 = s1 + Cp;
      acc_t *ms = kMask ? s2 + Cp : m, *mb = kMask ? s2 + 2 * Cp : m;  // the mask's scale, shift (kMask only)
      double *g1 = dbuf.data(), *g2 = g1 + C;
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / S_, s = t % S_, r0 = s * SR, r1 = std::min(L, r0 + SR);
        std::copy(mean + n * C, mean + (n + 1) * C, m);
        if constexpr (kMask) {
          std::copy(sc + n * C, sc + (n + 1) * C, ms);
          std::copy(sh + n * C, sh + (n + 1) * C, mb);
        }
        std::fill(g1, g1 + 2 * C, 0.0);
        const S* dys = dy + n * L * C;
        const S* xs = x + n * L * C;
        for (int64_t a = r0; a < r1; a += R) {
          const int64_t rows = std::min(R, r1 - a);
          if (C >= kWideC) {
            cl_rows_sums(dys + a * C, xs + a * C, C, rows, m, ms, mb, s1, s2);
          } else {
            int64_t c = 0;
            const S *dc = dys + a * C, *xc = xs + a * C;
            for (; c + 4 * W <= vC; c += 4 * W)
              cl_block_sums<4, false>(dc + c, xc + c, C, rows, m + c, ms + c, mb + c, 0, s1 + c, s2 + c);
            for (; c < vC; c += W)
              cl_block_sums<1, false>(dc + c, xc + c, C, rows, m + c, ms + c, mb + c, 0, s1 + c, s2 + c);
            if (tail) cl_block_sums<1, true>(dc + c, xc + c, C, rows, m + c, ms + c, mb + c, tail, s1 + c, s2 + c);
          }
          for (int64_t k = 0; k < C; ++k) {
            g1[k] += static_cast<double>(s1[k]);
            g2[k] += static_cast<double>(s2[k]);
          }
        }
        if (S_ == 1) {
          for (int64_t k = 0; k < C; ++k) {
            o1[n * C + k] = static_cast<acc_t>(g1[k]);
            o2[n * C + k] = static_cast<acc_t>(g2[k]);
          }
        } else {
          std::copy(g1, g1 + 2 * C, part.begin() + t * 2 * C);
        }
      }
    });
    if (S_ == 1) return;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < C; ++k) {
        double g1 = 0, g2 = 0;
        for (int64_t s = 0; s < S_; ++s) {
          const double* ps = part.data() + (n * S_ + s) * 2 * C;
          g1 += ps[k];
          g2 += ps[C + k];
        }
        o1[n * C + k] = static_cast<acc_t>(g1);
        o2[n * C + k] = static_cast<acc_t>(g2);
      }
    }
  }
};

// The masked variant (the fused ReLU's mask given) is a separate instantiation, chosen once per call.
template <bool kMask>
void run_sums(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = SumsKern<S, kMask>;
    using acc_t = typename K::acc_t;
    const auto& sh = g.shape;
    const S* dy = static_cast<const S*>(g.dy);
    const S* x = static_cast<const S*>(g.x);
    const acc_t* mean = static_cast<const acc_t*>(g.mean);
    const acc_t* ms = static_cast<const acc_t*>(g.mask_scale);
    const acc_t* mb = static_cast<const acc_t*>(g.mask_shift);
    acc_t* o1 = static_cast<acc_t*>(g.sum_dy);
    acc_t* o2 = static_cast<acc_t*>(g.sum_dy_xmu);
    if (sh.layout == nf::Layout::Contiguous || sh.L == 1)
      K::sums_contig(dy, x, mean, ms, mb, sh.N * sh.C, sh.L, o1, o2);
    else
      K::sums_cl(dy, x, mean, ms, mb, sh.N, sh.C, sh.L, o1, o2);
  });
}

}  // namespace

void backward_sums(const GenericArgs& g) {
  if (g.mask_scale)
    run_sums<true>(g);
  else
    run_sums<false>(g);
}

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
