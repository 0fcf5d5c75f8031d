// Shim driver for the four generic kernels (csrc/kernels/plane_{reduce,apply}.cuh).
// Usage: generic_driver CASES_FILE
// Each line of CASES_FILE: op dtype layout N C L threads misalign dir
//   op: moments | backward_sums | affine_apply | backward_apply, or one of the last three with
//   the suffix _relu (the fused ReLU: affine_apply's relu, the backward ops' mask from the
//   forward's scale.bin / shift.bin);  dtype: f32 | f16 | bf16
//   layout: contig | cl;  misalign: 0/1 (offset every tensor by one element);  dir: where the
//   inputs x.bin, dy.bin (raw dtype bits) and mean/scale/shift/c_dy/c_x/c_0.bin (float32) are and
//   the outputs (out0.bin, out1.bin) go.
// The same templated launchers as the real build run here (planning, vector width, splits).
// With NF_SHIM_TRACE=1 in the environment, each case's launch is traced: one more line,
// "trace OP DTYPE LAYOUT load=BYTES store=BYTES ..." (nf_shim::traced in cuda_shim.h).
#include "cuda_shim.h"
#include "driver_io.h"
#include "kernels/plane_apply.cuh"
#include "kernels/plane_reduce.cuh"

#include <cstring>
#include <fstream>
#include <sstream>

using nf_io::Buffer;

