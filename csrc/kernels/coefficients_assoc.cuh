// AssocNorm coefficient kernels, forward and backward: one launch each, one block per sample.
//
// Per sample: the group statistics (a Chan merge over the C/G channels of each group, by
// segments of `seg` lanes of a warp, merged by a fixed xor butterfly), the auto-encoder matvecs
// with their M- and G-vectors in shared memory, then the per-channel outputs. The formulas are
// common/coefficients.h (assoc_*), shared with the CPU op.
//
// Backward: the parameter gradients are sums over samples. Each block writes its sample's
// partials (P = 2C + 3MG floats) to a workspace slot and then takes part in a binary tree over the
// samples: at level s the blocks owning slots `left` and `left + s` meet at an arrival counter;
// the second to arrive adds the two slots (always left + right) and climbs on, the first exits.
// The block reaching the root writes the gradients. The tree's shape depends only on N, so the
// sums are bitwise reproducible, and the serial tail is log2(N) slot additions instead of N.
// Plain CUDA: no torch headers.
#pragma once
#include "common/coefficients.h"
#include "kernels/coefficients_batch.cuh"  // coef_threads, coef_pow2_at_least
#include "kernels/cuda_compat.cuh"

namespace nf {

struct AssocCoefPlan {
  int threads = 0;
  int seg = 1;  // lanes per group in the segment loops (power of two <= 32)
  size_t smem_bytes = 0;
};

// Shared memory of one sample. Forward: shift, mean, var, d (d_mu | d_var) over G; h (h_mu |
// h_var) over M. Backward adds the four group sums s[0..3] (reused for the decoder gradients and
// the gradients of mu_G / var_G), gh (grad h_mu | grad h_var) and the arrival flag.
struct AssocSmem {
  float *shift, *mean, *var, *d, *h;
  float *s0, *s1, *s2, *s3, *gh;
  int* flag;
};

NF_DEVICE AssocSmem assoc_smem(float* base, int64_t G, int64_t M, bool backward) {
  AssocSmem s;
  s.shift = base;
  s.mean = s.shift + G;
  s.var = s.mean + G;
  s.d = s.var + G;
  s.h = s.d + 2 * G;
  s.s0 = s.h + 2 * M;
  s.s1 = s.s0 + G;
  s.s2 = s.s1 + G;
  s.s3 = s.s2 + G;
  s.gh = s.s3 + G;
  s.flag = backward ? reinterpret_cast<int*>(s.gh + 2 * M) : nullptr;
  return s;
}

inline bool plan_assoc_coef(const AssocCoefParams<float>& p, bool backward, AssocCoefPlan* pl) {
  int cap = 0;
  if (!coef_threads(p.threads, &cap) || p.G <= 0 || p.M <= 0 || p.C % p.G != 0) return false;
  // 32-bit indices within a sample (AssocDims): the per-sample partials must fit an int.
  if (p.C > (1 << 28) || p.M * p.G > (1 << 28)) return false;
  if (p.N > INT32_MAX) return false;  // one block per sample (grid x)
  // enough threads for one channel each, whole warps (the segment loops shuffle)
  pl->threads = coef_pow2_at_least(p.C, cap);
  if (pl->threads < NF_WARP) pl->threads = NF_WARP;
  pl->seg = coef_pow2_at_least(p.C / p.G, NF_WARP);
  pl->smem_bytes = sizeof(float) * assoc_smem_floats(p.G, p.M, backward);
  return true;
}

NF_DEVICE float coef_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// Sizes of one sample as 32-bit ints (the planner bounds them): cheap index arithmetic in the
// per-channel loops, where 64-bit division would be emulated.
struct AssocDims {
  int C, G, M, cpg;
};

NF_DEVICE AssocDims assoc_dims(const AssocCoefParams<float>& p) {
  const int C = static_cast<int>(p.C), G = static_cast<int>(p.G);
  return AssocDims{C, G, static_cast<int>(p.M), C / G};
}

// Group statistics of sample n into sm.shift / sm.mean / sm.var. Segment `slot` of `seg` lanes
// handles group base + slot; the loop runs the same number of times in every thread so that
// whole warps meet in the shuffles.
NF_DEVICE void assoc_group_stats(const AssocCoefParams<float>& p, const AssocDims& d, int64_t n, int seg,
                                 const AssocSmem& sm) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & (seg - 1);
  const int slots = static_cast<int>(blockDim.x) / seg;
  const float L = static_cast<float>(p.L);
  const float* m = p.mean + n * p.C;
  const float* q = p.m2 + n * p.C;
  for (int base = 0; base < d.G; base += slots) {
    const int g = base + tid / seg;
    coef::Merge<float> acc = coef::merge_empty<float>();
    float shift = 0.f;
    if (g < d.G) {
      shift = coef::finite_or_zero(m[g * d.cpg]);  // relative to the group's first channel
      for (int j = lane; j < d.cpg; j += seg) coef::merge_add(acc, m[g * d.cpg + j] - shift, q[g * d.cpg + j], L);
    }
    for (int o = seg / 2; o > 0; o >>= 1) {
      const coef::Merge<float> other{coef_shfl_xor(acc.count, o), coef_shfl_xor(acc.mean, o),
                                     coef_shfl_xor(acc.q, o)};
      coef::merge(acc, other, L);
    }
    if (g < d.G && lane == 0) {
      sm.shift[g] = shift;
      sm.mean[g] = acc.mean;
      sm.var[g] = acc.q / (static_cast<float>(d.cpg) * L);
    }
  }
  __syncthreads();
}

