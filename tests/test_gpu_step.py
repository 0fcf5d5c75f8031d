"""A layer step on the GPU: no host-device synchronisation, and CUDA-graph capture (issue 13).

* ``test_step_never_syncs``: training steps (forward + backward) and eval steps (forward) of
  every layer, with every GPU backend, run under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises on any synchronising CUDA call torch makes (``.item()``, ``float(t)``,
  ``bool(t)``, a device-to-host copy, a stream synchronize, ``nonzero``...).  Cases: both memory
  formats, float32 and bfloat16 inputs with float32 parameters (autocast's common case),
  ``track_running_stats=False``, ``affine=False``.  Excluded, as documented in
  docs/performance.md: ``momentum=None`` in training reads ``num_batches_tracked`` on the host
  (the cumulative-average factor ``1 / (count + 1)`` is a float argument of the coefficient op),
  exactly as ``nn.BatchNorm2d`` does (``test_momentum_none_syncs_like_batchnorm`` pins that).
* ``test_cuda_graph_replay_matches_eager``: one layer forward + backward captured in a CUDA
  graph, replayed on a new input, gives bitwise what the same step gives eagerly: output, input
  and parameter gradients, running statistics and ``num_batches_tracked``.
* ``test_reduce_overhead_compile_with_a_growing_batch_matches_eager``: cudagraph trees
  (``torch.compile(mode="reduce-overhead")``) around AssocNorm steps whose batch grows, with the
  trees' slow-path asserts on: the persistent counters must not live in the graph pool
  unaccounted for (a review finding, unverified until a GPU runs it).

Without a CUDA device every test here is skipped.  Warm-up steps (first kernel launches,
Triton compilation, the allocator's first blocks, the persistent zeroed counters) run outside
the checked region: only steady-state steps are checked.
"""
from __future__ import annotations

import copy

import pytest
import torch

import normfuse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in normfuse.available_backends()]
SHAPE = (4, 16, 6, 5)


def _layers():
    """(id, factory) of every layer configuration checked."""
    return [
        ("bin", lambda: normfuse.BatchInstanceNorm2d(16)),
        ("bin-noaffine", lambda: normfuse.BatchInstanceNorm2d(16, affine=False)),
        ("bin-untracked", lambda: normfuse.BatchInstanceNorm2d(16, track_running_stats=False)),
        ("iebn", lambda: normfuse.IEBN2d(16)),
        ("iebn-untracked", lambda: normfuse.IEBN2d(16, track_running_stats=False)),
        ("assoc", lambda: normfuse.AssocNorm(4, 16)),
    ]


LAYERS = _layers()


