// The whole-layer ops' directions below autograd (declared in layer_directions.h): which op a
// layer call runs, and the 2-d (N, C) views that serve a layer with one value per plane. Each
// direction is one op call (common/layer_compositions.h; on the CPU without inner dispatches), the
// same ops with the same arguments as normfuse/_autograd.py's NormFunction runs them. The ops
// dispatch on the input's device: these functions serve the "cpu" and "cuda" backends alike.
#include "layer_directions.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "common/layer_compositions.h"
#include "common/op_handles.h"
#include "common/torch_glue.h"

namespace nf_layer {
namespace {

using nf_ops::plane_size;

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

const Tensor& req(const OptTensor& t) { return *t; }  // a parameter the schema says is a Tensor

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

// The backward of bin_as_one_sample's call: the one-sample op's gradients, and the chain rule of
// weight' = gamma * rho for the layer's gate and weight (its own gate, 1, gets none).
std::pair<Tensor, ParamGrads> bin_one_sample_backward(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& m2, const OptTensor& scale,
    const OptTensor& shift, const Params& p, const OptTensor& rm, const OptTensor& rv, const Config& c,
    bool want_dx) {
  const Ops& o = ops();
  const Params q = one_sample_params(p);
  Tensor dx, c_dy, c_x, c_0, unused_gate, grad_product;
  ParamGrads grads;
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

}  // namespace

const char* op_name(Layer layer) {
  switch (layer) {
    case kBin: return "normfuse::bin_layer";
    case kIebn: return "normfuse::iebn_layer";
    case kAssoc: return "normfuse::assoc_layer";
    default: return "normfuse::ilm_layer";
  }
}

Forward forward_direction(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
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

std::pair<Tensor, ParamGrads> backward_direction(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& m2, const OptTensor& scale,
                                                 const OptTensor& shift, const Params& p, const OptTensor& rm,
                                                 const OptTensor& rv, const Config& c, bool want_dx) {
  const Ops& o = ops();
  Tensor dx, c_dy, c_x, c_0;
  ParamGrads grads;
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

}  // namespace nf_layer
