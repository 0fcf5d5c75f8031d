// CPU ops assoc_coefficients / assoc_coefficients_backward (docs/architecture.md): argument
// checks, outputs, and the call of the kernels (coefficients_assoc_impl.h: per sample, vectorised;
// parameter gradients summed over samples in order, so results do not depend on the number of
// threads; AVX2 or portable build, coefficients_kernels.h). Formulas from common/coefficients.h;
// arithmetic in the statistics' dtype.
#include <torch/library.h>

#include <tuple>

#include "common/coefficients_glue.h"
#include "cpu/coefficients_kernels.h"

namespace {

using at::Tensor;

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
    if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_forward, p);
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
    if (p.N > 0 && p.C > 0) NF_CPU_CALL(assoc_backward, p);
  });
  if (mean.size(0) > 0 && mean.size(1) == 0)  // no channel: nothing reaches the parameters
    for (Tensor* t : {&g_enc, &g_dec_mean, &g_dec_var, &g_weight, &g_bias}) t->zero_();
  return {c_dy, c_x, c_0, g_enc, g_dec_mean, g_dec_var, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  m.impl("assoc_coefficients", &assoc_coefficients);
  m.impl("assoc_coefficients_backward", &assoc_coefficients_backward);
}
