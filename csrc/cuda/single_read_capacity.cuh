// How many blocks of a single-read kernel the current device holds at once: the cooperative
// launch's limit (it refuses a larger grid, so a grid-wide barrier can never deadlock). Asked of
// the CUDA runtime once per (kernel, device, block size, shared memory) and cached: the
// occupancy query costs microseconds, a layer step must not. CUDA builds only (not the shim).
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/single_read.cuh"

namespace nf {

// 0 when the device cannot launch cooperatively at all.
template <class Kernel>
int64_t cooperative_capacity(Kernel kernel, int threads, size_t smem_bytes) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  using Key = std::tuple<const void*, int, int, size_t>;
  static std::mutex mu;
  static std::map<Key, int64_t> cache;
  const Key key{reinterpret_cast<const void*>(kernel), dev, threads, smem_bytes};
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int coop = 0, sms = 0, per_sm = 0;
  int64_t cap = 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) == cudaSuccess && coop != 0 &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) == cudaSuccess)
    cap = static_cast<int64_t>(per_sm) * sms;
  (void)cudaGetLastError();  // a failed query is not sticky; leave no error for the next launch check
  const std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, cap);
  return cap;
}

}  // namespace nf
