// Shim driver for the coefficient kernels (csrc/kernels/coefficients_{batch,assoc,ilm}.cuh): runs the
// same templated launchers as the CUDA build on the CPU shim, under TSAN / ASAN.
// Usage: coefficients_driver CASES_FILE
// Each line: op N C L G M threads training running affine dir
//   op: bin | bin_backward | iebn | iebn_backward | assoc | assoc_backward | ilm | ilm_backward
//   G, M: AssocNorm and ILM-Norm only (ignored otherwise; ILM: M = E, and the line ends with K
//   after dir); training/running/affine: 0/1 (BIN/IEBN only: with
//   running statistics; with weight and bias, else None).
//   dir holds the float32 inputs (<name>.bin) and receives the outputs (out_<name>.bin).
// BIN / IEBN forwards also get a num_batches_tracked counter: it must be incremented once per launch
// in training (also for empty statistics) and left alone in eval.
// assoc_backward and ilm_backward run twice on the same counters: the second run must find them zeroed and give
// bitwise the same results (the reduction order depends only on N).
#include "cuda_shim.h"
#include "driver_io.h"
#include "kernels/coefficients_assoc.cuh"
#include "kernels/coefficients_batch.cuh"
#include "kernels/coefficients_ilm.cuh"

#include <fstream>
#include <map>
#include <sstream>
#include <vector>

using nf_io::Buffer;

