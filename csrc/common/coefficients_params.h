// Plain parameter structs of the per-layer coefficient ops (docs/architecture.md): torch-free and
// CUDA-free. The .cpp glue fills them, the CPU loops, the CUDA launchers and the CPU-shim drivers
// read them. `S` is the storage type of every array (float; double on the CPU). All (N, C) arrays
// are contiguous, all per-channel arrays are (C,).
#pragma once
#include <cstddef>
#include <cstdint>

// Functions usable from host code and from CUDA device code (and from the CPU shim, which
// compiles kernel code with g++ and no __CUDACC__).
#if defined(__CUDACC__)
#define NF_COEF_HD __host__ __device__ __forceinline__
#else
#define NF_COEF_HD inline
#endif

namespace nf {

// BIN and IEBN (one struct: the two layers differ only in their per-channel gate parameters).
template <class S>
struct BatchCoefParams {
  // inputs
  const S* mean = nullptr;        // (N, C) plane means
  const S* m2 = nullptr;          // (N, C) centred sums of squares
  const S* sum_dy = nullptr;      // backward: (N, C) sum dy            (grad of shift)
  const S* sum_dy_xmu = nullptr;  // backward: (N, C) sum dy * (x - m)  (grad of scale)
  const S* gate = nullptr;        // BIN: rho;  IEBN: gate_weight
  const S* gate_bias = nullptr;   // IEBN: gate_bias; unused by BIN
  const S* weight = nullptr;      // null means 1
  const S* bias = nullptr;        // null means 0
  S* running_mean = nullptr;      // null, or updated in place by the forward when training
  S* running_var = nullptr;       // given iff running_mean is
  // null, or a module's num_batches_tracked (one int64): the forward adds 1 when training,
  // running statistics or not (CUDA: thread 0 of block 0; CPU: the op itself)
  int64_t* num_batches_tracked = nullptr;
  // outputs, (N, C)
  S* scale = nullptr;  // forward
  S* shift = nullptr;
  S* c_dy = nullptr;   // backward
  S* c_x = nullptr;
  S* c_0 = nullptr;
  // outputs, (C,)
  S* grad_gate = nullptr;       // BIN: grad rho;  IEBN: grad gate_weight
  S* grad_gate_bias = nullptr;  // IEBN only
  S* grad_weight = nullptr;
  S* grad_bias = nullptr;

  int64_t N = 0, C = 0, L = 1;  // L: elements per plane (plane_size)
  bool training = false;
  double momentum = 0.1, eps = 1e-5;
  int threads = 0;  // CUDA threads per block: 0 = default (256); else a power of two in [32, 256]

  // Batch statistics are used in training or when there are no running statistics.
  NF_COEF_HD bool use_batch() const { return training || running_mean == nullptr; }
  NF_COEF_HD bool update_running() const { return training && running_mean != nullptr; }
  NF_COEF_HD bool count_batch() const { return training && num_batches_tracked != nullptr; }
};

// AssocNorm: G groups of C / G channels, auto-encoder with M hidden units.
template <class S>
struct AssocCoefParams {
  const S* mean = nullptr;        // (N, C)
  const S* m2 = nullptr;          // (N, C)
  const S* sum_dy = nullptr;      // backward, (N, C)
  const S* sum_dy_xmu = nullptr;  // backward, (N, C)
  const S* encoder = nullptr;       // (M, G) row-major
  const S* decoder_mean = nullptr;  // (G, M)
  const S* decoder_var = nullptr;   // (G, M)
  const S* weight = nullptr;        // (C,)  B_omega
  const S* bias = nullptr;          // (C,)  B_beta
  S* scale = nullptr;  // forward, (N, C)
  S* shift = nullptr;
  S* c_dy = nullptr;  // backward, (N, C)
  S* c_x = nullptr;
  S* c_0 = nullptr;
  S* grad_encoder = nullptr;       // (M, G)
  S* grad_decoder_mean = nullptr;  // (G, M)
  S* grad_decoder_var = nullptr;   // (G, M)
  S* grad_weight = nullptr;        // (C,)
  S* grad_bias = nullptr;          // (C,)

