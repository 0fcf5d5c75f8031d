// Scalar math of the per-layer coefficient ops (namespace nf::coef, torch-free and CUDA-free),
// written once for the CUDA kernels (T = float, also run on the CPU through tests/cuda_shim) and
// the CPU kernels (T = the statistics' dtype, float or double; their vectorised loops restate the
// per-channel formulas with at::vec and call these for merges, shifts and scalar tails). The
// formulas are those of normfuse/coefficients/{_merge,bin,iebn,assoc}.py in the centred form of
// docs/architecture.md; the loops around them live in cpu/coefficients_{batch,assoc}_impl.h and
// kernels/coefficients_{batch,assoc}.cuh. The torch glue of the ops is elsewhere
// (common/coefficients_glue.h, namespace nf_coef_glue).
//
// Notation: per plane (n, c): m = mean, q = m2 (centred sum of squares), L = plane size,
// g1 = sum_dy (gradient of shift), g2 = sum_dy_xmu (gradient of scale).
#pragma once
#include <math.h>

#include "common/coefficients_params.h"

namespace nf {
namespace coef {

// ---- elementary functions, float and double, host and device ---------------------------------
// rsqrt_: the float overloads of the CUDA math API and of <cmath> (rsqrtf, sqrtf) for float.
template <class T>
NF_COEF_HD T rsqrt_(T v) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(v);
#else
  return T(1) / ::sqrt(v);
#endif
}
NF_COEF_HD float exp_(float v) { return ::expf(v); }
NF_COEF_HD double exp_(double v) { return ::exp(v); }
NF_COEF_HD float tanh_(float v) { return ::tanhf(v); }
NF_COEF_HD double tanh_(double v) { return ::tanh(v); }

template <class T>
NF_COEF_HD T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));  // exp overflow -> 1 / inf = 0, the right limit
}
// NaN stays NaN, as torch.relu: a poisoned group must not look like a silent zero.
template <class T>
NF_COEF_HD T relu(T z) {
  return z <= T(0) ? T(0) : z;
}
// The shift of a merge (a plane mean): 0 when it is not finite, so that an Inf plane gives an
// Inf mean (as nn.BatchNorm) instead of Inf - Inf = NaN in every relative mean.
template <class T>
NF_COEF_HD T finite_or_zero(T v) {
  return v - v == T(0) ? v : T(0);
}

// ---- merging plane moments (Chan et al.) ---------------------------------------------------------
// Moments of a set of planes of L elements each: `count` planes, `mean` = their mean *relative
// to a shift* the caller picks (the first plane's mean), `q` = centred sum of squares over all
// count * L elements. The relative mean stays O(std) even when the data sit at an offset of 1e4,
// so float32 merges keep `m - mu` accurate (design.md sec. 2).
template <class T>
struct Merge {
  T count, mean, q;
};

template <class T>
NF_COEF_HD Merge<T> merge_empty() {
  return Merge<T>{T(0), T(0), T(0)};
}

// The mean of a merge, `ma + delta * wb` with delta = mb - ma, the weight wb = nb / (na + nb).
// Where delta is not finite (a mean is +-Inf or NaN: a plane holding Inf), that form gives
// Inf + (finite - Inf) * wb = NaN; the sum ma + mb gives what a plain sum over the elements
// gives (Inf; NaN for Inf - Inf or a NaN), as nn.BatchNorm does. One select, no branch.
template <class T>
NF_COEF_HD T merged_mean(T ma, T mb, T delta, T wb) {
  return delta - delta == T(0) ? ma + delta * wb : ma + mb;
}

// Welford step: add one plane (relative mean m_rel, centred sum of squares q).
template <class T>
NF_COEF_HD void merge_add(Merge<T>& a, T m_rel, T q, T L) {
  a.count += T(1);
  const T delta = m_rel - a.mean;
  a.mean = merged_mean(a.mean, m_rel, delta, T(1) / a.count);
  a.q += q + L * delta * (m_rel - a.mean);
}

