"""The single-read layer directions (issue 14; csrc/kernels/single_read.cuh, glue in
csrc/cuda/layer_directions_cuda.cpp): a channels-last BIN / IEBN layer's forward and backward each
as ONE cooperative launch when its blocks fit on the GPU, switched by NORMFUSE_SINGLE_READ /
normfuse._C.single_read ("0", the default, or "auto").

On a GPU: whole modules (train and eval, ReLU fused or not, float32 / bfloat16 / float16) give
the same outputs, input and parameter gradients, running statistics and batch counter with the
single read as without (to rounding: it sums in another order), and the launch counter shows it
was taken for both directions; an input it does not take (contiguous, or too large to fit) runs
the generic launches; a step runs without host-device synchronisation, and replays in a CUDA
graph with eager's results. Without a GPU only the mode switch is tested here; the kernels
themselves run on the CPU through the shim (tests/csrc/test_single_read_shim.py).
"""
from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse import _extension as ext

pytestmark = pytest.mark.skipif(not ext.HAS_CUDA_KERNELS, reason="normfuse._C built without CUDA kernels")
C_ = ext._C
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_mode_switch():
    previous = C_.single_read()
    try:
        assert C_.single_read("auto") == previous
        assert C_.single_read() == "auto" and C_.single_read(None) == "auto"
        assert C_.single_read("0") == "auto" and C_.single_read() == "0"
        with pytest.raises(ValueError, match="'0', 'auto'"):
            C_.single_read("1")
        with pytest.raises(TypeError):
            C_.single_read(1)
        assert C_.single_read() == "0"  # a refused mode changes nothing
        assert isinstance(C_.single_read_launches(), int)
    finally:
        C_.single_read(previous)


def _module(kind, C, relu, device):
    torch.manual_seed(0)
    cls = normfuse.BatchInstanceNorm2d if kind == "bin" else normfuse.IEBN2d
    m = cls(C, activation="relu" if relu else None).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _step(m, x, dy, train):
    m.train(train)
    x = x.detach().requires_grad_(True)
    with normfuse.use_backend("cuda"):
        y = m(x)
        grads = torch.autograd.grad(y, [x] + list(m.parameters()), dy)
    return y.detach(), grads


def _with_mode(mode, fn):
    previous = C_.single_read(mode)
    try:
        return fn()
    finally:
        C_.single_read(previous)


def _dy_off_the_kink(kind, C, train, x, dy, band=1e-3):
    """``dy``, zero where the layer's pre-activation v is within ``band`` of 0 (as
    tests/test_activation.py does). The two paths sum in another order, so their v differ by
    rounding and an element with v ~ 0 may be masked by one path and not the other: with dy there
    its own dx and the masked sums of its channel would differ by O(dy), not by rounding. v comes
    from the same module without the ReLU (same parameters and state) on the generic path."""
    lin = _module(kind, C, False, "cuda").train(train)
    with torch.no_grad(), normfuse.use_backend("cuda"):
        v = _with_mode("0", lambda: lin(x))
    # masked_fill returns a contiguous tensor: back to dy's (channels-last) layout
    return dy.masked_fill(v.abs() < band, 0).contiguous(memory_format=torch.channels_last)


@GPU
@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(8, 64, 14, 14), (3, 40, 9, 11), (2, 16, 96, 96)])
def test_cuda_single_read_equals_generic(kind, dtype, relu, train, shape):
    N, C, H, W = shape
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 1.5 + torch.arange(C).view(1, C, 1, 1) * 0.1).to("cuda", dtype)
    x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to("cuda", dtype).to(memory_format=torch.channels_last)
    if relu:
        dy = _dy_off_the_kink(kind, C, train, x, dy)
    ref_m, sr_m = _module(kind, C, relu, "cuda"), _module(kind, C, relu, "cuda")
    ref = _with_mode("0", lambda: _step(ref_m, x, dy, train))
    before = C_.single_read_launches()
    got = _with_mode("auto", lambda: _step(sr_m, x, dy, train))
    torch.cuda.synchronize()
    assert C_.single_read_launches() - before == 2, "the single read was not taken for both directions"
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=tol, atol=tol)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(sr_m.running_mean, ref_m.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sr_m.running_var, ref_m.running_var, rtol=1e-4, atol=1e-5)
    assert int(sr_m.num_batches_tracked) == int(ref_m.num_batches_tracked) == (1 if train else 0)


@GPU
def test_cuda_not_taken_where_it_does_not_apply():
    contiguous = torch.randn(4, 64, 8, 8, device="cuda")
    too_large = torch.randn(64, 256, 56, 56, device="cuda").to(memory_format=torch.channels_last)  # 205 MB
    for x in (contiguous, too_large):
        m = _module("bin", x.shape[1], True, "cuda")
        before = C_.single_read_launches()
        _with_mode("auto", lambda: _step(m, x, torch.randn_like(x), True))
        torch.cuda.synchronize()
        assert C_.single_read_launches() == before


@GPU
def test_cuda_no_sync_and_graph_replay():
    m = _module("iebn", 32, True, "cuda")
    x = torch.randn(8, 32, 16, 16, device="cuda").to(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn_like(x)
    params = [x] + list(m.parameters())

    def step():
        with normfuse.use_backend("cuda"):
            return torch.autograd.grad(m(x), params, dy)

    previous = C_.single_read("auto")
    try:
        step()  # warm: kernels loaded, occupancy cached
        sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
        m.eval()  # no running-statistics update, so replays are comparable
        eager = step()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        before = C_.single_read_launches()
        with torch.cuda.graph(graph):
            captured = step()
        assert C_.single_read_launches() - before == 2
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            torch.testing.assert_close(a, b)
    finally:
        C_.single_read(previous)


@GPU
def test_cuda_forward_single_read_generic_backward():
    """ResNet-50's 64x256x14x14 in bf16: the forward fits (192 blocks on a 132-SM GPU), the
    backward, holding dy and x, does not (320): the generic backward takes the forward's
    coefficients and its ReLU mask from the single-read forward."""
    shape = (64, 256, 14, 14)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    dy = _dy_off_the_kink("iebn", 256, True, x, dy)
    ref_m, sr_m = _module("iebn", 256, True, "cuda"), _module("iebn", 256, True, "cuda")
    ref = _with_mode("0", lambda: _step(ref_m, x, dy, True))
    before = C_.single_read_launches()
    got = _with_mode("auto", lambda: _step(sr_m, x, dy, True))
    torch.cuda.synchronize()
    taken = C_.single_read_launches() - before
    assert taken >= 1, "the forward did not take the single read"
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()))
