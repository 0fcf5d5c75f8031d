// The fused ReLU (issue 14) of the generic kernels: the affine map's arithmetic, written once, and
// the mask of the backward ops. affine_apply(relu=True) writes relu(v), v = affine_value(...);
// backward_sums / backward_apply given the forward's scale and shift replace dy by
// relu_grad(...), which recomputes v with the very same function, so the mask is the forward's
// sign bit for bit (same inputs converted the same way, same fmaf).
#pragma once
#include "kernels/cuda_compat.cuh"

namespace nf {

// v = (x - mean) * scale + shift, centred on the plane mean: x - mean is O(std) even for a 1e4
// offset, shift is O(1). AffineOp (plane_apply.cuh) and the mask below both call this.
NF_DEVICE float affine_value(float x, float mean, float scale, float shift) { return fmaf(x - mean, scale, shift); }

// torch.relu: 0 for v <= 0, NaN stays NaN.
NF_DEVICE float relu(float v) { return v <= 0.f ? 0.f : v; }

// ReLU's derivative applied to dy: dy where the forward's v > 0, else 0 (0 at v == 0 as torch's,
// and 0 for a NaN v). `c` holds the forward's per-plane mean and points at its scale and shift;
// `z` is 0 (see ReluMasked's `zero`).
template <class C>
NF_DEVICE float relu_grad(const C& c, float dy, float x, int z = 0) {
  return affine_value(x, c.mean, __ldg(c.scale + z), __ldg(c.shift + z)) > 0.f ? dy : 0.f;
}

// A backward op whose dy (input 0; input 1 is x) goes through the forward ReLU's mask first.
// Base is BackwardSumsOp (plane_reduce.cuh) or BackwardApplyOp (plane_apply.cuh); it keeps all
// its arithmetic, it just sees the masked dy. For BackwardApplyOp only the c_dy * dy term is
// masked: c_x * (x - mean) + c_0 carry the gradient through the statistics, which every element
// feeds. A separate type (not a runtime flag): the unmasked kernels stay exactly as they were.
//
// Registers: a channels-last thread owns VEC channels (8 for 16-bit types) and would keep the
// forward's scale and shift of each in registers for all its rows: 16 more, which took the
// masked channels-last kernels to 72-74 registers (the bandwidth kernels keep <= 64, for 4
// resident 256-thread blocks per SM). So the Ctx only points at them; the channels-last hooks
// (accumulate_channels, apply_channels) reload them for every row, from L1, at an offset of
// `row & zero`: 0, but not to the compiler (`zero` is a kernel parameter), so neither nvcc nor
// ptxas hoists the loads out of the row loop. Plane-wise (contiguous) kernels load them once per
// plane (the compiler hoists those loads, as it should).
template <class Base>
struct ReluMasked : Base {
  static_assert(Base::kInputs == 2, "the mask applies to dy (input 0) given x (input 1)");
  struct Ctx : Base::Ctx {
    const float* scale = nullptr;  // the forward's, of this plane / channel
    const float* shift = nullptr;
  };
  const float* scale;
  const float* shift;
  int zero = 0;  // always 0; see above

  // Reductions (plane_reduce.cuh) ask with the plane's first element, maps (plane_apply.cuh)
  // without; only the one the Base has gets instantiated.
  template <typename T>
  NF_DEVICE Ctx context(const T* plane_first, int64_t i) const {
    return Ctx{Base::context(plane_first, i), scale + i, shift + i};
  }
  NF_DEVICE Ctx context(int64_t i) const { return Ctx{Base::context(i), scale + i, shift + i}; }

  // (State is a template parameter so that the maps' Base, which has none, can be a Base too.)
  template <int VEC, class State>
  NF_DEVICE static void accumulate_run(State& s, const Ctx& c, const float (&dy)[VEC], const float (&x)[VEC]) {
    float m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = relu_grad(c, dy[k], x[k]);
    Base::template accumulate_run<VEC>(s, c, m, x);
  }
  template <int VEC, class State>
  NF_DEVICE void accumulate_channels(State (&s)[VEC], const Ctx (&c)[VEC], const float (&dy)[VEC],
                                     const float (&x)[VEC], int row) const {
    float m[VEC];
    typename Base::Ctx b[VEC];
    const int z = row & zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      m[k] = relu_grad(c[k], dy[k], x[k], z);
      b[k] = c[k];
    }
    Base::template accumulate_channels<VEC>(s, b, m, x);
  }
  NF_DEVICE static float apply(const Ctx& c, float dy, float x) { return Base::apply(c, relu_grad(c, dy, x), x); }
  template <int VEC>
  NF_DEVICE void apply_channels(const Ctx (&c)[VEC], const float (&dy)[VEC], const float (&x)[VEC], float (&y)[VEC],
                                int row) const {
    const int z = row & zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[k] = Base::apply(c[k], relu_grad(c[k], dy[k], x[k], z), x[k]);
  }
};

template <class Op>
constexpr bool is_relu_masked = false;
template <class Base>
constexpr bool is_relu_masked<ReluMasked<Base>> = true;

}  // namespace nf
