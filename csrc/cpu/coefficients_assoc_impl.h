// Bodies of the AssocNorm coefficient kernels (coefficients_kernels.h), compiled once per build:
// include after coefficients_batch_impl.h (it uses its Full / Part), with NF_CPU_NS defined.
//
// Formulas: common/coefficients.h (GroupStats, assoc_*), on at::vec vectors: the per-channel
// work in the statistics' type (whole vectors, then single channels for what is left of a group),
// the per-group and auto-encoder work (O(G M) per sample) in double, except that for float32
// statistics the sigmoid / tanh of the decoders run in float. Forward, in at::parallel_for passes:
// the group merge per sample (two passes per group, means relative to the group's first
// channel); the auto-encoder's products, each batched over the samples (the weight matrices are
// copied once per call, transposed and padded, so that every product runs down contiguous rows
// with each output summed in the order of the scalar formulas, and a strip of a matrix serves
// every sample while it is in cache: with G = C = 1024 per-sample mat-vecs read 4 MB matrices
// once per sample, 6x the paper's float32 composition); the activations and the per-channel
// coefficients per sample. The backward recomputes that, then alternates per-sample passes (the
// per-channel sums, the relu mask, the group-merge backward) with the batched products back
// through the decoders and the encoder; it keeps per-sample vectors and the per-(n, c)
// grad_omega, and sums the parameter gradients over n = 0..N-1 in order in two more parallel
// passes (over channel tiles, and over auto-encoder rows): results do not depend on the number
// of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/coefficients.h"
#include "common/coefficients_params.h"
#include "cpu/vec_io.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace assoc_detail {

using batch_detail::Full;
using batch_detail::Part;
using batch_detail::Scal;

template <class T>
struct AssocKern {
  using V = Vectorized<T>;  // per channel
  using va = VA<T>;
  using D = double;  // per group / auto-encoder
  using VD = Vectorized<D>;
  using P = nf::AssocCoefParams<T>;
  static constexpr int64_t W = V::size(), WD = VD::size();

  static int64_t pad(int64_t n) { return at::divup(n, WD) * WD; }
  static VD sigmoid(const VD& z) { return VD(D(1)) / (VD(D(1)) + z.neg().exp()); }
  static VD relu(const VD& z) { return VD::blendv(z, VD(D(0)), z <= VD(D(0))); }  // NaN stays NaN

  // body(c, io) over channels [c0, c0 + n): whole vectors (io: Full), then the rest one channel at
  // a time (io: Scal) or, with kMasked, as one partial vector (io: Part).
  template <bool kMasked = false, class F>
  static inline void channels(int64_t c0, int64_t n, const F& body) {
    int64_t c = c0;
    for (; c + W <= c0 + n; c += W) body(c, Full<T>{});
    if constexpr (kMasked) {
      if (c < c0 + n) body(c, Part<T>{c0 + n - c});
    } else {
      for (; c < c0 + n; ++c) body(c, Scal<T>{});
    }
  }
  // acc += x: into the vector accumulator, or the scalar one for a Scal channel
  template <class X>
  static inline void add(V& vacc, T& sacc, const X& x) {
    if constexpr (std::is_same_v<X, V>)
      vacc += x;
    else
      sacc += x;
  }

