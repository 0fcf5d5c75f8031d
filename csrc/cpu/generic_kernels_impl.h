// Bodies of the four generic CPU kernels, compiled once per build (generic_kernels.h):
// include after the torch headers, with NF_CPU_NS defined.
//
// Work decomposition (fixed by the shape, never by the thread count, so results are bitwise the
// same for any number of threads):
// * contiguous: a plane of L <= kSeg elements is one unit of work (several planes per
//   at::parallel_for task: grain kTask / L); a longer plane is cut into segments of kSeg elements
//   whose partial results merge in index order. L == 1 is a flat elementwise pass. Moments of
//   short planes (L <= kSmall) go W planes at a time (fixed groups), sharing the horizontal sums.
// * channels-last: a unit is a segment of rows (C elements each) of one sample; segments of a
//   sample merge in index order. Inside a segment, chunks of R rows are walked by column blocks
//   of up to 4 vectors of channels with the accumulators in registers, or, for wide rows, row by
//   row with the accumulators in L1 arrays (memory is read sequentially): moments from
//   C >= kWideMoments, backward sums from C >= kWideC (the two-pass moments re-read a chunk that
//   sits in L1, where register blocks win up to C ~ 512; the one-pass sums stream).
// * maps (affine_apply, backward_apply): a plane's / row's last partial vector is done as its
//   last whole vector again (same inputs, same values), no masked store, when it has W elements.
//
// Numerics (csrc/README.md): every plane is shifted by its first element; moments are exact
// two-pass mean / m2 over chunks that sit in L1 (a contiguous run of kChunk elements, or R
// channels-last rows), in the acc type, merged with Chan's formula in double once per chunk
// (vectorised over the channels for channels-last). Backward sums: acc-type sums over a chunk,
// added in double once per chunk. Reduced types are computed in float.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/coefficients.h"  // nf::coef::chan_merge
#include "cpu/generic_kernels.h"
#include "cpu/vec_io.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

constexpr int64_t kTask = 32768;     // elements per at::parallel_for task, at least
constexpr int64_t kSeg = 32768;      // longest unsplit contiguous plane / channels-last segment
constexpr int64_t kChunk = 2048;     // contiguous: exact two-pass chunk (8 KiB of float)
constexpr int64_t kRowChunk = 4096;  // channels-last: elements per chunk of rows

// Moments relative to the plane's shift: (count, mean - shift, m2), merged in double.
struct Mom {
  double n = 0, mean = 0, m2 = 0;
};

inline void chan_merge(Mom& a, const Mom& b) { nf::coef::chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2, 1.0); }

// Channels-last chunk rows: R C ~ kRowChunk, at least `lo` rows (merges amortised), at most `cap`.
inline int64_t chunk_rows(int64_t C, int64_t L, int64_t lo, int64_t cap) {
  return std::max<int64_t>(1, std::min({L, cap, std::max(lo, kRowChunk / C)}));
}

// Rows per channels-last segment: a multiple of the chunk rows, ~kSeg elements.
inline int64_t seg_rows(int64_t C, int64_t R) { return R * std::max<int64_t>(1, kSeg / (R * C)); }

template <class S>
struct Kern {
  using io = IO<S>;
  using acc_t = acc_type<S>;
  using V = Vectorized<acc_t>;
  using va = VA<acc_t>;
  static constexpr int64_t W = V::size();

  // ---- moments -------------------------------------------------------------------------------

  // The shift of plane moments: the plane's first element, 0 where it is +-Inf or NaN (a plane
  // starting with -Inf would give x - shift = NaN for every element, and a NaN mean where
  // nn.BatchNorm reports -Inf).
  static inline acc_t plane_shift(const S* first) { return nf::coef::finite_or_zero(io::get(first)); }

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

