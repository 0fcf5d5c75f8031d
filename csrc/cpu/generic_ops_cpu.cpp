// CPU implementations of the four generic ops (moments, affine_apply, backward_sums,
// backward_apply) for float64/float32/bfloat16/float16, contiguous and channels-last.
//
// Work is cut into fixed segments that depend only on the shape (never on the thread count), each
// segment writes its own partial, and partials are merged in index order: the result is the same
// whatever at::parallel_for does. Reduced types are accumulated in float (at::opmath_type).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/torch_glue.h"

namespace {

using at::vec::Vectorized;

// Elements per contiguous segment (and roughly per channels-last segment): a task is at least this
// much work, and a plane longer than this is split so that few large planes still use all cores.
constexpr int64_t kSeg = 32768;
// Moments are computed exactly (two passes) over chunks this small, which stay in L1.
constexpr int64_t kChunk = 512;

// W elements of scalar_t as one vector of the accumulation type.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  static constexpr int64_t W = AVec::size();
  static AVec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return AVec::loadu(p);
    } else {
      AVec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }
  static void store(scalar_t* p, const AVec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(W));
    }
  }
};

// Lanes summed in a fixed order (deterministic).
template <typename acc_t>
acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += tmp[i];
  return s;
}

// Moments relative to the plane's shift, merged in double: (count, mean - shift, m2).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

inline void chan_merge(Moments& a, const Moments& b) {
  const double n = a.n + b.n;
  if (n == 0) return;
  const double delta = b.mean - a.mean;
  const double wb = b.n / n;
  a.mean += delta * wb;
  a.m2 += b.m2 + delta * delta * a.n * wb;
  a.n = n;
}

// ---- moments ------------------------------------------------------------------------------------------

// One run of `n` contiguous elements of a plane. Each chunk: exact two-pass mean and m2 of the
// shifted values in the acc type (vectorised), then a Chan merge in double.
template <typename scalar_t>
Moments moments_run(const scalar_t* x, int64_t n, at::opmath_type<scalar_t> shift) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t W = IO::W;
  const AVec vshift(shift);
  Moments total;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const scalar_t* p = x + c0;
    const int64_t len = std::min(kChunk, n - c0);
    const int64_t vlen = len - len % W;
    AVec vs(0);
    for (int64_t i = 0; i < vlen; i += W) vs += IO::load(p + i) - vshift;
    acc_t s = hsum(vs);
    for (int64_t i = vlen; i < len; ++i) s += static_cast<acc_t>(p[i]) - shift;
    const acc_t cm = s / static_cast<acc_t>(len);
    const AVec vcm(cm);
    AVec vq(0);
    for (int64_t i = 0; i < vlen; i += W) {
      const AVec d = IO::load(p + i) - vshift - vcm;
      vq = at::vec::fmadd(d, d, vq);
    }
    acc_t q = hsum(vq);
    for (int64_t i = vlen; i < len; ++i) {
      const acc_t d = static_cast<acc_t>(p[i]) - shift - cm;
      q += d * d;
    }
    chan_merge(total, Moments{static_cast<double>(len), static_cast<double>(cm), static_cast<double>(q)});
  }
  return total;
}