  int64_t N = 0, C = 0, L = 1, G = 1, M = 1;
  double eps = 1e-5;
  int threads = 0;

  // CUDA backward only: per-sample parameter-gradient partials and the arrival counters of the
  // reduction tree over samples (kernels/coefficients_assoc.cuh). `workspace` holds
  // N * assoc_partials_per_sample() floats (no initialisation needed); `counters` holds N ints
  // that must be zero on entry and are left zero by the kernel.
  S* workspace = nullptr;
  int* counters = nullptr;

  NF_COEF_HD int64_t per_group() const { return C / G; }
  // Gradient partials of one sample: weight (C), bias (C), encoder (M G), two decoders (G M).
  NF_COEF_HD int64_t partials_per_sample() const { return 2 * C + 3 * M * G; }
};

// ILM-Norm: G normalisation groups of C / G channels and K key groups of C / K channels (both of
// consecutive channels; they need not nest), a meta network with E hidden units
// (normfuse/coefficients/ilm.py; math in common/coefficients_ilm.h).
template <class S>
struct IlmCoefParams {
  const S* mean = nullptr;            // (N, C)
  const S* m2 = nullptr;              // (N, C)
  const S* sum_dy = nullptr;          // backward, (N, C)
  const S* sum_dy_xmu = nullptr;      // backward, (N, C)
  const S* encoder = nullptr;         // (E, K) row-major, shared by both paths
  const S* decoder_weight = nullptr;  // (K, E): the variances' path, drives omega
  const S* decoder_bias = nullptr;    // (K, E): the means' path, drives beta
  const S* weight = nullptr;          // (C,)
  const S* bias = nullptr;            // (C,)
  S* scale = nullptr;  // forward, (N, C)
  S* shift = nullptr;
  S* c_dy = nullptr;  // backward, (N, C)
  S* c_x = nullptr;
  S* c_0 = nullptr;
  S* grad_encoder = nullptr;         // (E, K)
  S* grad_decoder_weight = nullptr;  // (K, E)
  S* grad_decoder_bias = nullptr;    // (K, E)
  S* grad_weight = nullptr;          // (C,)
  S* grad_bias = nullptr;            // (C,)

  // G = num_groups, K = encoder.shape[1], E = encoder.shape[0]; the glue guarantees that G and
  // K divide C and that both groupings hold more than one value (C / G * L > 1, C / K * L > 1).
  int64_t N = 0, C = 0, L = 1, G = 1, K = 1, E = 1;
  double eps = 1e-5;
  int threads = 0;

  // CUDA backward only, as AssocCoefParams: N * partials_per_sample() floats of per-sample
  // parameter-gradient partials, and N arrival counters, zero on entry and left zero
  // (kernels/coefficients_ilm.cuh).
  S* workspace = nullptr;
  int* counters = nullptr;

  NF_COEF_HD int64_t per_group() const { return C / G; }
  NF_COEF_HD int64_t per_key() const { return C / K; }
  // Gradient partials of one sample: weight (C), bias (C), encoder (E K), two decoders (K E).
  NF_COEF_HD int64_t partials_per_sample() const { return 2 * C + 3 * E * K; }
};

// Shared memory (floats) of one sample's block in the CUDA ILM-Norm kernels
// (kernels/coefficients_ilm.cuh: ilm_smem lays it out); the glue checks it against the device's
// limit before launching.
NF_COEF_HD size_t ilm_smem_floats(int64_t G, int64_t K, int64_t E, bool backward) {
  return static_cast<size_t>(6 * K + 3 * G + 2 * E + (backward ? 4 * K + 2 * G + 2 * E + 1 : 0));
}

// Shared memory (floats) of one sample's block in the CUDA AssocNorm kernels
// (kernels/coefficients_assoc.cuh: assoc_smem lays it out); the glue checks it against the
// device's limit before launching, for a clear error with large num_groups / embed_dim.
NF_COEF_HD size_t assoc_smem_floats(int64_t G, int64_t M, bool backward) {
  return static_cast<size_t>(5 * G + 2 * M + (backward ? 4 * G + 2 * M + 1 : 0));
}

}  // namespace nf
