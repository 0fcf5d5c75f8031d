// CPU kernels of assoc_coefficients and its backward (docs/architecture.md). at::parallel_for over
// samples for the per-sample work (group merge, auto-encoder, per-channel coefficients); the
// parameter gradients (sums over samples) in two more parallel passes, over channels and over
// auto-encoder weights, each output summed over n = 0..N-1 in order by one thread: results do not
// depend on the number of threads. Arithmetic in double; formulas from common/coefficients.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/coefficients.h"
#include "common/coefficients_glue.h"

namespace {

using at::Tensor;
using nf::AssocCoefParams;
using T = double;  // compute type
namespace coef = nf::coef;

// Per-sample vectors (the ones the CUDA kernel keeps in shared memory): over G: shift, mean, var,
// d (d_mu | d_var), s0..s3 (group sums, then the gradients built from them); over M: h (h_mu |
// h_var), gh (grad h_mu | grad h_var). The forward needs the first 5G + 2M values only.
struct Sample {
  T *shift, *mean, *var, *d, *s0, *s1, *s2, *s3, *h, *gh;
  static int64_t size(int64_t G, int64_t M) { return 9 * G + 4 * M; }
  Sample(T* base, int64_t G, int64_t M) {
    shift = base;
    mean = shift + G;
    var = mean + G;
    d = var + G;
    h = d + 2 * G;
    gh = h + 2 * M;  // forward scratch ends here
    s0 = gh + 2 * M;
    s1 = s0 + G;
    s2 = s1 + G;
    s3 = s2 + G;
  }
  coef::GroupStats<T> stats(int64_t g) const { return {shift[g], mean[g], var[g]}; }
};

// r_G of group g (0 for one-element groups, see coef::invstd_or_zero).
template <class S>
T invstd(const AssocCoefParams<S>& p, const Sample& w, int64_t g) {
  return coef::invstd_or_zero(w.var[g], static_cast<T>(p.per_group() * p.L), static_cast<T>(p.eps));
}

// Items per at::parallel_for task: enough work (~16k plane visits) to outweigh the scheduling.
int64_t items_per_task(int64_t work_per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_item, 1)); }

// Group statistics (two passes per group, means relative to the group's first channel), then the
// auto-encoder: h = W1 mu, W1 var; d_mu = sigmoid(W2 relu(h_mu)); d_var = tanh(W3 relu(h_var)).
template <class S>
void sample_forward(const AssocCoefParams<S>& p, int64_t n, const Sample& w) {
  const int64_t G = p.G, M = p.M, cpg = p.per_group();
  const T L = static_cast<T>(p.L);
  const S* m = p.mean + n * p.C;
  const S* q = p.m2 + n * p.C;
  for (int64_t g = 0; g < G; ++g) {
    const T shift = m[g * cpg];
    T sum = 0;
    for (int64_t j = 0; j < cpg; ++j) sum += static_cast<T>(m[g * cpg + j]) - shift;
    const T mean_rel = sum / static_cast<T>(cpg);
    T q_sum = 0, dev2 = 0;
    for (int64_t j = 0; j < cpg; ++j) {
      const T d = (static_cast<T>(m[g * cpg + j]) - shift) - mean_rel;
      q_sum += q[g * cpg + j];
      dev2 += d * d;
    }
    w.shift[g] = shift;
    w.mean[g] = mean_rel;
    w.var[g] = (q_sum + L * dev2) / (static_cast<T>(cpg) * L);
  }
  for (int64_t j = 0; j < M; ++j) {
    T h_mu = 0, h_var = 0;
    for (int64_t g = 0; g < G; ++g) {
      h_mu += static_cast<T>(p.encoder[j * G + g]) * w.stats(g).mu();
      h_var += static_cast<T>(p.encoder[j * G + g]) * w.var[g];
    }
    w.h[j] = h_mu;
    w.h[M + j] = h_var;
  }
  for (int64_t g = 0; g < G; ++g) {
    T z_mu = 0, z_var = 0;
    for (int64_t j = 0; j < M; ++j) {
      z_mu += static_cast<T>(p.decoder_mean[g * M + j]) * coef::relu(w.h[j]);
      z_var += static_cast<T>(p.decoder_var[g * M + j]) * coef::relu(w.h[M + j]);
    }
    w.d[g] = coef::sigmoid(z_mu);
    w.d[G + g] = coef::tanh_(z_var);
  }
}

