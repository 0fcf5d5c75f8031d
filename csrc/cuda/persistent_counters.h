// Zeroed arrival counters for the CUDA kernels' "last block done" merges (split reductions in
// kernels/plane_reduce.cuh, the assoc backward's tree in kernels/coefficients_assoc.cuh), without a
// memset launch per call. Torch glue only (.cpp): never include this from a .cu / .cuh.
//
// Why: the budget is 3 kernel launches per layer forward and 3 per backward; an at::zeros
// workspace per call is one more (fill) launch whenever a reduction splits its planes.
// Why it is safe: the counters are zeroed once when the buffer is (re)allocated and every kernel
// that uses them resets each counter it touched to 0 before it exits. One buffer per
// (device, stream), shared by all ops on that stream: launches on one stream run in order, so a
// kernel always finds the counters zero, whichever op ran before it. Launches on different
// streams get different buffers. (Keyed by the raw stream handle: a user's external stream
// destroyed while its kernels still run, and its handle reused by a new stream at once, would
// share a buffer with them; PyTorch's own pool streams are never destroyed.) The non-counter scratch (partials) needs no zeroing: take it
// from at::empty (the caching allocator, no launch).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace nf_glue {

// At least `count` zeroed 32-bit counters (an int32 tensor on like's device; keep it alive until
// the launch is enqueued) for kernels launched on the *current* CUDA stream of like's device,
// which the kernels must leave zeroed. Normally the persistent per-(device, stream) buffer, grown
// (with one zero fill) when too small. While that stream is being captured into a CUDA graph, a
// fresh zeroed buffer instead (its fill is captured into the graph): a graph may be replayed on
// any stream, concurrently with eager work, so it must not share counters with it.
at::Tensor zeroed_counters(const at::Tensor& like, int64_t count);

}  // namespace nf_glue
