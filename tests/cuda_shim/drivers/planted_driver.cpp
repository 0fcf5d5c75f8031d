// Runs one planted-bug kernel (planted/planted_kernels.cuh) on exactly-sized heap buffers.
// Usage: planted_driver race|oob buggy|fixed
#include "cuda_shim.h"
#include "driver_io.h"
#include "planted/planted_kernels.cuh"

#include <string>

int main(int argc, char** argv) {
  if (argc != 3) nf_io::die("usage: planted_driver race|oob buggy|fixed");
  const std::string which = argv[1];
  const bool fixed = std::string(argv[2]) == "fixed";
  const int n = 100, threads = 64, blocks = (n + threads - 1) / threads;
  nf_io::Buffer x(n * sizeof(float), 0), out(n * sizeof(float), 0);
  for (int i = 0; i < n; ++i) x.as<float>()[i] = static_cast<float>(i);
  if (which == "race") {
    NF_LAUNCH(planted::block_sum, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr, x.as<const float>(),
              out.as<float>(), n, fixed);
    float total = 0.f;
    for (int b = 0; b < blocks; ++b) total += out.as<float>()[b];
    std::printf("sum %g (expected %g)\n", total, n * (n - 1) / 2.0);
  } else if (which == "oob") {
    NF_LAUNCH(planted::forward_diff, dim3(blocks), dim3(threads), 0, nullptr, x.as<const float>(), out.as<float>(), n,
              fixed);
    std::printf("diff[0] %g\n", out.as<float>()[0]);
  } else {
    nf_io::die("unknown kernel " + which);
  }
  return 0;
}
