// Torch glue shared by the CPU and CUDA registrations of the coefficient ops: argument checks with
// clear messages, the filling of the plain parameter structs (common/coefficients_params.h) and
// the allocation of the outputs. The op entry points built from these are in
// common/coefficient_ops.h. Namespace nf_coef_glue (torch glue), not nf::coef (the torch-free
// math of common/coefficients.h). Torch is fine here; only .cpp files include this (never a .cu
// / .cuh).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <array>
#include <iterator>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/coefficients_params.h"
#include "common/torch_glue.h"

namespace nf_coef_glue {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// mean / m2 (and sum_dy / sum_dy_xmu in the backward): (N, C), contiguous, float32 or float64,
// all alike. Returns {N, C}.
inline std::pair<int64_t, int64_t> check_stats(const char* op, const Tensor& mean, const Tensor& m2) {
  TORCH_CHECK(mean.dim() == 2, "normfuse.", op, ": mean must be (N, C), got shape ", mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, "normfuse.", op,
              ": mean (the statistics) must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(mean.is_contiguous(), "normfuse.", op, ": mean must be contiguous");
  TORCH_CHECK(m2.sizes() == mean.sizes() && m2.scalar_type() == mean.scalar_type() && m2.device() == mean.device() &&
                  m2.is_contiguous(),
              "normfuse.", op, ": m2 must be a contiguous ", mean.scalar_type(), " tensor of shape ", mean.sizes(),
              " on ", mean.device(), " like mean, got ", m2.scalar_type(), " ", m2.sizes(), " on ", m2.device(),
              m2.is_contiguous() ? "" : " (not contiguous)");
  return {mean.size(0), mean.size(1)};
}

inline void check_like_stats(const char* op, const char* name, const Tensor& t, const Tensor& mean) {
  TORCH_CHECK(t.sizes() == mean.sizes() && t.scalar_type() == mean.scalar_type() && t.device() == mean.device() &&
                  t.is_contiguous(),
              "normfuse.", op, ": ", name, " must be a contiguous ", mean.scalar_type(), " tensor of shape ",
              mean.sizes(), " on ", mean.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// A parameter of shape `shape` (contiguous, stats dtype, stats device): checked, then its data.
template <class S>
S* param_ptr(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape, const Tensor& mean) {
  TORCH_CHECK(t.sizes() == shape, "normfuse.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == mean.scalar_type(), "normfuse.", op, ": ", name, " must be ", mean.scalar_type(),
              " like the statistics (float32, float64 for a float64 input), got ", t.scalar_type());
  TORCH_CHECK(t.device() == mean.device(), "normfuse.", op, ": ", name, " is on ", t.device(), ", statistics on ",
              mean.device());
  TORCH_CHECK(t.is_contiguous(), "normfuse.", op, ": ", name, " must be contiguous");
  return t.data_ptr<S>();
}

// An optional per-channel parameter: null when not given.
template <class S>
S* opt_param_ptr(const char* op, const char* name, const OptTensor& t, int64_t C, const Tensor& mean) {
  return t.has_value() ? param_ptr<S>(op, name, *t, {C}, mean) : nullptr;
}

inline void check_plane_size(const char* op, int64_t plane_size) {
  TORCH_CHECK(plane_size >= 1, "normfuse.", op, ": plane_size must be >= 1, got ", plane_size);
}

// What every layer's params hold first: the checked statistics (mean, m2: (N, C)) and plane size.
// `P`: BatchCoefParams, AssocCoefParams or IlmCoefParams.
template <template <class> class P, class S>
P<S> stats_params(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size) {
  const auto [N, C] = check_stats(op, mean, m2);
  check_plane_size(op, plane_size);
  P<S> p;
  p.mean = mean.data_ptr<S>();
  p.m2 = m2.data_ptr<S>();
  p.N = N;
  p.C = C;
  p.L = plane_size;
  return p;
}

// `written` (updated in place) must not share memory with `other` (read or written by the same call).
inline void check_no_overlap(const char* op, const char* written_name, const Tensor& written, const char* other_name,
                             const Tensor& other) {
  TORCH_CHECK(!nf_glue::shares_memory(written, other), "normfuse.", op, ": ", written_name,
              " must not share memory with ", other_name, " (", written_name,
              " is updated in place); pass separate tensors");
}

// Everything BIN / IEBN share; `gate_bias` is null for BIN. The running statistics are checked
// (both or neither) and, in the backward, only passed where eval mode reads them.
template <class S>
nf::BatchCoefParams<S> batch_params(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                    const Tensor& gate, const Tensor* gate_bias, const OptTensor& weight,
                                    const OptTensor& bias, const OptTensor& running_mean,
                                    const OptTensor& running_var, bool training, double momentum, double eps) {
  auto p = stats_params<nf::BatchCoefParams, S>(op, mean, m2, plane_size);
  p.gate = param_ptr<S>(op, gate_bias ? "gate_weight" : "gate", gate, {p.C}, mean);
  if (gate_bias) p.gate_bias = param_ptr<S>(op, "gate_bias", *gate_bias, {p.C}, mean);
  p.weight = opt_param_ptr<S>(op, "weight", weight, p.C, mean);
  p.bias = opt_param_ptr<S>(op, "bias", bias, p.C, mean);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "normfuse.", op,
              ": running_mean and running_var must be given together");
  p.running_mean = opt_param_ptr<S>(op, "running_mean", running_mean, p.C, mean);
  p.running_var = opt_param_ptr<S>(op, "running_var", running_var, p.C, mean);
  if (training && running_mean.has_value()) {
    // Written in place while the other arguments are read: sharing memory would give
    // silently wrong statistics (and, aliasing an input, wrong coefficients).
    const std::pair<const char*, const Tensor*> read[] = {
        {"mean", &mean}, {"m2", &m2}, {gate_bias ? "gate_weight" : "gate", &gate}, {"gate_bias", gate_bias},
        {"weight", weight ? &*weight : nullptr}, {"bias", bias ? &*bias : nullptr}};
    check_no_overlap(op, "running_mean", *running_mean, "running_var", *running_var);
    for (const auto& [name, t] : read) {
      if (t == nullptr) continue;
      check_no_overlap(op, "running_mean", *running_mean, name, *t);
      check_no_overlap(op, "running_var", *running_var, name, *t);
    }
  }
  p.training = training;
  p.momentum = momentum;
  p.eps = eps;
  return p;
}

// A layer step reads the input and, in training, writes the running statistics; the layer
// direction then reads the input again (the apply): sharing memory would change both.
inline void check_running_not_input(const char* op, const Tensor& input, const OptTensor& running_mean,
                                    const OptTensor& running_var, bool training) {
  if (!training) return;
  if (running_mean.has_value()) check_no_overlap(op, "running_mean", *running_mean, "input", input);
  if (running_var.has_value()) check_no_overlap(op, "running_var", *running_var, "input", input);
}

// Forward addition: the batch counter (a module's num_batches_tracked), checked before anything
// is computed or mutated. It is incremented (by the kernel on CUDA, by the op on the CPU) when
// training, so it is left alone in eval mode even when given; then it must not share memory
// with the running statistics updated beside it.
// What set_batch_counter takes for num_batches_tracked: a 0-dim (or 1-element) int64 tensor on
// the statistics' device.
inline bool is_batch_counter(const Tensor& t, const c10::Device& device) {
  return t.scalar_type() == at::kLong && t.numel() == 1 && t.dim() <= 1 && t.device() == device;
}

template <class S>
void set_batch_counter(nf::BatchCoefParams<S>& p, const char* op, const OptTensor& num_batches_tracked,
                       const Tensor& mean, const OptTensor& running_mean, const OptTensor& running_var) {
  if (!num_batches_tracked.has_value()) return;
  const Tensor& t = *num_batches_tracked;
  TORCH_CHECK(is_batch_counter(t, mean.device()),
              "normfuse.", op, ": num_batches_tracked must be a 0-dim (or 1-element) int64 tensor on ",
              mean.device(), " like the statistics, got a ", t.scalar_type(), " tensor of shape ", t.sizes(),
              " on ", t.device());
  if (p.training) {
    if (running_mean.has_value())
      check_no_overlap(op, "num_batches_tracked", t, "running_mean", *running_mean);
    if (running_var.has_value()) check_no_overlap(op, "num_batches_tracked", t, "running_var", *running_var);
  }
  p.num_batches_tracked = t.data_ptr<int64_t>();
}

// Backward addition of every layer: the two gradient sums. `P`: BatchCoefParams<S>,
// AssocCoefParams<S> or IlmCoefParams<S>.
template <class P>
void set_gradient_sums(P& p, const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& mean) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(p.mean)>>;
  check_like_stats(op, "sum_dy", sum_dy, mean);
  check_like_stats(op, "sum_dy_xmu", sum_dy_xmu, mean);
  p.sum_dy = sum_dy.template data_ptr<S>();
  p.sum_dy_xmu = sum_dy_xmu.template data_ptr<S>();
}

// BIN / IEBN backward additions: the gradient sums; in training the running statistics play no
// part (the reference recomputes batch statistics and never touches them).
template <class S>
void batch_backward_params(nf::BatchCoefParams<S>& p, const char* op, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                           const Tensor& mean) {
  set_gradient_sums(p, op, sum_dy, sum_dy_xmu, mean);
  if (p.training) p.running_mean = p.running_var = nullptr;
}

template <class S>
nf::AssocCoefParams<S> assoc_params(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                    int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                                    const Tensor& decoder_var, const Tensor& weight, const Tensor& bias, double eps) {
  auto p = stats_params<nf::AssocCoefParams, S>(op, mean, m2, plane_size);
  TORCH_CHECK(num_groups >= 1 && p.C % num_groups == 0, "normfuse.", op, ": num_groups (", num_groups,
              ") must be >= 1 and divide the number of channels (", p.C, ")");
  TORCH_CHECK(encoder.dim() == 2 && encoder.size(1) == num_groups && encoder.size(0) >= 1, "normfuse.", op,
              ": encoder must be (M, num_groups) = (M, ", num_groups, "), got ", encoder.sizes());
  p.G = num_groups;
  p.M = encoder.size(0);
  p.encoder = param_ptr<S>(op, "encoder", encoder, {p.M, p.G}, mean);
  p.decoder_mean = param_ptr<S>(op, "decoder_mean", decoder_mean, {p.G, p.M}, mean);
  p.decoder_var = param_ptr<S>(op, "decoder_var", decoder_var, {p.G, p.M}, mean);
  p.weight = param_ptr<S>(op, "weight", weight, {p.C}, mean);
  p.bias = param_ptr<S>(op, "bias", bias, {p.C}, mean);
  p.eps = eps;
  return p;
}

// ILM-Norm: G groups and K = encoder.shape[1] key groups, both dividing C, and a meta network of
// E = encoder.shape[0] hidden units. The unbiased variances need more than one value per group
// and per key group: refused here as normfuse/coefficients/ilm.py refuses them (the kernels
// would divide by n - 1 = 0).
template <class S>
nf::IlmCoefParams<S> ilm_params(const char* op, const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                int64_t num_groups, const Tensor& encoder, const Tensor& decoder_weight,
                                const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias, double eps) {
  auto p = stats_params<nf::IlmCoefParams, S>(op, mean, m2, plane_size);
  TORCH_CHECK(num_groups >= 1 && p.C % num_groups == 0, "normfuse.", op, ": num_groups (", num_groups,
              ") must be >= 1 and divide the number of channels (", p.C, ")");
  TORCH_CHECK(encoder.dim() == 2 && encoder.size(0) >= 1 && encoder.size(1) >= 1 && p.C % encoder.size(1) == 0,
              "normfuse.", op, ": encoder must be (E, K) with E >= 1 and K (the key-group count) >= 1 dividing ",
              "the number of channels (", p.C, "), got ", encoder.sizes());
  p.G = num_groups;
  p.K = encoder.size(1);
  p.E = encoder.size(0);
  // key groups first, as ilm.py checks them
  const std::pair<const char*, int64_t> counts[] = {{"key group", p.per_key() * plane_size},
                                                    {"group", p.per_group() * plane_size}};
  for (const auto& [what, count] : counts)
    TORCH_CHECK(count > 1, "normfuse.", op, ": the unbiased variance needs more than one value per ", what,
                ", got ", count, " (C = ", p.C, ", num_groups = ", p.G, ", K = ", p.K, ", plane_size = ", plane_size,
                ")");
  p.encoder = param_ptr<S>(op, "encoder", encoder, {p.E, p.K}, mean);
  p.decoder_weight = param_ptr<S>(op, "decoder_weight", decoder_weight, {p.K, p.E}, mean);
  p.decoder_bias = param_ptr<S>(op, "decoder_bias", decoder_bias, {p.K, p.E}, mean);
  p.weight = param_ptr<S>(op, "weight", weight, {p.C}, mean);
  p.bias = param_ptr<S>(op, "bias", bias, {p.C}, mean);
  p.eps = eps;
  return p;
}

inline Tensor empty_stats(const Tensor& mean) { return nf_glue::empty_dense(mean.sizes(), mean.scalar_type(), mean); }

// Parameter gradients: zeros when there is no sample to sum over (N == 0: nothing runs).
inline Tensor empty_grad(at::IntArrayRef shape, const Tensor& mean) {
  return mean.size(0) == 0 ? at::zeros(shape, mean.options()) : nf_glue::empty_dense(shape, mean.scalar_type(), mean);
}

// ---- outputs (allocated after every check; their pointers set in the params) --------------------

struct ForwardOutputs {
  Tensor scale, shift;
};

// `P`: BatchCoefParams<S>, AssocCoefParams<S> or IlmCoefParams<S>.
template <class P>
ForwardOutputs forward_outputs(P& p, const Tensor& mean) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(p.mean)>>;
  ForwardOutputs o{empty_stats(mean), empty_stats(mean)};
  p.scale = o.scale.template data_ptr<S>();
  p.shift = o.shift.template data_ptr<S>();
  return o;
}

// c_dy, c_x, c_0, then the parameter gradients in the op's schema order (BIN: gate, weight, bias;
// IEBN: gate_weight, gate_bias, weight, bias; AssocNorm: encoder, decoder_mean, decoder_var,
// weight, bias).
struct BackwardOutputs {
  Tensor c_dy, c_x, c_0;
  std::vector<Tensor> grads;
};

template <class P>
BackwardOutputs backward_outputs_common(P& p, const Tensor& mean) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(p.mean)>>;
  BackwardOutputs o{empty_stats(mean), empty_stats(mean), empty_stats(mean), {}};
  p.c_dy = o.c_dy.template data_ptr<S>();
  p.c_x = o.c_x.template data_ptr<S>();
  p.c_0 = o.c_0.template data_ptr<S>();
  return o;
}