// Channels-last rows [r0, r1) of sample `x` (rows of C elements): moments of every channel,
// chunks of `rows` rows done exactly in two passes, merged into `out[c]`.
template <typename scalar_t>
void moments_rows(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, const at::opmath_type<scalar_t>* shift,
                  Moments* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t W = IO::W;
  const int64_t vC = C - C % W;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / C);
  std::vector<acc_t> s(C), q(C);
  for (int64_t a = r0; a < r1; a += chunk_rows) {
    const int64_t b = std::min(r1, a + chunk_rows);
    std::fill(s.begin(), s.end(), acc_t(0));
    std::fill(q.begin(), q.end(), acc_t(0));
    for (int64_t r = a; r < b; ++r) {
      const scalar_t* row = x + r * C;
      for (int64_t c = 0; c < vC; c += W) (AVec::loadu(&s[c]) + (IO::load(row + c) - AVec::loadu(shift + c))).store(&s[c]);
      for (int64_t c = vC; c < C; ++c) s[c] += static_cast<acc_t>(row[c]) - shift[c];
    }
    const acc_t inv = acc_t(1) / static_cast<acc_t>(b - a);
    for (int64_t c = 0; c < C; ++c) s[c] *= inv;  // chunk mean (relative to the shift)
    for (int64_t r = a; r < b; ++r) {
      const scalar_t* row = x + r * C;
      for (int64_t c = 0; c < vC; c += W) {
        const AVec d = IO::load(row + c) - AVec::loadu(shift + c) - AVec::loadu(&s[c]);
        at::vec::fmadd(d, d, AVec::loadu(&q[c])).store(&q[c]);
      }
      for (int64_t c = vC; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(row[c]) - shift[c] - s[c];
        q[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c)
      chan_merge(out[c], Moments{static_cast<double>(b - a), static_cast<double>(s[c]), static_cast<double>(q[c])});
  }
}

template <typename scalar_t>
void moments_kernel(const at::Tensor& x, const nf::PlaneShape& sh, at::Tensor& mean, at::Tensor& m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* qp = m2.mutable_data_ptr<acc_t>();
  const int64_t N = sh.N, C = sh.C, L = sh.L;
  if (sh.layout == nf::Layout::Contiguous) {
    const int64_t P = N * C, S = at::divup(L, kSeg);
    std::vector<Moments> part(P * S);
    at::parallel_for(0, P * S, std::max<int64_t>(1, kSeg / std::min(L, kSeg)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / S, s = t % S;
        const scalar_t* plane = xp + p * L;
        const int64_t lo = s * kSeg;
        part[t] = moments_run(plane + lo, std::min(kSeg, L - lo), static_cast<acc_t>(plane[0]));
      }
    });
    at::parallel_for(0, P, 1024, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        Moments m;
        for (int64_t s = 0; s < S; ++s) chan_merge(m, part[p * S + s]);
        mp[p] = static_cast<acc_t>(static_cast<double>(static_cast<acc_t>(xp[p * L])) + m.mean);
        qp[p] = static_cast<acc_t>(m.m2);
      }
    });
  } else {
    const int64_t rows_per_seg = std::max<int64_t>(1, kSeg / C), S = at::divup(L, rows_per_seg);
    std::vector<Moments> part(N * S * C);
    std::vector<acc_t> shift(N * C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) shift[n * C + c] = static_cast<acc_t>(xp[n * L * C + c]);
    at::parallel_for(0, N * S, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / S, s = t % S;
        const int64_t r0 = s * rows_per_seg;
        moments_rows(xp + n * L * C, C, r0, std::min(L, r0 + rows_per_seg), &shift[n * C], &part[t * C]);
      }
    });
    at::parallel_for(0, N * C, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / C, c = i % C;
        Moments m;
        for (int64_t s = 0; s < S; ++s) chan_merge(m, part[(n * S + s) * C + c]);
        mp[i] = static_cast<acc_t>(static_cast<double>(shift[i]) + m.mean);
        qp[i] = static_cast<acc_t>(m.m2);
      }
    });
  }
}

// ---- backward sums -----------------------------------------------------------------------------------

struct Sums {
  double g1 = 0, g2 = 0;
};

// g1 = sum dy, g2 = sum dy * (x - mean) over a contiguous run; chunk sums in the acc type,
// chunk totals in double.
template <typename scalar_t>
Sums sums_run(const scalar_t* dy, const scalar_t* x, int64_t n, at::opmath_type<scalar_t> mean) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t W = IO::W;
  const AVec vm(mean);
  Sums total;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0), vlen = len - len % W;
    const scalar_t* d = dy + c0;
    const scalar_t* xx = x + c0;
    AVec v1(0), v2(0);
    for (int64_t i = 0; i < vlen; i += W) {
      const AVec g = IO::load(d + i);
      v1 += g;
      v2 = at::vec::fmadd(g, IO::load(xx + i) - vm, v2);
    }
    acc_t s1 = hsum(v1), s2 = hsum(v2);
    for (int64_t i = vlen; i < len; ++i) {
      const acc_t g = static_cast<acc_t>(d[i]);
      s1 += g;
      s2 += g * (static_cast<acc_t>(xx[i]) - mean);
    }
    total.g1 += s1;
    total.g2 += s2;
  }
  return total;
}

template <typename scalar_t>
void sums_rows(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
               const at::opmath_type<scalar_t>* mean, Sums* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t W = IO::W;
  const int64_t vC = C - C % W;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / C);
  std::vector<acc_t> s1(C), s2(C);
  for (int64_t a = r0; a < r1; a += chunk_rows) {
    const int64_t b = std::min(r1, a + chunk_rows);
    std::fill(s1.begin(), s1.end(), acc_t(0));
    std::fill(s2.begin(), s2.end(), acc_t(0));
    for (int64_t r = a; r < b; ++r) {
      const scalar_t* d = dy + r * C;
      const scalar_t* xx = x + r * C;
      for (int64_t c = 0; c < vC; c += W) {
        const AVec g = IO::load(d + c);
        (AVec::loadu(&s1[c]) + g).store(&s1[c]);
        at::vec::fmadd(g, IO::load(xx + c) - AVec::loadu(mean + c), AVec::loadu(&s2[c])).store(&s2[c]);
      }
      for (int64_t c = vC; c < C; ++c) {
        const acc_t g = static_cast<acc_t>(d[c]);
        s1[c] += g;
        s2[c] += g * (static_cast<acc_t>(xx[c]) - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c].g1 += s1[c];
      out[c].g2 += s2[c];
    }
  }
}

