// ADInplaceOrView kernels for the ops that write the running statistics: a version bump when they
// write them, i.e. in training only.
//
// An op whose schema marks an argument written (Tensor(a!)) gets, from a C++ registration, no
// ADInplaceOrView kernel (a fallthrough), so its in-place writes left the version counters alone:
// a graph that saved the running statistics (an eval-mode step) then read the new values in its
// backward without a word, where nn.BatchNorm's backward refuses ("modified by an inplace
// operation"). Bumping on every call would be wrong the other way: in eval mode these ops only
// read the statistics, and autograd must find them unchanged. Hence: bump the written arguments
// when `training` is true, then redispatch below this key. The Triton ops do the same from Python
// (normfuse/triton_kernels/coefficient_ops.py, _bump_running_versions_only_in_training); the
// whole-layer ops call these ops below ADInplaceOrView and bump once themselves
// (layer_autograd.cpp, bump_written_versions).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace {

void bump_written_in_training(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  const size_t first = stack->size() - args.size();  // the op's arguments are the stack's top
  const auto training = schema.argumentIndexWithName("training");
  TORCH_INTERNAL_ASSERT(training.has_value(), op.operator_name(), " has no 'training' argument");
  if ((*stack)[first + *training].toBool()) {
    for (size_t i = 0; i < args.size(); ++i) {
      const auto* alias = args[i].alias_info();
      if (alias == nullptr || !alias->isWrite()) continue;
      const c10::IValue& value = (*stack)[first + i];
      if (!value.isTensor()) continue;  // an optional argument given as None
      const at::Tensor& t = value.toTensor();
      if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, ADInplaceOrView, m) {
  for (const char* name : {"bin_coefficients", "iebn_coefficients", "bin_moments_coefficients",
                           "iebn_moments_coefficients", "bin_layer_forward", "iebn_layer_forward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_in_training>());
  }
}
