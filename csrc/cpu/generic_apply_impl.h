// Elementwise maps of the generic CPU kernels: affine_apply and backward_apply (the CPU side of
// kernels/plane_apply.cuh; work decomposition in generic_plan_impl.h).
#pragma once

#include <type_traits>

#include "cpu/generic_plan_impl.h"

namespace nf_cpu {
namespace NF_CPU_NS {
namespace {

// The per-plane affine maps for element type S (affine_apply(), backward_apply() below).
template <class S>
struct MapKern : KernTypes<S> {
  NF_CPU_KERN_TYPES(S);

  // ---- elementwise maps ---------------------------------------------------------------------------
  // out = Op(a, b, coefficients k[0..K)) with per-plane coefficients (k[0] is the mean).

  template <bool kRelu>
  struct AffineOp {  // y = (x - m) scale + shift;  kRelu: then v > 0 ? v : 0
    static constexpr int K = 3;
    static V f(const V& xv, const V&, const V* k) {
      const V v = affine(xv - k[0], k[1], k[2]);
      if constexpr (kRelu)
        return relu(v);
      else
        return v;
    }
  };
  template <bool kMask>
  struct BackwardOp {  // dx = c_dy dy + c_x (x - m) + c_0;  kMask: dy -> v > 0 ? dy : 0 (k[4], k[5]: the
                       // forward's scale and shift), the dy term only
    static constexpr int K = kMask ? 6 : 4;
    static V f(const V& g, const V& xv, const V* k) {
      const V xm = xv - k[0];
      if constexpr (kMask)
        return at::vec::fmadd(k[1], gate(g, affine(xm, k[4], k[5])), at::vec::fmadd(k[2], xm, k[3]));
      else
        return at::vec::fmadd(k[1], g, at::vec::fmadd(k[2], xm, k[3]));
    }
  };

  // The pointers a task reads are copied into its own locals (`Ptrs`) first: the vector stores
  // (at::vec's, through may_alias types) may alias any memory, so pointers read through the
  // captures of an at::parallel_for lambda were loaded again after every store, on the critical
  // path of the loop (perf: ~45% of channels-last backward_apply's samples on those loads).
  // the second input of a map, zeros where there is none (affine_apply)
  static V load_or_zero(const S* b, int64_t i) { return b ? io::load(b + i) : V(0); }
  static V load_n_or_zero(const S* b, int64_t i, int64_t n) { return b ? io::load_n(b + i, n) : V(0); }

  template <int K>
  struct Ptrs {
    const S* a;
    const S* b;
    S* out;
    const acc_t* k[K];
  };