// Chan et al.: merge the moments (nb, mb, qb) into (na, ma, qa), either may be empty. Means are
// relative to a common shift, counts in units of L elements (planes of L elements here; single
// elements, L = 1, in the generic kernels' moments: nf::chan_merge in kernels/numerics.cuh, Mom
// in cpu/generic_plan_impl.h). `div(nb, n)` is the weight's division (the GPU's generic
// kernels pass a fast one). The one Chan merge of the project: every backend's C++ and CUDA
// kernels call it. Not symmetric in rounding: callers merge in a fixed order so that results do
// not depend on scheduling.
struct PlainDiv {
  template <class T>
  NF_COEF_HD T operator()(T a, T b) const { return a / b; }
};
template <class T, class Div = PlainDiv>
NF_COEF_HD void chan_merge(T& na, T& ma, T& qa, T nb, T mb, T qb, T L, Div div = Div{}) {
  const T n = na + nb;
  if (n == T(0)) return;
  const T delta = mb - ma;
  const T wb = div(nb, n);
  ma = merged_mean(ma, mb, delta, wb);
  qa += qb + L * delta * delta * na * wb;
  na = n;
}

// Chan's formula on Merge: b into a.
template <class T>
NF_COEF_HD void merge(Merge<T>& a, const Merge<T>& b, T L) {
  chan_merge(a.count, a.mean, a.q, b.count, b.mean, b.q, L);
}

// ---- batch statistics of BIN / IEBN ---------------------------------------------------------------
// mu_B and r_B = (var_B + eps)^-1/2 of one channel. dev(m) = m - mu_B, computed as
// (m - shift) - mean with `mean` relative to `shift` (exact-ish even at large offsets).
template <class T>
struct BatchStats {
  T shift, mean, r;
  bool batch;  // batch statistics (their gradient flows back into every plane) or running ones
  NF_COEF_HD T dev(T m) const { return (m - shift) - mean; }
};

// From the merged moments of N planes of one channel (`shift` = the value means are relative to).
template <class T>
NF_COEF_HD BatchStats<T> batch_stats(T shift, T mean_rel, T q_total, T count, T L, T eps) {
  return BatchStats<T>{shift, mean_rel, rsqrt_(q_total / (count * L) + eps), true};
}

// Eval mode: the running statistics are constants.
template <class T>
NF_COEF_HD BatchStats<T> running_stats(T running_mean, T running_var, T eps) {
  return BatchStats<T>{running_mean, T(0), rsqrt_(running_var + eps), false};
}

// nn.BatchNorm's exponential average with the unbiased variance Q / (N L - 1).
template <class T>
NF_COEF_HD void update_running(T& running_mean, T& running_var, T shift, T mean_rel, T q_total,
                               T count, T L, T momentum) {
  running_mean = running_mean * (T(1) - momentum) + momentum * (shift + mean_rel);
  running_var = running_var * (T(1) - momentum) + momentum * (q_total / (count * L - T(1)));
}

// Inverse standard deviation of a plane (BIN's instance part) or of a group (AssocNorm) holding
// `count` elements: 0 for one element, where the normalized value (x - m) / sqrt(0 + eps) is
// exactly 0 anyway. The zero keeps 1/sqrt(eps) ~ 316 out of c_dy and c_0, where it would only
// cancel, costing float32 ~1e-4 in dx (docs/architecture.md, "One-element planes and groups").
template <class T>
NF_COEF_HD T invstd_or_zero(T var, T count, T eps) {
  return count == T(1) ? T(0) : rsqrt_(var + eps);
}

template <class T, class S>
NF_COEF_HD T param_or(const S* p, int64_t c, T fallback) {
  return p ? static_cast<T>(p[c]) : fallback;
}

// ---- BIN and IEBN: the interface of BinMath / IebnMath --------------------------------------------
//   Channel                      per-channel parameters and batch statistics (load())
//   plane(ch, m, q) -> pv        the per-plane value that costs a square root or an exponential
//                                (BIN: r_I, IEBN: delta); callers compute it once per plane and
//                                pass, and may keep it between the two passes of the backward
//   forward(ch, m, pv, ...)      scale, shift
//   accumulate(ch, m, pv, g1, g2, s)  adds the plane's terms to the kSums channel sums
//   store_grads / finalize       per-channel parameter gradients / the batch-merge backward
//   backward(ch, f, m, pv, g1, g2, ...)  c_dy, c_x, c_0

