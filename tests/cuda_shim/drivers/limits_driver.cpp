// Shim driver for the launchers' size limits (nf::kMaxPlaneLength, common/generic_params.h): the
// kernels walk a plane's splits in 32-bit ints, so every launcher must refuse a plane longer than
// 2^30 before it touches memory, and for planes up to 2^30 every split's end must stay below 2^31.
// No memory of that size is allocated: a refused launch never reads its pointers, and the split
// arithmetic is checked on the plans themselves. Usage: limits_driver (no arguments). Prints "ok".
#include "cuda_shim.h"
#include "kernels/layer_steps.cuh"
#include "kernels/plane_apply.cuh"
#include "kernels/plane_reduce.cuh"
#include "kernels/single_read.cuh"

#include <cstdio>
#include <string>

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "limits_driver: %s\n", what.c_str());
    std::exit(1);
  }
}

// Every launcher, given a plane of length L: does it refuse? (Pointers point at a small aligned
// buffer: a launcher that went ahead would read or write far past it, which ASAN reports.)
bool all_refuse(int64_t L, nf::Layout layout) {
  alignas(16) static float buf[64] = {};
  alignas(16) static unsigned counters[64] = {};
  nf::PlaneShape s;
  s.N = 1;
  s.C = layout == nf::Layout::Contiguous ? 1 : 4;
  s.L = L;
  s.layout = layout;
  nf::MomentsParams m;
  m.x = buf;
  m.mean = buf;
  m.m2 = buf;
  m.shape = s;
  m.counters = counters;
  m.partials = buf;
  nf::BackwardSumsParams b;
  b.dy = buf;
  b.x = buf;
  b.mean = buf;
  b.sum_dy = buf;
  b.sum_dy_xmu = buf;
  b.shape = s;
  b.counters = counters;
  b.partials = buf;
  nf::AffineApplyParams a;
  a.x = buf;
  a.mean = buf;
  a.scale = buf;
  a.shift = buf;
  a.y = buf;
  a.shape = s;
  nf::BackwardApplyParams d;
  d.dy = buf;
  d.x = buf;
  d.mean = buf;
  d.c_dy = buf;
  d.c_x = buf;
  d.c_0 = buf;
  d.dx = buf;
  d.shape = s;
  nf::BatchCoefParams<float> c;
  c.N = s.N;
  c.C = s.C;
  nf::SingleReadLaunch plan;
  using Bin = nf::coef::BinMath<float>;
  const bool single_read_refused = !nf::plan_single_read_forward<float, Bin>(m, buf, c, &plan) &&
                                   !nf::plan_single_read_backward<float, Bin>(b, buf, c, &plan);
  return nf::launch_moments<float>(m, nullptr) == cudaErrorInvalidValue &&
         nf::launch_backward_sums<float>(b, nullptr) == cudaErrorInvalidValue &&
         nf::launch_affine_apply<float>(a, nullptr) == cudaErrorInvalidValue &&
         nf::launch_backward_apply<float>(d, nullptr) == cudaErrorInvalidValue &&
         nf::launch_moments_step<float, Bin>(m, c, nullptr) == cudaErrorInvalidValue &&
         nf::launch_sums_step<float, Bin>(b, c, nullptr) == cudaErrorInvalidValue &&
         (layout == nf::Layout::Contiguous || single_read_refused);
}

}  // namespace

int main() {
  const int64_t max_l = nf::kMaxPlaneLength;
  for (nf::Layout layout : {nf::Layout::Contiguous, nf::Layout::ChannelsLast}) {
    require(all_refuse(max_l + 1, layout), "a launcher took a plane of 2^30 + 1 elements");
    require(all_refuse(int64_t(INT32_MAX), layout), "a launcher took a plane of 2^31 - 1 elements");
  }
  // Up to 2^30: every split of every plan ends below 2^31 (the last split's begin + seg, computed
  // in int32 by the kernels, is splits * seg), for every block size, vector width and a few plane
  // counts.
  for (int64_t L : {max_l, max_l - 1, max_l - 4095, int64_t(1) << 29}) {
    for (int threads = 32; threads <= NF_MAX_THREADS; threads *= 2) {
      for (int vec : {1, 4, 8}) {
        for (int64_t planes : {1, 2, 3, 1000}) {
          const nf::ContigPlan pl = nf::plan_contig(planes, L, vec, threads);
          require(int64_t(pl.splits) * pl.seg <= INT32_MAX, "contiguous split end overflows");
          const nf::ClPlan cl = nf::plan_cl(planes, 64, L, vec, threads);
          require(int64_t(cl.splits) * cl.seg <= INT32_MAX, "channels-last split end overflows");
        }
      }
    }
  }
  std::printf("ok\n");
  return 0;
}
