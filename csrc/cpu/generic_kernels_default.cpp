// Portable build of the generic CPU kernels (generic_kernels.h): at::vec's default
// implementation, compiled with the project's flags (no ISA extension assumed).
#include <ATen/cpu/vec/vec.h>

#define NF_CPU_NS portable
#include "cpu/generic_reduce_moments_impl.h"
#include "cpu/generic_reduce_sums_impl.h"
#include "cpu/generic_apply_impl.h"