NF_DEVICE float assoc_mu(const AssocSmem& sm, int g) { return sm.shift[g] + sm.mean[g]; }

// h = W1 mu, W1 var (M each) into sm.h; d_mu = sigmoid(W2 relu(h_mu)), d_var = tanh(W3 relu(h_var))
// (G each) into sm.d. The encoder's dot products run over G (up to thousands): one warp per
// output, lanes striding over G, then a shuffle tree (fixed order). A single thread summing G
// terms in sequence was G long in latency and ~sqrt(G) times less accurate (float32 rounding
// grows with the partial sums: G = 2048 cost 1e-4 in the shift). The decoder's (length M) stay
// one thread per output.
NF_DEVICE void assoc_autoencoder(const AssocCoefParams<float>& p, const AssocDims& d, const AssocSmem& sm) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int lane = tid & (NF_WARP - 1), warps = T / NF_WARP;  // T is a multiple of the warp
  for (int t = tid / NF_WARP; t < 2 * d.M; t += warps) {  // uniform per warp: full-warp shuffles
    const bool of_var = t >= d.M;
    const float* w1 = p.encoder + static_cast<int64_t>(t - (of_var ? d.M : 0)) * d.G;
    float acc = 0.f;
    for (int g = lane; g < d.G; g += NF_WARP) acc += w1[g] * (of_var ? sm.var[g] : assoc_mu(sm, g));
    for (int o = NF_WARP / 2; o > 0; o >>= 1) acc += coef_shfl_xor(acc, o);
    if (lane == 0) sm.h[t] = acc;
  }
  __syncthreads();
  for (int t = tid; t < 2 * d.G; t += T) {
    const bool of_var = t >= d.G;
    const float* w = (of_var ? p.decoder_var : p.decoder_mean) + static_cast<int64_t>(t - (of_var ? d.G : 0)) * d.M;
    const float* h = sm.h + (of_var ? d.M : 0);
    float acc = 0.f;
    for (int j = 0; j < d.M; ++j) acc += w[j] * coef::relu(h[j]);
    sm.d[t] = of_var ? coef::tanh_(acc) : coef::sigmoid(acc);
  }
  __syncthreads();
}

// r_G of group g (0 for one-element groups, see coef::invstd_or_zero).
NF_DEVICE float assoc_invstd(const AssocCoefParams<float>& p, const AssocSmem& sm, int g) {
  return coef::invstd_or_zero(sm.var[g], static_cast<float>(p.per_group() * p.L), static_cast<float>(p.eps));
}

NF_DEVICE coef::GroupStats<float> assoc_stats(const AssocSmem& sm, int g) {
  return coef::GroupStats<float>{sm.shift[g], sm.mean[g], sm.var[g]};
}

// Templates (instantiated for float only) so that the header can be included anywhere without
// duplicate kernel definitions.
template <typename S>
__global__ void __launch_bounds__(NF_MAX_THREADS) assoc_coef_forward_kernel(AssocCoefParams<S> p, int seg) {
  NF_DYNAMIC_SMEM(float, smem);
  const AssocSmem sm = assoc_smem(smem, p.G, p.M, false);
  const AssocDims d = assoc_dims(p);
  const int64_t n = blockIdx.x, row = n * p.C;
  assoc_group_stats(p, d, n, seg, sm);
  assoc_autoencoder(p, d, sm);
  for (int c = threadIdx.x; c < d.C; c += blockDim.x) {
    const int g = c / d.cpg;
    float scale, shift;
    coef::assoc_forward(p.mean[row + c], assoc_stats(sm, g), assoc_invstd(p, sm, g), sm.d[g], sm.d[d.G + g],
                        p.weight[c], p.bias[c], scale, shift);
    p.scale[row + c] = scale;
    p.shift[row + c] = shift;
  }
}

