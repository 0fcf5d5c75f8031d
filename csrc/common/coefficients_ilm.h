// Scalar math of the ILM-Norm coefficient ops (namespace nf::coef: torch-free, CUDA-free, host and
// device like common/coefficients.h, whose GroupStats, finite_or_zero, sigmoid, relu and
// assoc_forward it uses). The formulas are normfuse/coefficients/ilm.py's; the CPU loops around
// them are cpu/coefficients_ilm_impl.h and kernels/coefficients_ilm.cuh. A separate header (not
// in coefficients.h, which is long already): only the ILM kernels include it.
//
// Per sample two groupings of consecutive channels, which need not nest (C = 12, G = 4, K = 3: a
// key group straddles two groups), so each is merged from the planes, never one from the other:
//   K key groups  -> kmu, kvar (unbiased)  -> meta network -> d_w (from kvar), d_b (from kmu)
//   G groups      -> mu_G, var_G (unbiased) -> r_G = (var_G + eps)^-1/2
//   omega = d_w[key(c)] + weight[c],  beta = d_b[key(c)] + bias[c]
//   scale = omega r_G,  shift = beta + scale (m - mu_G)           (AssocNorm's assoc_forward)
// Notation as coefficients.h: m, q plane mean / centred sum of squares, L plane size, g1 = sum_dy,
// g2 = sum_dy_xmu. Matrices row-major: encoder W_e (E, K), decoders W_w, W_b (K, E).
#pragma once
#include <stdint.h>

#include "common/coefficients.h"

