// Whole layers as one op per direction: bin_layer, iebn_layer, assoc_layer, ilm_layer (schemas in ops.cpp).
//
// Forward: moments -> <layer>_coefficients -> affine_apply; backward: backward_sums ->
// <layer>_coefficients_backward -> backward_apply. The same ops, in the same order, with the
// same arguments as normfuse/_autograd.py's NormFunction runs them, each direction called as one
// op, <layer>_layer_forward / <layer>_layer_backward (common/layer_compositions.h), which a device
// may run in one launch (CUDA: the BIN / IEBN single-read path) and the CPU runs without inner
// dispatches; a backward that wants no dx calls the reduction and coefficient step alone (BIN /
// IEBN: the layer-step op), as it needs no backward_apply. Here the autograd node is
// C++ (the ops' Autograd kernels build it, as PyTorch's generated kernels build theirs), so a
// layer step costs the host one op call from Python and no Python autograd.Function (issue 13,
// host cost).
// The inner ops dispatch on the input's device: these kernels serve the "cpu" and "cuda"
// backends alike.
//
// Double backward (create_graph=True): the backward calls normfuse::_layer_backward_graph, a
// Python op (normfuse/_autograd.py) that recomputes the layer with the "torch" backend's
// differentiable ops and differentiates it, exactly as NormFunction.backward does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/layer_compositions.h"
#include "common/op_handles.h"
#include "common/torch_glue.h"

// torch.autograd.graph.node_creation_hook, where torch has it (2.14 does, 2.11 does not): nodes
// built outside Function::apply and the generated code fire it themselves.
#if __has_include(<torch/csrc/autograd/node_creation_hook.h>)
#define NF_NODE_CREATION_HOOKS 1
#else
#define NF_NODE_CREATION_HOOKS 0
#endif

