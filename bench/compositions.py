"""The baselines a user would write: BIN, IEBN, AssocNorm and ILM-Norm as plain PyTorch
compositions.

These follow the papers' formulas (``../shared/design.md`` section 1) op by op, the way the
authors' published code does it (BIN: Nam & Kim's ``_BatchInstanceNorm``, a batch-norm call plus
an instance norm done as ``batch_norm`` on an ``(1, N*C, H, W)`` view; IEBN: Liang et al.'s
``IEBN`` module, batch norm plus a sigmoid gate computed from the average pool; AssocNorm has no
published code, so it is written the obvious way from the paper's text; ILM-Norm: Jia et al.'s
``ilm_gn`` module, a meta network of ``nn.Sequential`` blocks on key-group statistics, then a
GroupNorm written out with ``mean`` / ``var``).  They are what normfuse is measured against, so
they are deliberately *not* optimized: every intermediate is a separate tensor and autograd saves
what it saves.

Parameter and buffer names match the normfuse modules where the API allows it (BIN, AssocNorm);
IEBN keeps the authors' ``weight_readjust`` / ``bias_readjust`` of shape ``(1, C, 1, 1)``, and
ILM-Norm the authors' submodules and names (``fc_embed``, ``fc_weight``, ``fc_bias``,
``weight_bias``, ``bias_bias``).  ``load_params_from`` copies the values of a normfuse module into
a composition so both compute the same function on the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bc(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) broadcasting over an input of rank ``ndim``."""
    return p.view(1, -1, *([1] * (ndim - 2)))


class BatchInstanceNormComposition(nn.BatchNorm2d):
    """Batch-Instance Normalization as in the authors' code (batch norm + instance norm, mixed)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.gate = nn.Parameter(torch.ones(num_features))

    def _check_input_dim(self, input):
        if input.dim() < 3:
            raise ValueError(f"expected an (N, C, *) input with spatial dims, got {input.dim()}-d")

    def forward(self, input):
        self._check_input_dim(input)
        nd = input.dim()
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        # batch-norm part, weighted by rho
        bn_w = self.weight * self.gate if self.affine else self.gate
        out_bn = F.batch_norm(
            input, self.running_mean, self.running_var, bn_w, self.bias,
            self.training or not self.track_running_stats, self.momentum, self.eps)
        # instance-norm part, weighted by (1 - rho): batch norm over a (1, N*C, *S) view
        n, c = input.shape[:2]
        in_w = self.weight * (1 - self.gate) if self.affine else 1 - self.gate
        flat = input.reshape(1, n * c, *input.shape[2:])
        out_in = F.batch_norm(flat, None, None, None, None, True, self.momentum, self.eps)
        out_in = out_in.view(n, c, *input.shape[2:])
        out_in = out_in * _bc(in_w, nd)
        return out_bn + out_in


class InstanceEnhancementBatchNormComposition(nn.BatchNorm2d):
    """IEBN as in the authors' code: batch norm rescaled by a per-sample sigmoid gate."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, track_running_stats=True):
        super().__init__(num_features, eps, momentum, True, track_running_stats)
        self.weight_readjust = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.bias_readjust = nn.Parameter(torch.full((1, num_features, 1, 1), -1.0))

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected a 4-d input, got {input.dim()}-d")

    def forward(self, input):
        self._check_input_dim(input)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        attention = torch.sigmoid(
            F.adaptive_avg_pool2d(input, 1) * self.weight_readjust + self.bias_readjust)
        out_bn = F.batch_norm(
            input, self.running_mean, self.running_var, None, None,
            self.training or not self.track_running_stats, self.momentum, self.eps)
        return out_bn * (_bc(self.weight, 4) * attention) + _bc(self.bias, 4)


