// Portable build of the generic CPU kernels (generic_kernels.h): at::vec's default
// implementation, compiled with the project's flags (no ISA extension assumed).
#include <ATen/cpu/vec/vec.h>

#define NF_CPU_NS portable
#include "cpu/generic_kernels_impl.h"