// ---- BIN ------------------------------------------------------------------------------------------
//   scale = gamma (rho r_B + (1 - rho) r_I)        shift = beta + gamma rho r_B (m - mu_B)
// Backward: per channel four sums over the batch (kSums), then per plane c_dy, c_x, c_0.
template <class T>
struct BinMath {
  static constexpr int kSums = 4;

  struct Channel {
    T gate, gamma, beta, L, inv_L, eps;  // inv_L: multiplications instead of divisions per plane
    BatchStats<T> st;
  };

  template <class S>
  NF_COEF_HD static Channel load(const BatchCoefParams<S>& p, int64_t c, const BatchStats<T>& st) {
    const T L = static_cast<T>(p.L);
    return Channel{static_cast<T>(p.gate[c]), param_or<T>(p.weight, c, T(1)), param_or<T>(p.bias, c, T(0)),
                   L,                         T(1) / L,                        static_cast<T>(p.eps),
                   st};
  }

  // r_I = (q / L + eps)^-1/2, 0 for one-element planes
  NF_COEF_HD static T plane(const Channel& ch, T /*m*/, T q) { return invstd_or_zero(q * ch.inv_L, ch.L, ch.eps); }

  NF_COEF_HD static void forward(const Channel& ch, T m, T r_i, T& scale, T& shift) {
    scale = ch.gamma * (ch.gate * ch.st.r + (T(1) - ch.gate) * r_i);
    shift = ch.beta + ch.gamma * ch.gate * ch.st.r * ch.st.dev(m);
  }

  // Per-plane contributions to the channel sums. gamma and rho are per channel, so they are
  // factored out of the sums and applied once in finalize():
  //   s0 = sum g1                              -> grad_bias, and grad mu_B = -gamma rho r_B s0
  //   s1 = sum g2 mix + g1 rho r_B dev         -> grad_weight       (mix = scale / gamma)
  //   s2 = sum g2 (r_B - r_I) + g1 r_B dev     -> grad_gate / gamma
  //   s3 = sum g2 + g1 dev                     -> grad r_B / (gamma rho)
  NF_COEF_HD static void accumulate(const Channel& ch, T m, T r_i, T g1, T g2, T (&s)[kSums]) {
    const T r_b = ch.st.r, dev = ch.st.dev(m);
    const T mix = ch.gate * r_b + (T(1) - ch.gate) * r_i;
    s[0] += g1;
    s[1] += g2 * mix + g1 * ch.gate * r_b * dev;
    s[2] += g2 * (r_b - r_i) + g1 * r_b * dev;
    s[3] += g2 + g1 * dev;
  }

  template <class S>
  NF_COEF_HD static void store_grads(const BatchCoefParams<S>& p, int64_t c, const Channel& ch,
                                     const T (&s)[kSums]) {
    p.grad_bias[c] = static_cast<S>(s[0]);
    p.grad_weight[c] = static_cast<S>(s[1]);
    p.grad_gate[c] = static_cast<S>(ch.gamma * s[2]);
  }

  // Gradients reaching mu_B and Q_B, spread over the planes by the merge backward:
  //   grad_m += gmu + 2 L gq dev,  grad_q += gq   (both zero in eval mode).
  struct Final {
    T gmu, gq;
  };
  NF_COEF_HD static Final finalize(const Channel& ch, const T (&s)[kSums], T count) {
    if (!ch.st.batch) return Final{T(0), T(0)};
    const T r = ch.st.r;
    const T grad_var = ch.gamma * ch.gate * s[3] * T(-0.5) * r * r * r;
    return Final{-ch.gamma * ch.gate * r * s[0] / count, grad_var / (count * ch.L)};
  }

