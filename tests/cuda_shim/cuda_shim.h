// CPU stand-ins for the CUDA built-ins, so the kernel headers in csrc/kernels compile with g++
// and run under -fsanitize=thread (racecheck) or -fsanitize=address (memcheck).
//
// Model: a launch creates one std::thread per CUDA thread of a block and reuses them for every
// block; blocks run one after another (a kernel relying on co-resident blocks would deadlock,
// which is also a bug on a GPU). A cooperative launch (launch_cooperative) runs all blocks at
// once instead, for kernels with grid-wide barriers. __syncthreads is a std::barrier over the block, warp shuffles
// are a per-warp exchange between two barriers, atomics go through std::atomic_ref, and dynamic
// shared memory is one exactly-sized heap buffer (so ASAN sees overruns; it is refilled with 0xCD
// between blocks so stale data is not silently reused).
//
// The kernels' bulk accesses (NF_TRACE_ACCESS) can be traced: bytes moved and 32-byte sectors per
// warp-wide request (trace_begin / trace_end, below).
//
// Include this first, then the kernel headers (they see NF_CUDA_SHIM). Test-only code.
#pragma once
#define NF_CUDA_SHIM 1
#define NF_CUDA_SHIM_INCLUDED 1

#include <atomic>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static __shared__ arrays become function statics: one instance shared by all threads, which is
// per-block storage because blocks run one after another. Prefer NF_DYNAMIC_SMEM (exact size).
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorCooperativeLaunchTooLarge = 720
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "shim error"; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- half / bfloat16 (storage types with round-to-nearest-even conversions) ------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE conversion, round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

// ---- math intrinsics ------------------------------------------------------------------------------
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

namespace nf_shim {

struct Warp {
  explicit Warp(int n) : size(n), bar(n) {}
  int size;
  std::barrier<> bar;
  uint64_t slot[32] = {};
};

struct Block {
  explicit Block(int n) : bar(n) {}
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_lane = 0, tl_warp = 0;

inline unsigned char* dynamic_smem() { return tl_block->smem; }

// Every lane publishes its value, the warp meets, each lane reads its source, the warp meets
// again so the next exchange cannot overwrite a slot before it has been read.
template <typename T>
T warp_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  Warp& w = *tl_block->warps[tl_warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[tl_lane] = bits;
  w.bar.arrive_and_wait();
  const uint64_t r = (src_lane >= 0 && src_lane < w.size) ? w.slot[src_lane] : bits;
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// Runs kernel(args...) on every block of `grid`, one std::thread per thread of `block`.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel argument count");
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) {
    std::fprintf(stderr, "nf_shim: bad block size %d\n", nthreads);
    std::abort();
  }
  Block blk(nthreads);
  for (int w = 0; w * 32 < nthreads; ++w) blk.warps.push_back(std::make_unique<Warp>(std::min(32, nthreads - w * 32)));
  std::unique_ptr<unsigned char[]> smem(new unsigned char[smem_bytes ? smem_bytes : 1]);
  std::memset(smem.get(), 0xCD, smem_bytes ? smem_bytes : 1);
  blk.smem = smem.get();
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;

  auto body = [&](int t) {
    tl_block = &blk;
    tl_lane = t % 32;
    tl_warp = t / 32;
    blockDim = block;
    gridDim = grid;
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    for (int64_t b = 0; b < nblocks; ++b) {
      blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                      static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y)));
      kernel(args...);
      blk.bar.arrive_and_wait();  // block b is finished for everybody
      if (t == 0) std::memset(blk.smem, 0xCD, smem_bytes ? smem_bytes : 1);
      blk.bar.arrive_and_wait();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) pool.emplace_back(body, t);
  for (auto& th : pool) th.join();
}

// Cooperative launch (cudaLaunchCooperativeKernel): every block at once, one std::thread per
// CUDA thread of the whole grid, so that a kernel can wait at grid-wide barriers (NF_GRID_SYNC,
// a std::barrier over all of them: TSAN sees it as the synchronisation it is). Each block has its
// own dynamic shared memory; static __shared__ arrays (function statics here) would be shared by
// all blocks, so kernels launched this way use dynamic shared memory only. A thread that leaves
// the kernel before a grid barrier the others wait at hangs the launch, as it would on a GPU.
inline thread_local std::barrier<>* tl_grid = nullptr;

