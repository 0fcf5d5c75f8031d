// Element conversion, 16-byte vector access and the moment-merging arithmetic shared by the
// generic kernels (and usable by the coefficient kernels). Plain CUDA, no torch.
#pragma once
#include "kernels/cuda_compat.cuh"
#include "common/coefficients.h"  // coef::chan_merge

namespace nf {

// ---- element type <-> float ----------------------------------------------------------------
NF_HOST_DEVICE float to_float(float v) { return v; }
NF_DEVICE float to_float(__half v) { return __half2float(v); }
NF_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
NF_DEVICE T from_float(float v);
template <>
NF_DEVICE float from_float<float>(float v) { return v; }
template <>
NF_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
NF_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements per 16-byte vector access: 4 floats, 8 halves.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC elements, aligned so that a load/store of the whole pack is one 128-bit access (LDG.128).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
NF_DEVICE void load_floats(const T* p, float (&out)[VEC]) {
  NF_TRACE_ACCESS(p, sizeof(T) * VEC, false);
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(pk.v[k]);
  }
}

template <typename T, int VEC>
NF_DEVICE void store_floats(T* p, const float (&in)[VEC]) {
  NF_TRACE_ACCESS(p, sizeof(T) * VEC, true);
  if constexpr (VEC == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// A 16-byte word (uint4, as loaded raw) as VEC floats: the single-read kernels keep their tile
// in such words and convert where used; load_floats_cg converts its L2 load with it.
template <typename T, int VEC>
NF_DEVICE void unpack(const uint4& raw, float (&out)[VEC]) {
  Pack<T, VEC> pk;
  static_assert(sizeof(pk) == sizeof(raw), "16-byte vectors only");
  memcpy(&pk, &raw, sizeof(raw));
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pk.v[k]);
}

// As load_floats, through L2 (ld.global.cg) instead of the read-only path (ld.global.nc), for a
// loop that wants two loads in flight before its stores: ptxas sank the second of two read-only
// loads below the first row's store in cl_apply_kernel (16-bit types: one load in flight at a
// time), but keeps an ordinary load above a store that follows it in the source.
template <typename T, int VEC>
NF_DEVICE void load_floats_cg(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    load_floats<T, VEC>(p, out);
  } else {
    NF_TRACE_ACCESS(p, sizeof(uint4), false);
    unpack<T, VEC>(__ldcg(reinterpret_cast<const uint4*>(p)), out);
  }
}

// Same as load_floats for float arrays written earlier in the same launch by another block:
// __ldcg reads through L2, skipping the (non-coherent) L1.
NF_DEVICE float load_cg(const float* p) { return __ldcg(p); }

// Division where a couple of ulps are fine (Welford weights): avoids the IEEE division sequence.
NF_DEVICE float fast_div(float a, float b) { return __fdividef(a, b); }

// ---- moments ------------------------------------------------------------------------------------
// Running moments of a set of values, *relative to a per-plane shift* chosen by the caller (the
// plane's first element): `mean` is mean(x) - shift, `m2` is sum (x - mean(x))^2. Keeping the
// mean relative keeps it O(std) instead of O(offset), so merging many partials never rounds it
// at the magnitude of the offset (design.md sec. 2).
struct Welford {
  float n = 0.f, mean = 0.f, m2 = 0.f;
};

// Chan et al.: merge b into a. Exact for the counts used here (floats hold integers < 2^24; above
// that the weights are off by ~1e-7 relative, harmless).
struct FastDiv {
  NF_DEVICE float operator()(float a, float b) const { return fast_div(a, b); }
};
NF_DEVICE void chan_merge(Welford& a, const Welford& b) {
  coef::chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2, 1.f, FastDiv{});
}

// Add VEC values (already shifted) of one plane: exact two-pass over the small batch, then one
// Chan merge, so one division per vector instead of one per element.
template <int VEC>
NF_DEVICE void welford_add(Welford& w, const float (&d)[VEC]) {
  if constexpr (VEC == 1) {
    w.n += 1.f;
    const float delta = d[0] - w.mean;
    w.mean = coef::merged_mean(w.mean, d[0], delta, fast_div(1.f, w.n));  // Inf-safe
    w.m2 += delta * (d[0] - w.mean);
  } else {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += d[k];
    const float bm = s * (1.f / VEC);
    float bq = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) bq += (d[k] - bm) * (d[k] - bm);
    Welford b;
    b.n = static_cast<float>(VEC);
    b.mean = bm;
    b.m2 = bq;
    chan_merge(w, b);
  }
}

// ---- warp exchange of small structs --------------------------------------------------------
NF_DEVICE float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

NF_DEVICE Welford shfl_xor(const Welford& w, int lane_mask) {
  Welford r;
  r.n = shfl_xor(w.n, lane_mask);
  r.mean = shfl_xor(w.mean, lane_mask);
  r.m2 = shfl_xor(w.m2, lane_mask);
  return r;
}

}  // namespace nf
