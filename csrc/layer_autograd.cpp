// Whole layers as one op per direction: bin_layer, iebn_layer, assoc_layer (schemas in ops.cpp).
//
// Forward: moments -> <layer>_coefficients -> affine_apply; backward: backward_sums ->
// <layer>_coefficients_backward -> backward_apply. The same ops, in the same order, with the
// same arguments as normfuse/_autograd.py's NormFunction runs them (for BIN and IEBN each
// direction is one op, <layer>_layer_forward / <layer>_layer_backward, layer_steps.cpp, which a
// device may run in one launch: on every device without its own kernel they are the composition,
// whose first two ops are the layer-step op; a backward that wants no dx calls that step op
// alone, as it needs no backward_apply); here the autograd node is
// C++ (registered at the Autograd key, as torchvision's roi_align does), so a layer step costs
// the host one op call from Python and no Python autograd.Function (issue 13, host cost).
// The inner ops dispatch on the input's device: these kernels serve the "cpu" and "cuda"
// backends alike.
//
// Double backward (create_graph=True): the backward calls normfuse::_layer_backward_graph, a
// Python op (normfuse/_autograd.py) that recomputes the layer with the "torch" backend's
// differentiable ops and differentiates it, exactly as NormFunction.backward does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/op_handles.h"
#include "common/torch_glue.h"

namespace {

using nf_ops::find;
using nf_ops::plane_size;

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Layer : int64_t { kBin = 0, kIebn = 1, kAssoc = 2 };
constexpr int kMaxParams = 5;  // AssocNorm: encoder, decoder_mean, decoder_var, weight, bias

using Pair = std::tuple<Tensor, Tensor>;
using Quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The component ops, looked up once (typed handles: a signature mismatch with ops.cpp throws
// at the first call instead of miscompiling).
struct Ops {
  c10::TypedOperatorHandle<Pair(const Tensor&)> moments;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)> affine_apply;
  c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>
      backward_sums;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const OptTensor&, const OptTensor&)>
      backward_apply;
  c10::TypedOperatorHandle<Pair(const Tensor&, const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&, double)>
      assoc;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&,
      const Tensor&, const Tensor&, const Tensor&, double)>
      assoc_backward;
  // The BIN / IEBN layer directions (layer_steps.cpp): a whole direction as one op.
  c10::TypedOperatorHandle<Five(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                const OptTensor&, bool, double, double, const OptTensor&, bool)>
      bin_forward;
  c10::TypedOperatorHandle<Five(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                const OptTensor&, const OptTensor&, bool, double, double, const OptTensor&, bool)>
      iebn_forward;
  c10::TypedOperatorHandle<Quad(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double,
                                const OptTensor&, const OptTensor&)>
      bin_backward;
  c10::TypedOperatorHandle<Five(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                bool, double, const OptTensor&, const OptTensor&)>
      iebn_backward;
  // The BIN / IEBN backward layer steps (layer_steps.cpp): reduction and coefficient step as one op,
  // for a backward that wants no dx.
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, bool, double, const OptTensor&, const OptTensor&)>
      bin_step_backward;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, const OptTensor&, bool, double, const OptTensor&, const OptTensor&)>
      iebn_step_backward;
};

const Ops& ops() {
  static const Ops o{
      find<Pair(const Tensor&)>("normfuse::moments"),
      find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>("normfuse::affine_apply"),
      find<Pair(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>(
          "normfuse::backward_sums"),
      find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                  const OptTensor&, const OptTensor&)>("normfuse::backward_apply"),
      find<Pair(const Tensor&, const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const Tensor&, double)>("normfuse::assoc_coefficients"),
      find<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, const Tensor&,
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>(
          "normfuse::assoc_coefficients_backward"),
      find<Five(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                bool, double, double, const OptTensor&, bool)>("normfuse::bin_layer_forward"),
      find<Five(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                const OptTensor&, bool, double, double, const OptTensor&, bool)>("normfuse::iebn_layer_forward"),
      find<Quad(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                const OptTensor&, const OptTensor&, const OptTensor&, bool, double, const OptTensor&,
                const OptTensor&)>("normfuse::bin_layer_backward"),
      find<Five(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double, const OptTensor&,
                const OptTensor&)>("normfuse::iebn_layer_backward"),
      find<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
          const OptTensor&, const OptTensor&, const OptTensor&, bool, double, const OptTensor&, const OptTensor&)>(
          "normfuse::bin_sums_coefficients_backward"),
      find<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
          const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double, const OptTensor&,
          const OptTensor&)>("normfuse::iebn_sums_coefficients_backward"),
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

