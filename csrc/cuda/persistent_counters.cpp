// See persistent_counters.h.
#include "cuda/persistent_counters.h"

#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace nf_glue {

at::Tensor zeroed_counters(const at::Tensor& like, int64_t count) {
  TORCH_INTERNAL_ASSERT(like.is_cuda(), "zeroed_counters: ", like.device(), " is not a CUDA device");
  const at::TensorOptions opts = like.options().dtype(at::kInt);
  const c10::DeviceIndex device = like.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return at::zeros({std::max<int64_t>(count, 1)}, opts);
  }
  // Held for the life of the process (leaked on purpose: no CUDA frees during static destruction).
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& buf = (*buffers)[{device, stream}];
  if (!buf.defined() || buf.numel() < count) {
    // The old buffer goes back to the caching allocator, which reuses it only on this stream, after
    // the kernels already queued there: no one else sees it while they may still count in it.
    const int64_t old = buf.defined() ? buf.numel() : 0;
    buf = at::zeros({std::max<int64_t>({count, 2 * old, 64})}, opts);  // on the current stream
  }
  return buf;
}

}  // namespace nf_glue