// Sum the per-sample partials (rows of P floats in `workspace`, sample n's at n * P) over the
// N samples by the tree described at the top; `counters` holds N - 1 used arrival counters, zero
// on entry and left zero; `flag` is one shared int. Returns true in the one block that reaches
// the root, whose sums are then workspace[0, P); false (in every thread alike) in the others.
// Shared by the AssocNorm and ILM-Norm backward kernels.
NF_DEVICE bool sum_partials_over_samples(float* workspace, int* counters, int64_t N, int P,
                                         int64_t n, int* flag) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  int64_t own = n;
  for (int64_t s = 1; s < N; s <<= 1) {
    const bool right = (own / s) % 2 == 1;
    if (!right && own + s >= N) continue;  // no partner at this level: climb alone
    const int64_t left = right ? own - s : own;
    __threadfence();  // this block's partial writes are visible before it is counted
    __syncthreads();
    if (tid == 0) {
      // node ids left + s - 1 are unique: s - 1 sets exactly the low log2(s) bits of left.
      const int ticket = atomicAdd(&counters[left + s - 1], 1);
      if (ticket == 1) atomicExch(&counters[left + s - 1], 0);  // leave the counter zeroed
      *flag = ticket;
      __threadfence();
    }
    __syncthreads();
    if (*flag == 0) return false;  // first to arrive: the partner adds our slot
    float* dst = workspace + left * P;
    const float* src = workspace + (left + s) * P;
    for (int i = tid; i < P; i += T) dst[i] = __ldcg(dst + i) + __ldcg(src + i);
    own = left;
  }
  __syncthreads();  // own == 0: the root's sums, complete for every thread of this block
  return true;
}

// The block that reaches the root of the samples' tree writes the five gradients.
NF_DEVICE void assoc_reduce_partials(const AssocCoefParams<float>& p, const AssocDims& d, int64_t n,
                                     const AssocSmem& sm) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int P = static_cast<int>(p.partials_per_sample());
  if (!sum_partials_over_samples(p.workspace, p.counters, p.N, P, n, sm.flag)) return;
  const int C = d.C, MG = d.M * d.G;
  const float* tot = p.workspace;
  for (int i = tid; i < P; i += T) {
    const float v = __ldcg(tot + i);
    if (i < C) p.grad_weight[i] = v;
    else if (i < 2 * C) p.grad_bias[i - C] = v;
    else if (i < 2 * C + MG) p.grad_encoder[i - 2 * C] = v;
    else if (i < 2 * C + 2 * MG) p.grad_decoder_mean[i - 2 * C - MG] = v;
    else p.grad_decoder_var[i - 2 * C - 2 * MG] = v;
  }
}