namespace {

using nf_ops::plane_size;

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::variable_list;

enum Layer : int64_t { kBin = 0, kIebn = 1, kAssoc = 2, kIlm = 3 };
// AssocNorm: encoder, decoder_mean, decoder_var, weight, bias (ILM-Norm: its two decoders)
constexpr int kMaxParams = 5;


// The ops a layer direction calls, looked up once (typed handles: a signature mismatch with
// ops.cpp throws at the first call instead of miscompiling). Signatures: the components'
// (common/op_handles.h) and the directions' compositions (common/layer_compositions.h).
using Signatures = nf_compose::Compositions<struct NoVia>;  // (declarations only: never called)
template <class Sig>
using Handle = c10::TypedOperatorHandle<Sig>;

struct Ops {
  // BIN's eval step with one value per plane (bin_one_sample_forward): coefficients and map alone.
  Handle<nf_ops::sig::BinCoefficients> bin_coefficients;
  Handle<nf_ops::sig::AffineApply> affine_apply;
  // A backward that wants no dx (AssocNorm / ILM-Norm): the reduction and the coefficient op.
  Handle<nf_ops::sig::BackwardSums> backward_sums;
  Handle<nf_ops::sig::MetaCoefficientsBackward> assoc_backward, ilm_backward;
  // The BIN / IEBN layer directions: a whole direction as one op.
  Handle<decltype(Signatures::bin_layer_forward)> bin_forward;
  Handle<decltype(Signatures::iebn_layer_forward)> iebn_forward;
  Handle<decltype(Signatures::bin_layer_backward)> bin_backward;
  Handle<decltype(Signatures::iebn_layer_backward)> iebn_backward;
  // The BIN / IEBN backward layer steps: reduction and coefficient step as one op, for a backward
  // that wants no dx.
  Handle<decltype(Signatures::bin_sums_coefficients_backward)> bin_step_backward;
  Handle<decltype(Signatures::iebn_sums_coefficients_backward)> iebn_step_backward;
  // The AssocNorm / ILM-Norm layer directions (one signature for both layers).
  Handle<decltype(Signatures::assoc_layer_forward)> assoc_forward, ilm_forward;
  Handle<decltype(Signatures::assoc_layer_backward)> assoc_layer_backward, ilm_layer_backward;
  // IEBN with one value per plane on the CPU (iebn_pointwise): the batch statistics as the
  // layer step of x viewed as one sample, then the elementwise directions.
  Handle<decltype(Signatures::iebn_moments_coefficients)> iebn_step;
  Handle<nf_ops::sig::IebnPointwiseApply> iebn_pointwise_apply;
  Handle<nf_ops::sig::IebnPointwiseBackward> iebn_pointwise_backward;
};

const Ops& ops() {
  using nf_ops::find_as;
  static const Ops o{
      find_as<decltype(Ops::bin_coefficients)>("normfuse::bin_coefficients"),
      find_as<decltype(Ops::affine_apply)>("normfuse::affine_apply"),
      find_as<decltype(Ops::backward_sums)>("normfuse::backward_sums"),
      find_as<decltype(Ops::assoc_backward)>("normfuse::assoc_coefficients_backward"),
      find_as<decltype(Ops::ilm_backward)>("normfuse::ilm_coefficients_backward"),
      find_as<decltype(Ops::bin_forward)>("normfuse::bin_layer_forward"),
      find_as<decltype(Ops::iebn_forward)>("normfuse::iebn_layer_forward"),
      find_as<decltype(Ops::bin_backward)>("normfuse::bin_layer_backward"),
      find_as<decltype(Ops::iebn_backward)>("normfuse::iebn_layer_backward"),
      find_as<decltype(Ops::bin_step_backward)>("normfuse::bin_sums_coefficients_backward"),
      find_as<decltype(Ops::iebn_step_backward)>("normfuse::iebn_sums_coefficients_backward"),
      find_as<decltype(Ops::assoc_forward)>("normfuse::assoc_layer_forward"),
      find_as<decltype(Ops::ilm_forward)>("normfuse::ilm_layer_forward"),
      find_as<decltype(Ops::assoc_layer_backward)>("normfuse::assoc_layer_backward"),
      find_as<decltype(Ops::ilm_layer_backward)>("normfuse::ilm_layer_backward"),
      find_as<decltype(Ops::iebn_step)>("normfuse::iebn_moments_coefficients"),
      find_as<decltype(Ops::iebn_pointwise_apply)>("normfuse::iebn_pointwise_apply"),
      find_as<decltype(Ops::iebn_pointwise_backward)>("normfuse::iebn_pointwise_backward"),
  };
  return o;
}

// Everything of a layer call that is not a differentiable input.
struct Config {
  Layer layer;
  bool training;
  double momentum;
  double eps;
  int64_t num_groups;
  bool relu;  // fused ReLU: y = max(norm(x), 0), its mask recomputed in the backward
};

// Running statistics and the batch counter: handed to the autograd function wrapped in this struct,
// so that they are not autograd inputs (they get no gradient and need no edge).
struct Buffers {
  OptTensor running_mean, running_var, num_batches_tracked;
};

using Params = std::array<OptTensor, kMaxParams>;

const Tensor& req(const OptTensor& t) { return *t; }  // a parameter the schema says is a Tensor

// What the forward leaves for the backward besides x: the statistics, and the coefficients that
// the fused ReLU's mask is recomputed from (used only when Config::relu).
struct Forward {
  Tensor y, mean, m2, scale, shift;
};

const char* op_name(Layer layer) {
  switch (layer) {
    case kBin: return "normfuse::bin_layer";
    case kIebn: return "normfuse::iebn_layer";
    case kAssoc: return "normfuse::assoc_layer";
    default: return "normfuse::ilm_layer";
  }
}

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Fake tensors of a dynamic-shape trace (torch.compile(dynamic=True) or opcheck of a direct op
// call): the 2-d views below ask for concrete sizes, so such a call takes the general path (the
// backward sees the same tensor, so it decides alike).
bool has_symbolic_sizes(const Tensor& x) { return x.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

// A (C,) tensor of the statistics' dtype on x's device, dense: what the ops take for a parameter.
bool is_vector_like(const Tensor& t, const Tensor& x) {
  return t.defined() && t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous() &&
         t.scalar_type() == nf_glue::acc_dtype(x.scalar_type()) && t.device() == x.device();
}

// BIN with one value per plane (a 2-d (N, C) input: the classifier and projection heads that
// `convert` makes of nn.BatchNorm1d). There the instance half is exactly 0 (a plane of one value
// normalises to 0, as its rho gradient's term), so the layer is batch norm with weight gamma * rho:
// it runs as BIN of one sample whose plane is the batch, x viewed as (1, C, N) with C innermost
// (channels-last: the same memory, no copy), gate 1 and weight gamma * rho. Each per-(n, c) tensor
// of the general path (the statistics, the coefficients, the backward's sums: nine a step, each as
// large as x at L = 1) is then a (1, C) one, and the passes over x are batch norm's
// (docs/performance.md). Only for well-formed arguments: anything else takes the general path and
// its refusals (so a wrong gate is refused by name, not by a broadcasting error of the product);
// one value per channel in training too (refused there as before). The forward adds
// one_sample_refused's test; the backward needs none (a call it sends elsewhere raised).
bool bin_as_one_sample(const Tensor& x, const Params& p, const Config& c) {
  if (c.layer != kBin || has_symbolic_sizes(x) || x.dim() != 2 || !x.is_floating_point() || !x.is_contiguous() ||
      x.size(0) < 1 || (c.training && x.size(0) < 2)) {
    return false;
  }
  return is_vector_like(*p[0], x) && (!opt(p[1]).defined() || is_vector_like(*p[1], x));
}

// A training call whose running statistics share memory with the gate or the weight: the op
// refuses it (they are written while those are read), but the one-sample call would hand it its
// own gate (1) and weight (gamma * rho), so such a call takes the general path and its refusal.
bool one_sample_refused(const Params& p, const Buffers& b, const Config& c) {
  if (!c.training) return false;
  for (const OptTensor* rs : {&b.running_mean, &b.running_var}) {
    if (!opt(*rs).defined()) continue;
    for (const OptTensor* read : {&p[0], &p[1]}) {
      if (opt(*read).defined() && nf_glue::shares_memory(**rs, **read)) return true;
    }
  }
  return false;
}

// (N, C) contiguous as (1, C, N) with C innermost, and such a tensor (the ops' outputs come in their
// input's layout) back: one view op each way.
Tensor as_one_sample(const Tensor& t) { return t.as_strided({1, t.size(1), t.size(0)}, {t.numel(), 1, t.size(1)}); }
Tensor from_one_sample(const Tensor& t) {
  TORCH_INTERNAL_ASSERT((t.stride(1) == 1 || t.size(1) == 1) && (t.stride(2) == t.size(1) || t.size(2) == 1));
  return t.as_strided({t.size(2), t.size(1)}, {t.size(1), 1});
}

// The one-sample call's (gate, weight, bias): 1, gamma * rho (rho without an affine weight), beta.
Params one_sample_params(const Params& p) {
  const Tensor& gate = *p[0];
  Tensor weight = opt(p[1]).defined() ? p[1]->mul(gate) : gate;
  return {at::ones_like(gate), std::move(weight), p[2], std::nullopt, std::nullopt};
}

// The forward of bin_as_one_sample's call. In eval mode with running statistics the sample's
// moments would go unused (the batch statistics are the running ones, the instance half is 0), so
// no pass computes them: the running mean stands in as the sample's mean, which gives
// y = (x - running_mean) * scale + beta, batch norm's own eval arithmetic (the backward's sums
// centre on it too), and m2 as N, a unit variance: any finite one serves the instance half, whose
// weight 1 - gate is 0, where m2 = 0 would give it 0 * rsqrt(0 + eps) = NaN at eps = 0. Only when
// every argument the coefficient op reads is well formed: it would name the running mean ("mean")
// in a refusal meant for the input, so a malformed call takes the direction op and its messages.
Forward bin_one_sample_forward(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  const Ops& o = ops();
  const Params q = one_sample_params(p);
  const Tensor rm = opt(b.running_mean), rv = opt(b.running_var), counter = opt(b.num_batches_tracked);
  const OptTensor& nbt = b.num_batches_tracked;
  Forward f;
  if (!c.training && is_vector_like(rm, x) && is_vector_like(rv, x) &&
      (!counter.defined() || nf_coef_glue::is_batch_counter(counter, x.device())) &&
      (!opt(p[2]).defined() || is_vector_like(*p[2], x))) {
    f.mean = rm.view({1, x.size(1)});
    f.m2 = at::full_like(f.mean, static_cast<double>(x.size(0)));
    std::tie(f.scale, f.shift) = o.bin_coefficients.call(f.mean, f.m2, x.size(0), req(q[0]), q[1], q[2], rm, rv,
                                                         false, c.momentum, c.eps, nbt);
    f.y = o.affine_apply.call(as_one_sample(x), f.mean, f.scale, f.shift, c.relu);
  } else {
    std::tie(f.y, f.mean, f.m2, f.scale, f.shift) =
        o.bin_forward.call(as_one_sample(x), req(q[0]), q[1], q[2], b.running_mean, b.running_var, c.training,
                           c.momentum, c.eps, b.num_batches_tracked, c.relu);
  }
  f.y = from_one_sample(f.y);
  return f;
}

// IEBN with one value per plane (a 2-d (N, C) input on the CPU). Its gate
// sigmoid(m * gate_weight + gate_bias) reads each value itself at L = 1, so unlike BIN's no batch
// norm view serves it, and the general path's per-(n, c) tensors would each be as large as x:
// iebn_pointwise_apply / _backward (csrc/cpu/iebn_pointwise_kernels.h) compute the layer
// elementwise from per-channel statistics instead, with batch norm's passes over x. The batch's
// statistics come from the layer step of x viewed as one sample (as BIN's view: its running
// statistics update and batch counter are the layer's); in eval mode the running ones, and no
// pass computes moments. The mean and rstd (C,) travel in the moments' slots. Only for well-formed
// arguments (as bin_as_one_sample): anything else takes the general path and its refusals.
bool batch_statistics(const OptTensor& running_mean, const Config& c) {
  return c.training || !opt(running_mean).defined();
}

bool iebn_pointwise(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  const OptTensor &rm = b.running_mean, &rv = b.running_var;
  if (c.layer != kIebn || !x.device().is_cpu() || has_symbolic_sizes(x) || x.dim() != 2 || !x.is_floating_point() ||
      !x.is_contiguous() || x.size(0) < 1 || x.size(1) < 1 || (c.training && x.size(0) < 2)) {
    return false;
  }
  for (size_t i = 0; i < 4; ++i) {
    if ((i < 2 || opt(p[i]).defined()) && !is_vector_like(opt(p[i]), x)) return false;
  }
  // eval: the running statistics read directly, so only well-formed ones (and a well-formed batch
  // counter, which the general path checks though eval mode leaves it alone)
  const Tensor counter = opt(b.num_batches_tracked);
  return batch_statistics(rm, c) ||
         (is_vector_like(*rm, x) && is_vector_like(opt(rv), x) &&
          (!counter.defined() || nf_coef_glue::is_batch_counter(counter, x.device())));
}

Forward iebn_pointwise_forward(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  const Ops& o = ops();
  const int64_t C = x.size(1);
  Forward f;
  if (batch_statistics(b.running_mean, c)) {
    Tensor m2, unused_scale, unused_shift;
    std::tie(f.mean, m2, unused_scale, unused_shift) =
        o.iebn_step.call(as_one_sample(x), req(p[0]), req(p[1]), p[2], p[3], b.running_mean, b.running_var,
                         c.training, c.momentum, c.eps, b.num_batches_tracked);
    f.mean = f.mean.view({C});
    f.m2 = m2.view({C}).div(static_cast<double>(x.size(0))).add_(c.eps).rsqrt_();  // rstd of the biased variance
  } else {
    f.mean = *b.running_mean;
    f.m2 = b.running_var->add(c.eps).rsqrt_();
  }
  f.y = o.iebn_pointwise_apply.call(x, f.mean, f.m2, req(p[0]), req(p[1]), p[2], p[3], c.relu);
  return f;
}

// moments -> coefficients -> affine_apply, as one layer-direction op.
Forward forward_impl(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  // (An empty batch, N = 0, gives an empty output, as torch's batch_norm does; an empty plane would
  // reach the coefficient ops as plane_size 0, an argument the caller never passed.)
  TORCH_CHECK(plane_size(x) >= 1, op_name(c.layer), ": input must not have an empty spatial ",
              "extent, got shape ", x.sizes());
  const Ops& o = ops();
  Forward f;
  switch (c.layer) {
    case kBin:
      if (bin_as_one_sample(x, p, c) && !one_sample_refused(p, b, c)) {
        f = bin_one_sample_forward(x, p, b, c);
        break;
      }
      std::tie(f.y, f.mean, f.m2, f.scale, f.shift) =
          o.bin_forward.call(x, req(p[0]), p[1], p[2], b.running_mean, b.running_var, c.training, c.momentum,
                             c.eps, b.num_batches_tracked, c.relu);
      break;
    case kIebn:
      if (iebn_pointwise(x, p, b, c)) {
        f = iebn_pointwise_forward(x, p, b, c);
        break;
      }
      std::tie(f.y, f.mean, f.m2, f.scale, f.shift) =
          o.iebn_forward.call(x, req(p[0]), req(p[1]), p[2], p[3], b.running_mean, b.running_var, c.training,
                              c.momentum, c.eps, b.num_batches_tracked, c.relu);
      break;
    case kAssoc:
    case kIlm: {
      const auto& direction = c.layer == kAssoc ? o.assoc_forward : o.ilm_forward;
      std::tie(f.y, f.mean, f.m2, f.scale, f.shift) = direction.call(
          x, c.num_groups, req(p[0]), req(p[1]), req(p[2]), req(p[3]), req(p[4]), c.eps, c.relu);
      break;
    }
  }
  return f;
}

// The backward of bin_as_one_sample's call: the one-sample op's gradients, and the chain rule of
// weight' = gamma * rho for the layer's gate and weight (its own gate, 1, gets none).
std::pair<Tensor, std::array<Tensor, kMaxParams>> bin_one_sample_backward(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2, const OptTensor& scale,
    const OptTensor& shift, const Params& p, const OptTensor& rm, const OptTensor& rv, const Config& c,
    bool want_dx) {
  const Ops& o = ops();
  const Params q = one_sample_params(p);
  Tensor dx, c_dy, c_x, c_0, unused_gate, grad_product;
  std::array<Tensor, kMaxParams> grads;
  if (want_dx) {
    std::tie(dx, unused_gate, grad_product, grads[2]) =
        o.bin_backward.call(as_one_sample(dy), as_one_sample(x), mean, m2, req(q[0]), q[1], q[2], rm, rv,
                            c.training, c.eps, scale, shift);
    dx = from_one_sample(dx);
  } else {
    std::tie(c_dy, c_x, c_0, unused_gate, grad_product, grads[2]) =
        o.bin_step_backward.call(as_one_sample(dy), as_one_sample(x), mean, m2, req(q[0]), q[1], q[2], rm, rv,
                                 c.training, c.eps, scale, shift);
  }
  const bool affine = opt(p[1]).defined();
  grads[0] = affine ? grad_product.mul(*p[1]) : grad_product;  // d(gamma * rho) / d rho = gamma
  if (affine) grads[1] = grad_product.mul(*p[0]);                // d(gamma * rho) / d gamma = rho
  return {std::move(dx), std::move(grads)};
}

// backward_sums -> coefficients backward -> backward_apply as one layer-direction op, or without dx
// the first two alone; (dx or undefined, parameter grads).
std::pair<Tensor, std::array<Tensor, kMaxParams>> backward_impl(const Tensor& dy, const Tensor& x,
                                                                 const Tensor& mean, const Tensor& m2,
                                                                 const OptTensor& scale, const OptTensor& shift,
                                                                 const Params& p, const OptTensor& rm,
                                                                 const OptTensor& rv, const Config& c,
                                                                 bool want_dx) {
  const Ops& o = ops();
  Tensor dx, c_dy, c_x, c_0;
  std::array<Tensor, kMaxParams> grads;
  switch (c.layer) {
    case kBin:
      if (bin_as_one_sample(x, p, c)) {  // (the forward's view: same x, parameters and config)
        std::tie(dx, grads) = bin_one_sample_backward(dy, x, mean, m2, scale, shift, p, rm, rv, c, want_dx);
        break;
      }
      if (want_dx) {
        std::tie(dx, grads[0], grads[1], grads[2]) = o.bin_backward.call(
            dy, x, mean, m2, req(p[0]), p[1], p[2], rm, rv, c.training, c.eps, scale, shift);
      } else {
        std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2]) = o.bin_step_backward.call(
            dy, x, mean, m2, req(p[0]), p[1], p[2], rm, rv, c.training, c.eps, scale, shift);
      }
      break;
    case kIebn:
      // (the forward's path, decided alike: the counter it checked was well formed, or it raised;
      // mean and m2 hold its mean and rstd)
      if (iebn_pointwise(x, p, {rm, rv, std::nullopt}, c)) {
        // dx comes with the parameters' gradients (one map pass; a backward without dx is rare here)
        std::tie(dx, grads[0], grads[1], grads[2], grads[3]) = o.iebn_pointwise_backward.call(
            dy, x, mean, m2, req(p[0]), req(p[1]), p[2], p[3], batch_statistics(rm, c), c.relu);
        if (!want_dx) dx = Tensor();
        break;
      }
      if (want_dx) {
        std::tie(dx, grads[0], grads[1], grads[2], grads[3]) = o.iebn_backward.call(
            dy, x, mean, m2, req(p[0]), req(p[1]), p[2], p[3], rm, rv, c.training, c.eps, scale, shift);
      } else {
        std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2], grads[3]) = o.iebn_step_backward.call(
            dy, x, mean, m2, req(p[0]), req(p[1]), p[2], p[3], rm, rv, c.training, c.eps, scale, shift);
      }
      break;
    case kAssoc:
    case kIlm: {
      if (want_dx) {
        const auto& direction = c.layer == kAssoc ? o.assoc_layer_backward : o.ilm_layer_backward;
        std::tie(dx, grads[0], grads[1], grads[2], grads[3], grads[4]) =
            direction.call(dy, x, mean, m2, c.num_groups, req(p[0]), req(p[1]), req(p[2]), req(p[3]), req(p[4]),
                           c.eps, scale, shift);
        break;
      }
      auto [g1, g2] = o.backward_sums.call(dy, x, mean, scale, shift);
      const auto& coefficients = c.layer == kAssoc ? o.assoc_backward : o.ilm_backward;
      std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2], grads[3], grads[4]) =
          coefficients.call(g1, g2, mean, m2, plane_size(x), c.num_groups, req(p[0]), req(p[1]), req(p[2]),
                            req(p[3]), req(p[4]), c.eps);
      break;
    }
  }
  return {std::move(dx), std::move(grads)};
}