template <typename scalar_t>
void sums_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const nf::PlaneShape& sh,
                 at::Tensor& g1, at::Tensor& g2) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  acc_t* o1 = g1.mutable_data_ptr<acc_t>();
  acc_t* o2 = g2.mutable_data_ptr<acc_t>();
  const int64_t N = sh.N, C = sh.C, L = sh.L;
  if (sh.layout == nf::Layout::Contiguous) {
    const int64_t P = N * C, S = at::divup(L, kSeg);
    std::vector<Sums> part(P * S);
    at::parallel_for(0, P * S, std::max<int64_t>(1, kSeg / std::min(L, kSeg)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t p = t / S, lo = (t % S) * kSeg;
        part[t] = sums_run(dp + p * L + lo, xp + p * L + lo, std::min(kSeg, L - lo), mp[p]);
      }
    });
    for (int64_t p = 0; p < P; ++p) {
      Sums s;
      for (int64_t k = 0; k < S; ++k) {
        s.g1 += part[p * S + k].g1;
        s.g2 += part[p * S + k].g2;
      }
      o1[p] = static_cast<acc_t>(s.g1);
      o2[p] = static_cast<acc_t>(s.g2);
    }
  } else {
    const int64_t rows_per_seg = std::max<int64_t>(1, kSeg / C), S = at::divup(L, rows_per_seg);
    std::vector<Sums> part(N * S * C);
    at::parallel_for(0, N * S, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / S, r0 = (t % S) * rows_per_seg;
        sums_rows(dp + n * L * C, xp + n * L * C, C, r0, std::min(L, r0 + rows_per_seg), mp + n * C, &part[t * C]);
      }
    });
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t n = i / C, c = i % C;
      Sums s;
      for (int64_t k = 0; k < S; ++k) {
        s.g1 += part[(n * S + k) * C + c].g1;
        s.g2 += part[(n * S + k) * C + c].g2;
      }
      o1[i] = static_cast<acc_t>(s.g1);
      o2[i] = static_cast<acc_t>(s.g2);
    }
  }
}

// ---- elementwise maps ------------------------------------------------------------------------------------

// out = F(a, b, coefficients), F given as a vector and a scalar functor of the coefficient index.
// Contiguous: per (plane, segment) task, the index is the plane, the same for the whole vector
// (the functors broadcast the coefficient). Channels-last: per (sample, row segment) task, the
// index is the first of W consecutive channels (the functors load a vector of coefficients).
template <typename scalar_t, typename VecF, typename ScalF>
void map_planes(const scalar_t* a, const scalar_t* b, scalar_t* out, const nf::PlaneShape& sh, const VecF& vf,
                const ScalF& sf) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t W = IO::W;
  const int64_t N = sh.N, C = sh.C, L = sh.L;
  auto load_b = [&](const scalar_t* p) { return b ? IO::load(p) : AVec(0); };
  auto scal_b = [&](const scalar_t* p) { return b ? static_cast<acc_t>(*p) : acc_t(0); };
  if (sh.layout == nf::Layout::Contiguous) {
    const int64_t P = N * C, S = at::divup(L, kSeg);
    at::parallel_for(0, P * S, std::max<int64_t>(1, kSeg / std::min(L, kSeg)), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t p = t / S, lo = (t % S) * kSeg, hi = std::min(L, lo + kSeg);
        const int64_t base = p * L;
        int64_t i = lo;
        for (; i + W <= hi; i += W)
          IO::store(out + base + i, vf(p, IO::load(a + base + i), load_b(b ? b + base + i : nullptr)));
        for (; i < hi; ++i) out[base + i] = static_cast<scalar_t>(sf(p, static_cast<acc_t>(a[base + i]), scal_b(b ? b + base + i : nullptr)));
      }
    });
  } else {
    const int64_t rows_per_seg = std::max<int64_t>(1, kSeg / C), S = at::divup(L, rows_per_seg);
    const int64_t vC = C - C % W;
    at::parallel_for(0, N * S, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / S, r0 = (t % S) * rows_per_seg, r1 = std::min(L, r0 + rows_per_seg);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = (n * L + r) * C;
          for (int64_t c = 0; c < vC; c += W)
            IO::store(out + base + c, vf(n * C + c, IO::load(a + base + c), load_b(b ? b + base + c : nullptr)));
          for (int64_t c = vC; c < C; ++c)
            out[base + c] = static_cast<scalar_t>(sf(n * C + c, static_cast<acc_t>(a[base + c]), scal_b(b ? b + base + c : nullptr)));
        }
      }
    });
  }
}
template <typename scalar_t>
void affine_kernel(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                   const nf::PlaneShape& sh, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  const acc_t* m = mean.const_data_ptr<acc_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sf = shift.const_data_ptr<acc_t>();
  const bool cl = sh.layout == nf::Layout::ChannelsLast;
  auto coef = [cl](const acc_t* p, int64_t i) { return cl ? AVec::loadu(p + i) : AVec(p[i]); };
  map_planes<scalar_t>(
      x.const_data_ptr<scalar_t>(), nullptr, y.mutable_data_ptr<scalar_t>(), sh,
      [&](int64_t i, const AVec& xv, const AVec&) { return at::vec::fmadd(xv - coef(m, i), coef(sc, i), coef(sf, i)); },
      [&](int64_t i, acc_t xv, acc_t) { return (xv - m[i]) * sc[i] + sf[i]; });
}