// Partials layout of one sample: [weight (C) | bias (C) | encoder (M, G) | decoder_mean (G, M) |
// decoder_var (G, M)], the layout of the outputs.
template <typename S>
__global__ void __launch_bounds__(NF_MAX_THREADS) assoc_coef_backward_kernel(AssocCoefParams<S> p, int seg) {
  NF_DYNAMIC_SMEM(float, smem);
  const AssocSmem sm = assoc_smem(smem, p.G, p.M, true);
  const AssocDims d = assoc_dims(p);
  const int C = d.C, G = d.G, M = d.M, cpg = d.cpg;
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t n = blockIdx.x, row = n * p.C;
  float* part = p.workspace + n * p.partials_per_sample();
  assoc_group_stats(p, d, n, seg, sm);
  assoc_autoencoder(p, d, sm);

  // 1. per channel: c_dy, the weight/bias partials; per group: the four sums (segment loops).
  const int lane = tid & (seg - 1), slots = T / seg;
  for (int base = 0; base < G; base += slots) {
    const int g = base + tid / seg;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    if (g < G) {
      const coef::GroupStats<float> st = assoc_stats(sm, g);
      const float r = assoc_invstd(p, sm, g);
      for (int j = lane; j < cpg; j += seg) {
        const int c = g * cpg + j;
        const float g1 = p.sum_dy[row + c];
        float grad_omega, c_dy;
        coef::assoc_accumulate(p.mean[row + c], g1, p.sum_dy_xmu[row + c], st, r, sm.d[g], p.weight[c], s,
                               grad_omega, c_dy);
        p.c_dy[row + c] = c_dy;
        part[c] = grad_omega;
        part[C + c] = g1;
      }
    }
    for (int o = seg / 2; o > 0; o >>= 1) {
#pragma unroll
      for (int k = 0; k < 4; ++k) s[k] += coef_shfl_xor(s[k], o);
    }
    if (g < G && lane == 0) {
      sm.s0[g] = s[0];
      sm.s1[g] = s[1];
      sm.s2[g] = s[2];
      sm.s3[g] = s[3];
    }
  }
  __syncthreads();
  // 2. decoder pre-activation gradients (in place of s0, s1)
  for (int g = tid; g < G; g += T) {
    sm.s0[g] = coef::sigmoid_grad(sm.s0[g], sm.d[g]);
    sm.s1[g] = coef::tanh_grad(sm.s1[g], sm.d[G + g]);
  }
  __syncthreads();
  // 3. grad h (through the decoders and the relu) and the decoder partials
  for (int t = tid; t < 2 * M; t += T) {
    const bool of_var = t >= M;
    const int j = t - (of_var ? M : 0);
    const float* w = of_var ? p.decoder_var : p.decoder_mean;
    const float* gz = of_var ? sm.s1 : sm.s0;
    float acc = 0.f;
    for (int g = 0; g < G; ++g) acc += gz[g] * w[g * M + j];
    sm.gh[t] = acc * (sm.h[t] > 0.f ? 1.f : 0.f);  // multiplied: a NaN gradient stays NaN
  }
  for (int t = tid; t < 2 * G * M; t += T) {
    const bool of_var = t >= G * M;
    const int k = t - (of_var ? G * M : 0), g = k / M, j = k - g * M;
    part[2 * C + M * G + t] = (of_var ? sm.s1 : sm.s0)[g] * coef::relu(sm.h[(of_var ? M : 0) + j]);
  }
  __syncthreads();
  // 4. encoder partials, and the gradients of mu_G / var_G (in place of s2, s3: one thread per g)
  for (int t = tid; t < M * G; t += T) {
    const int j = t / G, g = t - j * G;
    part[2 * C + t] = sm.gh[j] * assoc_mu(sm, g) + sm.gh[M + j] * sm.var[g];
  }
  for (int g = tid; g < G; g += T) {
    float enc_mu = 0.f, enc_var = 0.f;
    for (int j = 0; j < M; ++j) {
      enc_mu += sm.gh[j] * p.encoder[j * G + g];
      enc_var += sm.gh[M + j] * p.encoder[j * G + g];
    }
    const float r = assoc_invstd(p, sm, g);
    sm.s2[g] = coef::assoc_grad_mu(enc_mu, sm.s2[g]);
    sm.s3[g] = coef::assoc_grad_var(enc_var, sm.s3[g], r);
  }
  __syncthreads();
  // 5. per channel: the group-merge backward
  const float L = static_cast<float>(p.L);
  for (int c = tid; c < C; c += T) {
    const int g = c / cpg;
    float c_x, c_0;
    coef::assoc_backward(p.mean[row + c], assoc_stats(sm, g), sm.s2[g], sm.s3[g], static_cast<float>(cpg), L, c_x,
                         c_0);
    p.c_x[row + c] = c_x;
    p.c_0[row + c] = c_0;
  }
  assoc_reduce_partials(p, d, n, sm);
}

#ifndef NF_CUDA_SHIM
// More than the default 48 KiB of dynamic shared memory needs an opt-in (large G).
template <typename K>
inline cudaError_t coef_allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}
#else
template <typename K>
inline cudaError_t coef_allow_smem(K, size_t) {
  return cudaSuccess;
}
#endif

inline cudaError_t launch_assoc_coef_forward(const AssocCoefParams<float>& p, cudaStream_t stream) {
  AssocCoefPlan pl;
  if (!plan_assoc_coef(p, false, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  const cudaError_t e = coef_allow_smem(assoc_coef_forward_kernel<float>, pl.smem_bytes);
  if (e != cudaSuccess) return e;
  NF_LAUNCH(assoc_coef_forward_kernel<float>, dim3(static_cast<unsigned>(p.N)), dim3(static_cast<unsigned>(pl.threads)),
            pl.smem_bytes, stream, p, pl.seg);
  return cudaGetLastError();
}

// Needs p.workspace (N * partials_per_sample() floats) and p.counters (N zeroed ints).
inline cudaError_t launch_assoc_coef_backward(const AssocCoefParams<float>& p, cudaStream_t stream) {
  AssocCoefPlan pl;
  if (!plan_assoc_coef(p, true, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  if (p.workspace == nullptr || (p.N > 1 && p.counters == nullptr)) return cudaErrorInvalidValue;
  const cudaError_t e = coef_allow_smem(assoc_coef_backward_kernel<float>, pl.smem_bytes);
  if (e != cudaSuccess) return e;
  NF_LAUNCH(assoc_coef_backward_kernel<float>, dim3(static_cast<unsigned>(p.N)), dim3(static_cast<unsigned>(pl.threads)),
            pl.smem_bytes, stream, p, pl.seg);
  return cudaGetLastError();
}

}  // namespace nf