def _module(factory, seed=0):
    torch.manual_seed(seed)
    m = factory().cuda()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "gate":
                p.copy_(torch.rand_like(p) * 0.6 + 0.2)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _input(dtype, channels_last, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(SHAPE, generator=g) + 0.5).to(device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _train_step(m, x, dy):
    x = x.detach().requires_grad_(True)
    y = m(x)
    params = [p for p in m.parameters() if p.requires_grad]
    return (y,) + torch.autograd.grad(y, [x] + params, dy)


@pytest.fixture
def sync_error():
    """Raise on any synchronising CUDA call inside the ``with`` block it returns."""
    class _Mode:
        def __enter__(self):
            torch.cuda.synchronize()
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode(self.previous)
            torch.cuda.synchronize()
    return _Mode()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lid,factory", LAYERS, ids=[lid for lid, _ in LAYERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_step_never_syncs(backend, lid, factory, dtype, channels_last, sync_error):
    m = _module(factory)
    x = _input(dtype, channels_last)
    dy = torch.randn_like(x)
    with normfuse.use_backend(backend):
        for _ in range(2):  # warm-up, unchecked
            _train_step(m.train(), x, dy)
            with torch.no_grad():
                m.eval()(x)
        with sync_error:
            for _ in range(3):
                y, *grads = _train_step(m.train(), x, dy)
                leaf = x.detach().requires_grad_(True)
                (m(leaf).float() * dy.float()).sum().backward()  # .backward() too
            m.eval()
            with torch.no_grad():
                m(x)
            _train_step(m, x, dy)  # eval mode with gradients (running statistics as constants)
    assert all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_never_syncs_under_autocast(backend, sync_error):
    """conv -> layer under autocast: bfloat16 activations, float32 parameters, no cast of the
    parameters and no sync."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), normfuse.BatchInstanceNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), normfuse.IEBN2d(16),
        normfuse.AssocNorm(4, 16)).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()

    with normfuse.use_backend(backend):
        step()
        with sync_error:
            for _ in range(3):
                step()


def test_momentum_none_syncs_like_batchnorm(sync_error):
    """The one documented exception: momentum=None reads the batch count on the host, in
    normfuse as in nn.BatchNorm2d."""
    x = _input(torch.float32, False)
    for m in (torch.nn.BatchNorm2d(16, momentum=None).cuda(),
              normfuse.BatchInstanceNorm2d(16, momentum=None).cuda()):
        m(x)
        with pytest.raises(RuntimeError, match="synchroniz"):
            with sync_error:
                m(x)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lid,factory", LAYERS, ids=[lid for lid, _ in LAYERS])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_graph_replay_matches_eager(backend, lid, factory, channels_last, training):
    m = _module(factory).train(training)
    params = [p for p in m.parameters() if p.requires_grad]
    static_x = _input(torch.float32, channels_last, seed=1).requires_grad_(True)
    static_dy = torch.randn_like(static_x)
    with normfuse.use_backend(backend):
        # Warm up on a side stream (as torch.cuda.graphs' documentation does), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                torch.autograd.grad(m(static_x), [static_x] + params, static_dy)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = m(static_x)
            static_grads = torch.autograd.grad(static_y, [static_x] + params, static_dy)
        torch.cuda.synchronize()

        # The eager reference starts from the state the replay starts from.
        ref = copy.deepcopy(m)
        new_x = _input(torch.float32, channels_last, seed=7)
        new_dy = torch.randn_like(new_x)
        with torch.no_grad():
            static_x.copy_(new_x)
            static_dy.copy_(new_dy)
        graph.replay()
        torch.cuda.synchronize()
        y_ref, *grads_ref = _train_step(ref, new_x, new_dy)

    assert torch.equal(static_y, y_ref), f"{lid}: output differs from eager"
    for k, (g, r) in enumerate(zip(static_grads, grads_ref)):
        assert torch.equal(g, r), f"{lid}: gradient {k} differs from eager"
    for (name, b), (_, r) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, r), f"{lid}: buffer {name} differs from eager"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reduce_overhead_compile_with_a_growing_batch_matches_eager(backend):
    """torch.compile(mode="reduce-overhead") (cudagraph trees) of AssocNorm training steps, the
    batch growing from 8 to 128: the trees warm up eagerly on their own stream with its
    allocations routed to the graph pool, where the persistent zeroed counters
    (csrc/cuda/persistent_counters.cpp, keyed by device and stream; the AssocNorm backward uses
    one per sample) would then be allocated, and grown, unaccounted for: the trees' pool
    checkpoints could hand their memory to graph tensors, leaving the counters non-zero and
    the split reductions silently wrong (a review finding, unverified on a GPU). The trees'
    slow-path asserts report such allocations; the results must match eager."""
    import torch._inductor.config as inductor_config
    m = _module(lambda: normfuse.AssocNorm(4, 16))
    ref = copy.deepcopy(m)
    params = [p for p in m.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]

    def step(module, ps, x, dy):
        x = x.detach().requires_grad_(True)
        y = module(x)
        return (y,) + torch.autograd.grad(y, [x] + ps, dy)

    with normfuse.use_backend(backend), \
            inductor_config.patch({"triton.slow_path_cudagraph_asserts": True}):
        torch._dynamo.reset()
        compiled = torch.compile(m, mode="reduce-overhead")
        for batch in (8, 8, 8, 128, 128, 128, 8):
            g = torch.Generator(device="cpu").manual_seed(batch)
            x = (torch.randn(batch, 16, 6, 5, generator=g) + 0.5).cuda()
            dy = torch.randn(x.shape, generator=g).cuda()
            got = [t.clone() for t in step(compiled, params, x, dy)]
            want = step(ref, ref_params, x, dy)
            for k, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                           msg=f"batch {batch}, output {k}")
    torch._dynamo.reset()