template <typename scalar_t>
void backward_apply_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& c_dy,
                           const at::Tensor& c_x, const at::Tensor& c_0, const nf::PlaneShape& sh, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  const acc_t* m = mean.const_data_ptr<acc_t>();
  const acc_t* k1 = c_dy.const_data_ptr<acc_t>();
  const acc_t* k2 = c_x.const_data_ptr<acc_t>();
  const acc_t* k0 = c_0.const_data_ptr<acc_t>();
  const bool cl = sh.layout == nf::Layout::ChannelsLast;
  auto coef = [cl](const acc_t* p, int64_t i) { return cl ? AVec::loadu(p + i) : AVec(p[i]); };
  map_planes<scalar_t>(
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), sh,
      [&](int64_t i, const AVec& g, const AVec& xv) {
        return at::vec::fmadd(coef(k1, i), g, at::vec::fmadd(coef(k2, i), xv - coef(m, i), coef(k0, i)));
      },
      [&](int64_t i, acc_t g, acc_t xv) { return k1[i] * g + (k2[i] * (xv - m[i]) + k0[i]); });
}

// ---- op entry points -------------------------------------------------------------------------------------

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "normfuse.", op, " (CPU kernel): input is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x) {
  check_cpu(x, "moments");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "moments");
  at::Tensor mean = nf_glue::empty_stats(x, sh), m2 = nf_glue::empty_stats(x, sh);
  if (sh.N * sh.C == 0) return {mean, m2};
  if (sh.L == 0) {  // mean of nothing is undefined, a sum of nothing is 0 (as torch.mean / sum)
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normfuse_moments_cpu",
                                  [&] { moments_kernel<scalar_t>(x, sh, mean, m2); });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> backward_sums_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean) {
  check_cpu(x, "backward_sums");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "backward_sums");
  nf_glue::check_like_input(dy, x, sh, "backward_sums", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_sums", "mean");
  at::Tensor g1 = nf_glue::empty_stats(x, sh), g2 = nf_glue::empty_stats(x, sh);
  if (sh.N * sh.C == 0) return {g1, g2};
  if (sh.L == 0) {
    g1.zero_();
    g2.zero_();
    return {g1, g2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normfuse_backward_sums_cpu",
                                  [&] { sums_kernel<scalar_t>(dy, x, mean, sh, g1, g2); });
  return {g1, g2};
}

at::Tensor affine_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                            const at::Tensor& shift) {
  check_cpu(x, "affine_apply");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "affine_apply");
  nf_glue::check_stats(mean, x, sh, "affine_apply", "mean");
  nf_glue::check_stats(scale, x, sh, "affine_apply", "scale");
  nf_glue::check_stats(shift, x, sh, "affine_apply", "shift");
  at::Tensor y = nf_glue::empty_output(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normfuse_affine_apply_cpu",
                                  [&] { affine_kernel<scalar_t>(x, mean, scale, shift, sh, y); });
  return y;
}

at::Tensor backward_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& c_dy,
                              const at::Tensor& c_x, const at::Tensor& c_0) {
  check_cpu(x, "backward_apply");
  const nf::PlaneShape sh = nf_glue::plane_shape(x, "backward_apply");
  nf_glue::check_like_input(dy, x, sh, "backward_apply", "grad_output");
  nf_glue::check_stats(mean, x, sh, "backward_apply", "mean");
  nf_glue::check_stats(c_dy, x, sh, "backward_apply", "c_dy");
  nf_glue::check_stats(c_x, x, sh, "backward_apply", "c_x");
  nf_glue::check_stats(c_0, x, sh, "backward_apply", "c_0");
  at::Tensor dx = nf_glue::empty_output(x);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normfuse_backward_apply_cpu",
                                  [&] { backward_apply_kernel<scalar_t>(dy, x, mean, c_dy, c_x, c_0, sh, dx); });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("moments", &moments_cpu);
  m.impl("affine_apply", &affine_apply_cpu);
  m.impl("backward_sums", &backward_sums_cpu);
  m.impl("backward_apply", &backward_apply_cpu);
}
