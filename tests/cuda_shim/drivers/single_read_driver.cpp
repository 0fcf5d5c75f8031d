// Shim driver for the single-read layer directions (csrc/kernels/single_read.cuh): for each case
// it runs the generic launches (moments, coefficient forward, affine_apply; backward_sums,
// coefficient backward, backward_apply) and the single cooperative launch of each direction on the
// same inputs, with the same templated launchers as the CUDA build, and compares every output.
// The single-read plan splits planes by its register budget, so the reduction order differs from
// the generic kernels': results must agree to rounding (tolerances below), not bitwise; the batch
// counter and which elements are written must agree exactly. Outputs, statistics and partials
// start as NaN (0xff bytes), so an element or a partial left unwritten shows. The backward of both
// paths takes the same mask (the forward's scale and shift of the generic path), so its ReLU
// mask is the same bit for bit.
// Usage: single_read_driver CASES_FILE
// Each line: a case of batch_case.h. Layouts or alignments the kernels do not take must be refused by the
//   planner: those lines print "refused <line>" (and the test says which must be).
// Prints "ok <line> fwd_grid=<blocks> fwd_splits=<s> bwd_grid=<blocks> bwd_splits=<s> tiles=<t>";
// with NF_SHIM_TRACE=1 also a "trace single_read_{forward,backward} DTYPE LAYOUT ..." line for each
// single-read launch (nf_shim::traced in cuda_shim.h: the bytes it moved).
#include "cuda_shim.h"
#include "batch_case.h"
#include "driver_io.h"
#include "kernels/single_read.cuh"

#include <cmath>
#include <vector>

using nf_case::Case;
using nf_case::Channels;
using nf_case::coef_params;
using nf_case::Inputs;
using nf_case::make_inputs;
using nf_io::Buffer;

