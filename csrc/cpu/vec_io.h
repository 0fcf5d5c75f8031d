// Vector loads/stores of the CPU kernels on top of at::vec::Vectorized, for the two builds of
// every kernel file (see generic_kernels.h): `NF_CPU_NS` names the namespace of the build,
// `CPU_CAPABILITY_AVX2` is defined in the AVX2 one. Include after <ATen/cpu/vec/vec.h>.
//
//   VA<acc_t>   acc-type vectors (float: 8 lanes, double: 4): lane masks, masked loads/stores of
//               the first n lanes (no access beyond them), a horizontal sum in a fixed order
//   IO<S>       W elements of the storage type S as one acc-type vector (float for half and
//               bfloat16), full and partial (first n) loads/stores
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>
#include <vector>

#ifndef NF_CPU_NS
#error "define NF_CPU_NS (the namespace of this build of the kernels) before including vec_io.h"
#endif

namespace nf_cpu {
namespace NF_CPU_NS {

using at::vec::Vectorized;

template <class S>
using acc_type = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Lane masks: all bits set in the first n lanes (n = 0..W), loaded at an offset into these rows.
alignas(64) inline constexpr int32_t kMask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(64) inline constexpr int64_t kMask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
// All bits set in the one 16-bit lane 7 - k of a vector loaded at kLane16 + k (k = 1..7)
alignas(32) inline constexpr int16_t kLane16[16] = {0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0};

template <class A>
struct VA;

template <>
struct VA<float> {
  using V = Vectorized<float>;
  static constexpr int64_t W = V::size();
  static_assert(W == 8, "the lane masks assume 8 floats per vector");
  static V mask(int64_t n) { return V::loadu(reinterpret_cast<const float*>(kMask32 + 8 - n)); }
  static V load_n(const float* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask32 + 8 - n)));
#else
    return V::loadu(p, n);
#endif
  }
  static void store_n(float* p, const V& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    _mm256_maskstore_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask32 + 8 - n)), v);
#else
    v.store(p, static_cast<int>(n));
#endif
  }
  static float hsum(const V& v) {
#if defined(CPU_CAPABILITY_AVX2)
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
#else
    float t[W];
    v.store(t);
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
#endif
  }
  // Lane j of the result = the sum of the lanes of v[j] (a transposing reduction, fixed order).
  static V hsum_lanes(const V* v) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    float t[W];
    for (int64_t j = 0; j < W; ++j) t[j] = hsum(v[j]);
    return V::loadu(t);
#endif
  }
};

template <>
struct VA<double> {
  using V = Vectorized<double>;
  static constexpr int64_t W = V::size();
  static_assert(W == 4, "the lane masks assume 4 doubles per vector");
  static V mask(int64_t n) { return V::loadu(reinterpret_cast<const double*>(kMask64 + 4 - n)); }
  static V load_n(const double* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_maskload_pd(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask64 + 4 - n)));
#else
    return V::loadu(p, n);
#endif
  }
  static void store_n(double* p, const V& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    _mm256_maskstore_pd(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask64 + 4 - n)), v);
#else
    v.store(p, static_cast<int>(n));
#endif
  }
  static double hsum(const V& v) {
#if defined(CPU_CAPABILITY_AVX2)
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    lo = _mm_add_sd(lo, _mm_unpackhi_pd(lo, lo));
    return _mm_cvtsd_f64(lo);
#else
    double t[W];
    v.store(t);
    return (t[0] + t[2]) + (t[1] + t[3]);
#endif
  }
  static V hsum_lanes(const V* v) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256d t0 = _mm256_hadd_pd(v[0], v[1]), t1 = _mm256_hadd_pd(v[2], v[3]);
    return _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20), _mm256_permute2f128_pd(t0, t1, 0x31));
#else
    double t[W];
    for (int64_t j = 0; j < W; ++j) t[j] = hsum(v[j]);
    return V::loadu(t);
#endif
  }
};