  NF_COEF_HD static void backward(const Channel& ch, const Final& f, T m, T r_i, T g1, T g2, T& c_dy,
                                  T& c_x, T& c_0) {
    const T dev = ch.st.dev(m);
    const T inst = ch.gamma * (T(1) - ch.gate);  // weight of the instance part
    c_dy = ch.gamma * (ch.gate * ch.st.r + (T(1) - ch.gate) * r_i);  // = scale, bit for bit
    // r_I = (q / L + eps)^-1/2; the explicit m of the shift cancels the one of (x - m) except for
    // the instance part's -scale_I g1.
    const T grad_q = g2 * inst * T(-0.5) * r_i * r_i * r_i * ch.inv_L + f.gq;
    const T grad_m = -g1 * inst * r_i + f.gmu + T(2) * ch.L * f.gq * dev;
    c_x = T(2) * grad_q;
    c_0 = grad_m * ch.inv_L;
  }
};

// ---- IEBN -----------------------------------------------------------------------------------------
//   delta = sigmoid(m gate_weight + gate_bias)
//   scale = gamma delta r_B        shift = beta + scale (m - mu_B)
template <class T>
struct IebnMath {
  static constexpr int kSums = 5;

  struct Channel {
    T gw, gb, gamma, beta, L, inv_L;
    BatchStats<T> st;
  };

  template <class S>
  NF_COEF_HD static Channel load(const BatchCoefParams<S>& p, int64_t c, const BatchStats<T>& st) {
    const T L = static_cast<T>(p.L);
    return Channel{static_cast<T>(p.gate[c]),      static_cast<T>(p.gate_bias[c]),
                   param_or<T>(p.weight, c, T(1)), param_or<T>(p.bias, c, T(0)),
                   L,                              T(1) / L,
                   st};
  }

  // delta = sigmoid(m gate_weight + gate_bias)
  NF_COEF_HD static T plane(const Channel& ch, T m, T /*q*/) { return sigmoid(m * ch.gw + ch.gb); }

  NF_COEF_HD static void forward(const Channel& ch, T m, T d, T& scale, T& shift) {
    scale = ch.gamma * d * ch.st.r;
    shift = ch.beta + scale * ch.st.dev(m);
  }

  // gs = g2 + g1 dev is the gradient of scale (directly and through the shift); dd = delta'.
  //   s0 = sum g1            -> grad_bias
  //   s1 = sum gs delta      -> grad_weight / r_B, and grad r_B / gamma
  //   s2 = sum gs dd         -> grad_gate_bias / (gamma r_B)
  //   s3 = sum gs dd m       -> grad_gate_weight / (gamma r_B)
  //   s4 = sum g1 delta      -> grad mu_B = -gamma r_B s4
  NF_COEF_HD static void accumulate(const Channel& ch, T m, T d, T g1, T g2, T (&s)[kSums]) {
    const T gs = g2 + g1 * ch.st.dev(m), gdd = gs * d * (T(1) - d);
    s[0] += g1;
    s[1] += gs * d;
    s[2] += gdd;
    s[3] += gdd * m;
    s[4] += g1 * d;
  }

  template <class S>
  NF_COEF_HD static void store_grads(const BatchCoefParams<S>& p, int64_t c, const Channel& ch,
                                     const T (&s)[kSums]) {
    const T gr = ch.gamma * ch.st.r;
    p.grad_bias[c] = static_cast<S>(s[0]);
    p.grad_weight[c] = static_cast<S>(ch.st.r * s[1]);
    p.grad_gate_bias[c] = static_cast<S>(gr * s[2]);
    p.grad_gate[c] = static_cast<S>(gr * s[3]);
  }

  using Final = typename BinMath<T>::Final;
  NF_COEF_HD static Final finalize(const Channel& ch, const T (&s)[kSums], T count) {
    if (!ch.st.batch) return Final{T(0), T(0)};
    const T r = ch.st.r;
    const T grad_var = ch.gamma * s[1] * T(-0.5) * r * r * r;
    return Final{-ch.gamma * r * s[4] / count, grad_var / (count * ch.L)};
  }

