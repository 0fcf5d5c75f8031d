// Portable build of the coefficient kernels (coefficients_kernels.h).
#include <ATen/cpu/vec/vec.h>

#define NF_CPU_NS portable
#include "cpu/coefficients_kernels_impl.h"
