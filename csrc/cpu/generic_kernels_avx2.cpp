// AVX2 build of the generic CPU kernels (generic_kernels.h), chosen at run time on CPUs with
// AVX2 + FMA + F16C. The project compiles without -mavx2, so this file switches the target with
// `#pragma GCC target` for its own code and at::vec only:
// * every other header (torch, c10, std) is included first, with the default target, so no
//   inline function shared with other translation units is compiled for AVX2 here;
// * at::vec's AVX2 implementation lives in its own namespace (at::vec::AVX2, see "Note
//   [CPU_CAPABILITY namespace]" in ATen), distinct from the portable at::vec::CPU_CAPABILITY;
// * our kernels live in nf_cpu::avx2 and are only called after the run-time check.
#include "cpu/generic_kernels.h"

#if defined(NF_CPU_HAVE_AVX2_KERNELS)
#include "cpu/avx2_prelude.h"

#define NF_CPU_NS avx2
#include "cpu/generic_reduce_moments_impl.h"
#include "cpu/generic_reduce_sums_impl.h"
#include "cpu/generic_apply_impl.h"

#include "cpu/avx2_epilogue.h"
#endif