// `iebn`: the layer has a second gate (gate_bias). Told, not read off p.gate_bias: that pointer is
// null for IEBN too when C = 0 (an empty tensor's data).
template <class S>
BackwardOutputs backward_outputs(nf::BatchCoefParams<S>& p, const Tensor& mean, bool iebn) {
  BackwardOutputs o = backward_outputs_common(p, mean);
  S** slots[] = {&p.grad_gate, &p.grad_gate_bias, &p.grad_weight, &p.grad_bias};
  o.grads.reserve(std::size(slots));
  for (S** slot : slots) {
    if (slot == &p.grad_gate_bias && !iebn) continue;  // BIN has no second gate
    o.grads.push_back(empty_grad({p.C}, mean));
    *slot = o.grads.back().template data_ptr<S>();
  }
  return o;
}

template <class S>
BackwardOutputs backward_outputs(nf::AssocCoefParams<S>& p, const Tensor& mean) {
  BackwardOutputs o = backward_outputs_common(p, mean);
  // Shapes in fixed arrays and the list reserved: no heap allocation besides the tensors' own
  // (they showed in the host-cost profile of this small op).
  struct Slot {
    S** ptr;
    std::array<int64_t, 2> shape;
    size_t dims;
  };
  const Slot slots[] = {{&p.grad_encoder, {p.M, p.G}, 2},
                        {&p.grad_decoder_mean, {p.G, p.M}, 2},
                        {&p.grad_decoder_var, {p.G, p.M}, 2},
                        {&p.grad_weight, {p.C, 0}, 1},
                        {&p.grad_bias, {p.C, 0}, 1}};
  const bool nothing_to_sum = p.N == 0 || p.C == 0;  // no sample, or no channel: zero gradients
  o.grads.reserve(std::size(slots));
  for (const Slot& slot : slots) {
    const at::IntArrayRef shape(slot.shape.data(), slot.dims);
    o.grads.push_back(nothing_to_sum ? at::zeros(shape, mean.options())
                                     : nf_glue::empty_dense(shape, mean.scalar_type(), mean));
    *slot.ptr = o.grads.back().template data_ptr<S>();
  }
  return o;
}

// ILM-Norm: encoder (E, K), decoder_weight, decoder_bias (K, E), weight, bias (C,); zeros when
// there is no sample to sum over.
template <class S>
BackwardOutputs backward_outputs(nf::IlmCoefParams<S>& p, const Tensor& mean) {
  BackwardOutputs o = backward_outputs_common(p, mean);
  struct Slot {
    S** ptr;
    std::array<int64_t, 2> shape;
    size_t dims;
  };
  const Slot slots[] = {{&p.grad_encoder, {p.E, p.K}, 2},
                        {&p.grad_decoder_weight, {p.K, p.E}, 2},
                        {&p.grad_decoder_bias, {p.K, p.E}, 2},
                        {&p.grad_weight, {p.C, 0}, 1},
                        {&p.grad_bias, {p.C, 0}, 1}};
  o.grads.reserve(std::size(slots));
  for (const Slot& slot : slots) {
    const at::IntArrayRef shape(slot.shape.data(), slot.dims);
    o.grads.push_back(p.N == 0 ? at::zeros(shape, mean.options())
                               : nf_glue::empty_dense(shape, mean.scalar_type(), mean));
    *slot.ptr = o.grads.back().template data_ptr<S>();
  }
  return o;
}

}  // namespace nf_coef_glue
