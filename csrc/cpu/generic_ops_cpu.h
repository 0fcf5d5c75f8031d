// The CPU kernels of the four generic ops (registered for the CPU key in generic_ops_cpu.cpp), also
// called directly by the CPU layer directions (layer_directions_cpu.cpp): same checks, same
// outputs, no dispatch.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace nf_cpu {

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x);
at::Tensor affine_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                            const at::Tensor& shift, bool relu);
std::tuple<at::Tensor, at::Tensor> backward_sums_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                     const std::optional<at::Tensor>& scale,
                                                     const std::optional<at::Tensor>& shift);
at::Tensor backward_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& c_dy,
                              const at::Tensor& c_x, const at::Tensor& c_0, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift);

}  // namespace nf_cpu
