// Raw-pointer entry points of the CPU coefficient kernels (BIN, IEBN, AssocNorm, ILM-Norm; forward and
// backward), on the parameter structs of common/coefficients_params.h. Like the generic kernels
// (generic_kernels.h) they are compiled twice, coefficients_kernels_{avx2,default}.cpp (each
// through coefficients_kernels_impl.h), and the glue (coefficient_ops_cpu.cpp) picks the build at
// run time (nf_cpu::use_avx2()).
#pragma once

#include "common/coefficients_params.h"
#include "cpu/generic_kernels.h"

namespace nf_cpu {

// The entry points, one list for their declarations here and their definitions
// (coefficients_kernels_impl.h): X(name, params type, the kernel that runs it).
#define NF_CPU_COEF_ENTRY_POINTS(X, S)                                                \
  X(bin_forward, nf::BatchCoefParams<S>, batch_detail::BatchKern<S>::bin_forward)     \
  X(bin_backward, nf::BatchCoefParams<S>, batch_detail::BatchKern<S>::bin_backward)   \
  X(iebn_forward, nf::BatchCoefParams<S>, batch_detail::BatchKern<S>::iebn_forward)   \
  X(iebn_backward, nf::BatchCoefParams<S>, batch_detail::BatchKern<S>::iebn_backward) \
  X(assoc_forward, nf::AssocCoefParams<S>, assoc_detail::AssocKern<S>::forward)       \
  X(assoc_backward, nf::AssocCoefParams<S>, assoc_detail::AssocKern<S>::backward)     \
  X(ilm_forward, nf::IlmCoefParams<S>, ilm_detail::IlmKern<S>::forward)               \
  X(ilm_backward, nf::IlmCoefParams<S>, ilm_detail::IlmKern<S>::backward)

#define NF_CPU_DECLARE_COEF_ONE(name, Params, kernel) void name(const Params& p);

#define NF_CPU_DECLARE_COEF(ns)                                  \
  namespace ns {                                                 \
  NF_CPU_COEF_ENTRY_POINTS(NF_CPU_DECLARE_COEF_ONE, float)       \
  NF_CPU_COEF_ENTRY_POINTS(NF_CPU_DECLARE_COEF_ONE, double)      \
  }

NF_CPU_DECLARE_COEF(portable)
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
NF_CPU_DECLARE_COEF(avx2)
#endif

}  // namespace nf_cpu
