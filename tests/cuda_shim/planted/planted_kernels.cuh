// Test-only kernels with deliberate bugs, proving that the sanitizer net catches them.
// `fixed == true` gives the correct variant, which must stay silent (no false positives).
#pragma once
#include "kernels/cuda_compat.cuh"

namespace planted {

// Block sum in shared memory. The bug: no __syncthreads between filling smem and the first tree
// step, so a thread reads its partner's slot while the partner may still be writing it
// (compute-sanitizer racecheck would flag it; TSAN must report a data race here).
__global__ void block_sum(const float* x, float* out, int n, bool fixed) {
  NF_DYNAMIC_SMEM(float, s);
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.f;
  if (fixed) __syncthreads();  // <- the missing barrier when !fixed
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (t < half) s[t] += s[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Neighbour difference with an off-by-one bound: thread n-1 reads x[n], one past the end
// (memcheck would flag it; ASAN must report a heap-buffer-overflow here).
__global__ void forward_diff(const float* x, float* out, int n, bool fixed) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (fixed && i == n - 1) ? 0.f : x[i + 1] - x[i];
}

}  // namespace planted
