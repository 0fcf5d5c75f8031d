// Portable build of the IEBN one-value-per-plane kernels (iebn_pointwise_kernels.h).
#include <ATen/cpu/vec/vec.h>

#define NF_CPU_NS portable
#include "cpu/iebn_pointwise_impl.h"
