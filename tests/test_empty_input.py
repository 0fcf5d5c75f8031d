"""Inputs without elements, as torch's norms take them: ``nn.BatchNorm`` accepts an empty batch
or spatial extent, ``nn.GroupNorm`` an empty batch (a detection model's heads see zero
proposals).  Each layer is compared with that torch norm run beside it on the same input: the
output (empty, the input's shape and dtype; every input layout is tried, though the strides of
an empty tensor mean nothing), the gradients (an empty input gradient,
zero parameter gradients rather than None) and the buffers (running statistics untouched,
``num_batches_tracked`` counted as ``nn.BatchNorm`` counts it).  ``docs/errors.md`` says so.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oracles import dtype_supported

BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BATCH_SHAPES = [(0, 4), (0, 4, 5), (0, 4, 2, 3), (3, 4, 0, 3), (2, 4, 3, 0, 2), (0, 4, 0)]
GROUP_SHAPES = [(0, 4, 5), (0, 4, 2, 3), (0, 4, 1, 2, 2)]


def _batch_layer(nf, kind: str, rank: int, **kwargs):
    names = {"bin": "BatchInstanceNorm", "iebn": "InstanceEnhancementBatchNorm"}
    dims = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[rank]
    return getattr(nf, names[kind] + dims)(4, **kwargs)


def _input(shape, dtype, channels_last: bool, device) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype, device=device)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    return x.requires_grad_()


def _run(module, x):
    y = module(x)
    y.sum().backward()
    return y


def _check_like_torch(layer, torch_norm, x, dtype):
    """``layer`` and ``torch_norm`` on (copies of) ``x``: same output properties, gradients and
    buffer changes."""
    x_ref = x.detach().clone().requires_grad_()
    before = {name: b.clone() for name, b in layer.named_buffers()}
    y = _run(layer, x)
    _run(torch_norm, x_ref)
    assert y.shape == x.shape and y.dtype == dtype and y.numel() == 0
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient (DistributedDataParallel wants one)"
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    for name, p in torch_norm.named_parameters():  # the control: what torch gives
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    for name in ("running_mean", "running_var"):
        if before.get(name) is not None:
            assert torch.equal(getattr(layer, name), before[name]), f"{name} changed"
    if "num_batches_tracked" in before:
        assert torch.equal(layer.num_batches_tracked, torch_norm.num_batches_tracked)


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["train", "eval", "untracked", "relu"])
def test_batch_layers_take_an_empty_input_like_batch_norm(nf, backend, device, kind, shape,
                                                          mode):
    rank = len(shape)
    kwargs = {"track_running_stats": mode != "untracked"}
    layer = _batch_layer(nf, kind, rank, activation="relu" if mode == "relu" else None,
                         **kwargs).to(device)
    torch_norm = BATCH_NORMS[rank](4, **kwargs).to(device)
    if mode == "eval":
        layer.eval(), torch_norm.eval()
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in ((False, True) if rank >= 4 else (False,)):
            x = _input(shape, dtype, channels_last, device)
            _check_like_torch(layer.to(dtype), torch_norm.to(dtype), x, dtype)
            layer.zero_grad(), torch_norm.zero_grad()


@pytest.mark.parametrize("kind", ["assoc", "ilm"])
@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=str)
def test_group_layers_take_an_empty_batch_like_group_norm(nf, backend, device, kind, shape):
    for relu in (False, True):
        activation = "relu" if relu else None
        layer = (nf.AssocNorm(2, 4, activation=activation) if kind == "assoc"
                 else nf.ILMNorm(4, num_groups=2, key_group_size=2, activation=activation)
                 ).to(device)
        for dtype in (torch.float32, torch.float64):
            if not dtype_supported(device, dtype):  # the GPU backends refuse float64, empty too
                continue
            for channels_last in ((False, True) if len(shape) >= 4 else (False,)):
                x = _input(shape, dtype, channels_last, device)
                _check_like_torch(layer.to(dtype), nn.GroupNorm(2, 4).to(device, dtype), x,
                                  dtype)
                layer.zero_grad()


def test_group_layers_refuse_an_empty_sample(nf):
    """A sample without elements has no group statistics: refused (as nn.GroupNorm refuses it
    on the pinned torch; torch 2.11's returned an empty output)."""
    for layer in (nf.AssocNorm(2, 4), nf.ILMNorm(4, num_groups=2, key_group_size=2)):
        with pytest.raises(ValueError, match=f"{type(layer).__name__}: input must have at least "
                                             r"one element per sample .* \(2, 4, 0\)"):
            layer(torch.randn(2, 4, 0))


def test_functional_forms_take_an_empty_input(nf, backend, device):
    """The functional forms: an empty output, the running statistics untouched in training."""
    F = nf.functional
    x = torch.randn(0, 4, 3, 2, device=device, requires_grad=True)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    want = (rm.clone(), rv.clone())
    params = [torch.randn(4, device=device, requires_grad=True) for _ in range(4)]
    outs = [F.batch_instance_norm(x, rm, rv, params[0], params[1], params[2], training=True),
            F.instance_enhancement_batch_norm(x, rm, rv, *params, training=True),
            F.assoc_norm(x, 2, *(torch.randn(shape, device=device)
                                 for shape in ((1, 2), (2, 1), (2, 1))), params[0], params[1])]
    for y in outs:
        assert y.shape == x.shape and y.dtype == x.dtype
    sum(y.sum() for y in outs).backward()
    assert torch.equal(rm, want[0]) and torch.equal(rv, want[1])
    for p in params:
        assert torch.equal(p.grad, torch.zeros(4, device=device))


def test_empty_input_with_an_unusable_backend_still_raises(nf):
    """An explicit backend that cannot run on the input's device says so for an empty input too
    (no silent fallback)."""
    m = nf.BatchInstanceNorm2d(4).to("meta")
    with nf.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' cannot run"):
        m(torch.empty(0, 4, 2, 2, device="meta"))
