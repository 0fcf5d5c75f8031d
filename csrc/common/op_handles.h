// What the C++ that calls normfuse ops through the dispatcher shares (layer_directions.cpp,
// layer_steps.cpp, python_layer_step.cpp): typed op handles and the plane size of an input.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace nf_ops {

// A typed handle of op `name` ("normfuse::moments"), looked up once by the caller (keep it in a
// static): a signature that does not match ops.cpp throws at the lookup instead of miscompiling.
template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// find<Sig> for a handle type (TypedOperatorHandle<Sig>): a handle held as a struct member is
// looked up as find_as<decltype(Ops::member)>(name), its signature written once, in the member.
template <class Handle>
struct HandleSignature;
template <class Sig>
struct HandleSignature<c10::TypedOperatorHandle<Sig>> {
  using type = Sig;
};
template <class Handle>
Handle find_as(const char* name) {
  return find<typename HandleSignature<Handle>::type>(name);
}

// The C++ signatures of component ops' schemas (ops.cpp) that layer_directions.cpp calls through
// the dispatcher. layer_steps.cpp types its handles with its own functions' signatures, and the
// layer steps' and directions' signatures are their compositions' (common/layer_compositions.h).
namespace sig {
using at::Tensor;
using OptTensor = std::optional<Tensor>;
using BackwardSums = std::tuple<Tensor, Tensor>(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                const OptTensor& scale, const OptTensor& shift);
using AffineApply = Tensor(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift, bool relu);
using BinCoefficients = std::tuple<Tensor, Tensor>(const Tensor& mean, const Tensor& m2, int64_t plane_size,
                                                   const Tensor& gate, const OptTensor& weight, const OptTensor& bias,
                                                   const OptTensor& running_mean, const OptTensor& running_var,
                                                   bool training, double momentum, double eps,
                                                   const OptTensor& num_batches_tracked);
// AssocNorm's and ILM-Norm's coefficient backward ops (one signature for both).
using MetaCoefficientsBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& g1, const Tensor& g2, const Tensor& mean, const Tensor& m2, int64_t plane_size,
    int64_t num_groups, const Tensor& encoder, const Tensor& decoder_a, const Tensor& decoder_b,
    const Tensor& weight, const Tensor& bias, double eps);
// IEBN with one value per plane, CPU (csrc/cpu/iebn_pointwise_cpu.cpp).
using IebnPointwiseApply = Tensor(const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& gate_weight,
                                  const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias, bool relu);
using IebnPointwiseBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& gate_weight,
    const Tensor& gate_bias, const OptTensor& weight, const OptTensor& bias, bool batch_stats, bool relu);
}  // namespace sig

// Elements of one (n, c) plane: the product of the spatial sizes (1 for (N, C) inputs).
inline int64_t plane_size(const at::Tensor& x) {
  int64_t plane = 1;
  for (int64_t d = 2; d < x.dim(); ++d) plane *= x.size(d);
  return plane;
}

}  // namespace nf_ops