class AssocNormComposition(nn.Module):
    """Associate Normalization written from the paper: GroupNorm standardization whose
    per-sample scale and shift come from an auto-encoder on the group means and variances."""

    def __init__(self, num_groups, num_channels, embed_dim=None, eps=1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError("num_channels must be divisible by num_groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        m = embed_dim or max(1, num_groups // 2)
        self.encoder = nn.Parameter(torch.randn(m, num_groups) / num_groups ** 0.5)
        self.decoder_mean = nn.Parameter(torch.randn(num_groups, m) / m ** 0.5)
        self.decoder_var = nn.Parameter(torch.randn(num_groups, m) / m ** 0.5)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, input):
        n, c = input.shape[:2]
        g = self.num_groups
        xg = input.reshape(n, g, -1)
        mu = xg.mean(dim=2)
        var = xg.var(dim=2, unbiased=False)
        xhat = ((xg - mu.unsqueeze(-1)) / torch.sqrt(var.unsqueeze(-1) + self.eps)).view_as(input)
        d_mu = torch.sigmoid(F.linear(F.relu(F.linear(mu, self.encoder)), self.decoder_mean))
        d_v = torch.tanh(F.linear(F.relu(F.linear(var, self.encoder)), self.decoder_var))
        per_group = c // g
        omega = d_mu.repeat_interleave(per_group, dim=1) + self.weight
        beta = d_v.repeat_interleave(per_group, dim=1) + self.bias
        shape = (n, c) + (1,) * (input.dim() - 2)
        return xhat * omega.view(shape) + beta.view(shape)


class ILMNormComposition(nn.Module):
    """ILM-Norm as in the authors' ``ilm_gn`` (Gasoonjia/ILM-Norm, ``lib/nn/ilm_gn.py``): their
    submodules and parameters (one embedding layer shared by the weight and bias branches,
    ``nn.Linear`` without bias, ``weight_bias`` / ``bias_bias`` of shape ``(1, C, 1, 1)``) and
    their forward: mean and unbiased variance (``torch.var``'s default) of each key group of
    ``key_group_size`` channels into the meta network, its outputs repeated over the key group's
    channels, then GroupNorm written out with the unbiased variance.  ``reshape`` where theirs
    has ``view``, so that channels-last inputs run (theirs raises on them)."""

    # normfuse.ILMNorm's parameter names -> these (load_params_from)
    RENAMES = {"encoder": "fc_embed.0.weight", "decoder_weight": "fc_weight.1.weight",
               "decoder_bias": "fc_bias.1.weight", "weight": "weight_bias",
               "bias": "bias_bias"}

    def __init__(self, num_channels, num_groups=32, key_group_size=16, reduction=16, eps=1e-5):
        super().__init__()
        if num_channels % num_groups or num_channels % key_group_size:
            raise ValueError("num_channels must be divisible by num_groups and key_group_size")
        self.num_groups, self.key_group_size, self.eps = num_groups, key_group_size, eps
        self.key_groups = keys = num_channels // key_group_size
        embed = keys // reduction if keys >= reduction else 2  # the authors' rule
        self.fc_embed = nn.Sequential(nn.Linear(keys, embed, bias=False), nn.ReLU(inplace=True))
        self.fc_weight = nn.Sequential(self.fc_embed, nn.Linear(embed, keys, bias=False),
                                       nn.Sigmoid())
        self.weight_bias = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.fc_bias = nn.Sequential(self.fc_embed, nn.Linear(embed, keys, bias=False),
                                     nn.Tanh())
        self.bias_bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, input):
        n, c = input.shape[:2]
        k = self.key_groups
        shape = (n, c) + (1,) * (input.dim() - 2)
        # the meta network on the key groups' statistics: weight from the variances (sigmoid),
        # bias from the means (tanh), each repeated over its key group's channels
        xk = input.reshape(n, k, 1, -1)
        key_mean = xk.mean(-1, keepdim=True)
        key_var = xk.var(-1, keepdim=True)
        weight = self.fc_weight(key_var.view(n, k)).view(n, k, 1)
        weight = weight.repeat(1, 1, self.key_group_size).view(shape)
        weight = weight + self.weight_bias.view(1, c, *shape[2:])
        bias = self.fc_bias(key_mean.view(n, k)).view(n, k, 1)
        bias = bias.repeat(1, 1, self.key_group_size).view(shape)
        bias = bias + self.bias_bias.view(1, c, *shape[2:])
        # GroupNorm with the unbiased variance
        xg = input.reshape(n, self.num_groups, 1, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, keepdim=True)
        xhat = ((xg - mean) / (var + self.eps).sqrt()).view(input.shape)
        return xhat * weight + bias


# normfuse name -> composition name, where they differ (a composition's own RENAMES, if it has
# one, replaces these)
_RENAMES = {"gate_weight": "weight_readjust", "gate_bias": "bias_readjust"}


@torch.no_grad()
def load_params_from(composition: nn.Module, source: nn.Module) -> nn.Module:
    """Copy the parameters and buffers of a normfuse module (``source``) into ``composition``."""
    src = dict(source.state_dict())
    dst = composition.state_dict()
    renames = getattr(composition, "RENAMES", _RENAMES)
    for name, value in src.items():
        target = dst.get(renames.get(name, name))
        if target is None:
            continue
        if target.numel() != value.numel():
            raise ValueError(f"cannot copy {name}: {tuple(value.shape)} -> {tuple(target.shape)}")
        target.copy_(value.reshape(target.shape))
    return composition
