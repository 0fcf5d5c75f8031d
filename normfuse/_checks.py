"""Input validation shared by the functional API and the modules.

Every check runs before anything is computed or mutated, so a call that raises leaves running
statistics and ``num_batches_tracked`` as they were.  Messages name the argument and what was
expected.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RANK_SHAPES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def check_input(input, who: str, ranks=(2, 3, 4, 5)) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{who}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.layout != torch.strided:
        raise ValueError(f"{who}: input must be a dense (strided) tensor, got layout "
                         f"{input.layout}")
    if input.dtype not in FLOATING:
        raise ValueError(f"{who}: input must be float16, bfloat16, float32 or float64, got "
                         f"{input.dtype}")
    if input.dim() not in ranks:
        expected = " or ".join(f"{r}-d {_RANK_SHAPES[r]}" for r in ranks)
        raise ValueError(f"{who}: expected input of rank {expected}, got a {input.dim()}-d "
                         f"input of shape {tuple(input.shape)}")
    if input.numel() == 0:
        raise ValueError(f"{who}: input must not be empty, got shape {tuple(input.shape)}")


def check_channels(input: Tensor, expected: int, who: str, what: str = "num_features") -> None:
    if input.shape[1] != expected:
        raise ValueError(f"{who}: expected input with {expected} channels ({what}) in dim 1, "
                         f"got {input.shape[1]} (input shape {tuple(input.shape)})")


def check_tensor(t, name: str, shape: tuple, input: Tensor, who: str,
                 optional: bool = False) -> None:
    """A parameter or buffer: a floating tensor of ``shape`` on the input's device."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{who}: {name} must be a tensor of shape {shape}, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"{who}: {name} must be on the input's device {input.device}, got "
                         f"{t.device}")
    if t.dtype not in FLOATING:
        raise ValueError(f"{who}: {name} must be a floating-point tensor (float16, bfloat16, "
                         f"float32 or float64), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {tuple(shape)}, got "
                         f"{tuple(t.shape)}")


def check_running_stats(running_mean, running_var, channels: int, input: Tensor,
                        who: str) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: running_mean and running_var must both be tensors or both be "
                         f"None")
    check_tensor(running_mean, "running_mean", (channels,), input, who, optional=True)
    check_tensor(running_var, "running_var", (channels,), input, who, optional=True)


def check_batch_values(input: Tensor, who: str, training: bool = True) -> None:
    """Batch statistics need more than one value per channel (as ``nn.BatchNorm`` says)."""
    per_channel = input.shape[0] * math.prod(input.shape[2:])
    if per_channel <= 1:
        when = "training" if training else "eval mode without running statistics"
        raise ValueError(f"{who}: expected more than 1 value per channel when using batch "
                         f"statistics ({when}), got input of shape {tuple(input.shape)}")


def check_number(value, name: str, who: str, low: float = 0.0, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{who}: {name} must be >= {low}, got {value!r}")


def check_batch_counter(t, input: Tensor, who: str) -> None:
    """A module's ``num_batches_tracked`` (None: not counted): the 0-dim int64 tensor that the
    layer's coefficient op increments in place, on the input's device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: num_batches_tracked must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    if t.dtype != torch.int64 or t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{who}: num_batches_tracked must be a 0-dim int64 tensor, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{who}: num_batches_tracked must be on the input's device "
                         f"{input.device}, got {t.device}")


def check_group_values(input: Tensor, who: str, channels_per_group: int, group: str,
                       setting: str) -> None:
    """ILM-Norm's unbiased group variances need more than one value per group (the authors'
    layer returns NaN there).  ``group``: "group" or "key group"; ``setting``: what fixed the
    group's channel count, e.g. ``num_groups=4``."""
    per_group = channels_per_group * math.prod(input.shape[2:])
    if per_group <= 1:
        raise ValueError(f"{who}: expected more than 1 value per {group} for the unbiased "
                         f"variance, got input of shape {tuple(input.shape)} with {setting} "
                         f"(1 channel per {group}, 1 value per channel)")
