"""timm's norm layers (``timm/layers/norm_act.py`` and ``norm.py``, timm 1.0.31), copied, so
that the conversion of timm models is tested where timm is not installed (it needs
torchvision, whose wheels require a torch of their own release; CI runs tests/test_timm.py
against timm itself, ``.ci/timm.sh``).

The forwards are timm's, verbatim (the ``_fast_norm`` branch, which needs timm's
``set_fast_norm()``, left out).  The constructors take the activation as timm's do, simplified
to an ``nn.Module`` class (timm also takes names, resolved by ``create_act_layer``).  The classes
are registered under timm's module name, since that is how ``normfuse.convert`` recognises them;
``tests/test_timm.py::test_copy_matches_timm`` checks them against timm's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TIMM_MODULE = "timm.layers.norm_act"


def _create_act(act_layer, inplace=True, apply_act=True) -> nn.Module:
    if not apply_act or act_layer is None:
        return nn.Identity()
    try:
        return act_layer(inplace=inplace)
    except TypeError:  # timm: "recover if act layer doesn't have inplace arg"
        return act_layer()


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, inplace=True,
                 drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        assert x.ndim == 4, f'expected 4D input (got {x.ndim}D input)'
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class SyncBatchNormAct(nn.SyncBatchNorm):
    # timm makes these only in its convert_sync_batchnorm, which sets act and drop afterwards.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class GroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, group_size=None,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None, device=None,
                 dtype=None):
        if group_size:
            assert num_channels % group_size == 0
            num_groups = num_channels // group_size
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device,
                         dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class GroupNorm1Act(nn.GroupNorm):
    def __init__(self, num_channels, eps=1e-5, affine=True, apply_act=True, act_layer=nn.ReLU,
                 inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(1, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, inplace=inplace, apply_act=apply_act)

    forward = GroupNormAct.forward  # timm's two forwards are the same code


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, inplace=True,
                 drop_layer=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        x = self.act(self.drop(x))
        return x


class GroupNorm(nn.GroupNorm):  # timm/layers/norm.py
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, **kwargs):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNorm1(nn.GroupNorm):  # timm/layers/norm.py
    def __init__(self, num_channels, **kwargs):
        super().__init__(1, num_channels, **kwargs)

    forward = GroupNorm.forward


for _cls in (BatchNormAct2d, SyncBatchNormAct, GroupNormAct, GroupNorm1Act, FrozenBatchNormAct2d):
    _cls.__module__ = TIMM_MODULE
for _cls in (GroupNorm, GroupNorm1):
    _cls.__module__ = "timm.layers.norm"
