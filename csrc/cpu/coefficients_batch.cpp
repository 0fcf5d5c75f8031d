// CPU kernels of bin_coefficients / iebn_coefficients and their backward (docs/architecture.md).
// at::parallel_for over tiles of channels; each channel is independent (its batch merge, its
// parameter sums), so results do not depend on the number of threads. Arithmetic in double for float32 and
// float64 statistics alike (cheap at O(N C), and it makes float32 outputs correctly rounded
// versions of the float64 ones); the formulas are common/coefficients.h, shared with the CUDA
// kernels. No allocation besides the outputs (scratch is a per-thread buffer that grows once).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/coefficients.h"
#include "common/coefficients_glue.h"

namespace {

using at::Tensor;
using nf::BatchCoefParams;
using nf_coef::OptTensor;
using T = double;  // compute type

// Work is split into fixed tiles of kTile channels, and each tile walks the (N, C) arrays row by
// row (n outer, its channels inner): contiguous reads instead of one cache line per plane, with
// the per-channel state in small stack arrays. Tiles never depend on the thread count.
constexpr int64_t kTile = 64;

// Tiles per task: enough planes that a task outweighs the scheduling cost (~32k plane visits).
int64_t tile_grain(int64_t N) { return std::max<int64_t>(1, 32768 / (kTile * std::max<int64_t>(N, 1))); }

template <class F>
void for_each_tile(int64_t N, int64_t C, F&& f) {
  at::parallel_for(0, (C + kTile - 1) / kTile, tile_grain(N), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t * kTile, std::min(kTile, C - t * kTile));
  });
}

// mu_B / r_B of channels [c0, c0 + w): two passes over the batch like the reference (means
// relative to the first plane's, then the centred sum), or the running statistics. Updates the
// running ones when asked (training with running statistics).
template <class S>
void tile_stats(const BatchCoefParams<S>& p, int64_t c0, int64_t w, bool update, nf::coef::BatchStats<T>* st) {
  const T L = static_cast<T>(p.L), eps = static_cast<T>(p.eps);
  if (!p.use_batch()) {
    for (int64_t k = 0; k < w; ++k)
      st[k] = nf::coef::running_stats<T>(p.running_mean[c0 + k], p.running_var[c0 + k], eps);
    return;
  }
  T shift[kTile], mean[kTile] = {}, q[kTile] = {}, dev2[kTile] = {};
  for (int64_t k = 0; k < w; ++k) shift[k] = p.mean[c0 + k];
  for (int64_t n = 0; n < p.N; ++n) {
    const S* m = p.mean + n * p.C + c0;
    for (int64_t k = 0; k < w; ++k) mean[k] += static_cast<T>(m[k]) - shift[k];
  }
  const T count = static_cast<T>(p.N);
  for (int64_t k = 0; k < w; ++k) mean[k] /= count;  // relative to shift
  for (int64_t n = 0; n < p.N; ++n) {
    const S* m = p.mean + n * p.C + c0;
    const S* m2 = p.m2 + n * p.C + c0;
    for (int64_t k = 0; k < w; ++k) {
      const T d = (static_cast<T>(m[k]) - shift[k]) - mean[k];
      q[k] += m2[k];
      dev2[k] += d * d;
    }
  }
  for (int64_t k = 0; k < w; ++k) {
    const T q_total = q[k] + L * dev2[k];
    if (update) {
      T rm = p.running_mean[c0 + k], rv = p.running_var[c0 + k];
      nf::coef::update_running(rm, rv, shift[k], mean[k], q_total, count, L, static_cast<T>(p.momentum));
      p.running_mean[c0 + k] = static_cast<S>(rm);
      p.running_var[c0 + k] = static_cast<S>(rv);
    }
    st[k] = nf::coef::batch_stats(shift[k], mean[k], q_total, count, L, eps);
  }
}

template <class Math, class S>
void forward_cpu(const BatchCoefParams<S>& p) {
  for_each_tile(p.N, p.C, [&](int64_t c0, int64_t w) {
    nf::coef::BatchStats<T> st[kTile];
    typename Math::Channel ch[kTile];
    tile_stats(p, c0, w, p.update_running(), st);
    for (int64_t k = 0; k < w; ++k) ch[k] = Math::load(p, c0 + k, st[k]);
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t i = n * p.C + c0;
      for (int64_t k = 0; k < w; ++k) {
        const T m = p.mean[i + k];
        T scale, shift;
        Math::forward(ch[k], m, Math::plane(ch[k], m, p.m2[i + k]), scale, shift);
        p.scale[i + k] = static_cast<S>(scale);
        p.shift[i + k] = static_cast<S>(shift);
      }
    }
  });
}

