// ILM-Norm coefficient kernels, forward and backward: one launch each, one block per sample.
//
// Per sample: the two merges (K key groups, G groups: they need not nest, so each is merged from
// the planes), one thread per group walking its channels in order; the meta network, one thread
// per output row; then the per-channel outputs. Small vectors over K, G and E live in shared
// memory. The formulas are common/coefficients_ilm.h, shared with the CPU op
// (cpu/coefficients_ilm_impl.h). One thread per group keeps every sum in channel order and the
// code short; the groups are small (C / K = 16 channels by default, C / G = C / 32).
//
// Backward: the per-sample parameter-gradient partials (P = 2C + 3EK floats) are summed over the
// samples by the binary tree of the AssocNorm backward (kernels/coefficients_assoc.cuh, there
// described): its shape depends only on N, so the sums are bitwise reproducible.
// Plain CUDA: no torch headers.
#pragma once
#include "common/coefficients_ilm.h"
#include "kernels/coefficients_assoc.cuh"  // coef_allow_smem
#include "kernels/coefficients_batch.cuh"  // coef_threads, coef_pow2_at_least
#include "kernels/cuda_compat.cuh"

namespace nf {

struct IlmCoefPlan {
  int threads = 0;
  size_t smem_bytes = 0;
};

// Shared memory of one sample (ilm_smem_floats). Forward: over K kshift, kmean (the merge),
// kmu, kvar (unbiased: the meta network's inputs), dw, db; over G shift, mean, r; over E hw, hb.
// Backward adds over K gzw, gzb (the decoders' pre-activation gradients), gkmu, gkvar (of the key
// statistics); over G gmu, gvar (of the group statistics); over E ghw, ghb; the arrival flag.
struct IlmSmem {
  float *kshift, *kmean, *kmu, *kvar, *dw, *db, *shift, *mean, *r, *hw, *hb;
  float *gzw, *gzb, *gkmu, *gkvar, *gmu, *gvar, *ghw, *ghb;
  int* flag;
};

NF_DEVICE IlmSmem ilm_smem(float* b, int K, int G, int E, bool backward) {
  IlmSmem s;
  s.kshift = b;
  s.kmean = s.kshift + K;
  s.kmu = s.kmean + K;
  s.kvar = s.kmu + K;
  s.dw = s.kvar + K;
  s.db = s.dw + K;
  s.shift = s.db + K;
  s.mean = s.shift + G;
  s.r = s.mean + G;
  s.hw = s.r + G;
  s.hb = s.hw + E;
  // backward only (the forward's smem ends at hb + E)
  s.gzw = s.hb + E;
  s.gzb = s.gzw + K;
  s.gkmu = s.gzb + K;
  s.gkvar = s.gkmu + K;
  s.gmu = s.gkvar + K;
  s.gvar = s.gmu + G;
  s.ghw = s.gvar + G;
  s.ghb = s.ghw + E;
  s.flag = backward ? reinterpret_cast<int*>(s.ghb + E) : nullptr;
  return s;
}

inline bool plan_ilm_coef(const IlmCoefParams<float>& p, bool backward, IlmCoefPlan* pl) {
  int cap = 0;
  if (!coef_threads(p.threads, &cap) || p.G <= 0 || p.K <= 0 || p.E <= 0) return false;
  if (p.C % p.G != 0 || p.C % p.K != 0) return false;
  // 32-bit indices within a sample (IlmDims): the per-sample partials must fit an int.
  if (p.C > (1 << 28) || p.E * p.K > (1 << 27)) return false;
  if (p.N > INT32_MAX) return false;  // one block per sample (grid x)
  pl->threads = coef_pow2_at_least(p.C, cap);
  if (pl->threads < NF_WARP) pl->threads = NF_WARP;
  pl->smem_bytes = sizeof(float) * ilm_smem_floats(p.G, p.K, p.E, backward);
  return true;
}

// Sizes of one sample as 32-bit ints (the planner bounds them).
struct IlmDims {
  int C, G, K, E, cpg, cpk;
};

NF_DEVICE IlmDims ilm_dims(const IlmCoefParams<float>& p) {
  const int C = static_cast<int>(p.C), G = static_cast<int>(p.G), K = static_cast<int>(p.K);
  return IlmDims{C, G, K, static_cast<int>(p.E), C / G, C / K};
}

NF_DEVICE coef::GroupStats<float> ilm_smem_key(const IlmSmem& sm, int k) {
  return coef::GroupStats<float>{sm.kshift[k], sm.kmean[k], 0.f};  // dev() only
}
NF_DEVICE coef::GroupStats<float> ilm_smem_group(const IlmSmem& sm, int g) {
  return coef::GroupStats<float>{sm.shift[g], sm.mean[g], 0.f};
}

// Both merges, r_G and the meta network of sample n, into shared memory.
NF_DEVICE void ilm_sample_forward(const IlmCoefParams<float>& p, const IlmDims& d, int64_t n, const IlmSmem& sm) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const float L = static_cast<float>(p.L), eps = static_cast<float>(p.eps);
  const float bk = coef::bessel(static_cast<float>(d.cpk) * L), bg = coef::bessel(static_cast<float>(d.cpg) * L);
  const float* m = p.mean + n * p.C;
  const float* q = p.m2 + n * p.C;
  for (int k = tid; k < d.K; k += T) {
    const coef::GroupStats<float> st = coef::ilm_group_stats<float>(m + k * d.cpk, q + k * d.cpk, d.cpk, L);
    sm.kshift[k] = st.shift;
    sm.kmean[k] = st.mean;
    sm.kmu[k] = st.mu();
    sm.kvar[k] = st.var * bk;
  }
  for (int g = tid; g < d.G; g += T) {
    const coef::GroupStats<float> st = coef::ilm_group_stats<float>(m + g * d.cpg, q + g * d.cpg, d.cpg, L);
    sm.shift[g] = st.shift;
    sm.mean[g] = st.mean;
    sm.r[g] = coef::rsqrt_(st.var * bg + eps);
  }
  __syncthreads();
  for (int e = tid; e < d.E; e += T) coef::ilm_encoder_row(p.encoder, e, d.K, sm.kmu, sm.kvar, sm.hw[e], sm.hb[e]);
  __syncthreads();
  for (int k = tid; k < d.K; k += T)
    coef::ilm_decoder_row(p.decoder_weight, p.decoder_bias, k, d.E, sm.hw, sm.hb, sm.dw[k], sm.db[k]);
  __syncthreads();
}

