// Shim driver for the fused BIN / IEBN layer steps (csrc/kernels/layer_steps.cuh): for each case
// it runs the two separate launches (moments then the coefficient forward; backward_sums then the
// coefficient backward) and the fused one on the same inputs, with the same templated launchers
// as the CUDA build, and requires bitwise equal results (the epilogue runs the standalone
// kernel's tiles with its plan: same reduction order), equal running statistics and batch
// counter, and every arrival counter left zero. The fused launches run twice on the same counters
// (the second must find them zeroed). Inputs are generated here (a fixed LCG per case).
// Usage: layer_steps_driver CASES_FILE
// Each line: a case of batch_case.h (misaligned inputs run the scalar kernels).
// Prints one line per case: "ok <line> grid=<blocks> splits=<per item> tiles=<coefficient tiles>";
// with NF_SHIM_TRACE=1 also "trace {moments,sums}_step DTYPE LAYOUT ..." for the first fused
// launch of each direction (nf_shim::traced in cuda_shim.h: the bytes it moved).
#include "cuda_shim.h"
#include "batch_case.h"
#include "driver_io.h"
#include "kernels/layer_steps.cuh"

#include <vector>

using nf_case::Case;
using nf_case::Channels;
using nf_case::coef_params;
using nf_case::Inputs;
using nf_case::make_inputs;
using nf_io::Buffer;