  // The weights, copied once per call into double rows padded with zeros to whole vectors (Mp /
  // Gp), in the layouts the batched mat-vecs read: the forward's w1t (G, Mp), w2t, w3t (M, Gp)
  // (transposes), and for the backward also w2, w3 (G, Mp) and w1 (M, Gp).
  struct Weights {
    int64_t G, M, Gp, Mp;
    std::unique_ptr<D[]> storage;  // the matrices below in one allocation (padding zeroed by the copies)
    D *w1t, *w2t, *w3t, *w2 = nullptr, *w3 = nullptr, *w1 = nullptr;
    Weights(const P& p, bool backward) : G(p.G), M(p.M), Gp(pad(p.G)), Mp(pad(p.M)) {
      const int64_t gm = G * Mp, mg = M * Gp;
      storage.reset(new D[backward ? 3 * (gm + mg) : gm + 2 * mg]);
      w1t = storage.get();
      w2t = w1t + gm;
      w3t = w2t + mg;
      transpose_into(p.encoder, M, G, w1t, Mp);
      transpose_into(p.decoder_mean, G, M, w2t, Gp);
      transpose_into(p.decoder_var, G, M, w3t, Gp);
      if (backward) {
        w2 = w3t + mg;
        w3 = w2 + gm;
        w1 = w3 + gm;
        copy_into(p.decoder_mean, G, M, w2, Mp);
        copy_into(p.decoder_var, G, M, w3, Mp);
        copy_into(p.encoder, M, G, w1, Gp);
      }
    }
    Weights(const Weights&) = delete;  // the pointers point into storage
    Weights& operator=(const Weights&) = delete;