// As normfuse/_autograd.py: C innermost and dense (NHWC and its 1-d / 3-d analogues).
bool is_channels_last(const Tensor& x) {
  return x.dim() > 2 && !x.is_contiguous() && nf_glue::is_channels_last_dense(x);
}

Tensor like_layout(const Tensor& t, const Tensor& x) {
  if (!is_channels_last(x)) return t.contiguous();
  // The usual case, y's gradient already channels-last: no copy and none of the three view ops
  // (~8 us a backward on a GPU machine's host, bench.kernel_times).
  if (nf_glue::is_channels_last_dense(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// The backward node, written as PyTorch's generated nodes are (torch/csrc/autograd/generated/
// Functions.h): saved tensors and the config as plain members. torch::autograd::Function's CppNode
// cost the host ~6 us more per layer step (per-input metadata, a string-keyed map for the config,
// boxed saved lists; bench.host: issue 13, host cost).
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using NodePtr = decltype(torch::autograd::Edge::function);  // shared_ptr (older torch) or intrusive_ptr
using Needs = std::array<bool, 1 + kMaxParams>;  // edge i wants a gradient: 0 is x, 1 + i parameter slot i

// What the backward reads, in this order (a slot a layer call has no tensor for stays undefined):
// x, the moments, the running statistics (eval mode only: constants there), scale and shift (fused
// ReLU only: the mask's source), the five parameter slots.
enum Saved : size_t {
  kX, kMean, kM2, kRunningMean, kRunningVar, kScale, kShift, kParam0, kNumSaved = kParam0 + kMaxParams
};

OptTensor maybe(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The backward from plain values: LayerBackward::apply and, under compiled autograd, the function
// it hands the compiler.
variable_list layer_backward(const Tensor& grad, const variable_list& s, const Config& c, const Needs& needs) {
  variable_list result(1 + kMaxParams);
  const Tensor& x = s[kX];
  Params p;
  for (size_t i = 0; i < kMaxParams; ++i) p[i] = maybe(s[kParam0 + i]);
  const OptTensor rm = maybe(s[kRunningMean]), rv = maybe(s[kRunningVar]);
  // An undefined incoming gradient is zero (y has x's shape, dtype and layout): the inputs get zero
  // gradients, not none, as torch::autograd::Function (materialize_grads) and NormFunction give.
  const Tensor dy = grad.defined() ? like_layout(grad, x) : at::zeros_like(x);
  if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable recomputation
    static const auto graph =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("normfuse::_layer_backward_graph", "")
            .typed<std::vector<Tensor>(int64_t, const Tensor&, const Tensor&, const c10::List<std::optional<Tensor>>&,
                                       const OptTensor&, const OptTensor&, bool, double, int64_t, bool, int64_t)>();
    const size_t count = c.layer == kAssoc || c.layer == kIlm ? 5 : c.layer == kIebn ? 4 : 3;
    c10::List<std::optional<Tensor>> plist;
    int64_t mask = 0;  // bit i: input i (x, then the parameters) wants a gradient
    for (size_t i = 0; i <= count; ++i) {
      if (i > 0) plist.push_back(p[i - 1]);
      if (needs[i]) mask |= int64_t{1} << i;
    }
    const std::vector<Tensor> g =
        graph.call(static_cast<int64_t>(c.layer), x, dy, plist, rm, rv, c.training, c.eps, c.num_groups, c.relu, mask);
    TORCH_CHECK(g.size() == 1 + count, "normfuse::_layer_backward_graph returned ", g.size(), " gradients, expected ",
                1 + count);
    for (size_t i = 0; i <= count; ++i) {
      if (needs[i]) result[i] = g[i];
    }
    return result;
  }
  at::AutoDispatchBelowADInplaceOrView below;
  auto [dx, g] = backward_impl(dy, x, s[kMean], s[kM2], maybe(s[kScale]), maybe(s[kShift]), p, rm, rv, c, needs[0]);
  result[0] = std::move(dx);
  for (size_t i = 0; i < kMaxParams; ++i) {
    if (needs[1 + i]) result[1 + i] = std::move(g[i]);
  }
  return result;
}

// Compiled autograd (torch._dynamo.compiled_autograd) calls the backward as an opaque function, as it
// calls a torch::autograd::Function's: the config and the saved tensors packed in this order.
namespace ca = torch::dynamo::autograd;

variable_list layer_backward_packed(const variable_list& inputs, const std::vector<c10::IValue>& args) {
  ca::PackedArgs packed(args);
  Config c{};
  c.layer = static_cast<Layer>(packed.unpack<int64_t>());
  c.training = packed.unpack<bool>();
  c.eps = packed.unpack<double>();
  c.num_groups = packed.unpack<int64_t>();
  c.relu = packed.unpack<bool>();
  const variable_list saved = packed.unpack<variable_list>();
  const std::vector<bool> wanted = packed.unpack<std::vector<bool>>();
  Needs needs{};
  for (size_t i = 0; i < needs.size(); ++i) needs[i] = wanted[i];
  return layer_backward(inputs[0], saved, c, needs);
}

// Edges: 0 is x, 1 + i is parameter slot i (an empty edge where the layer has no such parameter).
struct LayerBackward : public Node {
  Config c{};
  std::array<SavedVariable, kNumSaved> saved;
  int64_t present = 0;  // bit i: saved[i] holds a tensor (which slots are filled changes the backward)

  std::string name() const override {
    switch (c.layer) {
      case kBin: return "NormfuseBinLayerBackward";
      case kIebn: return "NormfuseIebnLayerBackward";
      case kAssoc: return "NormfuseAssocLayerBackward";
      default: return "NormfuseIlmLayerBackward";
    }
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& v : saved) v.reset_data();
  }

  // The saved tensors, in slot order (unpack also refuses "backward through the graph a second time").
  variable_list unpack_saved() const {
    variable_list s(kNumSaved);
    for (size_t i = 0; i < kNumSaved; ++i) s[i] = saved[i].unpack();
    return s;
  }

  Needs wanted() const {
    Needs needs{};
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = task_should_compute_output(i);
    return needs;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return layer_backward(grads[0], unpack_saved(), c, wanted());
  }

  void compiled_args(ca::CompiledNodeArgs& args) const override {
    args.collect(static_cast<int64_t>(c.layer));
    args.collect(c.training);
    args.collect(c.eps);
    args.collect(c.num_groups);
    args.collect(c.relu);
    // A saved tensor with saved_tensors_hooks adds nothing to the cache key, an empty slot adds a
    // 0: without the mask two calls with different slots filled could share one compiled graph.
    args.collect(present);
    for (const auto& v : saved) args.collect(v, false);
  }

  variable_list apply_with_saved(const variable_list& inputs, ca::SwapSavedVariables& swap) override {
    for (auto& v : saved) swap.before(v);
    ca::PackedArgs packed;
    packed.pack(static_cast<int64_t>(c.layer));
    packed.pack(c.training);
    packed.pack(c.eps);
    packed.pack(c.num_groups);
    packed.pack(c.relu);
    packed.pack(unpack_saved());
    const Needs needs = wanted();
    packed.pack(std::vector<bool>(needs.begin(), needs.end()));
    const std::vector<c10::IValue> args = packed.vec();
    std::vector<at::TypePtr> schema;
    schema.reserve(args.size());
    for (const auto& value : args) schema.emplace_back(value.isTensor() ? at::TensorType::get() : value.type());
    const auto output_metadata = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    const auto& compiler = ca::getPyCompilerInterface();
    const std::string fn = compiler->bind_function(swap.get_py_compiler(), name(), layer_backward_packed, schema,
                                                   /*is_custom_function=*/true, /*is_traceable=*/false);
    variable_list results =
        compiler->call_function(swap.get_py_compiler(), "apply_functional", fn, inputs, args, output_metadata);
    for (auto& v : saved) swap.after(v);
    return results;
  }
};

// A node owned as the autograd engine owns nodes in this torch (the type of Edge::function).
template <class N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    N* raw = new N();
    return std::shared_ptr<N>(raw, [](N* n) { deleteNode(n); });  // ADL: torch::autograd::deleteNode
  } else {
    return c10::make_intrusive<N>();
  }
}

