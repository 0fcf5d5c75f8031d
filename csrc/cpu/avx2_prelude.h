// Start of the AVX2 section of a kernel file (see generic_kernels_avx2.cpp); end it with
// avx2_epilogue.h. Not a normal header: no include guard, include it once, after the file's
// other includes.
//
// 1. Every non-vec header that at::vec pulls in, included here with the default target, so that
//    none of their inline functions is compiled for AVX2 (the linker may pick any translation
//    unit's copy of an inline function).
// 2. The AVX2 target for what follows: at::vec (its AVX2 implementation, in at::vec::AVX2) and
//    the kernels of this file.
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <x86intrin.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h (included by at::vec's AVX2 headers) declares its 256-bit functions under __AVX__ only,
// which `#pragma GCC target` does not define.
#ifndef __AVX__
#define __AVX__ 1
#define NF_CPU_DEFINED_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define NF_CPU_DEFINED_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