namespace {

struct Case {
  std::string op, dtype, layout, dir;
  int64_t N, C, L;
  int threads, misalign;
  bool relu = false;  // op had the _relu suffix (removed from op)
};

template <typename T>
void run_case(const Case& cs) {
  nf::PlaneShape s;
  s.N = cs.N;
  s.C = cs.C;
  s.L = cs.L;
  s.layout = cs.layout == "cl" ? nf::Layout::ChannelsLast : nf::Layout::Contiguous;
  const size_t numel = static_cast<size_t>(cs.N * cs.C * cs.L);
  const size_t stats = static_cast<size_t>(cs.N * cs.C);
  const size_t off = cs.misalign ? sizeof(T) : 0;
  auto in = [&](const char* name, size_t bytes, size_t o) { return nf_io::read_file(cs.dir + "/" + name, bytes, o); };
  auto out = [&](const char* name, const Buffer& b) { nf_io::write_file(cs.dir + "/" + name, b.data(), b.bytes); };
  cudaError_t err = cudaSuccess;
  const std::string what = cs.op + (cs.relu ? "_relu " : " ") + cs.dtype + " " + cs.layout;
  // The forward's coefficients, for the backward ops' ReLU mask.
  Buffer mask_scale, mask_shift;
  if (cs.relu && cs.op != "affine_apply") {
    mask_scale = in("scale.bin", stats * sizeof(float), 0);
    mask_shift = in("shift.bin", stats * sizeof(float), 0);
  }
  const float* msc = cs.relu ? mask_scale.as<float>() : nullptr;
  const float* msh = cs.relu ? mask_shift.as<float>() : nullptr;

  if (cs.op == "moments" || cs.op == "backward_sums") {
    Buffer x = in("x.bin", numel * sizeof(T), off);
    Buffer o0(stats * sizeof(float), 0), o1(stats * sizeof(float), 0);
    Buffer dy, mean, counters, partials;
    nf::MomentsParams pm;
    nf::BackwardSumsParams pb;
    nf::Workspace w;
    if (cs.op == "moments") {
      pm.x = x.data();
      pm.mean = o0.as<float>();
      pm.m2 = o1.as<float>();
      pm.shape = s;
      pm.threads = cs.threads;
      w = nf::moments_workspace<T>(pm);
    } else {
      dy = in("dy.bin", numel * sizeof(T), off);
      mean = in("mean.bin", stats * sizeof(float), 0);
      pb.dy = dy.data();
      pb.x = x.data();
      pb.mean = mean.as<float>();
      pb.sum_dy = o0.as<float>();
      pb.sum_dy_xmu = o1.as<float>();
      pb.mask_scale = msc;
      pb.mask_shift = msh;
      pb.shape = s;
      pb.threads = cs.threads;
      w = nf::backward_sums_workspace<T>(pb);
    }
    // What the launcher plans must match what it reported (the glue allocates from the latter).
    const nf::Workspace planned =
        cs.op == "moments" ? nf::reduce_workspace<T, nf::MomentsOp>(s, cs.threads, x.data(), nullptr)
        : cs.relu ? nf::reduce_workspace<T, nf::ReluMasked<nf::BackwardSumsOp>>(s, cs.threads, dy.data(), x.data())
                  : nf::reduce_workspace<T, nf::BackwardSumsOp>(s, cs.threads, dy.data(), x.data());
    if (planned.counter_count != w.counter_count || planned.partial_floats != w.partial_floats)
      nf_io::die("workspace size mismatch in " + cs.dir);
    if ((w.counter_count == 0) != (w.partial_floats == 0)) nf_io::die("counters without partials in " + cs.dir);
    // Exactly sized (ASAN catches overruns). Counters zeroed, as the glue's persistent buffer is;
    // partials filled with garbage, as from at::empty: a kernel that read a partial it did not
    // write in this launch would turn the result into NaN (0xff bytes) and fail the check.
    counters = Buffer(w.counter_count * sizeof(uint32_t), 0);
    partials = Buffer(w.partial_floats * sizeof(float), 0);
    auto launch = [&](unsigned char garbage) {
      std::memset(partials.data(), garbage, partials.bytes);
      unsigned* c = w.counter_count ? counters.as<unsigned>() : nullptr;
      float* q = w.counter_count ? partials.as<float>() : nullptr;
      if (cs.op == "moments") {
        pm.counters = c;
        pm.partials = q;
        return nf::launch_moments<T>(pm, nullptr);
      }
      pb.counters = c;
      pb.partials = q;
      return nf::launch_backward_sums<T>(pb, nullptr);
    };
    auto counters_zero = [&] {
      for (size_t i = 0; i < w.counter_count; ++i)
        if (counters.as<uint32_t>()[i] != 0u) return false;
      return true;
    };
    if (cs.relu) {  // one of the two alone is refused, before anything runs
      pb.mask_scale = nullptr;
      if (nf::launch_backward_sums<T>(pb, nullptr) != cudaErrorInvalidValue)
        nf_io::die("backward_sums with mask_shift only was not refused in " + cs.dir);
      pb.mask_scale = msc;
    }
    err = nf_shim::traced(what.c_str(), [&] { return launch(0xff); });
    // The kernels promise to leave the arrival counters zeroed (the glue reuses them, unzeroed,
    // for the next launch on the stream).
    if (!counters_zero()) nf_io::die("arrival counter not reset in " + cs.dir);
    if (w.counter_count != 0 && err == cudaSuccess) {
      // ...and reusing them as they were left, with other garbage in the partials, gives
      // bitwise the same result.
      Buffer r0(o0.bytes, 0), r1(o1.bytes, 0);
      std::memcpy(r0.data(), o0.data(), o0.bytes);
      std::memcpy(r1.data(), o1.data(), o1.bytes);
      err = launch(0x7f);
      if (!counters_zero()) nf_io::die("arrival counter not reset (second launch) in " + cs.dir);
      if (std::memcmp(r0.data(), o0.data(), o0.bytes) != 0 || std::memcmp(r1.data(), o1.data(), o1.bytes) != 0)
        nf_io::die("second launch on reused counters differs in " + cs.dir);
    }
    out("out0.bin", o0);
    out("out1.bin", o1);
    std::printf("%s %s %s counters=%zu partials=%zu\n", cs.op.c_str(), cs.dtype.c_str(), cs.layout.c_str(),
                w.counter_count, w.partial_floats);
  } else if (cs.op == "affine_apply" || cs.op == "backward_apply") {
    Buffer x = in("x.bin", numel * sizeof(T), off);
    Buffer mean = in("mean.bin", stats * sizeof(float), 0);
    Buffer y(numel * sizeof(T), off);
    if (cs.op == "affine_apply") {
      Buffer scale = in("scale.bin", stats * sizeof(float), 0), shift = in("shift.bin", stats * sizeof(float), 0);
      nf::AffineApplyParams p;
      p.x = x.data();
      p.mean = mean.as<float>();
      p.scale = scale.as<float>();
      p.shift = shift.as<float>();
      p.y = y.data();
      p.relu = cs.relu;
      p.shape = s;
      p.threads = cs.threads;
      err = nf_shim::traced(what.c_str(), [&] { return nf::launch_affine_apply<T>(p, nullptr); });
    } else {
      Buffer dy = in("dy.bin", numel * sizeof(T), off);
      Buffer cdy = in("c_dy.bin", stats * sizeof(float), 0), cx = in("c_x.bin", stats * sizeof(float), 0),
             c0 = in("c_0.bin", stats * sizeof(float), 0);
      nf::BackwardApplyParams p;
      p.dy = dy.data();
      p.x = x.data();
      p.mean = mean.as<float>();
      p.c_dy = cdy.as<float>();
      p.c_x = cx.as<float>();
      p.c_0 = c0.as<float>();
      p.dx = y.data();
      p.shape = s;
      p.threads = cs.threads;
      if (cs.relu) {  // one of the two alone is refused, before anything runs
        p.mask_scale = msc;
        if (nf::launch_backward_apply<T>(p, nullptr) != cudaErrorInvalidValue)
          nf_io::die("backward_apply with mask_scale only was not refused in " + cs.dir);
        p.mask_shift = msh;
      }
      err = nf_shim::traced(what.c_str(), [&] { return nf::launch_backward_apply<T>(p, nullptr); });
    }
    out("out0.bin", y);
    std::printf("%s %s %s\n", cs.op.c_str(), cs.dtype.c_str(), cs.layout.c_str());
  } else {
    nf_io::die("unknown op " + cs.op);
  }
  if (err != cudaSuccess) nf_io::die("launcher returned an error for " + cs.dir);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) nf_io::die("usage: generic_driver CASES_FILE");
  std::ifstream f(argv[1]);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    std::istringstream ss(line);
    Case cs;
    ss >> cs.op >> cs.dtype >> cs.layout >> cs.N >> cs.C >> cs.L >> cs.threads >> cs.misalign >> cs.dir;
    if (!ss) nf_io::die("bad case line: " + line);
    const std::string suffix = "_relu";
    if (cs.op.size() > suffix.size() && cs.op.compare(cs.op.size() - suffix.size(), suffix.size(), suffix) == 0) {
      cs.relu = true;
      cs.op.resize(cs.op.size() - suffix.size());
      if (cs.op == "moments") nf_io::die("moments has no _relu variant");
    }
    if (cs.dtype == "f32")
      run_case<float>(cs);
    else if (cs.dtype == "f16")
      run_case<__half>(cs);
    else if (cs.dtype == "bf16")
      run_case<__nv_bfloat16>(cs);
    else
      nf_io::die("bad dtype " + cs.dtype);
  }
  return 0;
}
