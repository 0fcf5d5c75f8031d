// First include of every kernel header. Under nvcc it pulls the CUDA headers; under the CPU shim
// (tests/cuda_shim/cuda_shim.h, included before any kernel header, defines NF_CUDA_SHIM) the
// same names are provided by std::thread-based stand-ins, so one kernel source serves both.
#pragma once

#ifdef NF_CUDA_SHIM
#ifndef NF_CUDA_SHIM_INCLUDED
#error "include tests/cuda_shim/cuda_shim.h before any csrc/kernels header"
#endif
// Launch = run the blocks one after another, one std::thread per CUDA thread.
#define NF_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ((void)(stream), ::nf_shim::launch(kernel, grid, block, smem_bytes, __VA_ARGS__))
#define NF_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::nf_shim::dynamic_smem())
// Cooperative launch (all blocks resident at once) and its grid-wide barrier.
#define NF_LAUNCH_COOPERATIVE(kernel, grid, block, smem_bytes, stream, ...) \
  ((void)(stream), ::nf_shim::launch_cooperative(kernel, grid, block, smem_bytes, __VA_ARGS__), cudaSuccess)
#define NF_GRID_SYNC() ::nf_shim::grid_sync(__FILE__, __LINE__)
// A bulk element access (the tensors' streams: numerics.cuh's load_floats / store_floats, the
// single read's load_raw), recorded when a shim driver traces its launches (traffic and
// coalescing checks, tests/csrc/test_cuda_shim_traffic.py). Nothing under nvcc.
#define NF_TRACE_ACCESS(ptr, bytes, store) ::nf_shim::trace_access(ptr, bytes, store)
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define NF_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
// One extern declaration type for every kernel: differing types for the same extern __shared__
// name in one TU are an error; float4 gives 16-byte alignment.
#define NF_DYNAMIC_SMEM(type, name)    \
  extern __shared__ float4 nf_smem_[]; \
  type* name = reinterpret_cast<type*>(nf_smem_)
#include <cooperative_groups.h>
#include <tuple>
// cudaLaunchCooperativeKernel fails (cudaErrorCooperativeLaunchTooLarge) instead of launching a
// grid whose blocks cannot all be resident: a grid-wide barrier never deadlocks.
namespace nf_detail {
template <typename... KArgs, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args&&... args) {
  std::tuple<KArgs...> values(std::forward<Args>(args)...);
  return std::apply(
      [&](auto&... v) {
        void* ptrs[] = {static_cast<void*>(&v)...};
        return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, smem, stream);
      },
      values);
}
}  // namespace nf_detail
#define NF_LAUNCH_COOPERATIVE(kernel, grid, block, smem_bytes, stream, ...) \
  ::nf_detail::launch_cooperative(kernel, grid, block, smem_bytes, stream, __VA_ARGS__)
#define NF_GRID_SYNC() ::cooperative_groups::this_grid().sync()
#define NF_TRACE_ACCESS(ptr, bytes, store) ((void)0)
#endif

#define NF_DEVICE __device__ __forceinline__
#define NF_HOST_DEVICE __host__ __device__ __forceinline__

// Largest block any generic kernel is launched with; used in __launch_bounds__ so ptxas budgets
// registers for it (the launchers refuse larger blocks).
#define NF_MAX_THREADS 256
#define NF_WARP 32