// Storage type S <-> acc-type vectors.
template <class S>
struct IO {
  using acc_t = acc_type<S>;
  using V = Vectorized<acc_t>;
  static constexpr int64_t W = V::size();
  static acc_t get(const S* p) { return static_cast<acc_t>(*p); }
#if defined(CPU_CAPABILITY_AVX2)
  // W 16-bit elements (half or bfloat16) as floats
  static V widen(__m128i raw) {
    __m256 o;
    if constexpr (std::is_same_v<S, c10::Half>)
      at::vec::cvtfp16_fp32(raw, o);
    else
      at::vec::cvtbf16_fp32(raw, o);
    return o;
  }
#endif
  static V load(const S* p) {
    if constexpr (std::is_same_v<S, acc_t>) {
      return V::loadu(p);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
      float t[W];
      for (int64_t j = 0; j < W; ++j) t[j] = static_cast<float>(p[j]);
      return V::loadu(t);
#endif
    }
  }
  // The first n (< W) elements, zeros in the other lanes; reads nothing beyond p[n - 1].
  static V load_n(const S* p, int64_t n) {
    if constexpr (std::is_same_v<S, acc_t>) {
      return VA<acc_t>::load_n(p, n);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      // 16-bit elements in pairs through a masked 32-bit load, an odd last one blended in: a
      // copy through a stack buffer (memset + memcpy, then a vector load that cannot forward
      // from those stores) made the one tail of a 7 x 7 plane cost more than its six whole
      // vectors (bfloat16 moments 3.3x slower per element than on 8 x 8 planes).
      __m128i raw = _mm_maskload_epi32(reinterpret_cast<const int*>(p),
                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(kMask32 + 8 - n / 2)));
      if (n & 1) {
        const __m128i lane = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kLane16 + 8 - n));
        raw = _mm_blendv_epi8(raw, _mm_set1_epi16(static_cast<short>(p[n - 1].x)), lane);
      }
      return widen(raw);
#else
      S t[W];
      std::memset(static_cast<void*>(t), 0, sizeof(t));  // 0 bits are +0 for half and bfloat16
      std::memcpy(static_cast<void*>(t), p, n * sizeof(S));
      return load(t);
#endif
    }
  }
  static void store(S* p, const V& v) {
    if constexpr (std::is_same_v<S, acc_t>) {
      v.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      __m128i raw;
      if constexpr (std::is_same_v<S, c10::Half>)
        raw = at::vec::cvtfp32_fp16(v);
      else
        raw = at::vec::cvtfp32_bf16(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
#else
      float t[W];
      v.store(t);
      for (int64_t j = 0; j < W; ++j) p[j] = static_cast<S>(t[j]);
#endif
    }
  }
  // Writes the first n (< W) lanes only.
  static void store_n(S* p, const V& v, int64_t n) {
    if constexpr (std::is_same_v<S, acc_t>) {
      VA<acc_t>::store_n(p, v, n);
    } else {
      S t[W];
      store(t, v);
      std::memcpy(static_cast<void*>(p), t, n * sizeof(S));
    }
  }
};

// Host scratch of `count` values of T for a kernel: a buffer of the calling thread reused across
// calls (no allocation once warm) up to kKeepBytes; larger requests, and a second Scratch of the
// same type alive in the same thread, get their own allocation (so one huge shape does not pin its
// memory for the life of the thread, and nested users never share a buffer).
template <class T>
class Scratch {
 public:
  static constexpr int64_t kKeepBytes = int64_t(8) << 20;
  explicit Scratch(int64_t count) {
    thread_local std::vector<T> kept;
    thread_local bool busy = false;
    if (busy || count * static_cast<int64_t>(sizeof(T)) > kKeepBytes) {
      own_.resize(count);
      ptr_ = own_.data();
      return;
    }
    if (static_cast<int64_t>(kept.size()) < count) kept.resize(count);
    busy = true;
    busy_ = &busy;
    ptr_ = kept.data();
  }
  ~Scratch() {
    if (busy_) *busy_ = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return ptr_; }

 private:
  std::vector<T> own_;
  T* ptr_ = nullptr;
  bool* busy_ = nullptr;
};

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
