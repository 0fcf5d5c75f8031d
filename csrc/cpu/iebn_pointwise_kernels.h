// IEBN with one value per plane (a 2-d (N, C) input: the heads `convert` makes of nn.BatchNorm1d),
// CPU kernels. There the gate sigmoid(mean_plane(x) * gate_weight + gate_bias) reads each value
// itself, so the general path's per-(n, c) statistics and coefficients (nine a step, each as large
// as x at L = 1) would be per-element tensors; these kernels compute the layer elementwise from
// per-channel tables instead, with batch norm's passes over x (docs/performance.md):
//   forward   y = g (x - mean) (weight rstd) + bias,  g = sigmoid(gate_weight x + gate_bias)
//             (mean, rstd: the batch's, or the running statistics' in eval mode; computed by the
//             caller: the moments of x viewed as one sample, csrc/layer_directions.cpp)
//   backward  one reduction (five sums per channel) and one map (dx).
// Compiled twice like the generic kernels (generic_kernels.h): iebn_pointwise_kernels_avx2.cpp and
// iebn_pointwise_kernels_default.cpp; the glue (iebn_pointwise_cpu.cpp) picks one (NF_CPU_CALL).
#pragma once
#include <cstdint>

#include "common/generic_params.h"
#include "cpu/generic_kernels.h"

namespace nf_cpu {

// x, dy and out are (N, C) contiguous of `dtype`; every other pointer is a (C,) array of the acc
// type (double for float64, float otherwise).
struct PointwiseArgs {
  int64_t N = 0, C = 0;
  nf::DType dtype = nf::DType::f32;
  const void* x = nullptr;
  const void* dy = nullptr;  // backward
  void* out = nullptr;       // forward: y;  backward: dx
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* gate_weight = nullptr;
  const void* gate_bias = nullptr;
  const void* weight = nullptr;  // null: 1
  const void* bias = nullptr;    // null: 0
  bool relu = false;         // y = max(v, 0) of the value v above; the backward recomputes v's sign
  bool batch_stats = false;  // backward: mean and rstd are x's own batch statistics (their gradient flows)
  // backward outputs
  void* grad_gate_weight = nullptr;
  void* grad_gate_bias = nullptr;
  void* grad_weight = nullptr;  // the gradient of the weight (of a weight of 1 when there is none)
  void* grad_bias = nullptr;
};

#define NF_CPU_DECLARE_POINTWISE(ns)                    \
  namespace ns {                                        \
  void iebn_pointwise_apply(const PointwiseArgs& a);    \
  void iebn_pointwise_backward(const PointwiseArgs& a); \
  }

NF_CPU_DECLARE_POINTWISE(portable)
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
NF_CPU_DECLARE_POINTWISE(avx2)
#endif

}  // namespace nf_cpu
