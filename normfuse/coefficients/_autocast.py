"""Coefficient functions run with autocast off.

A layer is no autocast op: its statistics and coefficients are computed in the accumulation
dtype its inputs already have (float32, or float64 for float64 inputs; docs/layers.md,
Precision), whatever autocast region it is called in. The meta networks of AssocNorm and
ILM-Norm are matmuls, which autocast would otherwise run in bfloat16 / float16 (~1e-3 off).
The kernel backends' coefficient ops are custom ops that autocast passes through unchanged;
this covers the PyTorch-ops versions (the "torch" backend, ILM-Norm on every backend, export).
"""
from __future__ import annotations

import functools

import torch


def autocast_off(fn):
    """``fn`` with autocast disabled on the device of its first argument (a tensor), entered
    only where autocast is on: outside autocast (most calls) the context would cost 1-4 us and
    put an autocast region into every exported program. "meta" has no autocast (torch.autocast
    refuses it); is_autocast_enabled(device_type) traces under Dynamo on torch 2.11 and 2.14,
    where is_autocast_available does not on 2.11."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = args[0].device.type
        if device_type == "meta" or not torch.is_autocast_enabled(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper
