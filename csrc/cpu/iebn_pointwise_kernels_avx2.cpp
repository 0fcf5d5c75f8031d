// AVX2 build of the IEBN one-value-per-plane kernels (iebn_pointwise_kernels.h); how the target
// is switched for this file alone: generic_kernels_avx2.cpp.
#include "cpu/iebn_pointwise_kernels.h"

#if defined(NF_CPU_HAVE_AVX2_KERNELS)
#include "cpu/avx2_prelude.h"

#define NF_CPU_NS avx2
#include "cpu/iebn_pointwise_impl.h"

#include "cpu/avx2_epilogue.h"
#endif
