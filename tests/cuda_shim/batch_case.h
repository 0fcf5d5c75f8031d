// The case lines, inputs and coefficient params shared by the BIN / IEBN layer drivers
// (drivers/layer_steps_driver.cpp, drivers/single_read_driver.cpp). Test-only.
// A case line: layer dtype layout N C L threads training running affine masked misalign
//   layer: bin | iebn;  dtype: f32 | f16 | bf16;  layout: contig | cl;  the rest 0/1 (masked: the
//   backward's ReLU mask from the forward's scale / shift; misalign: inputs one element off
//   16-byte alignment).
#pragma once
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/coefficients.h"
#include "common/coefficients_params.h"
#include "common/generic_params.h"
#include "driver_io.h"
#include "kernels/numerics.cuh"  // nf::from_float (include cuda_shim.h first)

namespace nf_case {

using nf_io::Buffer;

struct Case {
  std::string line, layer, dtype, layout;
  int64_t N, C, L;
  int threads, training, running, affine, masked, misalign;
};

struct Rng {
  uint64_t s;
  float uniform() {  // [-1, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>((s >> 40) & 0xffffff) / 8388608.f - 1.f;
  }
};

inline Buffer zero_floats(size_t n) { return Buffer(n * sizeof(float), 0); }

// The per-channel parameters and running statistics (read-only: an op that updates running
// statistics gets a copy).
struct Channels {
  Buffer gate, gate_bias, weight, bias, rmean, rvar;
};

// A case's tensors: x with per-channel offsets and dy, random (a fixed LCG per case), never all
// zero; `off` bytes past 16-byte alignment when misaligned.
struct Inputs {
  nf::PlaneShape s;
  size_t numel, NC, C, off;
  Buffer x, dy;
  Channels ch;
};

template <typename T>
Inputs make_inputs(const Case& cs) {
  Inputs in;
  in.s.N = cs.N;
  in.s.C = cs.C;
  in.s.L = cs.L;
  in.s.layout = cs.layout == "cl" ? nf::Layout::ChannelsLast : nf::Layout::Contiguous;
  in.numel = static_cast<size_t>(cs.N * cs.C * cs.L);
  in.NC = static_cast<size_t>(cs.N * cs.C);
  in.C = static_cast<size_t>(cs.C);
  in.off = cs.misalign ? sizeof(T) : 0;
  Rng rng{static_cast<uint64_t>(cs.N * 1000003 + cs.C * 1009 + cs.L)};
  in.x = Buffer(in.numel * sizeof(T), in.off);
  in.dy = Buffer(in.numel * sizeof(T), in.off);
  for (size_t i = 0; i < in.numel; ++i) {
    const int64_t c = in.s.layout == nf::Layout::Contiguous ? (i / cs.L) % cs.C : i % cs.C;
    in.x.as<T>()[i] = nf::from_float<T>(0.5f * c + 2.f * rng.uniform());  // per-channel offsets
    in.dy.as<T>()[i] = nf::from_float<T>(rng.uniform());
  }
  const size_t C = in.C;
  in.ch = Channels{zero_floats(C), zero_floats(C), zero_floats(C), zero_floats(C), zero_floats(C), zero_floats(C)};
  for (size_t c = 0; c < C; ++c) {
    in.ch.gate.as<float>()[c] = 0.5f + 0.5f * rng.uniform();  // BIN's rho in [0, 1]
    in.ch.gate_bias.as<float>()[c] = rng.uniform();
    in.ch.weight.as<float>()[c] = 1.f + 0.5f * rng.uniform();
    in.ch.bias.as<float>()[c] = rng.uniform();
    in.ch.rmean.as<float>()[c] = rng.uniform();
    in.ch.rvar.as<float>()[c] = 1.5f + rng.uniform();
  }
  return in;
}

// Coefficient params over (mean, m2) for the case's mode; the outputs are set by the caller.
inline nf::BatchCoefParams<float> coef_params(const Case& cs, const Channels& ch, const float* mean, const float* m2,
                                              float* rmean, float* rvar, bool backward) {
  nf::BatchCoefParams<float> c;
  c.mean = mean;
  c.m2 = m2;
  c.gate = ch.gate.as<float>();
  if (cs.layer == "iebn") c.gate_bias = ch.gate_bias.as<float>();
  if (cs.affine) {
    c.weight = ch.weight.as<float>();
    c.bias = ch.bias.as<float>();
  }
  if (cs.running && !(backward && cs.training)) {  // glue convention: the training backward never sees them
    c.running_mean = rmean;
    c.running_var = rvar;
  }
  c.N = cs.N;
  c.C = cs.C;
  c.L = cs.L;
  c.training = cs.training != 0;
  c.momentum = 0.1;
  c.eps = 1e-5;
  c.threads = cs.threads;
  return c;
}

// The coefficient backward's outputs, in this order: c_dy, c_x, c_0 ((N, C) each), then the
// parameter gradients ((C,) each; grad_gate_bias IEBN's only).
inline constexpr const char* kBackwardOutputs[] = {"c_dy", "c_x", "c_0", "grad_gate", "grad_weight", "grad_bias",
                                                   "grad_gate_bias"};

inline void set_backward_outputs(nf::BatchCoefParams<float>& c, const std::vector<Buffer>& out, bool iebn) {
  c.c_dy = out[0].as<float>();
  c.c_x = out[1].as<float>();
  c.c_0 = out[2].as<float>();
  c.grad_gate = out[3].as<float>();
  c.grad_weight = out[4].as<float>();
  c.grad_bias = out[5].as<float>();
  if (iebn) c.grad_gate_bias = out[6].as<float>();
}

// Reads the case file and calls run.template operator()<T, Math>(case) for each line, with the
// line's element type (float, __half, __nv_bfloat16) and layer math (BinMath / IebnMath).
template <class Run>
int run_case_file(int argc, char** argv, const char* usage, Run run) {
  if (argc != 2) nf_io::die(usage);
  std::ifstream f(argv[1]);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    Case cs;
    cs.line = line;
    std::istringstream ss(line);
    ss >> cs.layer >> cs.dtype >> cs.layout >> cs.N >> cs.C >> cs.L >> cs.threads >> cs.training >> cs.running >>
        cs.affine >> cs.masked >> cs.misalign;
    if (!ss || (cs.layer != "bin" && cs.layer != "iebn")) nf_io::die("bad case line: " + line);
    auto with_type = [&](auto type) {
      using T = typename decltype(type)::type;
      if (cs.layer == "iebn")
        run.template operator()<T, nf::coef::IebnMath<float>>(cs);
      else
        run.template operator()<T, nf::coef::BinMath<float>>(cs);
    };
    if (cs.dtype == "f32")
      with_type(std::type_identity<float>{});
    else if (cs.dtype == "f16")
      with_type(std::type_identity<__half>{});
    else if (cs.dtype == "bf16")
      with_type(std::type_identity<__nv_bfloat16>{});
    else
      nf_io::die("bad dtype: " + line);
  }
  return 0;
}

}  // namespace nf_case
