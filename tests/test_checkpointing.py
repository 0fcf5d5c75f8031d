"""Activation checkpointing (``torch.utils.checkpoint``, reentrant or not): a normfuse layer
whose forward is recomputed in the backward gives the output and gradients of the plain run, on
every backend, with and without the fused ReLU. Its running statistics and batch counter move as
``nn.BatchNorm2d``'s do under checkpointing: the recompute is a second training forward on the
same batch, so they are updated twice (PyTorch's behaviour for batch norm, which the test pins
too: a change there should be a change here)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

C = 8


def _norm(nf, layer, relu):
    act = "relu" if relu else None
    if layer == "bin":
        return nf.BatchInstanceNorm2d(C, activation=act)
    if layer == "iebn":
        return nf.IEBN2d(C, activation=act)
    if layer == "assoc":
        return nf.AssocNorm(4, C, activation=act)
    if layer == "ilm":
        return nf.ILMNorm(C, num_groups=4, key_group_size=4, activation=act)
    return nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()) if relu else nn.BatchNorm2d(C)


def _models(nf, layer, relu, device):
    norm = _norm(nf, layer, relu)
    with torch.no_grad():  # parameters away from their initial values (a zero decoder hides bugs)
        for p in norm.parameters():
            p.add_(0.2 * torch.randn_like(p))
    plain = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), norm, nn.Conv2d(C, 4, 1)).to(device)
    return plain, copy.deepcopy(plain)


def _buffers(model):
    norm = model[1][0] if isinstance(model[1], nn.Sequential) else model[1]
    return {k: v.clone() for k, v in norm.named_buffers()}


@pytest.mark.parametrize("layer", ["bin", "iebn", "assoc", "ilm", "batchnorm"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_checkpointed_layer_gets_the_plain_gradients(nf, backend, device, layer, reentrant, relu):
    plain, ckpt = _models(nf, layer, relu, device)
    twice = copy.deepcopy(plain)  # two plain training forwards: what the recompute should leave
    x = torch.randn(4, 3, 6, 5, device=device) + 0.5
    y_plain = plain(x)
    y_plain.square().sum().backward()
    x_in = x.clone().requires_grad_(reentrant)  # reentrant checkpointing needs an input with grad
    y_ckpt = ckpt[2](checkpoint(lambda t: ckpt[1](ckpt[0](t)), x_in, use_reentrant=reentrant))
    y_ckpt.square().sum().backward()
    torch.testing.assert_close(y_ckpt, y_plain)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        twice(x)
        twice(x)
    for name, value in _buffers(ckpt).items():  # updated by the forward and by the recompute
        torch.testing.assert_close(value, _buffers(twice)[name], msg=name)
        if name == "num_batches_tracked":
            assert int(value) == 2