// Templates (instantiated for float only) so that the header can be included anywhere without
// duplicate kernel definitions.
template <typename S>
__global__ void __launch_bounds__(NF_MAX_THREADS) ilm_coef_forward_kernel(IlmCoefParams<S> p) {
  NF_DYNAMIC_SMEM(float, smem);
  const IlmDims d = ilm_dims(p);
  const IlmSmem sm = ilm_smem(smem, d.K, d.G, d.E, false);
  const int64_t n = blockIdx.x, row = n * p.C;
  ilm_sample_forward(p, d, n, sm);
  for (int c = threadIdx.x; c < d.C; c += blockDim.x) {
    const int g = c / d.cpg, k = c / d.cpk;
    float scale, shift;
    coef::assoc_forward(p.mean[row + c], ilm_smem_group(sm, g), sm.r[g], sm.dw[k], sm.db[k], p.weight[c],
                        p.bias[c], scale, shift);
    p.scale[row + c] = scale;
    p.shift[row + c] = shift;
  }
}

// Sum the per-sample partials over the samples (the AssocNorm backward's tree,
// sum_partials_over_samples); the block that reaches the root writes the five gradients.
NF_DEVICE void ilm_reduce_partials(const IlmCoefParams<float>& p, const IlmDims& d, int64_t n, int* flag) {
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int P = static_cast<int>(p.partials_per_sample());
  if (!sum_partials_over_samples(p.workspace, p.counters, p.N, P, n, flag)) return;
  const int C = d.C, EK = d.E * d.K;
  const float* tot = p.workspace;
  for (int i = tid; i < P; i += T) {
    const float v = __ldcg(tot + i);
    if (i < C) p.grad_weight[i] = v;
    else if (i < 2 * C) p.grad_bias[i - C] = v;
    else if (i < 2 * C + EK) p.grad_encoder[i - 2 * C] = v;
    else if (i < 2 * C + 2 * EK) p.grad_decoder_weight[i - 2 * C - EK] = v;
    else p.grad_decoder_bias[i - 2 * C - 2 * EK] = v;
  }
}