template <class Math, class S>
void backward_cpu(const BatchCoefParams<S>& p) {
  for_each_tile(p.N, p.C, [&](int64_t c0, int64_t w) {
    nf::coef::BatchStats<T> st[kTile];
    typename Math::Channel ch[kTile];
    typename Math::Final f[kTile];
    T s[kTile][Math::kSums] = {};
    // the tile's plane values (r_I / delta: a square root or an exponential each), kept from the
    // sums pass to the output pass
    const nf_coef::Scratch pv_buf(p.N * kTile);
    T* pv = pv_buf.data();
    tile_stats(p, c0, w, false, st);
    for (int64_t k = 0; k < w; ++k) ch[k] = Math::load(p, c0 + k, st[k]);
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t i = n * p.C + c0;
      for (int64_t k = 0; k < w; ++k) {
        const T m = p.mean[i + k];
        pv[n * kTile + k] = Math::plane(ch[k], m, p.m2[i + k]);
        Math::accumulate(ch[k], m, pv[n * kTile + k], p.sum_dy[i + k], p.sum_dy_xmu[i + k], s[k]);
      }
    }
    for (int64_t k = 0; k < w; ++k) {
      Math::store_grads(p, c0 + k, ch[k], s[k]);
      f[k] = Math::finalize(ch[k], s[k], static_cast<T>(p.N));
    }
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t i = n * p.C + c0;
      for (int64_t k = 0; k < w; ++k) {
        T c_dy, c_x, c_0;
        Math::backward(ch[k], f[k], p.mean[i + k], pv[n * kTile + k], p.sum_dy[i + k], p.sum_dy_xmu[i + k], c_dy,
                       c_x, c_0);
        p.c_dy[i + k] = static_cast<S>(c_dy);
        p.c_x[i + k] = static_cast<S>(c_x);
        p.c_0[i + k] = static_cast<S>(c_0);
      }
    }
  });
}

// ---- op entry points --------------------------------------------------------------------------------

template <template <class> class Math>
std::tuple<Tensor, Tensor> forward_op(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                      const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight,
                                      const OptTensor& bias, const OptTensor& running_mean,
                                      const OptTensor& running_var, bool training, double momentum, double eps) {
  nf_coef::check_stats(op, mean, m2);  // before the dtype dispatch: a clear message for bad dtypes
  Tensor scale = nf_coef::empty_stats(mean), shift = nf_coef::empty_stats(mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::batch_params<scalar_t>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                             running_var, training, momentum, eps);
    p.scale = scale.data_ptr<scalar_t>();
    p.shift = shift.data_ptr<scalar_t>();
    if (p.N > 0) forward_cpu<Math<T>>(p);
  });
  return {scale, shift};
}

// Returns c_dy, c_x, c_0, grad_gate, grad_gate_bias (undefined for BIN), grad_weight, grad_bias.
template <template <class> class Math>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_op(
    const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2,
    int64_t plane_size, const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  const int64_t C = nf_coef::check_stats(op, mean, m2).second;
  Tensor c_dy = nf_coef::empty_stats(mean), c_x = nf_coef::empty_stats(mean), c_0 = nf_coef::empty_stats(mean);
  Tensor g_gate = nf_coef::empty_grad({C}, mean), g_gate_bias, g_weight = nf_coef::empty_grad({C}, mean),
         g_bias = nf_coef::empty_grad({C}, mean);
  if (gate_bias) g_gate_bias = nf_coef::empty_grad({C}, mean);
  nf_coef::dispatch_stats(mean, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto p = nf_coef::batch_params<scalar_t>(op, mean, m2, plane_size, gate, gate_bias, weight, bias, running_mean,
                                             running_var, training, 0.0, eps);
    nf_coef::batch_backward_params(p, op, sum_dy, sum_dy_xmu, mean);
    p.c_dy = c_dy.data_ptr<scalar_t>();
    p.c_x = c_x.data_ptr<scalar_t>();
    p.c_0 = c_0.data_ptr<scalar_t>();
    p.grad_gate = g_gate.data_ptr<scalar_t>();
    p.grad_gate_bias = gate_bias ? g_gate_bias.data_ptr<scalar_t>() : nullptr;
    p.grad_weight = g_weight.data_ptr<scalar_t>();
    p.grad_bias = g_bias.data_ptr<scalar_t>();
    if (p.N > 0) backward_cpu<Math<T>>(p);
  });
  return {c_dy, c_x, c_0, g_gate, g_gate_bias, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> bin_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                            const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                            const OptTensor& running_mean, const OptTensor& running_var,
                                            bool training, double momentum, double eps) {
  return forward_op<nf::coef::BinMath>("bin_coefficients", mean, m2, plane_size, gate, nullptr, weight, bias,
                                       running_mean, running_var, training, momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bin_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double eps) {
  auto [c_dy, c_x, c_0, g_gate, unused, g_weight, g_bias] =
      backward_op<nf::coef::BinMath>("bin_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size, gate,
                                     nullptr, weight, bias, running_mean, running_var, training, eps);
  return {c_dy, c_x, c_0, g_gate, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> iebn_coefficients(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                             const Tensor& gate_weight, const Tensor& gate_bias,
                                             const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& running_mean, const OptTensor& running_var,
                                             bool training, double momentum, double eps) {
  return forward_op<nf::coef::IebnMath>("iebn_coefficients", mean, m2, plane_size, gate_weight, &gate_bias, weight,
                                        bias, running_mean, running_var, training, momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> iebn_coefficients_backward(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  return backward_op<nf::coef::IebnMath>("iebn_coefficients_backward", sum_dy, sum_dy_xmu, mean, m2, plane_size,
                                         gate_weight, &gate_bias, weight, bias, running_mean, running_var, training,
                                         eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("bin_coefficients", &bin_coefficients);
  m.impl("bin_coefficients_backward", &bin_coefficients_backward);
  m.impl("iebn_coefficients", &iebn_coefficients);
  m.impl("iebn_coefficients_backward", &iebn_coefficients_backward);
}
