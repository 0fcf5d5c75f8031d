// Moments (mean, m2) of the generic CPU kernels: the first half of the reductions (the CPU side of
// kernels/plane_reduce.cuh; work decomposition and numerics in generic_plan_impl.h).
#pragma once

#include "cpu/generic_plan_impl.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

// mean and m2 of every plane, for element type S (the entry point moments() below).
template <class S>
struct MomentsKern : KernTypes<S> {
  NF_CPU_KERN_TYPES(S);

  // The shift of plane moments: the plane's first element, 0 where it is +-Inf or NaN (a plane
  // starting with -Inf would give x - shift = NaN for every element, and a NaN mean where
  // nn.BatchNorm reports -Inf).
  static inline acc_t plane_shift(const S* first) { return nf::coef::finite_or_zero(io::get(first)); }

  // Chan's merge of a channels-last chunk's (cm, q) per channel, `rows` rows after `count`, into
  // the running (md, qd) in double: weight wb = rows / (count + rows), f = count wb. Four channels
  // at a time with merged_mean's test as a lane mask, the rest one by one: the same arithmetic
  // either way. (Scalar, with merged_mean's branch, it was ~40% of the instructions of a
  // (32, 256, 14, 14) channels-last call: one merge per channel every 16 rows.)
  using VD = Vectorized<double>;
  static inline VD load_d(const acc_t* p) {  // four acc-type values as doubles
    if constexpr (std::is_same_v<acc_t, double>) {
      return VD::loadu(p);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      return _mm256_cvtps_pd(_mm_loadu_ps(p));
#else
      double t[VD::size()];
      for (int64_t k = 0; k < VD::size(); ++k) t[k] = static_cast<double>(p[k]);
      return VD::loadu(t);
#endif
    }
  }
  static inline void chunk_merge(const acc_t* cm, const acc_t* q, int64_t C, double wb, double f, double* md,
                                 double* qd) {
    const VD vwb(wb), vf(f), zero(0.0);
    int64_t k = 0;
    for (; k + VD::size() <= C; k += VD::size()) {
      const VD c = load_d(cm + k), m = VD::loadu(md + k), delta = c - m;
      VD::blendv(m + c, at::vec::fmadd(delta, vwb, m), (delta - delta) == zero).store(md + k);  // Inf-safe
      (VD::loadu(qd + k) + at::vec::fmadd(delta * delta, vf, load_d(q + k))).store(qd + k);
    }
    for (; k < C; ++k) {
      const double delta = static_cast<double>(cm[k]) - md[k];
      md[k] = nf::coef::merged_mean(md[k], static_cast<double>(cm[k]), delta, wb);
      qd[k] += static_cast<double>(q[k]) + delta * delta * f;
    }
  }

  // Exact two-pass mean (relative to shift) and m2 of p[0, n), 1 <= n <= kChunk.
  static inline void two_pass(const S* p, int64_t n, acc_t shift, acc_t inv_n, acc_t& cm, acc_t& q) {
    const V vs(shift);
    const int64_t nv = n - n % W, tail = n % W;
    V a0(0), a1(0), a2(0), a3(0);
    int64_t i = 0;
    for (; i + 4 * W <= nv; i += 4 * W) {
      a0 += io::load(p + i) - vs;
      a1 += io::load(p + i + W) - vs;
      a2 += io::load(p + i + 2 * W) - vs;
      a3 += io::load(p + i + 3 * W) - vs;
    }
    for (; i < nv; i += W) a0 += io::load(p + i) - vs;
    const V tmask = tail ? va::mask(tail) : V(0);
    if (tail) a1 += (io::load_n(p + i, tail) - vs) & tmask;
    cm = va::hsum((a0 + a1) + (a2 + a3)) * inv_n;
    const V vc(cm);
    a0 = a1 = a2 = a3 = V(0);
    for (i = 0; i + 4 * W <= nv; i += 4 * W) {
      const V d0 = (io::load(p + i) - vs) - vc, d1 = (io::load(p + i + W) - vs) - vc;
      const V d2 = (io::load(p + i + 2 * W) - vs) - vc, d3 = (io::load(p + i + 3 * W) - vs) - vc;
      a0 = at::vec::fmadd(d0, d0, a0);
      a1 = at::vec::fmadd(d1, d1, a1);
      a2 = at::vec::fmadd(d2, d2, a2);
      a3 = at::vec::fmadd(d3, d3, a3);
    }
    for (; i < nv; i += W) {
      const V d = (io::load(p + i) - vs) - vc;
      a0 = at::vec::fmadd(d, d, a0);
    }
    if (tail) {
      const V d = ((io::load_n(p + i, tail) - vs) - vc) & tmask;
      a1 = at::vec::fmadd(d, d, a1);
    }
    q = va::hsum((a0 + a1) + (a2 + a3));
  }

