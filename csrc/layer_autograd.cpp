// Whole layers as one op per direction: bin_layer, iebn_layer, assoc_layer, ilm_layer (schemas in ops.cpp).
//
// Each direction is one op call (layer_directions.{h,cpp}: which op, and the 2-d views), which a
// device may run in one launch (CUDA: the BIN / IEBN single-read path) and the CPU runs without
// inner dispatches. Here the autograd node is C++ (the ops' Autograd kernels build it, as
// PyTorch's generated kernels build theirs), so a layer step costs the host one op call from
// Python and no Python autograd.Function (issue 13, host cost). The inner ops dispatch on the
// input's device: these kernels serve the "cpu" and "cuda" backends alike.
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

#include "common/torch_glue.h"
#include "layer_directions.h"

// torch.autograd.graph.node_creation_hook, where torch has it (2.14 does, 2.11 does not): nodes
// built outside Function::apply and the generated code fire it themselves.
#if __has_include(<torch/csrc/autograd/node_creation_hook.h>)
#define NF_NODE_CREATION_HOOKS 1
#else
#define NF_NODE_CREATION_HOOKS 0
#endif

namespace {

using namespace nf_layer;  // Layer, Config, Buffers, Params, Forward and the two directions
using torch::autograd::variable_list;

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
  auto [dx, g] = backward_direction(dy, x, s[kMean], s[kM2], maybe(s[kScale]), maybe(s[kShift]), p, rm, rv, c, needs[0]);
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
    f = forward_direction(x, p, b, c);
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
  return forward_direction(x, {gate, weight, bias, std::nullopt, std::nullopt},
                           {running_mean, running_var, num_batches_tracked}, {kBin, training, momentum, eps, 0, relu})
      .y;
}

Tensor iebn_layer(const Tensor& x, const Tensor& gate_weight, const Tensor& gate_bias, const OptTensor& weight,
                  const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                  bool training, double momentum, double eps, const OptTensor& num_batches_tracked, bool relu) {
  return forward_direction(x, {gate_weight, gate_bias, weight, bias, std::nullopt},
                           {running_mean, running_var, num_batches_tracked}, {kIebn, training, momentum, eps, 0, relu})
      .y;
}

Tensor assoc_layer(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_mean,
                   const Tensor& decoder_var, const Tensor& weight, const Tensor& bias, double eps,
                   bool relu) {
  return forward_direction(x, {encoder, decoder_mean, decoder_var, weight, bias}, {},
                           {kAssoc, false, 0.0, eps, num_groups, relu})
      .y;
}

Tensor ilm_layer(const Tensor& x, int64_t num_groups, const Tensor& encoder, const Tensor& decoder_weight,
                 const Tensor& decoder_bias, const Tensor& weight, const Tensor& bias, double eps, bool relu) {
  return forward_direction(x, {encoder, decoder_weight, decoder_bias, weight, bias}, {},
                           {kIlm, false, 0.0, eps, num_groups, relu})
      .y;
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