namespace {

Buffer floats(size_t n) { return Buffer(n * sizeof(float), 0); }

bool same_bits(const Buffer& a, const Buffer& b) { return a.bytes == b.bytes && std::memcmp(a.data(), b.data(), a.bytes) == 0; }

bool all_zero(const Buffer& b) {
  for (size_t i = 0; i < b.bytes; ++i)
    if (b.base[b.offset + i] != 0) return false;
  return true;
}

void require(bool ok, const Case& cs, const std::string& what) {
  if (!ok) nf_io::die(what + " in case: " + cs.line);
}

template <typename T, class Math>
void run_case(const Case& cs) {
  Inputs in = make_inputs<T>(cs);
  const nf::PlaneShape& s = in.s;
  const size_t NC = in.NC, C = in.C;
  const Buffer &x = in.x, &dy = in.dy;
  const Channels& ch = in.ch;
  const std::string ctx = "(" + cs.line + ")";

  // ---- forward: moments + coefficients, separately -------------------------------------------------
  Buffer mean_u = floats(NC), m2_u = floats(NC), scale_u = floats(NC), shift_u = floats(NC);
  Buffer rm_u = floats(C), rv_u = floats(C);
  std::memcpy(rm_u.data(), ch.rmean.data(), C * 4);
  std::memcpy(rv_u.data(), ch.rvar.data(), C * 4);
  int64_t nbt_u = 41;
  {
    nf::MomentsParams p;
    p.x = x.data();
    p.mean = mean_u.as<float>();
    p.m2 = m2_u.as<float>();
    p.shape = s;
    p.threads = cs.threads;
    const nf::Workspace w = nf::moments_workspace<T>(p);
    Buffer counters(w.counter_count * 4, 0), partials(w.partial_floats * 4, 0);
    std::memset(partials.data(), 0xff, partials.bytes);
    p.counters = w.counter_count ? counters.as<unsigned>() : nullptr;
    p.partials = w.counter_count ? partials.as<float>() : nullptr;
    require(nf::launch_moments<T>(p, nullptr) == cudaSuccess, cs, "moments launch");
    auto c = coef_params(cs, ch, p.mean, p.m2, rm_u.as<float>(), rv_u.as<float>(), false);
    c.num_batches_tracked = &nbt_u;
    c.scale = scale_u.as<float>();
    c.shift = shift_u.as<float>();
    require(nf::launch_batch_coef_forward<Math>(c, nullptr) == cudaSuccess, cs, "coefficient launch");
  }

  // ---- forward, fused (twice on the same counters) ---------------------------------------------------
  nf::MomentsParams pf;
  Buffer mean_f = floats(NC), m2_f = floats(NC);
  pf.x = x.data();
  pf.mean = mean_f.as<float>();
  pf.m2 = m2_f.as<float>();
  pf.shape = s;
  pf.threads = cs.threads;
  const nf::Workspace wf = nf::moments_step_workspace<T>(pf);
  const nf::Workspace wr = nf::moments_workspace<T>(pf);
  require(wf.counter_count == wr.counter_count + 1 && wf.partial_floats == wr.partial_floats, cs,
          "step workspace is not the reduction's plus one counter");
  Buffer counters_f(wf.counter_count * 4, 0), partials_f(wf.partial_floats * 4, 0);
  for (int run = 0; run < 2; ++run) {
    Buffer scale_f = floats(NC), shift_f = floats(NC), rm_f = floats(C), rv_f = floats(C);
    std::memset(mean_f.data(), 0xff, mean_f.bytes);  // NaN until written
    std::memset(m2_f.data(), 0xff, m2_f.bytes);
    std::memset(partials_f.data(), 0xff, partials_f.bytes);
    std::memcpy(rm_f.data(), ch.rmean.data(), C * 4);
    std::memcpy(rv_f.data(), ch.rvar.data(), C * 4);
    int64_t nbt_f = 41;
    pf.counters = counters_f.as<unsigned>();
    pf.partials = wf.partial_floats ? partials_f.as<float>() : nullptr;
    auto c = coef_params(cs, ch, pf.mean, pf.m2, rm_f.as<float>(), rv_f.as<float>(), false);
    c.num_batches_tracked = &nbt_f;
    c.scale = scale_f.as<float>();
    c.shift = shift_f.as<float>();
    auto fused = [&] { return nf::launch_moments_step<T, Math>(pf, c, nullptr); };
    const std::string what = "moments_step " + cs.dtype + " " + cs.layout;
    require((run == 0 ? nf_shim::traced(what.c_str(), fused) : fused()) == cudaSuccess, cs, "fused forward launch");
    require(all_zero(counters_f), cs, "fused forward left a counter set");
    require(same_bits(mean_f, mean_u) && same_bits(m2_f, m2_u), cs, "fused moments differ");
    require(same_bits(scale_f, scale_u) && same_bits(shift_f, shift_u), cs, "fused scale/shift differ");
    require(same_bits(rm_f, rm_u) && same_bits(rv_f, rv_u), cs, "fused running statistics differ");
    require(nbt_f == nbt_u && nbt_u == (cs.training ? 42 : 41), cs, "num_batches_tracked differs");
  }

  // ---- backward: backward_sums + coefficient backward, separately, then fused ----------------------------
  const bool iebn = cs.layer == "iebn";
  auto grads = [&](nf::BatchCoefParams<float>& c, std::vector<Buffer>& out) {
    for (int k = 0; k < 3 + 4; ++k) out.push_back(floats(k < 3 ? NC : C));
    nf_case::set_backward_outputs(c, out, iebn);
  };
  auto sums_params = [&](Buffer& g1, Buffer& g2) {
    nf::BackwardSumsParams b;
    b.dy = dy.data();
    b.x = x.data();
    b.mean = mean_u.as<float>();
    b.sum_dy = g1.as<float>();
    b.sum_dy_xmu = g2.as<float>();
    if (cs.masked) {
      b.mask_scale = scale_u.as<float>();
      b.mask_shift = shift_u.as<float>();
    }
    b.shape = s;
    b.threads = cs.threads;
    return b;
  };
  Buffer g1_u = floats(NC), g2_u = floats(NC);
  std::vector<Buffer> out_u;
  {
    nf::BackwardSumsParams b = sums_params(g1_u, g2_u);
    const nf::Workspace w = nf::backward_sums_workspace<T>(b);
    Buffer counters(w.counter_count * 4, 0), partials(w.partial_floats * 4, 0);
    std::memset(partials.data(), 0xff, partials.bytes);
    b.counters = w.counter_count ? counters.as<unsigned>() : nullptr;
    b.partials = w.counter_count ? partials.as<float>() : nullptr;
    require(nf::launch_backward_sums<T>(b, nullptr) == cudaSuccess, cs, "backward_sums launch");
    auto c = coef_params(cs, ch, mean_u.as<float>(), m2_u.as<float>(), ch.rmean.as<float>(), ch.rvar.as<float>(), true);
    c.sum_dy = b.sum_dy;
    c.sum_dy_xmu = b.sum_dy_xmu;
    grads(c, out_u);
    require(nf::launch_batch_coef_backward<Math>(c, nullptr) == cudaSuccess, cs, "coefficient backward launch");
  }
  Buffer g1_f = floats(NC), g2_f = floats(NC);
  nf::BackwardSumsParams bf = sums_params(g1_f, g2_f);
  const nf::Workspace wb = nf::sums_step_workspace<T>(bf);
  Buffer counters_b(wb.counter_count * 4, 0), partials_b(wb.partial_floats * 4, 0);
  for (int run = 0; run < 2; ++run) {
    std::vector<Buffer> out_f;
    std::memset(g1_f.data(), 0xff, g1_f.bytes);
    std::memset(g2_f.data(), 0xff, g2_f.bytes);
    std::memset(partials_b.data(), 0xff, partials_b.bytes);
    bf.counters = counters_b.as<unsigned>();
    bf.partials = wb.partial_floats ? partials_b.as<float>() : nullptr;
    auto c = coef_params(cs, ch, mean_u.as<float>(), m2_u.as<float>(), ch.rmean.as<float>(), ch.rvar.as<float>(), true);
    c.sum_dy = bf.sum_dy;
    c.sum_dy_xmu = bf.sum_dy_xmu;
    grads(c, out_f);
    auto fused = [&] { return nf::launch_sums_step<T, Math>(bf, c, nullptr); };
    const std::string what = "sums_step " + cs.dtype + " " + cs.layout;
    require((run == 0 ? nf_shim::traced(what.c_str(), fused) : fused()) == cudaSuccess, cs, "fused backward launch");
    require(all_zero(counters_b), cs, "fused backward left a counter set");
    require(same_bits(g1_f, g1_u) && same_bits(g2_f, g2_u), cs, "fused gradient sums differ");
    for (int k = 0; k < (iebn ? 7 : 6); ++k)
      require(same_bits(out_f[k], out_u[k]), cs, std::string("fused ") + nf_case::kBackwardOutputs[k] + " differs");
  }

  // What the launch looked like (the test checks that the grids vary, so the last block varies).
  const int vec = nf::choose_vec(s, sizeof(T), x.data(), nullptr);
  int64_t blocks, splits;
  if (s.layout == nf::Layout::Contiguous) {
    const nf::ContigPlan pl = nf::plan_contig(s.N * s.C, s.L, vec, cs.threads);
    blocks = pl.blocks;
    splits = pl.splits;
  } else {
    const nf::ClPlan pl = nf::plan_cl(s.N, s.C, s.L, vec, cs.threads);
    blocks = pl.blocks;
    splits = pl.splits;
  }
  nf::BatchCoefPlan cp;
  auto q = coef_params(cs, ch, nullptr, nullptr, nullptr, nullptr, false);
  require(nf::plan_step_coef<Math>(q, cs.threads, &cp), cs, "coefficient plan");
  std::printf("ok %s grid=%lld splits=%lld tiles=%lld\n", cs.line.c_str(), static_cast<long long>(blocks),
              static_cast<long long>(splits), static_cast<long long>(cp.blocks));
}

struct Run {
  template <typename T, class Math>
  void operator()(const Case& cs) const {
    run_case<T, Math>(cs);
  }
};

}  // namespace

int main(int argc, char** argv) { return nf_case::run_case_file(argc, argv, "usage: layer_steps_driver CASES_FILE", Run{}); }
