// One build of the coefficient kernels (coefficients_kernels.h), for the namespace NF_CPU_NS: the
// kernel bodies, and each entry point, float and double, defined as a call to its kernel.
// Included by coefficients_kernels_{avx2,default}.cpp, after the torch headers.
#pragma once

#include "cpu/coefficients_kernels.h"
#include "cpu/coefficients_batch_impl.h"
#include "cpu/coefficients_assoc_impl.h"
#include "cpu/coefficients_ilm_impl.h"

#define NF_CPU_DEFINE_COEF_ONE(name, Params, kernel) \
  void name(const Params& p) { kernel(p); }

namespace nf_cpu {
namespace NF_CPU_NS {
NF_CPU_COEF_ENTRY_POINTS(NF_CPU_DEFINE_COEF_ONE, float)
NF_CPU_COEF_ENTRY_POINTS(NF_CPU_DEFINE_COEF_ONE, double)
}  // namespace NF_CPU_NS
}  // namespace nf_cpu

#undef NF_CPU_DEFINE_COEF_ONE