  // Short planes (L <= kSmall), W at a time: the exact two-pass of two_pass() for each of the W
  // planes, with the per-plane horizontal sums done together (hsum_lanes) and the results
  // written as vectors. x points at the first of the W planes.
  static constexpr int64_t kSmall = 256;
  static inline void moments_w_planes(const S* x, int64_t L, acc_t inv_L, const V& tmask, acc_t* mean, acc_t* m2) {
    const int64_t nv = L - L % W, tail = L % W;
    acc_t sh[W];
    for (int64_t j = 0; j < W; ++j) sh[j] = plane_shift(x + j * L);
    V a[W];
    for (int64_t j = 0; j < W; ++j) {
      const S* p = x + j * L;
      const V vs(sh[j]);
      V a0(0), a1(0);
      int64_t i = 0;
      for (; i + 2 * W <= nv; i += 2 * W) {
        a0 += io::load(p + i) - vs;
        a1 += io::load(p + i + W) - vs;
      }
      if (i < nv) a0 += io::load(p + i) - vs, i += W;
      if (tail) a1 += (io::load_n(p + i, tail) - vs) & tmask;
      a[j] = a0 + a1;
    }
    const V cm = va::hsum_lanes(a) * V(inv_L);
    acc_t c[W];
    cm.store(c);
    for (int64_t j = 0; j < W; ++j) {
      const S* p = x + j * L;
      const V vs(sh[j]), vc(c[j]);
      V a0(0), a1(0);
      int64_t i = 0;
      for (; i + 2 * W <= nv; i += 2 * W) {
        const V d0 = (io::load(p + i) - vs) - vc, d1 = (io::load(p + i + W) - vs) - vc;
        a0 = at::vec::fmadd(d0, d0, a0);
        a1 = at::vec::fmadd(d1, d1, a1);
      }
      if (i < nv) {
        const V d = (io::load(p + i) - vs) - vc;
        a0 = at::vec::fmadd(d, d, a0);
        i += W;
      }
      if (tail) {
        const V d = ((io::load_n(p + i, tail) - vs) - vc) & tmask;
        a1 = at::vec::fmadd(d, d, a1);
      }
      a[j] = a0 + a1;
    }
    // shift + cm: both in the acc type, their sum rounded once (as in double, then rounded)
    (V::loadu(sh) + cm).store(mean);
    va::hsum_lanes(a).store(m2);
  }

