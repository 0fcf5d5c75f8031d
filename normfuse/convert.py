"""``normfuse.convert``: swap the normalization layers of an existing model for ours."""
from __future__ import annotations

import torch
from torch import nn

from .modules import (AssocNorm, BatchInstanceNorm1d, BatchInstanceNorm2d, BatchInstanceNorm3d,
                      InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                      InstanceEnhancementBatchNorm3d)

_BATCH_NORM_TARGETS = {
    "bin": {nn.BatchNorm1d: BatchInstanceNorm1d, nn.BatchNorm2d: BatchInstanceNorm2d,
            nn.BatchNorm3d: BatchInstanceNorm3d},
    "iebn": {nn.BatchNorm1d: InstanceEnhancementBatchNorm1d,
             nn.BatchNorm2d: InstanceEnhancementBatchNorm2d,
             nn.BatchNorm3d: InstanceEnhancementBatchNorm3d},
}
TARGETS = ("bin", "iebn", "assoc")


def _factory(module: nn.Module) -> dict:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _from_batch_norm(bn: nn.modules.batchnorm._BatchNorm, cls, to: str) -> nn.Module:
    kwargs = dict(eps=bn.eps, momentum=bn.momentum, track_running_stats=bn.track_running_stats,
                  **_factory(bn))
    if to == "bin":
        kwargs["affine"] = bn.affine
    new = cls(bn.num_features, **kwargs)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _from_group_norm(gn: nn.GroupNorm) -> AssocNorm:
    new = AssocNorm(gn.num_groups, gn.num_channels, eps=gn.eps, **_factory(gn))
    with torch.no_grad():
        # A fresh AssocNorm's decoder gives omega = 0.5 + B_omega: start from the same function.
        if gn.affine:
            new.weight.copy_(gn.weight - 0.5)
            new.bias.copy_(gn.bias)
        else:
            new.weight.fill_(0.5)
    return new


def _replacement(child: nn.Module, to: str):
    if to == "assoc":
        return _from_group_norm(child) if type(child) is nn.GroupNorm else None
    cls = _BATCH_NORM_TARGETS[to].get(type(child))
    return None if cls is None else _from_batch_norm(child, cls, to)


def convert(module: nn.Module, to: str) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (``to="bin"`` or ``"iebn"``) or ``nn.GroupNorm``
    (``to="assoc"``) in ``module`` by the normfuse layer, in place, and return ``module``.

    Weights, running statistics, ``num_batches_tracked``, device, dtype and train/eval mode
    are carried over.  A converted BIN starts with gates at 1, so it computes exactly what the
    batch norm did; IEBN starts from the paper's gate initialisation (a scale of sigmoid(-1) on
    the batch-norm weight until trained); AssocNorm starts as the same GroupNorm function
    (``B_omega = weight - 0.5`` with zero decoders).  A ``module`` that is itself a norm layer
    is returned converted, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if to not in TARGETS:
        raise ValueError(f"convert: to must be one of {TARGETS}, got {to!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be an nn.Module, got {type(module).__name__}")
    new = _replacement(module, to)
    if new is not None:
        return new.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert(child, to))
    return module
