// Bodies of the ILM-Norm coefficient kernels (coefficients_kernels.h), compiled once per build:
// include with NF_CPU_NS defined. Formulas: common/coefficients_ilm.h (normfuse/coefficients/ilm.py).
//
// Scalar loops: per sample there are only O(C + K E) values, and the work this replaces was ~50
// (forward) / ~100 (backward) PyTorch ops on (N, C) tensors, each costing more host time than the
// whole loop. Everything per sample is computed in double (the statistics are read and the
// results stored in their own dtype, float or double), one at::parallel_for item per sample.
// The backward keeps each sample's small vectors and its grad_omega (n, c), then sums the
// parameter gradients over n = 0..N-1 in order in two more parallel passes (over channel tiles,
// and over the rows of the meta network's matrices): results do not depend on the number of
// threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common/coefficients_ilm.h"
#include "common/coefficients_params.h"
#include "cpu/vec_io.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace ilm_detail {

template <class T>
struct IlmKern {
  using D = double;
  using P = nf::IlmCoefParams<T>;
  using Stats = nf::coef::GroupStats<D>;

  // One sample's vectors, carved from one buffer. Over key groups (K): the merge (kshift, kmean
  // relative to it), the meta network's inputs kmu, kvar (unbiased), its outputs d_w, d_b; in the
  // backward the sums key_w, key_b (then in place the decoder pre-activation gradients) and the
  // key statistics' gradients gkmu, gkvar. Over groups (G): shift, mean, r; backward grp_scale,
  // grp_omega (then in place the gradients of mu_G and the biased var_G). Over the hidden units
  // (E): h_w, h_b; backward gh_w, gh_b.
  struct Sample {
    D *kshift, *kmean, *kmu, *kvar, *dw, *db, *key_w, *key_b, *gkmu, *gkvar;
    D *shift, *mean, *r, *grp_scale, *grp_omega;
    D *hw, *hb, *ghw, *ghb;
    static int64_t size(const P& p) { return 10 * p.K + 5 * p.G + 4 * p.E; }
    Sample(D* b, const P& p) {
      D** k_vecs[] = {&kshift, &kmean, &kmu, &kvar, &dw, &db, &key_w, &key_b, &gkmu, &gkvar};
      for (D** v : k_vecs) {
        *v = b;
        b += p.K;
      }
      D** g_vecs[] = {&shift, &mean, &r, &grp_scale, &grp_omega};
      for (D** v : g_vecs) {
        *v = b;
        b += p.G;
      }
      D** e_vecs[] = {&hw, &hb, &ghw, &ghb};
      for (D** v : e_vecs) {
        *v = b;
        b += p.E;
      }
    }
    Stats key_stats(int64_t k) const { return Stats{kshift[k], kmean[k], D(0)}; }  // var unused: dev only
    Stats group_stats(int64_t g) const { return Stats{shift[g], mean[g], D(0)}; }
  };

  static D bessel_key(const P& p) { return nf::coef::bessel(static_cast<D>(p.per_key() * p.L)); }
  static D bessel_group(const P& p) { return nf::coef::bessel(static_cast<D>(p.per_group() * p.L)); }

  // Both merges, r_G and the meta network of sample n.
  static void sample_forward(const P& p, int64_t n, const Sample& w) {
    namespace co = nf::coef;
    const int64_t C = p.C, cpk = p.per_key(), cpg = p.per_group();
    const D L = static_cast<D>(p.L), bk = bessel_key(p), bg = bessel_group(p);
    const T *m = p.mean + n * C, *q = p.m2 + n * C;
    for (int64_t k = 0; k < p.K; ++k) {
      const Stats st = co::ilm_group_stats<D>(m + k * cpk, q + k * cpk, cpk, L);
      w.kshift[k] = st.shift;
      w.kmean[k] = st.mean;
      w.kmu[k] = st.mu();
      w.kvar[k] = st.var * bk;
    }
    for (int64_t g = 0; g < p.G; ++g) {
      const Stats st = co::ilm_group_stats<D>(m + g * cpg, q + g * cpg, cpg, L);
      w.shift[g] = st.shift;
      w.mean[g] = st.mean;
      w.r[g] = co::rsqrt_(st.var * bg + static_cast<D>(p.eps));
    }
    for (int64_t e = 0; e < p.E; ++e) co::ilm_encoder_row(p.encoder, e, p.K, w.kmu, w.kvar, w.hw[e], w.hb[e]);
    for (int64_t k = 0; k < p.K; ++k)
      co::ilm_decoder_row(p.decoder_weight, p.decoder_bias, k, p.E, w.hw, w.hb, w.dw[k], w.db[k]);
  }

