"""What a layer keeps for its backward: the input itself (no copy) and O(N*C) statistics, the
README's promise ("Only the input and O(N*C) statistics are saved for backward") and half of
the project's point (the authors' compositions keep several full-size tensors).

Every tensor autograd saves passes through ``saved_tensors_hooks``' pack hook, whichever
carrier runs the layer (the Python autograd.Function, or the whole-layer op's C++ node), so the
hook sees all of it: exactly one saved tensor may have the input's size, and it must be the
input's own storage; the rest together must stay far below one input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

N, C, H, W = 4, 6, 8, 8


def _saved_by(fn, x):
    """The tensors autograd saves while ``fn(x)`` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, saved


def _full_size(saved, x):
    return [t for t in saved if t.numel() >= x.numel()]


def _layers(nf, relu):
    act = "relu" if relu else None
    return {"bin": nf.BatchInstanceNorm2d(C, activation=act),
            "iebn": nf.InstanceEnhancementBatchNorm2d(C, activation=act),
            "assoc": nf.AssocNorm(3, C, activation=act),
            "ilm": nf.ILMNorm(C, num_groups=3, key_group_size=2, activation=act)}


@pytest.mark.parametrize("layer", ["bin", "iebn", "assoc", "ilm"])
@pytest.mark.parametrize("mode", ["train", "eval", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_only_the_input_and_statistics_are_saved(nf, backend, device, layer, mode, layout):
    m = _layers(nf, mode == "relu")[layer].to(device).train(mode != "eval")
    x = torch.randn(N, C, H, W, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y, saved = _saved_by(m, x)
    full = _full_size(saved, x)
    assert len(full) == 1, f"{len(full)} full-size tensors saved: {[t.shape for t in full]}"
    assert full[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), \
        "the saved full-size tensor is a copy, not the input"
    small = sum(t.numel() for t in saved if t is not full[0])
    params = sum(p.numel() for p in m.parameters())
    # the moments (and with the fused ReLU the scale and shift: 4 (N, C) tensors at most), the
    # parameters, in eval mode the running statistics
    assert small <= 4 * N * C + params + 2 * C, f"{small} elements of statistics saved"
    y.backward(torch.randn_like(y))  # what was saved is enough for the backward
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["train", "eval", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_bin_on_one_value_per_plane_saves_channel_statistics(nf, backend, device, mode, affine):
    """A 2-d (N, C) input (the heads `convert` makes of nn.BatchNorm1d): each plane holds one
    value, so BIN's instance half is 0 and it runs as batch norm with weight gamma * rho on x
    viewed as one sample (the whole-layer op: csrc/layer_directions.cpp, bin_as_one_sample;
    NormFunction's callers: normfuse/_autograd.py, _bin_as_one_sample): besides x it saves (1, C)
    statistics and the parameters, as batch norm does, not (N, C) ones (as large as x here)."""
    if backend == "torch":
        pytest.skip("the torch backend, the reference composition, runs the general path")
    n, c = 64, 6
    m = nf.BatchInstanceNorm1d(c, affine=affine, activation="relu" if mode == "relu" else None)
    m = m.to(device).train(mode != "eval")
    x = torch.randn(n, c, device=device, requires_grad=True)
    y, saved = _saved_by(m, x)
    rest = [t for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert len(rest) == len(saved) - 1, "x itself is saved once"
    params = sum(p.numel() for p in m.parameters())
    # mean and m2 (and with the fused ReLU scale and shift): 4 (1, C) tensors at most, the
    # parameters, in eval mode the running statistics
    small = sum(t.numel() for t in rest)
    assert small <= 4 * c + params + 2 * c, f"{[tuple(t.shape) for t in rest]} saved"
    y.backward(torch.randn_like(y))
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["train", "eval", "relu"])
def test_iebn_on_one_value_per_plane_saves_channel_statistics(nf, backend, device, mode):
    """IEBN on a 2-d (N, C) input on the cpu backend (csrc/layer_directions.cpp, iebn_pointwise):
    computed elementwise from per-channel statistics, it saves x, the mean and rstd (C,) and the
    parameters, not the general path's (N, C) statistics (as large as x here); with the fused ReLU
    no mask (the backward recomputes it)."""
    if backend != "cpu" or device != "cpu":
        pytest.skip("the elementwise path is the cpu backend's whole-layer op")
    n, c = 64, 6
    m = nf.InstanceEnhancementBatchNorm1d(c, activation="relu" if mode == "relu" else None)
    m = m.to(device).train(mode != "eval")
    x = torch.randn(n, c, device=device, requires_grad=True)
    y, saved = _saved_by(m, x)
    rest = [t for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert len(rest) == len(saved) - 1, "x itself is saved once"
    assert all(t.numel() <= c for t in rest), f"{[tuple(t.shape) for t in rest]} saved"
    y.backward(torch.randn_like(y))
    assert x.grad is not None and x.grad.shape == x.shape


def test_the_check_sees_a_composition_save_more():
    """The control: the authors' way (batch norm and instance norm as separate ops, mixed)
    keeps several full-size tensors, which the same hook counts."""
    x = torch.randn(N, C, H, W, requires_grad=True)
    gate = torch.rand(C).view(1, C, 1, 1)

    def composition(x):
        xb = F.batch_norm(x, None, None, training=True)
        xi = F.instance_norm(x)
        return gate * xb + (1 - gate) * xi

    _, saved = _saved_by(composition, x)
    assert len(_full_size(saved, x)) >= 2