template <typename... KArgs, typename... Args>
void launch_cooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel argument count");
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (nthreads <= 0 || nthreads > 1024 || nblocks <= 0 || nblocks * nthreads > 4096) {
    std::fprintf(stderr, "nf_shim: cooperative launch of %lld blocks x %d threads is too large for the shim\n",
                 static_cast<long long>(nblocks), nthreads);
    std::abort();
  }
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::unique_ptr<unsigned char[]>> smems;
  for (int64_t b = 0; b < nblocks; ++b) {
    blocks.push_back(std::make_unique<Block>(nthreads));
    for (int w = 0; w * 32 < nthreads; ++w)
      blocks.back()->warps.push_back(std::make_unique<Warp>(std::min(32, nthreads - w * 32)));
    smems.emplace_back(new unsigned char[smem_bytes ? smem_bytes : 1]);
    std::memset(smems.back().get(), 0xCD, smem_bytes ? smem_bytes : 1);
    blocks.back()->smem = smems.back().get();
  }
  std::barrier<> grid_bar(static_cast<std::ptrdiff_t>(nblocks * nthreads));
  auto body = [&](int64_t b, int t) {
    tl_block = blocks[b].get();
    tl_grid = &grid_bar;
    tl_lane = t % 32;
    tl_warp = t / 32;
    blockDim = block;
    gridDim = grid;
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y)));
    kernel(args...);
    tl_grid = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(nblocks * nthreads));
  for (int64_t b = 0; b < nblocks; ++b)
    for (int t = 0; t < nthreads; ++t) pool.emplace_back(body, b, t);
  for (auto& th : pool) th.join();
}

// A planted bug for the tests, without a build per plant: NF_SHIM_DROP_GRID_SYNC="file.cuh:line"
// makes the NF_GRID_SYNC() at that line a no-op for every thread (as if the line were deleted;
// the barrier's phases stay aligned since all threads skip it). Unset: every barrier waits.
inline bool grid_sync_dropped(const char* file, int line) {
  static const char* const spec = std::getenv("NF_SHIM_DROP_GRID_SYNC");
  if (spec == nullptr) return false;
  const char* colon = std::strrchr(spec, ':');
  if (colon == nullptr || std::atoi(colon + 1) != line) return false;
  const size_t name_len = static_cast<size_t>(colon - spec), file_len = std::strlen(file);
  return file_len >= name_len && std::strncmp(file + file_len - name_len, spec, name_len) == 0;
}

inline void grid_sync(const char* file, int line) {
  if (tl_grid == nullptr) {
    std::fprintf(stderr, "nf_shim: grid-wide barrier outside a cooperative launch\n");
    std::abort();
  }
  if (grid_sync_dropped(file, line)) return;
  tl_grid->arrive_and_wait();
}

// ---- access trace: what the kernels' bulk accesses (NF_TRACE_ACCESS) move, and how they coalesce
// Off unless a driver turns it on (trace_begin). Then every traced access is recorded with its
// block, thread, size and the thread's running number among its accesses of that size in that
// block, and trace_end() sums up the launches in between: bytes loaded and stored, and the
// 32-byte sectors they cost. On a GPU the 32 lanes of a warp issue an access together, so one
// warp-wide request is the n-th traced access of a size of each lane of a warp; it costs the
// distinct sectors its lanes' bytes touch (what ncu counts as sectors per request), against
// ceil(its bytes / 32) when perfectly coalesced. That pairing assumes the lanes run the same
// accesses in the same order, as these kernels' loops do (a lane with fewer iterations only
// drops out of the later requests); numbering each size apart keeps the 16-byte vector accesses
// paired when lanes take different numbers of scalar ones (a contiguous plane's unaligned head
// and tail, whose length differs from plane to plane).
struct Access {
  int64_t block;
  int32_t thread, seq;
  uintptr_t addr;
  uint32_t bytes;
  bool store;
};

struct TraceSummary {
  uint64_t load_bytes = 0, store_bytes = 0;
  uint64_t requests = 0;       // warp-wide requests
  uint64_t sectors = 0;        // 32-byte sectors they touch
  uint64_t ideal_sectors = 0;  // sum of ceil(request bytes / 32): every request fully coalesced
  // the same of the 16-byte (vector) accesses alone
  uint64_t vector_bytes = 0, vector_requests = 0, vector_sectors = 0, vector_ideal = 0;
};

inline std::atomic<bool> trace_on{false};
inline std::mutex trace_mutex;
inline std::vector<Access> trace_log;
inline thread_local int64_t tl_trace_block = -1;
inline thread_local int32_t tl_trace_seq[17] = {};  // by access size, 1 to 16 bytes

