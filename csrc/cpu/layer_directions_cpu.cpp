// The layer steps and layer directions on the CPU: common/layer_compositions.h with the CPU kernels
// called directly (the functions the CPU registrations of the component ops are), so a direction
// costs the host one dispatch instead of three or four, and the results, refusals included, are
// those of the ops called one by one (issue 13, host cost: docs/performance.md).
#include <torch/library.h>

#include "common/layer_compositions.h"
#include "cpu/coefficient_ops_cpu.h"
#include "cpu/generic_ops_cpu.h"

namespace {

using nf_compose::Compositions;

struct Cpu {
  static constexpr auto moments = &nf_cpu::moments_cpu;
  static constexpr auto affine_apply = &nf_cpu::affine_apply_cpu;
  static constexpr auto backward_sums = &nf_cpu::backward_sums_cpu;
  static constexpr auto backward_apply = &nf_cpu::backward_apply_cpu;
  static constexpr auto bin_coefficients = &nf_cpu::CoefficientOps::bin_coefficients;
  static constexpr auto iebn_coefficients = &nf_cpu::CoefficientOps::iebn_coefficients;
  static constexpr auto bin_coefficients_backward = &nf_cpu::CoefficientOps::bin_coefficients_backward;
  static constexpr auto iebn_coefficients_backward = &nf_cpu::CoefficientOps::iebn_coefficients_backward;
  static constexpr auto assoc_coefficients = &nf_cpu::CoefficientOps::assoc_coefficients;
  static constexpr auto ilm_coefficients = &nf_cpu::CoefficientOps::ilm_coefficients;
  static constexpr auto assoc_coefficients_backward = &nf_cpu::CoefficientOps::assoc_coefficients_backward;
  static constexpr auto ilm_coefficients_backward = &nf_cpu::CoefficientOps::ilm_coefficients_backward;
  // The layer steps: the compositions themselves (no CPU kernel of their own to dispatch to).
  static constexpr auto bin_step = &Compositions<Cpu>::bin_moments_coefficients;
  static constexpr auto iebn_step = &Compositions<Cpu>::iebn_moments_coefficients;
  static constexpr auto bin_step_backward = &Compositions<Cpu>::bin_sums_coefficients_backward;
  static constexpr auto iebn_step_backward = &Compositions<Cpu>::iebn_sums_coefficients_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  nf_compose::register_compositions<Cpu>(m);
}
