// AVX2 build of the coefficient kernels (coefficients_kernels.h); see generic_kernels_avx2.cpp for
// how the AVX2 section is set up.
#include "cpu/coefficients_kernels.h"

#if defined(NF_CPU_HAVE_AVX2_KERNELS)
#include "cpu/avx2_prelude.h"

#define NF_CPU_NS avx2
#include "cpu/coefficients_kernels_impl.h"

#include "cpu/avx2_epilogue.h"
#endif