  // Wide rows: the chunk is walked row by row (sequential memory), with the per-channel
  // accumulators in padded L1 arrays instead of registers. Same sums per channel, rows in the
  // same order as the column blocks (a channel's result is the same either way up to the
  // association of the row sums; the choice depends only on C). Thresholds measured with
  // `python -m bench.cpu_ops --layouts cl` (AMD EPYC, 1 thread): register blocks took the
  // moments of C = 64..256 from 1.4-2.7x a copy to 0.8-1.2x, and lose from C ~ 1024; the
  // backward sums gain nothing from them beyond C = 64.
  static constexpr int64_t kWideC = 64;         // backward sums
  static constexpr int64_t kWideMoments = 1024;  // moments
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
            const double nb = static_cast<double>(rows), wb = nb / (count + nb), f = count * wb;
            for (int64_t k = 0; k < C; ++k) {
              const double delta = static_cast<double>(cm[k]) - md[k];
              md[k] += delta * wb;
              qd[k] += static_cast<double>(q[k]) + delta * delta * f;
            }
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
    at::parallel_for(0, N, std::max<int64_t>(1, 1024 / C), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        for (int64_t k = 0; k < C; ++k) {
          Mom m;
          for (int64_t s = 0; s < S_; ++s) {
            const double* ps = part.data() + (n * S_ + s) * 2 * C;
            chan_merge(m, Mom{static_cast<double>(std::min(L, (s + 1) * SR) - s * SR), ps[k], ps[C + k]});
          }
          mean[n * C + k] = static_cast<acc_t>(static_cast<double>(plane_shift(x + n * L * C + k)) + m.mean);
          m2[n * C + k] = static_cast<acc_t>(m.m2);
        }
      }
    });
  }

  // ---- backward sums --------------------------------------------------------------------------

  // g1 = sum dy, g2 = sum dy (x - mean) of a run: acc-type sums per chunk, added in double.
  static inline void chunk_sums(const S* dy, const S* x, int64_t n, const V& vm, acc_t& s1, acc_t& s2) {
    const int64_t nv = n - n % W, tail = n % W;
    V a0(0), a1(0), a2(0), a3(0), b0(0), b1(0), b2(0), b3(0);
    int64_t i = 0;
    for (; i + 4 * W <= nv; i += 4 * W) {
      const V g0 = io::load(dy + i), g1 = io::load(dy + i + W), g2 = io::load(dy + i + 2 * W),
              g3 = io::load(dy + i + 3 * W);
      a0 += g0;
      a1 += g1;
      a2 += g2;
      a3 += g3;
      b0 = at::vec::fmadd(g0, io::load(x + i) - vm, b0);
      b1 = at::vec::fmadd(g1, io::load(x + i + W) - vm, b1);
      b2 = at::vec::fmadd(g2, io::load(x + i + 2 * W) - vm, b2);
      b3 = at::vec::fmadd(g3, io::load(x + i + 3 * W) - vm, b3);
    }
    for (; i < nv; i += W) {
      const V g = io::load(dy + i);
      a0 += g;
      b0 = at::vec::fmadd(g, io::load(x + i) - vm, b0);
    }
    if (tail) {  // dy's zero lanes cancel x's
      const V g = io::load_n(dy + i, tail);
      a1 += g;
      b1 = at::vec::fmadd(g, io::load_n(x + i, tail) - vm, b1);
    }
    s1 = va::hsum((a0 + a1) + (a2 + a3));
    s2 = va::hsum((b0 + b1) + (b2 + b3));
  }

  static void run_sums(const S* dy, const S* x, int64_t n, acc_t m, double& g1, double& g2) {
    const V vm(m);
    g1 = g2 = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      acc_t s1, s2;
      chunk_sums(dy + c0, x + c0, std::min(kChunk, n - c0), vm, s1, s2);
      g1 += static_cast<double>(s1);
      g2 += static_cast<double>(s2);
    }
  }

  static void sums_contig(const S* dy, const S* x, const acc_t* mean, int64_t P, int64_t L, acc_t* o1, acc_t* o2) {
    if (L == 1) {  // g1 = dy, g2 = dy (x - mean)
      at::parallel_for(0, P, kTask, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + W <= e; i += W) {
          const V g = io::load(dy + i);
          g.store(o1 + i);
          (g * (io::load(x + i) - V::loadu(mean + i))).store(o2 + i);
        }
        if (i < e) {
          const int64_t n = e - i;
          const V g = io::load_n(dy + i, n);
          va::store_n(o1 + i, g, n);
          va::store_n(o2 + i, g * (io::load_n(x + i, n) - va::load_n(mean + i, n)), n);
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
            chunk_sums(dy + p * L, x + p * L, L, V(mean[p]), s1, s2);
            o1[p] = s1;
            o2[p] = s2;
          } else {
            double g1, g2;
            run_sums(dy + p * L, x + p * L, L, mean[p], g1, g2);
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
        run_sums(dy + p * L + lo, x + p * L + lo, std::min(kSeg, L - lo), mean[p], part[2 * t], part[2 * t + 1]);
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

  template <int B, bool Partial>
  static inline void cl_block_sums(const S* dyb, const S* xb, int64_t C, int64_t rows, const acc_t* m, int64_t tail,
                                   acc_t* s1, acc_t* s2) {
    constexpr int U = B >= 4 ? 1 : 4 / B;  // rows at a time, separate accumulators
    auto ld = [&](const S* p) { return Partial ? io::load_n(p, tail) : io::load(p); };
    V vm[B], a[U][B], b[U][B];
    for (int j = 0; j < B; ++j) {
      vm[j] = V::loadu(m + j * W);
      for (int u = 0; u < U; ++u) a[u][j] = b[u][j] = V(0);
    }
    auto step = [&](int u, int64_t r) {
      for (int j = 0; j < B; ++j) {
        const V g = ld(dyb + r * C + j * W);
        a[u][j] += g;
        b[u][j] = at::vec::fmadd(g, ld(xb + r * C + j * W) - vm[j], b[u][j]);
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

  static inline void cl_rows_sums(const S* dyb, const S* xb, int64_t C, int64_t rows, const acc_t* m, acc_t* s1,
                                  acc_t* s2) {
    const int64_t vC = C - C % W, tail = C % W;
    std::fill(s1, s1 + vC + (tail ? W : 0), acc_t(0));
    std::fill(s2, s2 + vC + (tail ? W : 0), acc_t(0));
    for (int64_t r = 0; r < rows; ++r) {
      const S* d = dyb + r * C;
      const S* xr = xb + r * C;
      int64_t c = 0;
      for (; c < vC; c += W) {
        const V g = io::load(d + c);
        (V::loadu(s1 + c) + g).store(s1 + c);
        at::vec::fmadd(g, io::load(xr + c) - V::loadu(m + c), V::loadu(s2 + c)).store(s2 + c);
      }
      if (tail) {
        const V g = io::load_n(d + c, tail);
        (V::loadu(s1 + c) + g).store(s1 + c);
        at::vec::fmadd(g, io::load_n(xr + c, tail) - V::loadu(m + c), V::loadu(s2 + c)).store(s2 + c);
      }
    }
  }

  static void sums_cl(const S* dy, const S* x, const acc_t* mean, int64_t N, int64_t C, int64_t L, acc_t* o1,
                      acc_t* o2) {
    // one pass: the chunk only bounds how many rows a float sum runs over
    const int64_t R = std::min<int64_t>(L, 32), SR = seg_rows(C, R), S_ = at::divup(L, SR);
    const int64_t vC = C - C % W, tail = C % W, Cp = C + W;
    std::vector<double> part(S_ > 1 ? N * S_ * 2 * C : 0);
    at::parallel_for(0, N * S_, std::max<int64_t>(1, kTask / (std::min(L, SR) * C)), [&](int64_t tb, int64_t te) {
      std::vector<acc_t> abuf(3 * Cp, acc_t(0));
      std::vector<double> dbuf(2 * C);
      acc_t *m = abuf.data(), *s1 = m + Cp, *s2 = s1 + Cp;
      double *g1 = dbuf.data(), *g2 = g1 + C;
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / S_, s = t % S_, r0 = s * SR, r1 = std::min(L, r0 + SR);
        std::copy(mean + n * C, mean + (n + 1) * C, m);
        std::fill(g1, g1 + 2 * C, 0.0);
        const S* dys = dy + n * L * C;
        const S* xs = x + n * L * C;
        for (int64_t a = r0; a < r1; a += R) {
          const int64_t rows = std::min(R, r1 - a);
          if (C >= kWideC) {
            cl_rows_sums(dys + a * C, xs + a * C, C, rows, m, s1, s2);
          } else {
            int64_t c = 0;
            for (; c + 4 * W <= vC; c += 4 * W)
              cl_block_sums<4, false>(dys + a * C + c, xs + a * C + c, C, rows, m + c, 0, s1 + c, s2 + c);
            for (; c < vC; c += W) cl_block_sums<1, false>(dys + a * C + c, xs + a * C + c, C, rows, m + c, 0, s1 + c, s2 + c);
            if (tail) cl_block_sums<1, true>(dys + a * C + c, xs + a * C + c, C, rows, m + c, tail, s1 + c, s2 + c);
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

  // ---- elementwise maps ---------------------------------------------------------------------------
  // out = Op(a, b, coefficients k[0..K)) with per-plane coefficients (k[0] is the mean).

  struct AffineOp {  // y = (x - m) scale + shift
    static constexpr int K = 3;
    static V f(const V& xv, const V&, const V* k) { return at::vec::fmadd(xv - k[0], k[1], k[2]); }
  };
  struct BackwardOp {  // dx = c_dy dy + c_x (x - m) + c_0
    static constexpr int K = 4;
    static V f(const V& g, const V& xv, const V* k) {
      return at::vec::fmadd(k[1], g, at::vec::fmadd(k[2], xv - k[0], k[3]));
    }
  };

  template <class Op>
  static void map(const S* a, const S* b, S* out, const acc_t* const* coef, const nf::PlaneShape& sh) {
    constexpr int K = Op::K;
    const int64_t N = sh.N, C = sh.C, L = sh.L;
    auto ldb = [&](int64_t i) { return b ? io::load(b + i) : V(0); };
    auto ldb_n = [&](int64_t i, int64_t n) { return b ? io::load_n(b + i, n) : V(0); };
    if (L == 1 || sh.layout == nf::Layout::ChannelsLast) {
      // Coefficient index = (n * C + c), contiguous along the innermost dimension: for L == 1 the
      // whole tensor is one "row" of N C elements; for channels-last each row is C elements.
      const int64_t rowlen = L == 1 ? N * C : C, nrows = L == 1 ? 1 : N * L;
      auto do_row = [&](int64_t base, const acc_t* const* kp, int64_t c0, int64_t c1) {
        int64_t c = c0;
        V k[K];
        auto full = [&](int64_t c) {
          for (int j = 0; j < K; ++j) k[j] = V::loadu(kp[j] + c);
          io::store(out + base + c, Op::f(io::load(a + base + c), ldb(base + c), k));
        };
        for (; c + W <= c1; c += W) full(c);
        if (c < c1) {
          if (c1 - c0 >= W) {  // the row's last W elements again: same inputs, same values
            full(c1 - W);
          } else {
            const int64_t n = c1 - c;
            for (int j = 0; j < K; ++j) k[j] = va::load_n(kp[j] + c, n);
            io::store_n(out + base + c, Op::f(io::load_n(a + base + c, n), ldb_n(base + c, n), k), n);
          }
        }
      };
      if (L == 1) {
        at::parallel_for(0, rowlen, kTask, [&](int64_t c0, int64_t c1) { do_row(0, coef, c0, c1); });
      } else {
        at::parallel_for(0, nrows, std::max<int64_t>(1, kTask / C), [&](int64_t r0, int64_t r1) {
          int64_t n = r0 / L, l = r0 % L;  // row r = n L + l, advanced without divisions
          const acc_t* kp[K];
          for (int j = 0; j < K; ++j) kp[j] = coef[j] + n * C;
          for (int64_t r = r0; r < r1; ++r) {
            do_row(r * C, kp, 0, C);
            if (++l == L) {
              l = 0;
              ++n;
              for (int j = 0; j < K; ++j) kp[j] += C;
            }
          }
        });
      }
      return;
    }
    // contiguous: coefficients broadcast per plane; planes longer than kSeg split in segments
    const int64_t P = N * C, S_ = at::divup(L, kSeg), seg = std::min(L, kSeg);
    at::parallel_for(0, P * S_, std::max<int64_t>(1, kTask / seg), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t p = S_ == 1 ? t : t / S_, lo = S_ == 1 ? 0 : (t % S_) * kSeg, hi = std::min(L, lo + kSeg);
        V k[K];
        for (int j = 0; j < K; ++j) k[j] = V(coef[j][p]);
        const int64_t base = p * L;
        int64_t i = base + lo;
        const int64_t end = base + hi;
        for (; i + 2 * W <= end; i += 2 * W) {
          const V y0 = Op::f(io::load(a + i), ldb(i), k);
          const V y1 = Op::f(io::load(a + i + W), ldb(i + W), k);
          io::store(out + i, y0);
          io::store(out + i + W, y1);
        }
        if (i + W <= end) {
          io::store(out + i, Op::f(io::load(a + i), ldb(i), k));
          i += W;
        }
        if (i < end) {
          if (hi - lo >= W)  // the segment's last W elements again: same inputs, same values
            io::store(out + end - W, Op::f(io::load(a + end - W), ldb(end - W), k));
          else
            io::store_n(out + i, Op::f(io::load_n(a + i, end - i), ldb_n(i, end - i), k), end - i);
        }
      }
    });
  }
};

template <class F>
void dispatch(nf::DType t, F&& f) {
  switch (t) {
    case nf::DType::f64:
      f(double{});
      break;
    case nf::DType::f32:
      f(float{});
      break;
    case nf::DType::f16:
      f(c10::Half{});
      break;
    case nf::DType::bf16:
      f(c10::BFloat16{});
      break;
  }
}

}  // namespace

void moments(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = Kern<S>;
    using acc_t = typename K::acc_t;
    const auto& sh = g.shape;
    const S* x = static_cast<const S*>(g.x);
    acc_t* mean = static_cast<acc_t*>(g.s1);
    acc_t* m2 = static_cast<acc_t*>(g.s2);
    if (sh.layout == nf::Layout::Contiguous || sh.L == 1)
      K::moments_contig(x, sh.N * sh.C, sh.L, mean, m2);
    else
      K::moments_cl(x, sh.N, sh.C, sh.L, mean, m2);
  });
}

void backward_sums(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = Kern<S>;
    using acc_t = typename K::acc_t;
    const auto& sh = g.shape;
    const S* dy = static_cast<const S*>(g.dy);
    const S* x = static_cast<const S*>(g.x);
    const acc_t* mean = static_cast<const acc_t*>(g.mean);
    acc_t* o1 = static_cast<acc_t*>(g.s1);
    acc_t* o2 = static_cast<acc_t*>(g.s2);
    if (sh.layout == nf::Layout::Contiguous || sh.L == 1)
      K::sums_contig(dy, x, mean, sh.N * sh.C, sh.L, o1, o2);
    else
      K::sums_cl(dy, x, mean, sh.N, sh.C, sh.L, o1, o2);
  });
}

void affine_apply(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = Kern<S>;
    using acc_t = typename K::acc_t;
    const acc_t* coef[3] = {static_cast<const acc_t*>(g.mean), static_cast<const acc_t*>(g.k1),
                            static_cast<const acc_t*>(g.k2)};
    K::template map<typename K::AffineOp>(static_cast<const S*>(g.x), nullptr, static_cast<S*>(g.out), coef,
                                          g.shape);
  });
}

void backward_apply(const GenericArgs& g) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using K = Kern<S>;
    using acc_t = typename K::acc_t;
    const acc_t* coef[4] = {static_cast<const acc_t*>(g.mean), static_cast<const acc_t*>(g.k1),
                            static_cast<const acc_t*>(g.k2), static_cast<const acc_t*>(g.k0)};
    K::template map<typename K::BackwardOp>(static_cast<const S*>(g.dy), static_cast<const S*>(g.x),
                                            static_cast<S*>(g.out), coef, g.shape);
  });
}

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