bool any_requires_grad(const Tensor& x, const Params& p) {
  if (x.requires_grad()) return true;
  for (const auto& t : p) {
    if (t.has_value() && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// Forward-mode AD: the node has no jvp, so a dual input is refused rather than its tangent dropped
// (the modules send such calls to NormFunction, which refuses them too).
void check_no_tangents(const Tensor& x, const Params& p, Layer layer) {
  bool dual = torch::autograd::isFwGradDefined(x);
  for (const auto& t : p) dual = dual || torch::autograd::isFwGradDefined(t);
  TORCH_CHECK_NOT_IMPLEMENTED(!dual, op_name(layer), ": forward-mode AD is not supported (the input or a ",
                              "parameter is a dual tensor)");
}

// The running statistics and the batch counter, written in place by a training forward below the
// ADInplaceOrView key, get the version bump that key would give them: a graph that saved them (an
// eval-mode step) then refuses a backward after they changed instead of silently reading the new
// values. (Inference tensors have no version counter.)
void bump_written_versions(const Buffers& b, const Config& c) {
  if (!c.training) return;
  for (const OptTensor* t : {&b.running_mean, &b.running_var, &b.num_batches_tracked}) {
    if (t->has_value() && (*t)->defined() && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
  }
}

// The Autograd kernel: the forward below autograd, and a backward node when a gradient can flow.
Tensor run(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  check_no_tangents(x, p, c.layer);
  const bool differentiable = at::GradMode::is_enabled() && any_requires_grad(x, p);
  if (differentiable) {
    if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
      functorch_tls->checkSupportsCppAutogradFunction();  // as torch::autograd::Function: not under functorch
    }
  }
  // Inference tensors (torch.inference_mode) here, outside inference mode: x cannot be saved, and
  // torch refuses in-place updates of the statistics; say so before anything is written (the
  // layers' Python checks say it first, by argument name).
  TORCH_CHECK(!(differentiable && x.is_inference()), op_name(c.layer),
              ": input is an inference tensor, which autograd cannot save for the backward");
  if (c.training) {
    for (const OptTensor* t : {&b.running_mean, &b.running_var, &b.num_batches_tracked}) {
      TORCH_CHECK(!(t->has_value() && (*t)->defined() && (*t)->is_inference()), op_name(c.layer),
                  ": a running statistic or num_batches_tracked is an inference tensor, which may be "
                  "updated in place only inside inference mode");
    }
  }
  Forward f;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    f = forward_impl(x, p, b, c);
  }
  bump_written_versions(b, c);
  if (!differentiable) return std::move(f.y);
  NodePtr node = make_node<LayerBackward>();
  auto* n = static_cast<LayerBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(x, p[0], p[1], p[2], p[3], p[4]));
  n->c = c;
  auto save = [n](size_t slot, const Tensor& t) {
    n->saved[slot] = SavedVariable(t, false);
    n->present |= int64_t{1} << slot;
  };
  save(kX, x);
  save(kMean, f.mean);
  save(kM2, f.m2);
  if (!c.training && b.running_mean.has_value() && b.running_mean->defined()) {  // eval: constants
    save(kRunningMean, *b.running_mean);
    save(kRunningVar, opt(b.running_var));
  }
  if (c.relu) {
    save(kScale, f.scale);
    save(kShift, f.shift);
  }
  for (size_t i = 0; i < kMaxParams; ++i) {
    if (p[i].has_value() && p[i]->defined()) save(kParam0 + i, *p[i]);
  }
  torch::autograd::set_history(f.y, node);
#if NF_NODE_CREATION_HOOKS
  torch::autograd::fire_node_creation_hooks(node);  // torch.autograd.graph.node_creation_hook
#endif
  return std::move(f.y);
}

// Below autograd (inference mode, or tensors without autograd): the forward only.
Tensor bin_layer(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                 const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                 double eps, const OptTensor& num_batches_tracked, bool relu) {
  return (forward_impl(x, {gate, weight, bias, std::nullopt, std::nullopt},
                                  {running_mean, running_var, num_batches_tracked},
                                  {kBin, training, momentum, eps, 0, relu}).y);
}

Tensor iebn_layer(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                  const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                  bool training, double momentum, double eps, const OptTensor& num_batches_tracked, bool relu) {
  return (forward_impl(x, {gate_weight, gate_bias, weight, bias, std::nullopt},
                                  {running_mean, running_var, num_batches_tracked},
                                  {kIebn, training, momentum, eps, 0, relu}).y);
}

Tensor assoc_layer(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                   const Tensor& decoder_var, const Tensor& weight, const Tensor& bias, double eps,
                   bool relu) {
  return (forward_impl(x, {encoder, decoder_mean, decoder_var, weight, bias}, {},
                                  {kAssoc, false, 0.0, eps, num_groups, relu}).y);
}

Tensor ilm_layer(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_weight,
                 const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias, double eps, bool relu) {
  return (forward_impl(x, {encoder, decoder_weight, decoder_bias, weight, bias}, {},
                       {kIlm, false, 0.0, eps, num_groups, relu}).y);
}

Tensor bin_layer_autograd(const Tensor& x, const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, bool training,
                          double momentum, double eps, const OptTensor& num_batches_tracked, bool relu) {
  return run(x, {gate, weight, bias, std::nullopt, std::nullopt}, {running_mean, running_var, num_batches_tracked},
             {kBin, training, momentum, eps, 0, relu});
}

Tensor iebn_layer_autograd(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias,
                           const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                           const OptTensor& running_var, bool training, double momentum, double eps,
                           const OptTensor& num_batches_tracked, bool relu) {
  return run(x, {gate_weight, gate_bias, weight, bias, std::nullopt},
             {running_mean, running_var, num_batches_tracked}, {kIebn, training, momentum, eps, 0, relu});
}

Tensor assoc_layer_autograd(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                            const Tensor& decoder_var, const Tensor& weight, const Tensor& bias, double eps,
                   bool relu) {
  return run(x, {encoder, decoder_mean, decoder_var, weight, bias}, {}, {kAssoc, false, 0.0, eps, num_groups, relu});
}

Tensor ilm_layer_autograd(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_weight,
                          const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias, double eps,
                          bool relu) {
  return run(x, {encoder, decoder_weight, decoder_bias, weight, bias}, {}, {kIlm, false, 0.0, eps, num_groups, relu});
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CompositeExplicitAutograd, m) {
  m.impl("bin_layer", &bin_layer);
  m.impl("iebn_layer", &iebn_layer);
  m.impl("assoc_layer", &assoc_layer);
  m.impl("ilm_layer", &ilm_layer);
}

TORCH_LIBRARY_IMPL(normfuse, Autograd, m) {
  m.impl("bin_layer", &bin_layer_autograd);
  m.impl("iebn_layer", &iebn_layer_autograd);
  m.impl("assoc_layer", &assoc_layer_autograd);
  m.impl("ilm_layer", &ilm_layer_autograd);
}
