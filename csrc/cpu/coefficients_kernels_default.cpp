// Portable build of the coefficient kernels (coefficients_kernels.h).
#include <ATen/cpu/vec/vec.h>

#define NF_CPU_NS portable
#include "cpu/coefficients_kernels.h"
#include "cpu/coefficients_batch_impl.h"
#include "cpu/coefficients_assoc_impl.h"