inline void trace_access(const void* p, size_t bytes, bool store) {
  if (!trace_on.load(std::memory_order_relaxed)) return;
  const int64_t b = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  const int32_t t = static_cast<int32_t>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  if (b != tl_trace_block) {  // this std::thread runs the same CUDA thread of the next block
    tl_trace_block = b;
    std::fill(std::begin(tl_trace_seq), std::end(tl_trace_seq), 0);
  }
  if (bytes == 0 || bytes > 16) {
    std::fprintf(stderr, "nf_shim: traced access of %zu bytes (1 to 16 expected)\n", bytes);
    std::abort();
  }
  const Access a{b, t, tl_trace_seq[bytes]++, reinterpret_cast<uintptr_t>(p), static_cast<uint32_t>(bytes), store};
  std::lock_guard<std::mutex> lock(trace_mutex);
  trace_log.push_back(a);
}

inline void trace_begin() {
  std::lock_guard<std::mutex> lock(trace_mutex);
  trace_log.clear();
  trace_on = true;
}

inline TraceSummary trace_end() {
  trace_on = false;
  std::lock_guard<std::mutex> lock(trace_mutex);
  std::vector<Access>& log = trace_log;
  auto key = [](const Access& a) { return std::make_tuple(a.block, a.thread / 32, a.bytes, a.seq); };
  std::sort(log.begin(), log.end(), [&](const Access& a, const Access& b) { return key(a) < key(b); });
  TraceSummary s;
  std::vector<uintptr_t> sectors;
  for (size_t i = 0; i < log.size();) {
    size_t j = i;
    uint64_t bytes = 0;
    sectors.clear();
    for (; j < log.size() && key(log[j]) == key(log[i]); ++j) {
      bytes += log[j].bytes;
      (log[j].store ? s.store_bytes : s.load_bytes) += log[j].bytes;
      for (uintptr_t q = log[j].addr / 32; q <= (log[j].addr + log[j].bytes - 1) / 32; ++q) sectors.push_back(q);
    }
    std::sort(sectors.begin(), sectors.end());
    const uint64_t touched = static_cast<uint64_t>(std::unique(sectors.begin(), sectors.end()) - sectors.begin());
    const uint64_t ideal = (bytes + 31) / 32;
    s.sectors += touched;
    s.ideal_sectors += ideal;
    s.requests += 1;
    if (log[i].bytes == 16) {
      s.vector_bytes += bytes;
      s.vector_sectors += touched;
      s.vector_ideal += ideal;
      s.vector_requests += 1;
    }
    i = j;
  }
  log.clear();
  return s;
}

// Runs `launch` (a callable returning cudaError_t), traced when the driver runs with
// NF_SHIM_TRACE=1, and then prints one line for the test to read:
//   trace WHAT load=BYTES store=BYTES requests=N sectors=N ideal=N vector_bytes=BYTES
//         vector_requests=N vector_sectors=N vector_ideal=N
template <class F>
cudaError_t traced(const char* what, F&& launch) {
  static const bool on = [] {
    const char* v = std::getenv("NF_SHIM_TRACE");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (!on) return launch();
  trace_begin();
  const cudaError_t err = launch();
  const TraceSummary t = trace_end();
  auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("trace %s load=%llu store=%llu requests=%llu sectors=%llu ideal=%llu vector_bytes=%llu "
              "vector_requests=%llu vector_sectors=%llu vector_ideal=%llu\n",
              what, u(t.load_bytes), u(t.store_bytes), u(t.requests), u(t.sectors), u(t.ideal_sectors),
              u(t.vector_bytes), u(t.vector_requests), u(t.vector_sectors), u(t.vector_ideal));
  return err;
}

}  // namespace nf_shim

inline void __syncthreads() { nf_shim::tl_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { nf_shim::tl_block->warps[nf_shim::tl_warp]->bar.arrive_and_wait(); }
// seq_cst fence; TSAN does not model bare fences, but blocks are serialised here anyway and the
// in-block ordering comes from the barriers.
inline void __threadfence() {
#ifndef __SANITIZE_THREAD__
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) { return nf_shim::warp_exchange(v, nf_shim::tl_lane ^ lane_mask); }
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  return nf_shim::warp_exchange(v, nf_shim::tl_lane + static_cast<int>(delta));
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  return nf_shim::warp_exchange(v, nf_shim::tl_lane - static_cast<int>(delta));
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int = 32) { return nf_shim::warp_exchange(v, src); }

template <typename T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T>
T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (old < v && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