// moments -> coefficients -> affine_apply (BIN / IEBN: one layer-direction op, layer_steps.cpp).
Forward forward_impl(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  const Ops& o = ops();
  Forward f;
  switch (c.layer) {
    case kBin:
      std::tie(f.y, f.mean, f.m2, f.scale, f.shift) =
          o.bin_forward.call(x, req(p[0]), p[1], p[2], b.running_mean, b.running_var, c.training, c.momentum,
                             c.eps, b.num_batches_tracked, c.relu);
      break;
    case kIebn:
      std::tie(f.y, f.mean, f.m2, f.scale, f.shift) =
          o.iebn_forward.call(x, req(p[0]), req(p[1]), p[2], p[3], b.running_mean, b.running_var, c.training,
                              c.momentum, c.eps, b.num_batches_tracked, c.relu);
      break;
    case kAssoc:
      std::tie(f.mean, f.m2) = o.moments.call(x);
      std::tie(f.scale, f.shift) = o.assoc.call(f.mean, f.m2, plane_size(x), c.num_groups, req(p[0]), req(p[1]),
                                                req(p[2]), req(p[3]), req(p[4]), c.eps);
      f.y = o.affine_apply.call(x, f.mean, f.scale, f.shift, c.relu);
      break;
  }
  return f;
}

// backward_sums -> coefficients backward -> backward_apply (BIN / IEBN: one layer-direction op, or
// without dx the layer step alone); (dx or undefined, parameter grads).
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
      if (want_dx) {
        std::tie(dx, grads[0], grads[1], grads[2]) = o.bin_backward.call(
            dy, x, mean, m2, req(p[0]), p[1], p[2], rm, rv, c.training, c.eps, scale, shift);
      } else {
        std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2]) = o.bin_step_backward.call(
            dy, x, mean, m2, req(p[0]), p[1], p[2], rm, rv, c.training, c.eps, scale, shift);
      }
      break;
    case kIebn:
      if (want_dx) {
        std::tie(dx, grads[0], grads[1], grads[2], grads[3]) = o.iebn_backward.call(
            dy, x, mean, m2, req(p[0]), req(p[1]), p[2], p[3], rm, rv, c.training, c.eps, scale, shift);
      } else {
        std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2], grads[3]) = o.iebn_step_backward.call(
            dy, x, mean, m2, req(p[0]), req(p[1]), p[2], p[3], rm, rv, c.training, c.eps, scale, shift);
      }
      break;
    case kAssoc: {
      auto [g1, g2] = o.backward_sums.call(dy, x, mean, scale, shift);
      std::tie(c_dy, c_x, c_0, grads[0], grads[1], grads[2], grads[3], grads[4]) =
          o.assoc_backward.call(g1, g2, mean, m2, plane_size(x), c.num_groups, req(p[0]), req(p[1]), req(p[2]),
                                req(p[3]), req(p[4]), c.eps);
      if (want_dx) dx = o.backward_apply.call(dy, x, mean, c_dy, c_x, c_0, scale, shift);
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
  if (is_channels_last(x)) return t.movedim(1, -1).contiguous().movedim(-1, 1);
  return t.contiguous();
}

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Saved: x, mean, m2, running_mean, running_var (eval mode only: constants there), the parameters,
// scale and shift (fused ReLU only: the mask's source).
constexpr size_t kSavedParams = 5;
constexpr size_t kSavedScale = 5 + kSavedParams;

struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  // Inputs, in the order CppNode counts them: x, p0..p4 (undefined ones are not variables), then
  // the non-tensor arguments.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& p0, const OptTensor& p1,
                        const OptTensor& p2, const OptTensor& p3, const OptTensor& p4, const Buffers& b,
                        const Config& c) {
    at::AutoDispatchBelowADInplaceOrView below;
    const Params p{p0, p1, p2, p3, p4};
    Forward f = forward_impl(x, p, b, c);
    const bool keep_running = !c.training && b.running_mean.has_value() && b.running_mean->defined();
    ctx->save_for_backward({x, f.mean, f.m2, keep_running ? opt(b.running_mean) : Tensor(),
                            keep_running ? opt(b.running_var) : Tensor(), opt(p0), opt(p1), opt(p2), opt(p3),
                            opt(p4), c.relu ? f.scale : Tensor(), c.relu ? f.shift : Tensor()});
    // Two entries (each one a string-keyed map insert and lookup): layer, training, relu and
    // num_groups packed into one integer, and eps.
    ctx->saved_data["config"] =
        static_cast<int64_t>(c.layer) | (c.training ? 4 : 0) | (c.relu ? 8 : 0) | (c.num_groups << 4);
    ctx->saved_data["eps"] = c.eps;
    return std::move(f.y);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const int64_t packed = ctx->saved_data["config"].toInt();
    const Config c{static_cast<Layer>(packed & 3), (packed & 4) != 0, 0.0, ctx->saved_data["eps"].toDouble(),
                   packed >> 4, (packed & 8) != 0};
    Params p;
    for (size_t i = 0; i < kSavedParams; ++i) {
      if (saved[5 + i].defined()) p[i] = saved[5 + i];
    }
    const OptTensor rm = saved[3].defined() ? OptTensor(saved[3]) : std::nullopt;
    const OptTensor rv = saved[4].defined() ? OptTensor(saved[4]) : std::nullopt;
    // Which inputs want a gradient: edge 0 is x, then one edge per given parameter.
    std::array<bool, 1 + kMaxParams> needs{};
    needs[0] = ctx->needs_input_grad(0);
    size_t edge = 1;
    for (size_t i = 0; i < kMaxParams; ++i) {
      if (p[i].has_value()) needs[1 + i] = ctx->needs_input_grad(edge++);
    }
    const Tensor dy = like_layout(grad_outputs[0], x);

    // forward's arguments: x, p0..p4, buffers, config.
    variable_list result(1 + kMaxParams + 2);
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable recomputation
      static const auto graph =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("normfuse::_layer_backward_graph", "")
              .typed<std::vector<Tensor>(int64_t, const Tensor&, const Tensor&,
                                         const c10::List<std::optional<Tensor>>&, const OptTensor&,
                                         const OptTensor&, bool, double, int64_t, bool, int64_t)>();
      const size_t count = c.layer == kAssoc ? 5 : c.layer == kIebn ? 4 : 3;
      c10::List<std::optional<Tensor>> plist;
      int64_t mask = 0;  // bit i: input i (x, then the parameters) wants a gradient
      for (size_t i = 0; i <= count; ++i) {
        if (i > 0) plist.push_back(p[i - 1]);
        if (needs[i]) mask |= int64_t{1} << i;
      }
      const std::vector<Tensor> grads =
          graph.call(static_cast<int64_t>(c.layer), x, dy, plist, rm, rv, c.training, c.eps, c.num_groups, c.relu,
                     mask);
      TORCH_CHECK(grads.size() == 1 + count, "normfuse::_layer_backward_graph returned ", grads.size(),
                  " gradients, expected ", 1 + count);
      for (size_t i = 0; i <= count; ++i) {
        if (needs[i]) result[i] = grads[i];
      }
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const OptTensor scale = c.relu ? OptTensor(saved[kSavedScale]) : std::nullopt;
    const OptTensor shift = c.relu ? OptTensor(saved[kSavedScale + 1]) : std::nullopt;
    auto [dx, grads] = backward_impl(dy, x, saved[1], saved[2], scale, shift, p, rm, rv, c, needs[0]);
    result[0] = std::move(dx);
    for (size_t i = 0; i < kMaxParams; ++i) {
      if (p[i].has_value() && needs[1 + i]) result[1 + i] = std::move(grads[i]);
    }
    return result;
  }
};

bool any_requires_grad(const Tensor& x, const Params& p) {
  if (x.requires_grad()) return true;
  for (const auto& t : p) {
    if (t.has_value() && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// The Autograd kernel: a C++ autograd node when a gradient can flow, else the plain forward.
Tensor run(const Tensor& x, const Params& p, const Buffers& b, const Config& c) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, p)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_impl(x, p, b, c).y;
  }
  return LayerFunction::apply(x, p[0], p[1], p[2], p[3], p[4], b, c);
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

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CompositeExplicitAutograd, m) {
  m.impl("bin_layer", &bin_layer);
  m.impl("iebn_layer", &iebn_layer);
  m.impl("assoc_layer", &assoc_layer);
}

TORCH_LIBRARY_IMPL(normfuse, Autograd, m) {
  m.impl("bin_layer", &bin_layer_autograd);
  m.impl("iebn_layer", &iebn_layer_autograd);
  m.impl("assoc_layer", &assoc_layer_autograd);
}