template <class S>
void forward_cpu(const AssocCoefParams<S>& p) {
  at::parallel_for(0, p.N, items_per_task(p.C + 4 * p.M * p.G), [&](int64_t n0, int64_t n1) {
    const nf_coef::Scratch scratch(Sample::size(p.G, p.M));  // one sample per task
    const Sample w(scratch.data(), p.G, p.M);
    for (int64_t n = n0; n < n1; ++n) {
      sample_forward(p, n, w);
      for (int64_t g = 0, c = 0; g < p.G; ++g) {
        const T r = invstd(p, w, g);
        for (const int64_t end = c + p.per_group(); c < end; ++c) {
          const int64_t i = n * p.C + c;
          T scale, shift;
          coef::assoc_forward<T>(p.mean[i], w.stats(g), r, w.d[g], w.d[p.G + g], p.weight[c], p.bias[c], scale,
                                 shift);
          p.scale[i] = static_cast<S>(scale);
          p.shift[i] = static_cast<S>(shift);
        }
      }
    }
  });
}

// Phase 1 (per sample): forward again, c_dy / c_x / c_0, and the per-sample vectors the
// parameter gradients need, kept in `ws` (N rows of Sample::size).
template <class S>
void backward_samples(const AssocCoefParams<S>& p, T* ws) {
  const int64_t C = p.C, G = p.G, M = p.M, cpg = p.per_group();
  const T L = static_cast<T>(p.L);
  at::parallel_for(0, p.N, items_per_task(2 * C + 6 * M * G), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const Sample w(ws + n * Sample::size(G, M), G, M);
      sample_forward(p, n, w);
      for (int64_t g = 0; g < G; ++g) {
        T s[4] = {0, 0, 0, 0};
        const T r = invstd(p, w, g);
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const int64_t i = n * C + c;
          T grad_omega, c_dy;
          coef::assoc_accumulate<T>(p.mean[i], p.sum_dy[i], p.sum_dy_xmu[i], w.stats(g), r, w.d[g], p.weight[c], s,
                                    grad_omega, c_dy);
          p.c_dy[i] = static_cast<S>(c_dy);
        }
        w.s0[g] = coef::assoc_grad_z_mean(s[0], w.d[g]);  // decoder pre-activation gradients
        w.s1[g] = coef::assoc_grad_z_var(s[1], w.d[G + g]);
        w.s2[g] = s[2];
        w.s3[g] = s[3];
      }
      // grad h: through the decoders (rows of W2 / W3 in order) and the relu
      std::fill(w.gh, w.gh + 2 * M, T(0));
      for (int64_t g = 0; g < G; ++g) {
        const S* w2 = p.decoder_mean + g * M;
        const S* w3 = p.decoder_var + g * M;
        for (int64_t j = 0; j < M; ++j) {
          w.gh[j] += w.s0[g] * static_cast<T>(w2[j]);
          w.gh[M + j] += w.s1[g] * static_cast<T>(w3[j]);
        }
      }
      for (int64_t j = 0; j < 2 * M; ++j)
        if (!(w.h[j] > 0)) w.gh[j] = 0;
      // gradients of mu_G, var_G in place of s2, s3: the direct terms first (assoc_grad_* are
      // `encoder term + direct term`), then the encoder terms, rows of W1 in order
      for (int64_t g = 0; g < G; ++g) {
        w.s2[g] = coef::assoc_grad_mu(T(0), w.s2[g]);
        w.s3[g] = coef::assoc_grad_var(T(0), w.s3[g], invstd(p, w, g));
      }
      for (int64_t j = 0; j < M; ++j) {
        const S* w1 = p.encoder + j * G;
        for (int64_t g = 0; g < G; ++g) {
          w.s2[g] += w.gh[j] * static_cast<T>(w1[g]);
          w.s3[g] += w.gh[M + j] * static_cast<T>(w1[g]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / cpg, i = n * C + c;
        T c_x, c_0;
        coef::assoc_backward<T>(p.mean[i], w.stats(g), w.s2[g], w.s3[g], static_cast<T>(cpg), L, c_x, c_0);
        p.c_x[i] = static_cast<S>(c_x);
        p.c_0[i] = static_cast<S>(c_0);
      }
    }
  });
}

// Phases 2 and 3: sums over the samples, each output summed over n = 0..N-1 in order by one
// task; the loops walk rows (n outer) over fixed tiles of channels / of decoder columns.
constexpr int64_t kTile = 64;

