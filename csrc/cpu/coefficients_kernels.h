// Raw-pointer entry points of the CPU coefficient kernels (BIN, IEBN, AssocNorm; forward and
// backward), on the parameter structs of common/coefficients_params.h. Like the generic kernels
// (generic_kernels.h) they are compiled twice, coefficients_kernels_{avx2,default}.cpp, and the
// glue (coefficient_ops_cpu.cpp) picks the build at run time
// (nf_cpu::use_avx2()).
#pragma once

#include "common/coefficients_params.h"
#include "cpu/generic_kernels.h"

namespace nf_cpu {

#define NF_CPU_DECLARE_COEF_T(S)                              \
  void bin_forward(const nf::BatchCoefParams<S>& p);          \
  void bin_backward(const nf::BatchCoefParams<S>& p);         \
  void iebn_forward(const nf::BatchCoefParams<S>& p);         \
  void iebn_backward(const nf::BatchCoefParams<S>& p);        \
  void assoc_forward(const nf::AssocCoefParams<S>& p);        \
  void assoc_backward(const nf::AssocCoefParams<S>& p);

#define NF_CPU_DECLARE_COEF(ns) \
  namespace ns {                \
  NF_CPU_DECLARE_COEF_T(float)  \
  NF_CPU_DECLARE_COEF_T(double) \
  }

NF_CPU_DECLARE_COEF(portable)
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
NF_CPU_DECLARE_COEF(avx2)
#endif

// Calls ns::fn(p) with ns = avx2 where use_avx2(), else portable.
#if defined(NF_CPU_HAVE_AVX2_KERNELS)
#define NF_CPU_CALL(fn, p) (::nf_cpu::use_avx2() ? ::nf_cpu::avx2::fn(p) : ::nf_cpu::portable::fn(p))
#else
#define NF_CPU_CALL(fn, p) (::nf_cpu::portable::fn(p))
#endif

}  // namespace nf_cpu
