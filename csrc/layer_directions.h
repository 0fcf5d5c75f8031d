// The whole-layer ops' two directions below autograd (layer_directions.cpp), shared with their
// autograd node and op kernels (layer_autograd.cpp).
//
// Forward: moments -> <layer>_coefficients -> affine_apply; backward: backward_sums ->
// <layer>_coefficients_backward -> backward_apply, each direction called as one op
// (<layer>_layer_forward / <layer>_layer_backward, common/layer_compositions.h), or a 2-d view of
// its own where a layer has one value per plane (BIN: batch norm of x viewed as one sample; IEBN
// on the CPU: the elementwise iebn_pointwise ops).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <utility>

namespace nf_layer {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Layer : int64_t { kBin = 0, kIebn = 1, kAssoc = 2, kIlm = 3 };
// AssocNorm: encoder, decoder_mean, decoder_var, weight, bias (ILM-Norm: its two decoders)
constexpr int kMaxParams = 5;

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
using ParamGrads = std::array<Tensor, kMaxParams>;

// What the forward leaves for the backward besides x: the statistics, and the coefficients that
// the fused ReLU's mask is recomputed from (used only when Config::relu).
struct Forward {
  Tensor y, mean, m2, scale, shift;
};

inline Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// The whole-layer op's name, for messages.
const char* op_name(Layer layer);

// moments -> coefficients -> affine_apply, as one layer-direction op (or a 2-d view's).
Forward forward_direction(const Tensor& x, const Params& p, const Buffers& b, const Config& c);

// backward_sums -> coefficients backward -> backward_apply as one layer-direction op, or without dx
// the first two alone; (dx or undefined, parameter grads). mean and m2 are what the forward left.
std::pair<Tensor, ParamGrads> backward_direction(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& m2, const OptTensor& scale,
                                                 const OptTensor& shift, const Params& p, const OptTensor& rm,
                                                 const OptTensor& rv, const Config& c, bool want_dx);

}  // namespace nf_layer