// Partials layout of one sample: [weight (C) | bias (C) | encoder (E, K) | decoder_weight (K, E) |
// decoder_bias (K, E)], the layout of the outputs.
template <typename S>
__global__ void __launch_bounds__(NF_MAX_THREADS) ilm_coef_backward_kernel(IlmCoefParams<S> p) {
  NF_DYNAMIC_SMEM(float, smem);
  const IlmDims d = ilm_dims(p);
  const IlmSmem sm = ilm_smem(smem, d.K, d.G, d.E, true);
  const int C = d.C, K = d.K, G = d.G, E = d.E;
  const int tid = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t n = blockIdx.x, row = n * p.C;
  const float* m = p.mean + row;
  const float* g1 = p.sum_dy + row;
  const float* g2 = p.sum_dy_xmu + row;
  float* part = p.workspace + n * p.partials_per_sample();
  const float L = static_cast<float>(p.L);
  ilm_sample_forward(p, d, n, sm);

  // 1. key groups (one thread each, channels in order): c_dy, the weight / bias partials, the
  //    decoders' pre-activation gradients. Groups (likewise): the gradients of mu_G, var_G.
  //    ilm_accumulate gives both kinds of sums; each pass keeps its own.
  for (int k = tid; k < K; k += T) {
    float kw = 0.f, kb = 0.f, unused_s = 0.f, unused_o = 0.f;
    for (int c = k * d.cpk; c < (k + 1) * d.cpk; ++c) {
      const int g = c / d.cpg;
      float go, cdy;
      coef::ilm_accumulate(m[c], g1[c], g2[c], ilm_smem_group(sm, g), sm.r[g], sm.dw[k], p.weight[c], go, cdy, kw,
                           kb, unused_s, unused_o);
      p.c_dy[row + c] = cdy;
      part[c] = go;
      part[C + c] = g1[c];
    }
    sm.gzw[k] = coef::sigmoid_grad(kw, sm.dw[k]);
    sm.gzb[k] = coef::tanh_grad(kb, sm.db[k]);
  }
  const float bk = coef::bessel(static_cast<float>(d.cpk) * L), bg = coef::bessel(static_cast<float>(d.cpg) * L);
  for (int g = tid; g < G; g += T) {
    float unused_w = 0.f, unused_b = 0.f, s = 0.f, o = 0.f;
    for (int c = g * d.cpg; c < (g + 1) * d.cpg; ++c) {
      float go, cdy;
      coef::ilm_accumulate(m[c], g1[c], g2[c], ilm_smem_group(sm, g), sm.r[g], sm.dw[c / d.cpk], p.weight[c], go,
                           cdy, unused_w, unused_b, s, o);
    }
    sm.gmu[g] = -s;  // the explicit m of the shift cancels the one of (x - m)
    sm.gvar[g] = coef::ilm_grad_group_var(o, sm.r[g], bg);
  }
  __syncthreads();
  // 2. grad h (through the decoders and the relu); the decoder partials
  for (int e = tid; e < E; e += T)
    coef::ilm_grad_h_row(p.decoder_weight, p.decoder_bias, e, K, E, sm.gzw, sm.gzb, sm.hw[e], sm.hb[e], sm.ghw[e],
                         sm.ghb[e]);
  for (int t = tid; t < K * E; t += T) {
    const int k = t / E, e = t - k * E;
    part[2 * C + E * K + t] = sm.gzw[k] * coef::relu(sm.hw[e]);
    part[2 * C + 2 * E * K + t] = sm.gzb[k] * coef::relu(sm.hb[e]);
  }
  __syncthreads();
  // 3. the key statistics' gradients (through the encoder); the encoder partials
  for (int k = tid; k < K; k += T) coef::ilm_grad_key_row(p.encoder, k, K, E, sm.ghw, sm.ghb, bk, sm.gkmu[k], sm.gkvar[k]);
  for (int t = tid; t < E * K; t += T) {
    const int e = t / K, k = t - e * K;
    part[2 * C + t] = sm.ghw[e] * sm.kvar[k] + sm.ghb[e] * sm.kmu[k];
  }
  __syncthreads();
  // 4. per channel: both merges' backward
  for (int c = tid; c < C; c += T) {
    const int k = c / d.cpk, g = c / d.cpg;
    float gq = 0.f, gm = 0.f;
    coef::ilm_merge_backward_add(m[c], ilm_smem_key(sm, k), sm.gkmu[k], sm.gkvar[k], static_cast<float>(d.cpk), L,
                                 gq, gm);
    coef::ilm_merge_backward_add(m[c], ilm_smem_group(sm, g), sm.gmu[g], sm.gvar[g], static_cast<float>(d.cpg), L,
                                 gq, gm);
    p.c_x[row + c] = 2.f * gq;
    p.c_0[row + c] = gm / L;
  }
  ilm_reduce_partials(p, d, n, sm.flag);
}

inline cudaError_t launch_ilm_coef_forward(const IlmCoefParams<float>& p, cudaStream_t stream) {
  IlmCoefPlan pl;
  if (!plan_ilm_coef(p, false, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  const cudaError_t e = coef_allow_smem(ilm_coef_forward_kernel<float>, pl.smem_bytes);
  if (e != cudaSuccess) return e;
  NF_LAUNCH(ilm_coef_forward_kernel<float>, dim3(static_cast<unsigned>(p.N)), dim3(static_cast<unsigned>(pl.threads)),
            pl.smem_bytes, stream, p);
  return cudaGetLastError();
}

// Needs p.workspace (N * partials_per_sample() floats) and p.counters (N zeroed ints).
inline cudaError_t launch_ilm_coef_backward(const IlmCoefParams<float>& p, cudaStream_t stream) {
  IlmCoefPlan pl;
  if (!plan_ilm_coef(p, true, &pl)) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0) return cudaSuccess;
  if (p.workspace == nullptr || (p.N > 1 && p.counters == nullptr)) return cudaErrorInvalidValue;
  const cudaError_t e = coef_allow_smem(ilm_coef_backward_kernel<float>, pl.smem_bytes);
  if (e != cudaSuccess) return e;
  NF_LAUNCH(ilm_coef_backward_kernel<float>, dim3(static_cast<unsigned>(p.N)), dim3(static_cast<unsigned>(pl.threads)),
            pl.smem_bytes, stream, p);
  return cudaGetLastError();
}

}  // namespace nf