template <class S>
void backward_params(const AssocCoefParams<S>& p, const T* ws) {
  const int64_t C = p.C, G = p.G, M = p.M, cpg = p.per_group(), W = Sample::size(G, M);
  auto sample = [&](int64_t n) { return Sample(const_cast<T*>(ws) + n * W, G, M); };
  const int64_t c_tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, c_tiles, items_per_task(kTile * p.N) , [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTile, width = std::min(kTile, C - c0);
      T g_weight[kTile] = {}, g_bias[kTile] = {};
      for (int64_t n = 0; n < p.N; ++n) {
        const Sample w = sample(n);
        for (int64_t k = 0; k < width; ++k) {
          const int64_t c = c0 + k, g = c / cpg, i = n * C + c;
          T s[4] = {0, 0, 0, 0}, grad_omega, c_dy;
          coef::assoc_accumulate<T>(p.mean[i], p.sum_dy[i], p.sum_dy_xmu[i], w.stats(g), invstd(p, w, g), w.d[g],
                                    p.weight[c], s, grad_omega, c_dy);
          g_weight[k] += grad_omega;
          g_bias[k] += p.sum_dy[i];
        }
      }
      for (int64_t k = 0; k < width; ++k) {
        p.grad_weight[c0 + k] = static_cast<S>(g_weight[k]);
        p.grad_bias[c0 + k] = static_cast<S>(g_bias[k]);
      }
    }
  });
  // Item (g, tile of j): decoder entries [g, j] and encoder entries [j, g].
  const int64_t j_tiles = (M + kTile - 1) / kTile;
  at::parallel_for(0, G * j_tiles, items_per_task(kTile * p.N), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t g = k / j_tiles, j0 = (k % j_tiles) * kTile, width = std::min(kTile, M - j0);
      T dec_mu[kTile] = {}, dec_var[kTile] = {}, enc[kTile] = {};
      for (int64_t n = 0; n < p.N; ++n) {
        const Sample w = sample(n);
        const T gz_mu = w.s0[g], gz_var = w.s1[g], mu = w.stats(g).mu(), var = w.var[g];
        for (int64_t j = 0; j < width; ++j) {
          dec_mu[j] += gz_mu * coef::relu(w.h[j0 + j]);
          dec_var[j] += gz_var * coef::relu(w.h[M + j0 + j]);
          enc[j] += w.gh[j0 + j] * mu + w.gh[M + j0 + j] * var;
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        p.grad_decoder_mean[g * M + j0 + j] = static_cast<S>(dec_mu[j]);
        p.grad_decoder_var[g * M + j0 + j] = static_cast<S>(dec_var[j]);
        p.grad_encoder[(j0 + j) * G + g] = static_cast<S>(enc[j]);
      }
    }
  });
}

std::tuple<Tensor, Tensor> assoc_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                              int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                                              const Tensor& decoder_var, const Tensor& weight, const Tensor& bias,
                                              double eps) {
  const char* op = "assoc_coefficients";
  nf_coef::check_stats(op, mean, m2);
  Tensor scale = nf_coef::empty_stats(mean), shift = nf_coef::empty_stats(mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::assoc_params<scalar_t>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                             decoder_var, weight, bias, eps);
    p.scale = scale.data_ptr<scalar_t>();
    p.shift = shift.data_ptr<scalar_t>();
    if (p.N > 0 && p.C > 0) forward_cpu(p);
  });
  return {scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> assoc_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean, const Tensor& decoder_var,
    const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "assoc_coefficients_backward";
  nf_coef::check_stats(op, mean, m2);
  Tensor c_dy = nf_coef::empty_stats(mean), c_x = nf_coef::empty_stats(mean), c_0 = nf_coef::empty_stats(mean);
  Tensor g_enc = nf_coef::empty_grad(encoder.sizes(), mean), g_dec_mean = nf_coef::empty_grad(decoder_mean.sizes(), mean),
         g_dec_var = nf_coef::empty_grad(decoder_var.sizes(), mean), g_weight = nf_coef::empty_grad(weight.sizes(), mean),
         g_bias = nf_coef::empty_grad(bias.sizes(), mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::assoc_params<scalar_t>(op, mean, m2, plane_size, num_groups, encoder, decoder_mean,
                                             decoder_var, weight, bias, eps);
    nf_coef::check_like_stats(op, "sum_dy", sum_dy, mean);
    nf_coef::check_like_stats(op, "sum_dy_xmu", sum_dy_xmu, mean);
    p.sum_dy = sum_dy.data_ptr<scalar_t>();
    p.sum_dy_xmu = sum_dy_xmu.data_ptr<scalar_t>();
    p.c_dy = c_dy.data_ptr<scalar_t>();
    p.c_x = c_x.data_ptr<scalar_t>();
    p.c_0 = c_0.data_ptr<scalar_t>();
    p.grad_encoder = g_enc.data_ptr<scalar_t>();
    p.grad_decoder_mean = g_dec_mean.data_ptr<scalar_t>();
    p.grad_decoder_var = g_dec_var.data_ptr<scalar_t>();
    p.grad_weight = g_weight.data_ptr<scalar_t>();
    p.grad_bias = g_bias.data_ptr<scalar_t>();
    if (p.N == 0) return;
    // Per-sample vectors for the parameter gradients (the caller's scratch, shared by the tasks).
    const nf_coef::Scratch ws(p.N * Sample::size(p.G, p.M));
    backward_samples(p, ws.data());
    backward_params(p, ws.data());
  });
  return {c_dy, c_x, c_0, g_enc, g_dec_mean, g_dec_var, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("assoc_coefficients", &assoc_coefficients);
  m.impl("assoc_coefficients_backward", &assoc_coefficients_backward);
}