namespace {

struct Case {
  std::string op, dir;
  int64_t N, C, L, G, M, K = 1;
  int threads, training, running, affine;
};

// Inputs and outputs of one case, by name, each an exactly-sized buffer (ASAN sees overruns).
struct Arrays {
  std::string dir;
  std::map<std::string, Buffer> in, out;
  const float* input(const std::string& name, int64_t count) {
    in[name] = nf_io::read_file(dir + "/" + name + ".bin", sizeof(float) * count);
    return in[name].as<float>();
  }
  float* output(const std::string& name, int64_t count) {
    out[name] = Buffer(sizeof(float) * count, 0);
    return out[name].as<float>();
  }
  // An input the kernel updates in place, written back as an output.
  float* inout(const std::string& name, int64_t count) {
    float* p = output(name, count);
    Buffer b = nf_io::read_file(dir + "/" + name + ".bin", sizeof(float) * count);
    std::memcpy(p, b.data(), sizeof(float) * count);
    return p;
  }
  void write_all() {
    for (auto& [name, b] : out) nf_io::write_file(dir + "/out_" + name + ".bin", b.data(), b.bytes);
  }
};

void check(cudaError_t e, const Case& cs) {
  if (e != cudaSuccess) nf_io::die("launcher returned an error for " + cs.dir);
}

// What every layer's params share: the shape, eps, threads, the statistics and, in the backward,
// the gradient sums. `P`: BatchCoefParams<float> or AssocCoefParams<float>.
template <class P>
P stats_params(const Case& cs, Arrays& a, bool backward) {
  const int64_t NC = cs.N * cs.C;
  P p;
  p.N = cs.N;
  p.C = cs.C;
  p.L = cs.L;
  p.eps = 1e-5;
  p.threads = cs.threads;
  p.mean = a.input("mean", NC);
  p.m2 = a.input("m2", NC);
  if (backward) {
    p.sum_dy = a.input("sum_dy", NC);
    p.sum_dy_xmu = a.input("sum_dy_xmu", NC);
  }
  return p;
}

// A parameter gradient of the backward: its output name, its pointer in the params, its size.
struct Grad {
  std::string name;
  float** slot;
  int64_t count;
};

// The backward's outputs, named as the op's outputs (+ suffix): c_dy, c_x, c_0 ((N, C)), then the
// parameter gradients.
template <class P>
void backward_outputs(P& p, Arrays& a, const std::vector<Grad>& grads, const std::string& suffix = "") {
  const int64_t NC = p.N * p.C;
  p.c_dy = a.output("c_dy" + suffix, NC);
  p.c_x = a.output("c_x" + suffix, NC);
  p.c_0 = a.output("c_0" + suffix, NC);
  for (const Grad& g : grads) *g.slot = a.output(g.name + suffix, g.count);
}

void run_batch(const Case& cs, Arrays& a) {
  const bool iebn = cs.op.rfind("iebn", 0) == 0, backward = cs.op.find("backward") != std::string::npos;
  const int64_t NC = cs.N * cs.C, C = cs.C;
  auto p = stats_params<nf::BatchCoefParams<float>>(cs, a, backward);
  p.training = cs.training != 0;
  p.momentum = 0.1;
  p.gate = a.input("gate", C);
  if (iebn) p.gate_bias = a.input("gate_bias", C);
  if (cs.affine) {
    p.weight = a.input("weight", C);
    p.bias = a.input("bias", C);
  }
  // The backward never updates them; in training it does not even read them (glue convention).
  if (cs.running && !(backward && p.training)) {
    p.running_mean = backward ? const_cast<float*>(a.input("running_mean", C)) : a.inout("running_mean", C);
    p.running_var = backward ? const_cast<float*>(a.input("running_var", C)) : a.inout("running_var", C);
  }
  if (!backward) {
    p.scale = a.output("scale", NC);
    p.shift = a.output("shift", NC);
    // The forward counts the batch in training (one thread of one launch), also when the
    // statistics are empty and no other work is done; eval leaves the counter alone.
    int64_t count = 41;
    p.num_batches_tracked = &count;
    const auto forward = [&](const nf::BatchCoefParams<float>& q) {
      check(iebn ? nf::launch_batch_coef_forward<nf::coef::IebnMath<float>>(q, nullptr)
                 : nf::launch_batch_coef_forward<nf::coef::BinMath<float>>(q, nullptr),
            cs);
    };
    forward(p);
    nf::BatchCoefParams<float> empty = p;
    empty.N = 0;
    forward(empty);
    if (count != (p.training ? 43 : 41)) nf_io::die("num_batches_tracked miscounted in " + cs.dir);
    return;
  }
  std::vector<Grad> grads = {{"grad_gate", &p.grad_gate, C}, {"grad_weight", &p.grad_weight, C},
                             {"grad_bias", &p.grad_bias, C}};
  if (iebn) grads.push_back({"grad_gate_bias", &p.grad_gate_bias, C});
  backward_outputs(p, a, grads);
  check(iebn ? nf::launch_batch_coef_backward<nf::coef::IebnMath<float>>(p, nullptr)
             : nf::launch_batch_coef_backward<nf::coef::BinMath<float>>(p, nullptr),
        cs);
}

// A backward with a tree over samples: run twice on the same counters (zeroed, and left zeroed),
// both runs bitwise equal.
template <class P, class Launch>
void run_twice(const Case& cs, Arrays& a, P& p, const std::vector<Grad>& grads, Launch launch) {
  Buffer ws(sizeof(float) * cs.N * p.partials_per_sample(), 0);
  Buffer counters(sizeof(int) * cs.N, 0);  // zeroed
  p.workspace = ws.as<float>();
  p.counters = counters.as<int>();
  for (const char* suffix : {"", "_again"}) {
    backward_outputs(p, a, grads, suffix);
    check(launch(p), cs);
    for (int64_t i = 0; i < cs.N; ++i)
      if (counters.as<int>()[i] != 0) nf_io::die("arrival counter not reset in " + cs.dir);
  }
  std::vector<std::string> names = {"c_dy", "c_x", "c_0"};
  for (const Grad& g : grads) names.push_back(g.name);
  for (const std::string& name : names) {
    const Buffer& x = a.out[name];
    const Buffer& y = a.out[name + "_again"];
    if (std::memcmp(x.data(), y.data(), x.bytes) != 0)
      nf_io::die("second run differs in " + name + " for " + cs.dir);
  }
}

void run_ilm(const Case& cs, Arrays& a) {
  const bool backward = cs.op == "ilm_backward";
  const int64_t NC = cs.N * cs.C, C = cs.C, EK = cs.M * cs.K;
  auto p = stats_params<nf::IlmCoefParams<float>>(cs, a, backward);
  p.G = cs.G;
  p.K = cs.K;
  p.E = cs.M;
  p.encoder = a.input("encoder", EK);
  p.decoder_weight = a.input("decoder_weight", EK);
  p.decoder_bias = a.input("decoder_bias", EK);
  p.weight = a.input("weight", C);
  p.bias = a.input("bias", C);
  if (!backward) {
    p.scale = a.output("scale", NC);
    p.shift = a.output("shift", NC);
    check(nf::launch_ilm_coef_forward(p, nullptr), cs);
    return;
  }
  run_twice(cs, a, p,
            {{"grad_encoder", &p.grad_encoder, EK},
             {"grad_decoder_weight", &p.grad_decoder_weight, EK},
             {"grad_decoder_bias", &p.grad_decoder_bias, EK},
             {"grad_weight", &p.grad_weight, C},
             {"grad_bias", &p.grad_bias, C}},
            [](const nf::IlmCoefParams<float>& q) { return nf::launch_ilm_coef_backward(q, nullptr); });
}

void run_assoc(const Case& cs, Arrays& a) {
  const bool backward = cs.op == "assoc_backward";
  const int64_t NC = cs.N * cs.C, C = cs.C, MG = cs.M * cs.G;
  auto p = stats_params<nf::AssocCoefParams<float>>(cs, a, backward);
  p.G = cs.G;
  p.M = cs.M;
  p.encoder = a.input("encoder", MG);
  p.decoder_mean = a.input("decoder_mean", MG);
  p.decoder_var = a.input("decoder_var", MG);
  p.weight = a.input("weight", C);
  p.bias = a.input("bias", C);
  if (!backward) {
    p.scale = a.output("scale", NC);
    p.shift = a.output("shift", NC);
    check(nf::launch_assoc_coef_forward(p, nullptr), cs);
    return;
  }
  run_twice(cs, a, p,
            {{"grad_encoder", &p.grad_encoder, MG},
             {"grad_decoder_mean", &p.grad_decoder_mean, MG},
             {"grad_decoder_var", &p.grad_decoder_var, MG},
             {"grad_weight", &p.grad_weight, C},
             {"grad_bias", &p.grad_bias, C}},
            [](const nf::AssocCoefParams<float>& q) { return nf::launch_assoc_coef_backward(q, nullptr); });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) nf_io::die("usage: coefficients_driver CASES_FILE");
  std::ifstream f(argv[1]);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    std::istringstream ss(line);
    Case cs;
    ss >> cs.op >> cs.N >> cs.C >> cs.L >> cs.G >> cs.M >> cs.threads >> cs.training >> cs.running >> cs.affine >>
        cs.dir;
    if (cs.op.rfind("ilm", 0) == 0) ss >> cs.K;
    if (!ss) nf_io::die("bad case line: " + line);
    Arrays a;
    a.dir = cs.dir;
    if (cs.op.rfind("ilm", 0) == 0)
      run_ilm(cs, a);
    else if (cs.op.rfind("assoc", 0) == 0)
      run_assoc(cs, a);
    else
      run_batch(cs, a);
    a.write_all();
    std::printf("%s N=%ld C=%ld L=%ld ok\n", cs.op.c_str(), static_cast<long>(cs.N), static_cast<long>(cs.C),
                static_cast<long>(cs.L));
  }
  return 0;
}