  template <class Op>
  static void map(const S* a_in, const S* b_in, S* out_in, const acc_t* const* coef, const nf::PlaneShape& sh) {
    constexpr int K = Op::K;
    const int64_t N = sh.N, C = sh.C, L = sh.L;
    if (L == 1 || sh.layout == nf::Layout::ChannelsLast) {
      // Coefficient index = (n * C + c), contiguous along the innermost dimension: for L == 1 the
      // whole tensor is one "row" of N C elements; for channels-last each row is C elements.
      const int64_t rowlen = L == 1 ? N * C : C, nrows = L == 1 ? 1 : N * L;
      // one row [c0, c1) at element offset base, coefficients p.k (already at the row's sample)
      auto do_row = [](const Ptrs<K>& p, int64_t base, int64_t c0, int64_t c1) {
        const S *a = p.a, *b = p.b;
        S* out = p.out;
        const acc_t* kp[K];
        for (int j = 0; j < K; ++j) kp[j] = p.k[j];
        int64_t c = c0;
        V k[K];
        auto full = [&](int64_t c) {
          for (int j = 0; j < K; ++j) k[j] = V::loadu(kp[j] + c);
          io::store(out + base + c, Op::f(io::load(a + base + c), load_or_zero(b, base + c), k));
        };
        for (; c + W <= c1; c += W) full(c);
        if (c < c1) {
          if (c1 - c0 >= W) {  // the row's last W elements again: same inputs, same values
            full(c1 - W);
          } else {
            const int64_t n = c1 - c;
            for (int j = 0; j < K; ++j) k[j] = va::load_n(kp[j] + c, n);
            io::store_n(out + base + c, Op::f(io::load_n(a + base + c, n), load_n_or_zero(b, base + c, n), k), n);
          }
        }
      };
      if (L == 1) {
        at::parallel_for(0, rowlen, kTask, [&](int64_t c0, int64_t c1) {
          Ptrs<K> p{a_in, b_in, out_in, {}};
          for (int j = 0; j < K; ++j) p.k[j] = coef[j];
          do_row(p, 0, c0, c1);
        });
      } else {
        at::parallel_for(0, nrows, std::max<int64_t>(1, kTask / C), [&](int64_t r0, int64_t r1) {
          int64_t n = r0 / L, l = r0 % L;  // row r = n L + l, advanced without divisions
          Ptrs<K> p{a_in, b_in, out_in, {}};
          for (int j = 0; j < K; ++j) p.k[j] = coef[j] + n * C;
          for (int64_t r = r0; r < r1; ++r) {
            do_row(p, r * C, 0, C);
            if (++l == L) {
              l = 0;
              ++n;
              for (int j = 0; j < K; ++j) p.k[j] += C;
            }
          }
        });
      }
      return;
    }
    // contiguous: coefficients broadcast per plane; planes longer than kSeg split in segments
    const int64_t P = N * C, S_ = at::divup(L, kSeg), seg = std::min(L, kSeg);
    at::parallel_for(0, P * S_, std::max<int64_t>(1, kTask / seg), [&](int64_t tb, int64_t te) {
      const S *a = a_in, *b = b_in;
      S* out = out_in;
      for (int64_t t = tb; t < te; ++t) {
        const int64_t p = S_ == 1 ? t : t / S_, lo = S_ == 1 ? 0 : (t % S_) * kSeg, hi = std::min(L, lo + kSeg);
        V k[K];
        for (int j = 0; j < K; ++j) k[j] = V(coef[j][p]);
        const int64_t base = p * L;
        int64_t i = base + lo;
        const int64_t end = base + hi;
        for (; i + 2 * W <= end; i += 2 * W) {
          const V y0 = Op::f(io::load(a + i), load_or_zero(b, i), k);
          const V y1 = Op::f(io::load(a + i + W), load_or_zero(b, i + W), k);
          io::store(out + i, y0);
          io::store(out + i + W, y1);
        }
        if (i + W <= end) {
          io::store(out + i, Op::f(io::load(a + i), load_or_zero(b, i), k));
          i += W;
        }
        if (i < end) {
          if (hi - lo >= W)  // the segment's last W elements again: same inputs, same values
            io::store(out + end - W, Op::f(io::load(a + end - W), load_or_zero(b, end - W), k));
          else
            io::store_n(out + i, Op::f(io::load_n(a + i, end - i), load_n_or_zero(b, i, end - i), k), end - i);
        }
      }
    });
  }
};

// MapKern<S>::map<Op> for g's element type: out = Op(a, b, coef), coef[0] the mean; Op is
// BackwardOp<kVariant> (kVariant: the ReLU's mask) or AffineOp<kVariant> (kVariant: ReLU).
template <bool kBackward, bool kVariant, int K>
void run_map(const GenericArgs& g, const void* a, const void* b, const void* const (&coef)[K]) {
  dispatch(g.dtype, [&](auto tag) {
    using S = decltype(tag);
    using MK = MapKern<S>;
    using Op = std::conditional_t<kBackward, typename MK::template BackwardOp<kVariant>,
                                  typename MK::template AffineOp<kVariant>>;
    static_assert(Op::K == K, "one coefficient pointer per coefficient of the op");
    const acc_type<S>* k[K];
    for (int j = 0; j < K; ++j) k[j] = static_cast<const acc_type<S>*>(coef[j]);
    MK::template map<Op>(static_cast<const S*>(a), static_cast<const S*>(b), static_cast<S*>(g.out), k, g.shape);
  });
}

}  // namespace

// The ReLU / mask variants are separate instantiations, chosen once per call: the plain maps are
// the same code as without them.
void affine_apply(const GenericArgs& g) {
  if (g.relu)
    run_map<false, true>(g, g.x, nullptr, {g.mean, g.scale, g.shift});
  else
    run_map<false, false>(g, g.x, nullptr, {g.mean, g.scale, g.shift});
}

void backward_apply(const GenericArgs& g) {
  if (g.mask_scale)
    run_map<true, true>(g, g.dy, g.x, {g.mean, g.c_dy, g.c_x, g.c_0, g.mask_scale, g.mask_shift});
  else
    run_map<true, false>(g, g.dy, g.x, {g.mean, g.c_dy, g.c_x, g.c_0});
}

}  // namespace NF_CPU_NS
}  // namespace nf_cpu
