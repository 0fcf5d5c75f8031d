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

// 0 when the device cannot launch cooperatively at all (cached), or the query failed (not cached).
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
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      (coop != 0 && cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess)) {
    (void)cudaGetLastError();  // our failed query's error (not sticky): not left for the next launch check
    return 0;                  // not cached: asked again next time
  }
  const int64_t cap = coop != 0 ? static_cast<int64_t>(per_sm) * sms : 0;  // a definite answer: cached
  const std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, cap);
  return cap;
}

}  // namespace nf