    // dst (cols, ld) = src (rows, cols) transposed, zeros in lanes rows..ld-1. Eight source rows
    // at a time, so that each destination write is eight consecutive doubles: with power-of-two row
    // lengths a column walk through larger tiles maps every line to the same L1 set (a 32 x 32
    // tiling took longer than all of a G = 1024 step's mat-vecs).
    static void transpose_into(const T* src, int64_t rows, int64_t cols, D* dst, int64_t ld) {
      for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const int64_t nr = std::min<int64_t>(8, rows - r0);
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = 0; r < nr; ++r) dst[c * ld + r0 + r] = static_cast<D>(src[(r0 + r) * cols + c]);
      }
      for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, D(0));
    }
    // dst (rows, ld) = src (rows, cols), zeros in lanes cols..ld-1
    static void copy_into(const T* src, int64_t rows, int64_t cols, D* dst, int64_t ld) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = static_cast<D>(src[r * cols + c]);
        std::fill(dst + r * ld + cols, dst + (r + 1) * ld, D(0));
      }
    }
  };

  // Per-sample vectors: over groups (Gp) shift, mean (relative to shift), var, r, d_mu, d_var;
  // over the bottleneck (Mp) h_mu, h_var. The backward adds over groups s0..s3 and mu and over
  // the bottleneck gh_mu, gh_var.
  struct Sample {
    D *shift, *mean, *var, *r, *dmu, *dvar, *hmu, *hvar;
    D *s0, *s1, *s2, *s3, *mu, *ghmu, *ghvar;
    static int64_t size(int64_t Gp, int64_t Mp) { return 11 * Gp + 4 * Mp; }
    Sample(D* b, int64_t Gp, int64_t Mp) {
      D** g_vecs[] = {&shift, &mean, &var, &r, &dmu, &dvar, &s0, &s1, &s2, &s3, &mu};
      for (D** q : g_vecs) {
        *q = b;
        b += Gp;
      }
      D** m_vecs[] = {&hmu, &hvar, &ghmu, &ghvar};
      for (D** q : m_vecs) {
        *q = b;
        b += Mp;
      }
    }
  };

  // Group statistics and r_G of sample n (padding lanes of shift, mean, var, mu: 0; of r: what
  // var = 0 gives, read only into padding lanes).
  static void group_stats(const P& p, int64_t Gp, int64_t n, const Sample& w) {
    const int64_t C = p.C, G = p.G, cpg = C / G;
    const D L = static_cast<D>(p.L), eps = p.eps, inv_cl = D(1) / (static_cast<D>(cpg) * L);
    const T inv_count = T(1) / static_cast<T>(cpg);  // multiplications, not a division per group
    const T *m = p.mean + n * C, *q = p.m2 + n * C;
    std::fill(w.shift, w.shift + 6 * Gp, D(0));  // shift, mean, var, r, dmu, dvar: padding lanes 0
    std::fill(w.mu, w.mu + Gp, D(0));
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * cpg;
      const T shift = nf::coef::finite_or_zero(m[c0]);
      T mean_rel, q_sum, dev2;
      V acc(T(0));
      T t = 0;
      channels(c0, cpg, [&](int64_t c, auto io) {
        using U = typename decltype(io)::U;
        add(acc, t, io.ld(m + c) - U(shift));
      });
      mean_rel = ((cpg >= W ? va::hsum(acc) : T(0)) + t) * inv_count;  // (no whole vector: no hsum)
      V qa(T(0)), da(T(0));
      T tq = 0, td = 0;
      channels(c0, cpg, [&](int64_t c, auto io) {
        using U = typename decltype(io)::U;
        const U d = (io.ld(m + c) - U(shift)) - U(mean_rel);
        add(qa, tq, io.ld(q + c));
        add(da, td, d * d);
      });
      q_sum = (cpg >= W ? va::hsum(qa) : T(0)) + tq;
      dev2 = (cpg >= W ? va::hsum(da) : T(0)) + td;
      w.shift[g] = shift;
      w.mean[g] = mean_rel;
      w.var[g] = (static_cast<D>(q_sum) + L * static_cast<D>(dev2)) * inv_cl;
      w.mu[g] = w.shift[g] + w.mean[g];
    }
    // r_G: 0 for one-element groups (see coef::invstd_or_zero)
    const bool one = cpg * p.L == 1;
    for (int64_t g = 0; g < Gp; g += WD) {
      const VD r = VD(D(1)) / (VD::loadu(w.var + g) + VD(eps)).sqrt();
      (one ? VD(D(0)) : r).store(w.r + g);
    }
  }

  // d_mu = sigmoid(z_mu), d_var = tanh(z_var) in place (z: the decoders' outputs)
  static void activations(int64_t Gp, const Sample& w) {
    if constexpr (std::is_same_v<T, float>) {  // float statistics: the transcendentals in float
      for (int64_t g = 0; g < Gp; g += W) {
        const int64_t n = std::min(W, Gp - g);
        float a[W] = {}, b[W] = {};
        for (int64_t k = 0; k < n; ++k) {
          a[k] = static_cast<float>(w.dmu[g + k]);
          b[k] = static_cast<float>(w.dvar[g + k]);
        }
        (V(1.f) / (V(1.f) + V::loadu(a).neg().exp())).store(a);
        V::loadu(b).tanh().store(b);
        for (int64_t k = 0; k < n; ++k) {
          w.dmu[g + k] = a[k];
          w.dvar[g + k] = b[k];
        }
      }
    } else {
      for (int64_t g = 0; g < Gp; g += WD) {
        sigmoid(VD::loadu(w.dmu + g)).store(w.dmu + g);
        VD::loadu(w.dvar + g).tanh().store(w.dvar + g);
      }
    }
  }

  // The auto-encoder's products, batched over the samples: y_i[0, len) (=, or += with kAccumulate)
  // sum_k A[k, :] f(x_i[k]), k = 0..K-1 in order for every element, for vectors i = 0..count-1 (x
  // and y: pointers, count of them, padded to whole blocks of kNI with a zero x and no y). Each
  // task takes a strip of 2 vectors of columns and runs every input through it, so that a large
  // A is read from memory once per call (not once per sample, as per-sample mat-vecs did) and its
  // strip of K rows stays in cache; kNI inputs at a time keep the chains of additions independent.
  static constexpr int64_t kNI = 4;
  struct Batch {
    std::vector<const D*> x;
    std::vector<D*> y;
    std::vector<D> zeros;
    int64_t count = 0;
    explicit Batch(int64_t K) : zeros(K, D(0)) {}
    void add(const D* xi, D* yi) {
      x.push_back(xi);
      y.push_back(yi);
      ++count;
    }
    void close() {  // pad to whole blocks
      while (x.size() % kNI) {
        x.push_back(zeros.data());
        y.push_back(nullptr);
      }
    }
  };
  template <bool kAccumulate, int NV, class Fn>
  static inline void batch_block(const D* A, int64_t len, int64_t K, const D* const* x, D* const* y, int64_t ni,
                                 Fn f) {
    VD acc[kNI][NV];
    for (int64_t i = 0; i < kNI; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = kAccumulate && i < ni ? VD::loadu(y[i] + v * WD) : VD(D(0));
    for (int64_t k = 0; k < K; ++k) {
      VD a[NV];
      for (int v = 0; v < NV; ++v) a[v] = VD::loadu(A + k * len + v * WD);
      for (int64_t i = 0; i < kNI; ++i) {
        const VD u(f(x[i][k]));
        for (int v = 0; v < NV; ++v) acc[i][v] += a[v] * u;
      }
    }
    for (int64_t i = 0; i < ni; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v].store(y[i] + v * WD);
  }
  template <bool kAccumulate = false, class Fn>
  static void batched_matvec(const D* A, int64_t len, int64_t K, Batch& b, Fn f) {
    b.close();
    const int64_t strips = at::divup(len, 2 * WD), blocks = static_cast<int64_t>(b.x.size()) / kNI;
    const int64_t work = std::max<int64_t>(1, K * blocks * kNI * 2 * WD);
    at::parallel_for(0, strips, std::max<int64_t>(1, 32768 / work), [&](int64_t s0, int64_t s1) {
      D* y[kNI];
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t j = s * 2 * WD;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t i0 = blk * kNI, ni = std::min(kNI, b.count - i0);
          for (int64_t i = 0; i < ni; ++i) y[i] = b.y[i0 + i] + j;
          if (j + 2 * WD <= len)
            batch_block<kAccumulate, 2>(A + j, len, K, b.x.data() + i0, y, ni, f);
          else
            batch_block<kAccumulate, 1>(A + j, len, K, b.x.data() + i0, y, ni, f);
        }
      }
    });
  }

  // The auto-encoder of all samples: h = W1 mu, W1 var; z_mu = W2 relu(h_mu), z_var = W3 relu(h_var)
  // into dmu / dvar, then the activations. The per-sample vectors of sample n start at ws + n S.
  static void auto_encoder(const P& p, const Weights& wt, D* ws, int64_t S) {
    const int64_t N = p.N, G = p.G, M = p.M, Gp = wt.Gp, Mp = wt.Mp;
    Batch enc(G), dm(M), dv(M);
    for (int64_t n = 0; n < N; ++n) {
      const Sample w(ws + n * S, Gp, Mp);
      enc.add(w.mu, w.hmu);
      enc.add(w.var, w.hvar);
      dm.add(w.hmu, w.dmu);
      dv.add(w.hvar, w.dvar);
    }
    batched_matvec(wt.w1t, Mp, G, enc, [](D v) { return v; });
    batched_matvec(wt.w2t, Gp, M, dm, [](D v) { return nf::coef::relu(v); });
    batched_matvec(wt.w3t, Gp, M, dv, [](D v) { return nf::coef::relu(v); });
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (Gp + 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) activations(Gp, Sample(ws + n * S, Gp, Mp));
    });
  }

  // the first n lanes of a double vector into T
  static void store_d(T* p, const VD& v, int64_t n) {
    D t[WD];
    v.store(t);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(t[k]);
  }

  static int64_t grain(const P& p) { return std::max<int64_t>(1, 8192 / (2 * p.C + 1)); }

  // Group statistics of every sample (one parallel pass), then the auto-encoder.
  static void sample_vectors(const P& p, const Weights& wt, D* ws, int64_t S) {
    at::parallel_for(0, p.N, grain(p), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) group_stats(p, wt.Gp, n, Sample(ws + n * S, wt.Gp, wt.Mp));
    });
    auto_encoder(p, wt, ws, S);
  }

  static void forward(const P& p) {
    const Weights wt(p, false);
    const int64_t S = Sample::size(wt.Gp, wt.Mp);
    const Scratch<D> keep(p.N * S);
    D* ws = keep.data();
    sample_vectors(p, wt, ws, S);
    at::parallel_for(0, p.N, grain(p), [&](int64_t n0, int64_t n1) {
      const int64_t C = p.C, cpg = C / p.G;
      for (int64_t n = n0; n < n1; ++n) {
        const Sample w(ws + n * S, wt.Gp, wt.Mp);
        const T *m = p.mean + n * C, *weight = p.weight, *bias = p.bias;
        T *scale = p.scale + n * C, *shift = p.shift + n * C;
        for (int64_t g = 0; g < p.G; ++g) {
          const T r = static_cast<T>(w.r[g]), dmu = static_cast<T>(w.dmu[g]), dvar = static_cast<T>(w.dvar[g]);
          const T gs = static_cast<T>(w.shift[g]), gm = static_cast<T>(w.mean[g]);
          channels(g * cpg, cpg, [&](int64_t c, auto io) {
            using U = typename decltype(io)::U;
            const U sc = (U(dmu) + io.ld(weight + c)) * U(r);
            io.st(scale + c, sc);
            io.st(shift + c, U(dvar) + io.ld(bias + c) + sc * ((io.ld(m + c) - U(gs)) - U(gm)));
          });
        }
      }
    });
  }

  static void backward(const P& p) {
    const Weights wt(p, true);
    const int64_t N = p.N, C = p.C, G = p.G, M = p.M, cpg = C / G, Gp = wt.Gp, Mp = wt.Mp;
    const int64_t S = Sample::size(Gp, Mp);
    const D L = static_cast<D>(p.L), inv_count = D(1) / static_cast<D>(cpg), inv_cl = inv_count / L;
    // per-sample vectors and grad_omega (n, c), in scratch of the calling thread (shared by the tasks)
    const Scratch<D> keep(N * S);
    const Scratch<T> keep_go(N * C);
    D* ws = keep.data();
    T* gomega = keep_go.data();
    sample_vectors(p, wt, ws, S);
    at::parallel_for(0, N, grain(p), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const Sample w(ws + n * S, Gp, Mp);
        const T *m = p.mean + n * C, *g1p = p.sum_dy + n * C, *g2p = p.sum_dy_xmu + n * C, *weight = p.weight;
        T *c_dy = p.c_dy + n * C, *go = gomega + n * C;
        std::fill(w.s0, w.s0 + 4 * Gp, D(0));
        for (int64_t g = 0; g < G; ++g) {
          // per channel: omega = d_mu + B_omega, scale = omega r, gs = g2 + g1 dev (scale reaches y
          // directly and through the shift), grad_omega = gs r; group sums s0 = sum grad_omega,
          // s1 = sum g1, s2 = sum g1 scale, s3 = sum gs omega
          const T r = static_cast<T>(w.r[g]), dmu = static_cast<T>(w.dmu[g]);
          const T gsh = static_cast<T>(w.shift[g]), gm = static_cast<T>(w.mean[g]);
          V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
          T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
          channels(g * cpg, cpg, [&](int64_t c, auto io) {
            using U = typename decltype(io)::U;
            const U g1 = io.ld(g1p + c), omega = U(dmu) + io.ld(weight + c), scale = omega * U(r);
            const U gs = io.ld(g2p + c) + g1 * ((io.ld(m + c) - U(gsh)) - U(gm)), gw = gs * U(r);
            io.st(c_dy + c, scale);
            io.st(go + c, gw);
            add(a0, t0, gw);
            add(a1, t1, g1);
            add(a2, t2, g1 * scale);
            add(a3, t3, gs * omega);
          });
          const D d = w.dmu[g], dv = w.dvar[g];
          if (cpg >= W) {
            t0 += va::hsum(a0);
            t1 += va::hsum(a1);
            t2 += va::hsum(a2);
            t3 += va::hsum(a3);
          }
          w.s0[g] = nf::coef::sigmoid_grad(static_cast<D>(t0), d);  // decoder pre-activation gradients
          w.s1[g] = nf::coef::tanh_grad(static_cast<D>(t1), dv);
          w.s2[g] = static_cast<D>(t2);
          w.s3[g] = static_cast<D>(t3);
        }
        // the direct terms of the gradients of mu_G, var_G (the encoder's are added below)
        for (int64_t g = 0; g < Gp; g += WD) {
          const VD r = VD::loadu(w.r + g);
          (VD(D(0)) - VD::loadu(w.s2 + g)).store(w.s2 + g);
          (VD(D(0)) + VD::loadu(w.s3 + g) * VD(D(-0.5)) * r * r * r).store(w.s3 + g);
        }
      }
    });
    // grad h: through the decoders (rows of W2 / W3 in order) and the relu. The mask multiplies
    // (as assoc.py's `* (h > 0)`): a NaN gradient stays NaN where h <= 0. h is replaced by relu(h)
    // there: the decoder weight gradients below read that.
    Batch dec_mu(G), dec_var(G), enc(M);
    for (int64_t n = 0; n < N; ++n) {
      const Sample w(ws + n * S, Gp, Mp);
      dec_mu.add(w.s0, w.ghmu);
      dec_var.add(w.s1, w.ghvar);
      enc.add(w.ghmu, w.s2);
      enc.add(w.ghvar, w.s3);
    }
    batched_matvec(wt.w2, Mp, G, dec_mu, [](D v) { return v; });
    batched_matvec(wt.w3, Mp, G, dec_var, [](D v) { return v; });
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (Mp + 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const Sample w(ws + n * S, Gp, Mp);
        for (int64_t j = 0; j < Mp; j += WD) {
          const VD zero(D(0)), one(D(1)), hm = VD::loadu(w.hmu + j), hv = VD::loadu(w.hvar + j);
          (VD::loadu(w.ghmu + j) * VD::blendv(zero, one, hm > zero)).store(w.ghmu + j);
          (VD::loadu(w.ghvar + j) * VD::blendv(zero, one, hv > zero)).store(w.ghvar + j);
          relu(hm).store(w.hmu + j);
          relu(hv).store(w.hvar + j);
        }
      }
    });
    // the encoder terms (rows of W1 in order)
    batched_matvec<true>(wt.w1, Gp, M, enc, [](D v) { return v; });
    // group-merge backward: c_x = 2 grad_q, c_0 = (grad_mu / cpg + 2 L grad_q dev) / L
    at::parallel_for(0, N, grain(p), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const Sample w(ws + n * S, Gp, Mp);
        const T* m = p.mean + n * C;
        T *c_x = p.c_x + n * C, *c_0 = p.c_0 + n * C;
        for (int64_t g = 0; g < G; ++g) {
          const D grad_q = w.s3[g] * inv_cl;
          const T a = static_cast<T>(w.s2[g] * inv_count), b = static_cast<T>(D(2) * L * grad_q),
                  cx = static_cast<T>(D(2) * grad_q), gsh = static_cast<T>(w.shift[g]), gm = static_cast<T>(w.mean[g]);
          const T inv_l = T(1) / static_cast<T>(p.L);
          channels(g * cpg, cpg, [&](int64_t c, auto io) {
            using U = typename decltype(io)::U;
            io.st(c_x + c, U(cx));
            io.st(c_0 + c, (U(a) + U(b) * ((io.ld(m + c) - U(gsh)) - U(gm))) * U(inv_l));
          });
        }
      }
    });
    // grad_weight[c] = sum_n grad_omega, grad_bias[c] = sum_n g1: tiles of 256 channels, n in order
    constexpr int64_t kTile = 32 * W;
    at::parallel_for(0, at::divup(C, kTile), std::max<int64_t>(1, 16384 / (kTile * N)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kTile, w = std::min(kTile, C - c0);
        V aw[32], ab[32];
        for (int64_t v = 0; v < 32; ++v) aw[v] = ab[v] = V(T(0));
        for (int64_t n = 0; n < N; ++n) {
          const T *go = gomega + n * C, *g1 = p.sum_dy + n * C;
          int64_t v = 0;
          channels<true>(c0, w, [&](int64_t c, auto io) {
            aw[v] += io.ld(go + c);
            ab[v] += io.ld(g1 + c);
            ++v;
          });
        }
        int64_t v = 0;
        channels<true>(c0, w, [&](int64_t c, auto io) {
          io.st(p.grad_weight + c, aw[v]);
          io.st(p.grad_bias + c, ab[v]);
          ++v;
        });
      }
    });
    // decoder rows g: grad_W2[g, j] = sum_n gz_mu[g] relu(h_mu[j]) (and W3); encoder rows j:
    // grad_W1[j, g] = sum_n gh_mu[j] mu[g] + gh_var[j] var[g]
    const Sample w0(ws, Gp, Mp);  // offsets of the vectors of sample 0; sample n: + n S
    at::parallel_for(0, G + M, std::max<int64_t>(1, 4096 / (N * std::max(Gp, Mp))), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        if (k < G) {
          const int64_t g = k;
          // up to 4 + 4 independent chains over n (fixed-size blocks: accumulators in registers)
          auto block = [&](int64_t j0, auto nv_c) {
            constexpr int NV = decltype(nv_c)::value;
            VD dm[NV], dv[NV];
            for (int v = 0; v < NV; ++v) dm[v] = dv[v] = VD(D(0));
            for (int64_t n = 0; n < N; ++n) {
              const VD a(w0.s0[n * S + g]), b(w0.s1[n * S + g]);
              for (int v = 0; v < NV; ++v) {
                dm[v] += a * VD::loadu(w0.hmu + n * S + j0 + v * WD);  // relu(h) by now
                dv[v] += b * VD::loadu(w0.hvar + n * S + j0 + v * WD);
              }
            }
            for (int v = 0; v < NV; ++v) {
              const int64_t j = j0 + v * WD;
              store_d(p.grad_decoder_mean + g * M + j, dm[v], std::min(WD, M - j));
              store_d(p.grad_decoder_var + g * M + j, dv[v], std::min(WD, M - j));
            }
          };
          int64_t j0 = 0;
          for (; j0 + 4 * WD <= M; j0 += 4 * WD) block(j0, std::integral_constant<int, 4>{});
          for (; j0 < M; j0 += WD) block(j0, std::integral_constant<int, 1>{});
        } else {
          const int64_t j = k - G;
          auto block = [&](int64_t g0, auto nv_c) {  // independent chains over n
            constexpr int NV = decltype(nv_c)::value;
            VD e[NV];
            for (int v = 0; v < NV; ++v) e[v] = VD(D(0));
            for (int64_t n = 0; n < N; ++n) {
              const VD a(w0.ghmu[n * S + j]), b(w0.ghvar[n * S + j]);
              for (int v = 0; v < NV; ++v)
                e[v] += a * VD::loadu(w0.mu + n * S + g0 + v * WD) + b * VD::loadu(w0.var + n * S + g0 + v * WD);
            }
            for (int v = 0; v < NV; ++v) {
              const int64_t g = g0 + v * WD;
              store_d(p.grad_encoder + j * G + g, e[v], std::min(WD, G - g));
            }
          };
          int64_t g0 = 0;
          for (; g0 + 8 * WD <= G; g0 += 8 * WD) block(g0, std::integral_constant<int, 8>{});
          for (; g0 < G; g0 += WD) block(g0, std::integral_constant<int, 1>{});
        }
      }
    });
  }
};

}  // namespace assoc_detail

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