  // Moments of a run p[0, n) (a plane or a segment of one), chunk by chunk.
  static Mom run_moments(const S* p, int64_t n, acc_t shift) {
    acc_t cm, q;
    if (n <= kChunk) {
      two_pass(p, n, shift, acc_t(1) / static_cast<acc_t>(n), cm, q);
      return Mom{static_cast<double>(n), static_cast<double>(cm), static_cast<double>(q)};
    }
    Mom total;
    const acc_t inv_full = acc_t(1) / static_cast<acc_t>(kChunk);
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t len = std::min(kChunk, n - c0);
      two_pass(p + c0, len, shift, len == kChunk ? inv_full : acc_t(1) / static_cast<acc_t>(len), cm, q);
      chan_merge(total, Mom{static_cast<double>(len), static_cast<double>(cm), static_cast<double>(q)});
    }
    return total;
  }

  static void moments_contig(const S* x, int64_t P, int64_t L, acc_t* mean, acc_t* m2) {
    if (L == 1) {  // mean = x, m2 = 0
      at::parallel_for(0, P, kTask, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + W <= e; i += W) {
          io::load(x + i).store(mean + i);
          V(0).store(m2 + i);
        }
        if (i < e) {
          va::store_n(mean + i, io::load_n(x + i, e - i), e - i);
          va::store_n(m2 + i, V(0), e - i);
        }
      });
      return;
    }
    const int64_t S_ = at::divup(L, kSeg);
    if (S_ == 1) {
      const acc_t inv_L = acc_t(1) / static_cast<acc_t>(L);
      const V tmask = L % W ? va::mask(L % W) : V(0);
      if (L <= kSmall) {  // groups of W planes (fixed by the shape), the last one plane by plane
        at::parallel_for(0, at::divup(P, W), std::max<int64_t>(1, kTask / (W * L)), [&](int64_t b, int64_t e) {
          for (int64_t g = b; g < e; ++g) {
            const int64_t p0 = g * W;
            if (p0 + W <= P) {
              moments_w_planes(x + p0 * L, L, inv_L, tmask, mean + p0, m2 + p0);
              continue;
            }
            for (int64_t p = p0; p < P; ++p) {
              acc_t cm, q;
              const acc_t shift = plane_shift(x + p * L);
              two_pass(x + p * L, L, shift, inv_L, cm, q);
              mean[p] = static_cast<acc_t>(static_cast<double>(shift) + static_cast<double>(cm));
              m2[p] = q;
            }
          }
        });
        return;
      }
      at::parallel_for(0, P, std::max<int64_t>(1, kTask / L), [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          const S* plane = x + p * L;
          const acc_t shift = plane_shift(plane);
          if (L <= kChunk) {
            acc_t cm, q;
            two_pass(plane, L, shift, inv_L, cm, q);
            mean[p] = static_cast<acc_t>(static_cast<double>(shift) + static_cast<double>(cm));
            m2[p] = q;
          } else {
            const Mom m = run_moments(plane, L, shift);
            mean[p] = static_cast<acc_t>(static_cast<double>(shift) + m.mean);
            m2[p] = static_cast<acc_t>(m.m2);
          }
        }
      });
      return;
    }
    std::vector<Mom> part(P * S_);
    at::parallel_for(0, P * S_, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / S_, lo = (t % S_) * kSeg;
        const S* plane = x + p * L;
        part[t] = run_moments(plane + lo, std::min(kSeg, L - lo), plane_shift(plane));
      }
    });
    at::parallel_for(0, P, 1024, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        Mom m;
        for (int64_t s = 0; s < S_; ++s) chan_merge(m, part[p * S_ + s]);
        mean[p] = static_cast<acc_t>(static_cast<double>(plane_shift(x + p * L)) + m.mean);
        m2[p] = static_cast<acc_t>(m.m2);
      }
    });
  }

  // One column block of B vectors (Partial: a single vector of `tail` < W channels, loaded
  // masked) of a chunk of `rows` rows: exact two-pass mean / m2 per channel, relative to shift.
  // cm / q / shift are padded buffers (W extra lanes).
  template <int B, bool Partial>
  static inline void cl_block_moments(const S* base, int64_t C, int64_t rows, const acc_t* shift, acc_t inv_r,
                                      int64_t tail, acc_t* cm, acc_t* q) {
    // U rows at a time with separate accumulators (B U >= 4 independent chains), summed in a
    // fixed order at the end
    constexpr int U = B >= 4 ? 1 : 4 / B;
    auto ld = [&](const S* p) { return Partial ? io::load_n(p, tail) : io::load(p); };
    V vs[B], acc[U][B];
    for (int j = 0; j < B; ++j) {
      vs[j] = V::loadu(shift + j * W);
      for (int u = 0; u < U; ++u) acc[u][j] = V(0);
    }
    int64_t r = 0;
    for (; r + U <= rows; r += U)
      for (int u = 0; u < U; ++u)
        for (int j = 0; j < B; ++j) acc[u][j] += ld(base + (r + u) * C + j * W) - vs[j];
    for (; r < rows; ++r)
      for (int j = 0; j < B; ++j) acc[0][j] += ld(base + r * C + j * W) - vs[j];
    const V vinv(inv_r);
    V vc[B];
    for (int j = 0; j < B; ++j) {
      V t = acc[0][j];
      for (int u = 1; u < U; ++u) t += acc[u][j];
      vc[j] = t * vinv;
      for (int u = 0; u < U; ++u) acc[u][j] = V(0);
    }
    for (r = 0; r + U <= rows; r += U)
      for (int u = 0; u < U; ++u)
        for (int j = 0; j < B; ++j) {
          const V d = (ld(base + (r + u) * C + j * W) - vs[j]) - vc[j];
          acc[u][j] = at::vec::fmadd(d, d, acc[u][j]);
        }
    for (; r < rows; ++r)
      for (int j = 0; j < B; ++j) {
        const V d = (ld(base + r * C + j * W) - vs[j]) - vc[j];
        acc[0][j] = at::vec::fmadd(d, d, acc[0][j]);
      }
    for (int j = 0; j < B; ++j) {
      V t = acc[0][j];
      for (int u = 1; u < U; ++u) t += acc[u][j];
      vc[j].store(cm + j * W);
      t.store(q + j * W);
    }
  }

  // Wide rows (C >= kWideMoments, see generic_plan_impl.h): row by row, accumulators in L1 arrays.
  static inline void cl_rows_moments(const S* base, int64_t C, int64_t rows, const acc_t* shift, acc_t inv_r,
                                     acc_t* cm, acc_t* q) {
    const int64_t vC = C - C % W, tail = C % W;
    std::fill(cm, cm + vC + (tail ? W : 0), acc_t(0));
    std::fill(q, q + vC + (tail ? W : 0), acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const S* row = base + r * C;
      int64_t c = 0;
      for (; c < vC; c += W) (V::loadu(cm + c) + (io::load(row + c) - V::loadu(shift + c))).store(cm + c);
      if (tail) (V::loadu(cm + c) + (io::load_n(row + c, tail) - V::loadu(shift + c))).store(cm + c);
    }
    const V vinv(inv_r);
    for (int64_t c = 0; c < vC + (tail ? W : 0); c += W) (V::loadu(cm + c) * vinv).store(cm + c);
    for (int64_t r = 0; r < rows; ++r) {
      const S* row = base + r * C;
      int64_t c = 0;
      for (; c < vC; c += W) {
        const V d = (io::load(row + c) - V::loadu(shift + c)) - V::loadu(cm + c);
        at::vec::fmadd(d, d, V::loadu(q + c)).store(q + c);
      }
      if (tail) {
        const V d = (io::load_n(row + c, tail) - V::loadu(shift + c)) - V::loadu(cm + c);
        at::vec::fmadd(d, d, V::loadu(q + c)).store(q + c);
      }
    }
  }

  static void moments_cl(const S* x, int64_t N, int64_t C, int64_t L, acc_t* mean, acc_t* m2) {
    // at least 16 rows a chunk: the Chan merge (per channel, in double) amortised over 16 rows
    const int64_t R = chunk_rows(C, L, 16, 256), SR = seg_rows(C, R), S_ = at::divup(L, SR);
    const int64_t vC = C - C % W, tail = C % W, Cp = C + W;
    // partial moments per (sample, segment): counts implied by the segment, mean / m2 per channel
    std::vector<double> part(S_ > 1 ? N * S_ * 2 * C : 0);
    at::parallel_for(0, N * S_, std::max<int64_t>(1, kTask / (std::min(L, SR) * C)), [&](int64_t tb, int64_t te) {
      std::vector<acc_t> abuf(3 * Cp, acc_t(0));
      std::vector<double> dbuf(2 * C);
      acc_t *shift = abuf.data(), *cm = shift + Cp, *q = cm + Cp;
      double *md = dbuf.data(), *qd = md + C;
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / S_, s = t % S_, r0 = s * SR, r1 = std::min(L, r0 + SR);
        const S* xs = x + n * L * C;
        for (int64_t c = 0; c < C; ++c) shift[c] = plane_shift(xs + c);
        double count = 0;
        for (int64_t a = r0; a < r1; a += R) {
          const int64_t rows = std::min(R, r1 - a);
          const acc_t inv_r = acc_t(1) / static_cast<acc_t>(rows);
          const S* base = xs + a * C;
          if (C >= kWideMoments) {
            cl_rows_moments(base, C, rows, shift, inv_r, cm, q);
          } else {
            int64_t c = 0;
            for (; c + 4 * W <= vC; c += 4 * W) cl_block_moments<4, false>(base + c, C, rows, shift + c, inv_r, 0, cm + c, q + c);
            for (; c < vC; c += W) cl_block_moments<1, false>(base + c, C, rows, shift + c, inv_r, 0, cm + c, q + c);
            if (tail) cl_block_moments<1, true>(base + c, C, rows, shift + c, inv_r, tail, cm + c, q + c);
          }
          if (count == 0) {
            for (int64_t k = 0; k < C; ++k) {
              md[k] = static_cast<double>(cm[k]);
              qd[k] = static_cast<double>(q[k]);
            }
          } else {  // Chan, vectorised over channels (the counts are shared)
            const double nb = static_cast<double>(rows), wb = nb / (count + nb);
            chunk_merge(cm, q, C, wb, count * wb, md, qd);
          }
          count += static_cast<double>(rows);
        }
        if (S_ == 1) {
          for (int64_t k = 0; k < C; ++k) {
            mean[n * C + k] = static_cast<acc_t>(static_cast<double>(shift[k]) + md[k]);
            m2[n * C + k] = static_cast<acc_t>(qd[k]);
          }
        } else {
          std::copy(md, md + 2 * C, part.begin() + t * 2 * C);
        }
      }
    });
    if (S_ == 1) return;
    // the segments of a sample in order, each into all channels: chan_merge's arithmetic with its
    // counts and weight (one division) shared by the channels (channel by channel it divided once
    // per channel and segment, and read the segments across memory: ~15-20% of a (32, 2048, 7, 7)
    // channels-last call)
    at::parallel_for(0, N, std::max<int64_t>(1, 1024 / C), [&](int64_t b, int64_t e) {
      std::vector<double> acc(2 * C);
      double *md = acc.data(), *qd = md + C;
      for (int64_t n = b; n < e; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0);
        double na = 0;
        for (int64_t s = 0; s < S_; ++s) {
          const double* ps = part.data() + (n * S_ + s) * 2 * C;
          const double nb = static_cast<double>(std::min(L, (s + 1) * SR) - s * SR), wb = nb / (na + nb);
          for (int64_t k = 0; k < C; ++k) {
            const double delta = ps[k] - md[k];
            md[k] = nf::coef::merged_mean(md[k], ps[k], delta, wb);
            qd[k] += ps[C + k] + delta * delta * na * wb;
          }
          na += nb;
        }
        for (int64_t k = 0; k < C; ++k) {
          mean[n * C + k] = static_cast<acc_t>(static_cast<double>(plane_shift(x + n * L * C + k)) + md[k]);
          m2[n * C + k] = static_cast<acc_t>(qd[k]);
        }
      }
    });
  }
};

}  // namespace

void moments(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = MomentsKern<S>;
    using acc_t = typename K::acc_t;
    const auto& sh = g.shape;
    const S* x = static_cast<const S*>(g.x);
    acc_t* mean = static_cast<acc_t*>(g.mean_out);
    acc_t* m2 = static_cast<acc_t*>(g.m2_out);
    if (sh.layout == nf::Layout::Contiguous || sh.L == 1)
      K::moments_contig(x, sh.N * sh.C, sh.L, mean, m2);
    else
      K::moments_cl(x, sh.N, sh.C, sh.L, mean, m2);
  });
}

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