namespace {

Buffer floats(size_t n) {
  Buffer b(n * sizeof(float), 0);
  std::memset(b.data(), 0xff, b.bytes);  // NaN until written
  return b;
}

void require(bool ok, const Case& cs, const std::string& what) {
  if (!ok) nf_io::die(what + " in case: " + cs.line);
}

// |a - b| <= rtol * (|b| + max|b over the array|) elementwise, NaN only where b is NaN.
template <typename T>
void require_close(const T* a, const T* b, size_t n, double rtol, const Case& cs, const std::string& what) {
  double scale = 0;
  for (size_t i = 0; i < n; ++i) scale = std::fmax(scale, std::fabs(static_cast<double>(nf::to_float(b[i]))));
  for (size_t i = 0; i < n; ++i) {
    const double x = nf::to_float(a[i]), y = nf::to_float(b[i]);
    if (std::isnan(x) || std::isnan(y)) {
      if (std::isnan(x) != std::isnan(y))
        nf_io::die(what + ": element " + std::to_string(i) + " NaN in one path only (" + std::to_string(x) + " vs " +
                   std::to_string(y) + ") in case: " + cs.line);
      continue;
    }
    if (std::fabs(x - y) > rtol * (std::fabs(y) + scale))
      nf_io::die(what + ": element " + std::to_string(i) + " is " + std::to_string(x) + ", generic path " +
                 std::to_string(y) + " in case: " + cs.line);
  }
}

void require_close(const Buffer& a, const Buffer& b, double rtol, const Case& cs, const std::string& what) {
  require(a.bytes == b.bytes, cs, what + ": sizes differ");
  require_close(a.as<float>(), b.as<float>(), a.bytes / sizeof(float), rtol, cs, what);
}

template <typename T>
constexpr double out_rtol() {
  if constexpr (std::is_same_v<T, float>) return 1e-4;
  if constexpr (std::is_same_v<T, __half>) return 2e-3;
  return 1.6e-2;  // bfloat16: one rounding flip of an 8-bit mantissa
}
constexpr double kStatRtol = 1e-4;  // float32 statistics summed in another order


// The forward's results of one path.
struct Fwd {
  Buffer mean, m2, scale, shift, rm, rv, y;
  int64_t nbt = 41;
};

// The backward's results of one path: c_dy, c_x, c_0, grad_gate, grad_weight, grad_bias,
// grad_gate_bias, and dx.
struct Bwd {
  Buffer g1, g2;
  std::vector<Buffer> out;
  Buffer dx;
};

template <typename T, class Math>
void run_case(const Case& cs) {
  Inputs in = make_inputs<T>(cs);
  const nf::PlaneShape& s = in.s;
  const size_t numel = in.numel, NC = in.NC, C = in.C, off = in.off;
  const Buffer &x = in.x, &dy = in.dy;
  const Channels& ch = in.ch;
  const bool iebn = cs.layer == "iebn";
  auto fresh_fwd = [&] {
    Fwd f{floats(NC), floats(NC), floats(NC), floats(NC), floats(C), floats(C), Buffer(numel * sizeof(T), off)};
    std::memcpy(f.rm.data(), ch.rmean.data(), C * 4);
    std::memcpy(f.rv.data(), ch.rvar.data(), C * 4);
    std::memset(f.y.data(), 0xff, f.y.bytes);
    return f;
  };
  auto moments_params = [&](Fwd& f) {
    nf::MomentsParams p;
    p.x = x.data();
    p.mean = f.mean.as<float>();
    p.m2 = f.m2.as<float>();
    p.shape = s;
    p.threads = cs.threads;
    return p;
  };
  auto fwd_coef = [&](Fwd& f) {
    auto c = coef_params(cs, ch, f.mean.as<float>(), f.m2.as<float>(), f.rm.as<float>(), f.rv.as<float>(), false);
    c.num_batches_tracked = &f.nbt;
    c.scale = f.scale.as<float>();
    c.shift = f.shift.as<float>();
    return c;
  };

  // ---- single-read planning: refused where it must be ---------------------------------------------
  Fwd fs = fresh_fwd();
  nf::MomentsParams ps = moments_params(fs);
  nf::SingleReadLaunch Lf;
  const auto cf = fwd_coef(fs);
  if (!nf::plan_single_read_forward<T, Math>(ps, fs.y.data(), cf, &Lf)) {
    std::printf("refused %s\n", cs.line.c_str());
    return;
  }

  // ---- forward: generic launches ---------------------------------------------------------------------
  Fwd fg = fresh_fwd();
  {
    nf::MomentsParams p = moments_params(fg);
    const nf::Workspace w = nf::moments_workspace<T>(p);
    Buffer counters(w.counter_count * 4, 0), partials(w.partial_floats * 4, 0);
    p.counters = w.counter_count ? counters.as<unsigned>() : nullptr;
    p.partials = w.counter_count ? partials.as<float>() : nullptr;
    require(nf::launch_moments<T>(p, nullptr) == cudaSuccess, cs, "moments launch");
    const auto c = fwd_coef(fg);
    require(nf::launch_batch_coef_forward<Math>(c, nullptr) == cudaSuccess, cs, "coefficient launch");
    nf::AffineApplyParams a;
    a.x = x.data();
    a.mean = fg.mean.as<float>();
    a.scale = fg.scale.as<float>();
    a.shift = fg.shift.as<float>();
    a.y = fg.y.data();
    a.relu = cs.masked != 0;
    a.shape = s;
    a.threads = cs.threads;
    require(nf::launch_affine_apply<T>(a, nullptr) == cudaSuccess, cs, "affine_apply launch");
  }

  // ---- forward: one cooperative launch ---------------------------------------------------------------
  {
    Buffer partials(Lf.partial_floats * 4, 0);
    std::memset(partials.data(), 0xff, partials.bytes);
    ps.partials = Lf.partial_floats ? partials.as<float>() : nullptr;
    const std::string what = "single_read_forward " + cs.dtype + " " + cs.layout;
    require(nf_shim::traced(what.c_str(), [&] {
              return nf::launch_single_read_forward<T, Math>(Lf, ps, fs.y.data(), cs.masked != 0, cf, nullptr);
            }) == cudaSuccess,
            cs, "single-read forward launch");
  }
  require_close(fs.mean, fg.mean, kStatRtol, cs, "mean");
  require_close(fs.m2, fg.m2, kStatRtol, cs, "m2");
  require_close(fs.scale, fg.scale, kStatRtol, cs, "scale");
  require_close(fs.shift, fg.shift, kStatRtol, cs, "shift");
  require_close(fs.rm, fg.rm, kStatRtol, cs, "running_mean");
  require_close(fs.rv, fg.rv, kStatRtol, cs, "running_var");
  require(fs.nbt == fg.nbt && fg.nbt == (cs.training ? 42 : 41), cs, "num_batches_tracked");
  require_close(fs.y.as<T>(), fg.y.as<T>(), numel, out_rtol<T>(), cs, "y");

  // ---- backward: both paths from the generic forward's statistics (and mask) ----------------------------
  auto fresh_bwd = [&] {
    Bwd b{floats(NC), floats(NC), {}, Buffer(numel * sizeof(T), off)};
    for (int k = 0; k < 7; ++k) b.out.push_back(floats(k < 3 ? NC : C));
    std::memset(b.dx.data(), 0xff, b.dx.bytes);
    return b;
  };
  auto sums_params = [&](Bwd& b) {
    nf::BackwardSumsParams p;
    p.dy = dy.data();
    p.x = x.data();
    p.mean = fg.mean.as<float>();
    p.sum_dy = b.g1.as<float>();
    p.sum_dy_xmu = b.g2.as<float>();
    if (cs.masked) {
      p.mask_scale = fg.scale.as<float>();
      p.mask_shift = fg.shift.as<float>();
    }
    p.shape = s;
    p.threads = cs.threads;
    return p;
  };
  auto bwd_coef = [&](Bwd& b) {
    auto c = coef_params(cs, ch, fg.mean.as<float>(), fg.m2.as<float>(), ch.rmean.as<float>(), ch.rvar.as<float>(),
                         true);
    c.sum_dy = b.g1.as<float>();
    c.sum_dy_xmu = b.g2.as<float>();
    nf_case::set_backward_outputs(c, b.out, iebn);
    return c;
  };
  Bwd bg = fresh_bwd();
  {
    nf::BackwardSumsParams p = sums_params(bg);
    const nf::Workspace w = nf::backward_sums_workspace<T>(p);
    Buffer counters(w.counter_count * 4, 0), partials(w.partial_floats * 4, 0);
    p.counters = w.counter_count ? counters.as<unsigned>() : nullptr;
    p.partials = w.counter_count ? partials.as<float>() : nullptr;
    require(nf::launch_backward_sums<T>(p, nullptr) == cudaSuccess, cs, "backward_sums launch");
    const auto c = bwd_coef(bg);
    require(nf::launch_batch_coef_backward<Math>(c, nullptr) == cudaSuccess, cs, "coefficient backward launch");
    nf::BackwardApplyParams a;
    a.dy = dy.data();
    a.x = x.data();
    a.mean = fg.mean.as<float>();
    a.c_dy = c.c_dy;
    a.c_x = c.c_x;
    a.c_0 = c.c_0;
    a.dx = bg.dx.data();
    a.mask_scale = p.mask_scale;
    a.mask_shift = p.mask_shift;
    a.shape = s;
    a.threads = cs.threads;
    require(nf::launch_backward_apply<T>(a, nullptr) == cudaSuccess, cs, "backward_apply launch");
  }
  Bwd bs = fresh_bwd();
  nf::SingleReadLaunch Lb;
  {
    nf::BackwardSumsParams p = sums_params(bs);
    const auto c = bwd_coef(bs);
    require(nf::plan_single_read_backward<T, Math>(p, bs.dx.data(), c, &Lb), cs, "backward refused, forward taken");
    Buffer partials(Lb.partial_floats * 4, 0);
    std::memset(partials.data(), 0xff, partials.bytes);
    p.partials = Lb.partial_floats ? partials.as<float>() : nullptr;
    const std::string what = "single_read_backward " + cs.dtype + " " + cs.layout;
    require(nf_shim::traced(what.c_str(),
                            [&] { return nf::launch_single_read_backward<T, Math>(Lb, p, bs.dx.data(), c, nullptr); }) ==
                cudaSuccess,
            cs, "single-read backward launch");
  }
  require_close(bs.g1, bg.g1, kStatRtol, cs, "sum_dy");
  require_close(bs.g2, bg.g2, kStatRtol, cs, "sum_dy_xmu");
  for (int k = 0; k < (iebn ? 7 : 6); ++k) require_close(bs.out[k], bg.out[k], kStatRtol, cs, nf_case::kBackwardOutputs[k]);
  require_close(bs.dx.as<T>(), bg.dx.as<T>(), numel, out_rtol<T>(), cs, "dx");

  std::printf("ok %s fwd_grid=%lld fwd_splits=%d bwd_grid=%lld bwd_splits=%d tiles=%lld\n", cs.line.c_str(),
              static_cast<long long>(Lf.pl.blocks), Lf.pl.splits, static_cast<long long>(Lb.pl.blocks), Lb.pl.splits,
              static_cast<long long>(Lf.cp.blocks));
}

struct Run {
  template <typename T, class Math>
  void operator()(const Case& cs) const {
    run_case<T, Math>(cs);
  }
};

}  // namespace

int main(int argc, char** argv) { return nf_case::run_case_file(argc, argv, "usage: single_read_driver CASES_FILE", Run{}); }