  // m reaches the output only through delta and the batch statistics: the explicit m of the
  // shift cancels the -m of (x - m).
  NF_COEF_HD static void backward(const Channel& ch, const Final& f, T m, T d, T g1, T g2, T& c_dy,
                                  T& c_x, T& c_0) {
    const T dev = ch.st.dev(m);
    const T grad_logit = (g2 + g1 * dev) * ch.gamma * ch.st.r * d * (T(1) - d);
    c_dy = ch.gamma * d * ch.st.r;  // = scale, bit for bit
    c_x = T(2) * f.gq;
    c_0 = (grad_logit * ch.gw + f.gmu + T(2) * ch.L * f.gq * dev) * ch.inv_L;
  }
};

// ---- AssocNorm ------------------------------------------------------------------------------------
// Per sample: group statistics (shift, mean relative to it, var, r) from a channel merge, then
//   h = W1 mu, W1 var;   e = relu(h);   d_mu = sigmoid(W2 e_mu);   d_var = tanh(W3 e_var)
//   scale = (d_mu[g] + B_omega) r_G       shift = d_var[g] + B_beta + scale (m - mu_G)
template <class T>
struct GroupStats {
  T shift, mean, var;  // mean relative to shift; var = Q / (C/G L)
  NF_COEF_HD T mu() const { return shift + mean; }
  NF_COEF_HD T dev(T m) const { return (m - shift) - mean; }
};

template <class T>
NF_COEF_HD void assoc_forward(T m, const GroupStats<T>& gs, T r, T d_mu, T d_var, T weight,
                              T bias, T& scale, T& shift) {
  scale = (d_mu + weight) * r;
  shift = d_var + bias + scale * gs.dev(m);
}

// Per channel of one sample: contributions to the group sums
//   s0 = sum grad_omega (= gs r)    -> decoder_mean path      s1 = sum g1 -> decoder_var path
//   s2 = sum g1 scale               -> grad mu_G              s3 = sum gs omega -> grad r_G
// and the per-sample partials of grad_weight (grad_omega) and grad_bias (g1).
template <class T>
NF_COEF_HD void assoc_accumulate(T m, T g1, T g2, const GroupStats<T>& st, T r, T d_mu, T weight,
                                 T (&s)[4], T& grad_omega, T& c_dy) {
  const T omega = d_mu + weight, scale = omega * r;
  const T gs = g2 + g1 * st.dev(m);  // scale reaches y directly and through the shift
  grad_omega = gs * r;
  c_dy = scale;
  s[0] += grad_omega;
  s[1] += g1;
  s[2] += g1 * scale;
  s[3] += gs * omega;
}

// A decoder pre-activation's gradient from the gradient of its output: through a sigmoid
// (output s; AssocNorm's d_mu from s0, ILM-Norm's d_w) or a tanh (output t; AssocNorm's d_var
// from s1, ILM-Norm's d_b).
template <class T>
NF_COEF_HD T sigmoid_grad(T grad_out, T s) {
  return grad_out * s * (T(1) - s);
}
template <class T>
NF_COEF_HD T tanh_grad(T grad_out, T t) {
  return grad_out * (T(1) - t * t);
}

// Gradients of the group mean / variance: through the encoder (enc_mu = sum_j gh_mu[j] W1[j, g],
// same for var) and directly; the explicit m of the shift cancels the one of (x - m).
template <class T>
NF_COEF_HD T assoc_grad_mu(T enc_mu, T s2) {
  return enc_mu - s2;
}
template <class T>
NF_COEF_HD T assoc_grad_var(T enc_var, T s3, T r) {
  return enc_var + s3 * T(-0.5) * r * r * r;
}

// Group-merge backward for one plane: c_x = 2 grad_q, c_0 = grad_mean / L.
template <class T>
NF_COEF_HD void assoc_backward(T m, const GroupStats<T>& st, T grad_mu, T grad_var, T per_group,
                               T L, T& c_x, T& c_0) {
  const T grad_q = grad_var / (per_group * L);
  c_x = T(2) * grad_q;
  c_0 = (grad_mu / per_group + T(2) * L * grad_q * st.dev(m)) / L;
}

}  // namespace coef
}  // namespace nf