namespace nf {
namespace coef {

// n / (n - 1) for a group of n values: the unbiased variance is the biased one times this (the
// glue refuses n <= 1, as ilm.py does).
template <class T>
NF_COEF_HD T bessel(T n) {
  return n / (n - T(1));
}

// Moments of `count` consecutive planes of one sample, in two passes as coefficients/_merge.py's
// group_merge: the mean relative to the first plane's mean (0 where that is not finite), then
// the *biased* variance Q / (count L). `m`, `q` point at the group's first channel.
template <class T, class S>
NF_COEF_HD GroupStats<T> ilm_group_stats(const S* m, const S* q, int64_t count, T L) {
  const T shift = finite_or_zero(static_cast<T>(m[0]));
  T sum = T(0);
  for (int64_t c = 0; c < count; ++c) sum += static_cast<T>(m[c]) - shift;
  const T mean = sum / static_cast<T>(count);
  T q_sum = T(0), dev2 = T(0);
  for (int64_t c = 0; c < count; ++c) {
    const T d = (static_cast<T>(m[c]) - shift) - mean;
    q_sum += static_cast<T>(q[c]);
    dev2 += d * d;
  }
  return GroupStats<T>{shift, mean, (q_sum + L * dev2) / (static_cast<T>(count) * L)};
}

// ---- meta network, forward (one output per call: a CUDA block would spread the rows over threads)
// Row e of the shared encoder: h_w[e] = sum_k W_e[e, k] kvar[k], h_b[e] = sum_k W_e[e, k] kmu[k].
template <class T, class S>
NF_COEF_HD void ilm_encoder_row(const S* encoder, int64_t e, int64_t K, const T* kmu, const T* kvar, T& h_w,
                                T& h_b) {
  T a = T(0), b = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T w = static_cast<T>(encoder[e * K + k]);
    a += w * kvar[k];
    b += w * kmu[k];
  }
  h_w = a;
  h_b = b;
}

// Row k of the decoders: d_w[k] = sigmoid(sum_e W_w[k, e] relu(h_w[e])) (the variances drive the
// weight), d_b[k] = tanh(sum_e W_b[k, e] relu(h_b[e])) (the means the bias). relu keeps NaN.
template <class T, class S>
NF_COEF_HD void ilm_decoder_row(const S* decoder_weight, const S* decoder_bias, int64_t k, int64_t E, const T* h_w,
                                const T* h_b, T& d_w, T& d_b) {
  T zw = T(0), zb = T(0);
  for (int64_t e = 0; e < E; ++e) {
    zw += static_cast<T>(decoder_weight[k * E + e]) * relu(h_w[e]);
    zb += static_cast<T>(decoder_bias[k * E + e]) * relu(h_b[e]);
  }
  d_w = sigmoid(zw);
  d_b = tanh_(zb);
}

// ---- backward ------------------------------------------------------------------------------------
// One channel: c_dy (= the forward's scale), grad_omega (its share of grad_weight), and its terms
// of four per-sample sums: key group  key_w += grad_omega, key_b += g1   (the decoders' paths);
// group  grp_scale += g1 scale (-> grad mu_G),  grp_omega += gs omega (-> grad r_G), with
// gs = g2 + g1 (m - mu_G) the gradient of scale (directly and through the shift).
template <class T>
NF_COEF_HD void ilm_accumulate(T m, T g1, T g2, const GroupStats<T>& st, T r, T d_w, T weight, T& grad_omega,
                               T& c_dy, T& key_w, T& key_b, T& grp_scale, T& grp_omega) {
  const T omega = d_w + weight, scale = omega * r;
  const T gs = g2 + g1 * st.dev(m);
  grad_omega = gs * r;
  c_dy = scale;
  key_w += grad_omega;
  key_b += g1;
  grp_scale += g1 * scale;
  grp_omega += gs * omega;
}

// (Decoder pre-activation gradients of key group k from its sums: sigmoid_grad / tanh_grad,
// common/coefficients.h.)

// Column e of the decoders: gh_w[e] = sum_k gz_w[k] W_w[k, e], masked by h_w[e] > 0 (same for the
// bias path). The mask multiplies, as ilm.py's `* (h > 0)`: a NaN or Inf gradient stays NaN.
template <class T, class S>
NF_COEF_HD void ilm_grad_h_row(const S* decoder_weight, const S* decoder_bias, int64_t e, int64_t K, int64_t E,
                               const T* gz_w, const T* gz_b, T h_w, T h_b, T& gh_w, T& gh_b) {
  T a = T(0), b = T(0);
  for (int64_t k = 0; k < K; ++k) {
    a += gz_w[k] * static_cast<T>(decoder_weight[k * E + e]);
    b += gz_b[k] * static_cast<T>(decoder_bias[k * E + e]);
  }
  gh_w = a * (h_w > T(0) ? T(1) : T(0));
  gh_b = b * (h_b > T(0) ? T(1) : T(0));
}

// Column k of the encoder: gradients of key group k's mean and *biased* variance
// (d var_biased = d var_unbiased * bessel_k).
template <class T, class S>
NF_COEF_HD void ilm_grad_key_row(const S* encoder, int64_t k, int64_t K, int64_t E, const T* gh_w, const T* gh_b,
                                 T bessel_k, T& grad_mu, T& grad_var) {
  T a = T(0), b = T(0);
  for (int64_t e = 0; e < E; ++e) {
    const T w = static_cast<T>(encoder[e * K + k]);
    a += gh_b[e] * w;
    b += gh_w[e] * w;
  }
  grad_mu = a;
  grad_var = b * bessel_k;
}

// Gradient of a group's biased variance from grp_omega = sum gs omega:
// r = (var_u + eps)^-1/2, var_u = bessel var.
template <class T>
NF_COEF_HD T ilm_grad_group_var(T grp_omega, T r, T bessel_g) {
  return grp_omega * (T(-0.5) * bessel_g) * r * r * r;
}

// One plane's share of a group merge's backward (coefficients/_merge.py group_merge_backward),
// added to its (grad_q, grad_mean): each plane feeds both merges. Then c_x = 2 grad_q,
// c_0 = grad_mean / L.
template <class T>
NF_COEF_HD void ilm_merge_backward_add(T m, const GroupStats<T>& st, T grad_mu, T grad_var, T per_group, T L,
                                       T& grad_q, T& grad_mean) {
  const T gq = grad_var / (per_group * L);
  grad_q += gq;
  grad_mean += grad_mu / per_group + T(2) * L * gq * st.dev(m);
}

}  // namespace coef
}  // namespace nf
