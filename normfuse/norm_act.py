"""Norm + activation modules: a normfuse layer followed by its ``drop`` and ``act`` submodules.

This is the shape of timm's ``BatchNormAct2d``, ``SyncBatchNormAct``, ``GroupNormAct`` and
``GroupNorm1Act`` (``timm.layers.norm_act``): a norm subclass that applies ``drop`` and then
``act`` to its output, so that weights trained with a separate norm and activation load.  Most
timm CNNs use them instead of a norm and a separate activation module (EfficientNet, MobileNet
v2/v3, RegNet, DenseNet, CSPNet, DPN, VoVNet, ResNetV2/BiT, ...). ``normfuse.convert`` turns each
into the module here of the same shape, keeping its ``drop`` and ``act`` modules, so the converted
model computes what the timm one did (up to the layer's own change) and keeps timm's
``state_dict`` keys.

``act`` is any module; ``activation="relu"`` is normfuse's fused ReLU, applied by the layer's own
apply kernel, before ``drop`` and ``act``.  ``convert(..., fuse_relu=True)`` moves an ``act``
that is exactly ``nn.ReLU`` (no hooks, ``drop`` the identity) into ``activation``; its ``act``
becomes ``nn.Identity``.  Other activations (SiLU, Hardswish, ReLU6, LeakyReLU) stay modules.
"""
from __future__ import annotations

from torch import nn
from torch.fx import Proxy

from .distributed import SyncBatchInstanceNorm, SyncInstanceEnhancementBatchNorm
from .modules import (AssocNorm, BatchInstanceNorm2d, ILMNorm, InstanceEnhancementBatchNorm2d,
                      _fx_leaf, _has_hooks)


def plain_identity(module: nn.Module) -> bool:
    """An ``nn.Identity`` (not a subclass) without hooks: calling it or not is the same."""
    return type(module) is nn.Identity and not _has_hooks(module)


def _post_module(name: str, who: str, module) -> nn.Module:
    if module is None:
        return nn.Identity()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: {name} must be an nn.Module or None, got "
                        f"{type(module).__name__}")
    return module


class _NormAct:
    """``act(drop(norm(x)))``.  Takes the layer's own arguments, plus keyword-only ``drop`` and
    ``act`` (modules; None: ``nn.Identity``)."""

    def __init__(self, *args, drop: nn.Module | None = None, act: nn.Module | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        who = type(self).__name__
        self.drop = _post_module("drop", who, drop)
        self.act = _post_module("act", who, act)

    def forward(self, input):
        if isinstance(input, Proxy):  # torch.fx: the whole layer, act included, is one node
            return _fx_leaf(self, input)
        return self.act(self.drop(super().forward(input)))

    def _post_is_identity(self) -> bool:
        """Whether ``drop`` and ``act`` are both plain ``nn.Identity`` without hooks: only then
        is the layer's output its norm's (``fuse_relu`` may fuse a ReLU that follows it)."""
        return plain_identity(self.drop) and plain_identity(self.act)


class BatchInstanceNormAct2d(_NormAct, BatchInstanceNorm2d):
    """``act(drop(BatchInstanceNorm2d(x)))``: what ``convert(..., "bin")`` makes of timm's
    ``BatchNormAct2d``."""


class InstanceEnhancementBatchNormAct2d(_NormAct, InstanceEnhancementBatchNorm2d):
    """``act(drop(InstanceEnhancementBatchNorm2d(x)))``: what ``convert(..., "iebn")`` makes of
    timm's ``BatchNormAct2d``."""


class SyncBatchInstanceNormAct(_NormAct, SyncBatchInstanceNorm):
    """``act(drop(SyncBatchInstanceNorm(x)))``: what ``convert(..., "bin")`` makes of timm's
    ``SyncBatchNormAct``, and ``convert_sync`` of a ``BatchInstanceNormAct2d``."""


class SyncInstanceEnhancementBatchNormAct(_NormAct, SyncInstanceEnhancementBatchNorm):
    """``act(drop(SyncInstanceEnhancementBatchNorm(x)))``: what ``convert(..., "iebn")`` makes
    of timm's ``SyncBatchNormAct``, and ``convert_sync`` of an
    ``InstanceEnhancementBatchNormAct2d``."""


class AssocNormAct(_NormAct, AssocNorm):
    """``act(drop(AssocNorm(x)))``: what ``convert(..., "assoc")`` makes of timm's
    ``GroupNormAct`` / ``GroupNorm1Act``."""


class ILMNormAct(_NormAct, ILMNorm):
    """``act(drop(ILMNorm(x)))``: what ``convert(..., "ilm")`` makes of timm's ``GroupNormAct``
    / ``GroupNorm1Act``."""


# The synchronized form of each batch-statistics norm + act module (convert_sync).
SYNC_OF = {BatchInstanceNormAct2d: SyncBatchInstanceNormAct,
           InstanceEnhancementBatchNormAct2d: SyncInstanceEnhancementBatchNormAct}
