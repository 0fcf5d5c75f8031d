"""AssocNorm's limits on the Triton backend, through the public module: ``num_groups`` up to 64
runs in the coefficient kernels (the group tile of heuristics.ASSOC_BLOCKS), more runs the
reference coefficient step (the op refuses it, naming the size; docs/architecture.md, "Triton
backend"); the hidden size (``embed_dim``) has no limit (the
kernels walk it in chunks of ``M_CHUNK``), checked past one chunk and not a multiple of it."""
from __future__ import annotations

import pytest
import torch
from tk_common import DEVICE

import normfuse


def _run(groups, channels, embed_dim):
    m = normfuse.AssocNorm(groups, channels, embed_dim=embed_dim).to(DEVICE)
    x = torch.randn(2, channels, 3, device=DEVICE, requires_grad=True)
    with normfuse.use_backend("triton"):
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    return m, x, y, grads


def _assert_matches_torch(m, x, y, grads):
    """``y`` and the gradients of ``y.square().sum()`` are the torch backend's."""
    with normfuse.use_backend("torch"):
        y_ref = m(x)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("groups,channels,embed_dim", [(64, 64, 64), (8, 16, 100)])
def test_assoc_supported_sizes(groups, channels, embed_dim):
    _assert_matches_torch(*_run(groups, channels, embed_dim))


@pytest.mark.parametrize("setting", ["triton", "auto"])
def test_assoc_more_than_64_groups_run_the_reference_coefficient_step(monkeypatch, setting):
    """More groups than the coefficient kernels' tile: the layer runs that O(N * C) step with
    the reference (the streaming passes stay Triton's) instead of raising, also where "auto"
    picks Triton (a GPU without the compiled CUDA ops); the op itself still refuses them."""
    from normfuse import _autograd
    from normfuse.triton_kernels import heuristics
    assert _autograd.TRITON_ASSOC_MAX_GROUPS == heuristics.ASSOC_BLOCKS[-1]
    m = normfuse.AssocNorm(65, 130, embed_dim=8).to(DEVICE)
    with torch.no_grad():
        for p in (m.decoder_mean, m.decoder_var):  # (zero at first: exercise the meta network)
            p.copy_(0.3 * torch.randn(p.shape, device=DEVICE))
    x = torch.randn(2, 130, 3, device=DEVICE, requires_grad=True)
    if setting == "auto":
        monkeypatch.setattr(normfuse.backends, "_auto", lambda x: "triton")
    with normfuse.use_backend(setting):
        assert normfuse.resolve_backend(x) == "triton"
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    _assert_matches_torch(m, x, y, grads)
    mean = torch.randn(2, 130, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"num_groups <= 64, got 65"):
        torch.ops.normfuse_triton.assoc_coefficients(
            mean, mean.abs(), 3, 65, m.encoder.detach(), m.decoder_mean.detach(),
            m.decoder_var.detach(), m.weight.detach(), m.bias.detach(), 1e-5)


@pytest.mark.parametrize("shape,channels_last", [
    ((2**21 + 16, 1024), False),             # N*C >= 2**31 (2M tokens x 1024 features)
    ((2, 3, 2**15 + 1, 2**15), False),       # H*W > 2**30
    ((2**15 + 1, 4, 256, 256), True),        # channels-last N*H*W >= 2**31
    ((1, 2**16, 2**8, 2**7), True),          # channels-last C*H*W >= 2**31
])
def test_sizes_past_32_bit_indexing_are_refused(monkeypatch, shape, channels_last):
    """The Triton kernels index in int32: inputs whose indices would wrap are refused with the
    sizes, before any launch (meta tensors: nothing allocated; the device check is the only
    one they would fail)."""
    from normfuse.triton_kernels import runtime

    monkeypatch.setattr(runtime, "check_device", lambda t, what: None)
    x = torch.empty(shape, dtype=torch.float16, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"past the Triton kernels' 32-bit indexing .* use the "
                                           r"cuda or torch backend"):
        runtime.check_input(x)
    smaller = torch.empty((2, 4, 8, 8), dtype=torch.float16, device="meta")
    assert runtime.check_input(smaller) == (2, 4, 64, False)


def test_auto_passes_triton_by_for_inputs_past_its_indexing(monkeypatch):
    """``auto`` choosing among the GPU backends, with Triton the one available (no compiled
    CUDA ops): an input past the Triton kernels' int32 indexing goes to ``torch`` (which
    resolve_backend reports), a smaller one to ``triton``.  Played on the CPU: the CPU order
    set to Triton's (the interpreter); the big input is allocated but never touched."""
    from normfuse import backends

    if "triton" not in normfuse.available_backends():
        pytest.skip("the triton backend is not available here")
    monkeypatch.setattr(backends, "_AUTO_ORDER_CPU", ("triton",))
    big = torch.empty((2**21 + 16, 1024), dtype=torch.float16)  # N*C >= 2**31
    with normfuse.use_backend("auto"):
        assert normfuse.resolve_backend(big) == "torch"
        assert normfuse.resolve_backend(big[:1024]) == "triton"
