// CPU coefficient ops (docs/architecture.md; entry points in common/coefficient_ops.h): checks and
// outputs from common/coefficients_glue.h, then the kernels (coefficients_{batch,assoc,ilm}_impl.h;
// AVX2 or portable build: coefficients_kernels.h), through the steps of cpu/coefficient_ops_cpu.h.
#include <torch/library.h>

#include "cpu/coefficient_ops_cpu.h"

TORCH_LIBRARY_IMPL(normfuse, CPU, m) {
  nf_cpu::CoefficientOps::register_all(m);
  nf_cpu::CoefficientOps::register_ilm(m);
}