  static int64_t grain(const P& p) { return std::max<int64_t>(1, 8192 / (4 * p.C + 4 * p.K * p.E + 1)); }

  static void forward(const P& p) {
    at::parallel_for(0, p.N, grain(p), [&](int64_t n0, int64_t n1) {
      const Scratch<D> buf(Sample::size(p));
      const Sample w(buf.data(), p);
      const int64_t C = p.C, cpk = p.per_key(), cpg = p.per_group();
      for (int64_t n = n0; n < n1; ++n) {
        sample_forward(p, n, w);
        const T* m = p.mean + n * C;
        T *scale = p.scale + n * C, *shift = p.shift + n * C;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t g = c / cpg, k = c / cpk;
          D sc, sh;
          nf::coef::assoc_forward<D>(m[c], w.group_stats(g), w.r[g], w.dw[k], w.db[k], p.weight[c], p.bias[c], sc,
                                     sh);
          scale[c] = static_cast<T>(sc);
          shift[c] = static_cast<T>(sh);
        }
      }
    });
  }

  // Sample n's c_dy, c_x, c_0 and its per-sample vectors (kept in w for the sums over samples)
  // and grad_omega (go, C values).
  static void sample_backward(const P& p, int64_t n, const Sample& w, T* go) {
    namespace co = nf::coef;
    const int64_t C = p.C, K = p.K, G = p.G, E = p.E, cpk = p.per_key(), cpg = p.per_group();
    const D L = static_cast<D>(p.L);
    sample_forward(p, n, w);
    const T *m = p.mean + n * C, *g1 = p.sum_dy + n * C, *g2 = p.sum_dy_xmu + n * C;
    std::fill(w.key_w, w.key_w + K, D(0));
    std::fill(w.key_b, w.key_b + K, D(0));
    std::fill(w.grp_scale, w.grp_scale + G, D(0));
    std::fill(w.grp_omega, w.grp_omega + G, D(0));
    T* c_dy = p.c_dy + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / cpg, k = c / cpk;
      D gw, cdy;
      co::ilm_accumulate<D>(m[c], g1[c], g2[c], w.group_stats(g), w.r[g], w.dw[k], p.weight[c], gw, cdy, w.key_w[k],
                            w.key_b[k], w.grp_scale[g], w.grp_omega[g]);
      go[c] = static_cast<T>(gw);
      c_dy[c] = static_cast<T>(cdy);
    }
    for (int64_t k = 0; k < K; ++k) {  // decoder pre-activation gradients, in place
      w.key_w[k] = co::sigmoid_grad(w.key_w[k], w.dw[k]);
      w.key_b[k] = co::tanh_grad(w.key_b[k], w.db[k]);
    }
    for (int64_t e = 0; e < E; ++e)
      co::ilm_grad_h_row(p.decoder_weight, p.decoder_bias, e, K, E, w.key_w, w.key_b, w.hw[e], w.hb[e], w.ghw[e],
                         w.ghb[e]);
    const D bk = bessel_key(p), bg = bessel_group(p);
    for (int64_t k = 0; k < K; ++k) co::ilm_grad_key_row(p.encoder, k, K, E, w.ghw, w.ghb, bk, w.gkmu[k], w.gkvar[k]);
    for (int64_t g = 0; g < G; ++g) {  // gradients of mu_G and var_G (biased), in place
      w.grp_omega[g] = co::ilm_grad_group_var(w.grp_omega[g], w.r[g], bg);
      w.grp_scale[g] = -w.grp_scale[g];  // the explicit m of the shift cancels the one of (x - m)
    }
    // each plane feeds both merges: c_x = 2 (grad_q_key + grad_q_group), c_0 = grad_mean / L
    T *c_x = p.c_x + n * C, *c_0 = p.c_0 + n * C;
    const D dk = static_cast<D>(cpk), dg = static_cast<D>(cpg);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / cpg, k = c / cpk;
      D gq = 0, gm = 0;
      co::ilm_merge_backward_add<D>(m[c], w.key_stats(k), w.gkmu[k], w.gkvar[k], dk, L, gq, gm);
      co::ilm_merge_backward_add<D>(m[c], w.group_stats(g), w.grp_scale[g], w.grp_omega[g], dg, L, gq, gm);
      c_x[c] = static_cast<T>(D(2) * gq);
      c_0[c] = static_cast<T>(gm / L);
    }
  }

  static void backward(const P& p) {
    const int64_t N = p.N, C = p.C, K = p.K, E = p.E, S = Sample::size(p);
    // every sample's vectors and grad_omega, in scratch of the calling thread (shared by the tasks)
    const Scratch<D> keep(N * S);
    const Scratch<T> keep_go(N * C);
    D* ws = keep.data();
    T* gomega = keep_go.data();
    at::parallel_for(0, N, grain(p), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) sample_backward(p, n, Sample(ws + n * S, p), gomega + n * C);
    });
    // grad_weight[c] = sum_n grad_omega, grad_bias[c] = sum_n g1: tiles of channels, n in order
    constexpr int64_t kTile = 256;
    at::parallel_for(0, at::divup(C, kTile), std::max<int64_t>(1, 16384 / (kTile * N)), [&](int64_t t0, int64_t t1) {
      D aw[kTile], ab[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kTile, width = std::min(kTile, C - c0);
        std::fill(aw, aw + width, D(0));
        std::fill(ab, ab + width, D(0));
        for (int64_t n = 0; n < N; ++n) {
          const T *go = gomega + n * C + c0, *g1 = p.sum_dy + n * C + c0;
          for (int64_t i = 0; i < width; ++i) {
            aw[i] += static_cast<D>(go[i]);
            ab[i] += static_cast<D>(g1[i]);
          }
        }
        for (int64_t i = 0; i < width; ++i) {
          p.grad_weight[c0 + i] = static_cast<T>(aw[i]);
          p.grad_bias[c0 + i] = static_cast<T>(ab[i]);
        }
      }
    });
    // rows k < K: decoders, grad_W_w[k, e] = sum_n gz_w[k] relu(h_w[e]) (and W_b with the means);
    // rows K + e: encoder, grad_W_e[e, k] = sum_n gh_w[e] kvar[k] + gh_b[e] kmu[k]
    const Sample w0(ws, p);  // the vectors of sample 0; sample n's are S further per n
    const int64_t width = std::max(K, E);
    at::parallel_for(0, K + E, std::max<int64_t>(1, 4096 / (N * width + 1)), [&](int64_t r0, int64_t r1) {
      const Scratch<D> acc_buf(2 * width);
      D *a = acc_buf.data(), *b = a + width;
      for (int64_t row = r0; row < r1; ++row) {
        if (row < K) {
          const int64_t k = row;
          std::fill(a, a + E, D(0));
          std::fill(b, b + E, D(0));
          for (int64_t n = 0; n < N; ++n) {
            const D zw = w0.key_w[n * S + k], zb = w0.key_b[n * S + k];
            const D *hw = w0.hw + n * S, *hb = w0.hb + n * S;
            for (int64_t e = 0; e < E; ++e) {
              a[e] += zw * nf::coef::relu(hw[e]);
              b[e] += zb * nf::coef::relu(hb[e]);
            }
          }
          for (int64_t e = 0; e < E; ++e) {
            p.grad_decoder_weight[k * E + e] = static_cast<T>(a[e]);
            p.grad_decoder_bias[k * E + e] = static_cast<T>(b[e]);
          }
        } else {
          const int64_t e = row - K;
          std::fill(a, a + K, D(0));
          for (int64_t n = 0; n < N; ++n) {
            const D gw = w0.ghw[n * S + e], gb = w0.ghb[n * S + e];
            const D *kvar = w0.kvar + n * S, *kmu = w0.kmu + n * S;
            for (int64_t k = 0; k < K; ++k) a[k] += gw * kvar[k] + gb * kmu[k];
          }
          for (int64_t k = 0; k < K; ++k) p.grad_encoder[e * K + k] = static_cast<T>(a[k]);
        }
      }
    });
  }
};

}  // namespace ilm_detail
}  // namespace NF_CPU_NS
}  // namespace nf_cpu
