"""The "torch" backend: the four generic full-size steps in PyTorch ops.

It is the readable reference for the kernels and the path wherever no compiled kernel exists.
Each function takes and returns exactly what the op of the same name in docs/architecture.md
does.  Elementwise PyTorch ops keep the input's memory format, so channels-last stays
channels-last without special cases.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .coefficients import (assoc_coefficients, assoc_coefficients_backward, bin_coefficients,
                           bin_coefficients_backward, iebn_coefficients,
                           iebn_coefficients_backward, ilm_coefficients,
                           ilm_coefficients_backward)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and coefficients are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _planes(t: Tensor, x: Tensor) -> Tensor:
    """View an ``(N, C)`` per-plane tensor so that it broadcasts against ``x``."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def moments(input: Tensor) -> tuple[Tensor, Tensor]:
    x = input.to(acc_dtype(input.dtype))
    if x.dim() == 2:  # one element per plane
        return x.clone(), torch.zeros_like(x)
    dims = tuple(range(2, x.dim()))
    # Shift by one element of each plane before summing: keeps float32 accurate for inputs with
    # a large offset (design section 2), then a second, centred pass for the squares.
    pivot = x
    for d in dims:
        pivot = pivot.narrow(d, 0, 1)
    # 0 where that element is not finite: an Inf pivot would make an Inf plane NaN (Inf - Inf)
    pivot = torch.where(torch.isfinite(pivot), pivot, torch.zeros_like(pivot))
    shifted = x - pivot
    offset = shifted.mean(dims, keepdim=True)
    m2 = (shifted - offset).square().sum(dims)
    return (pivot + offset).reshape(x.shape[:2]), m2


def _pre_activation(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean) * scale + shift`` in the statistics' dtype: the affine map, and the value
    whose sign the fused ReLU's backward recomputes (the same expression, so the same bits)."""
    return (x.to(mean.dtype) - _planes(mean, x)) * _planes(scale, x) + _planes(shift, x)


def relu_masked(dy: Tensor, input: Tensor, mean: Tensor, scale, shift) -> Tensor:
    """``dy`` where the forward's pre-activation is > 0, else 0 (ReLU's derivative, 0 at 0 as
    torch's); ``dy`` itself when ``scale``/``shift`` are None (no fused ReLU)."""
    if scale is None and shift is None:
        return dy
    if scale is None or shift is None:
        raise ValueError("backward: scale and shift (the forward's coefficients, for the fused "
                         "ReLU's mask) must both be given or both be None")
    v = _pre_activation(input, mean, scale, shift)
    return torch.where(v > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))


def affine_apply(input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                 relu: bool = False) -> Tensor:
    y = _pre_activation(input, mean, scale, shift)
    if relu:
        y = torch.relu(y)
    return y.to(input.dtype)


def backward_sums(grad_output: Tensor, input: Tensor, mean: Tensor, scale=None,
                  shift=None) -> tuple[Tensor, Tensor]:
    dy = relu_masked(grad_output.to(mean.dtype), input, mean, scale, shift)
    if dy.dim() == 2:
        return dy.clone(), dy * (input.to(mean.dtype) - mean)
    dims = tuple(range(2, dy.dim()))
    centred = input.to(mean.dtype) - _planes(mean, dy)
    return dy.sum(dims), (dy * centred).sum(dims)


def backward_apply(grad_output: Tensor, input: Tensor, mean: Tensor, c_dy: Tensor, c_x: Tensor,
                   c_0: Tensor, scale=None, shift=None) -> Tensor:
    # Only the direct term is masked: c_x and c_0 carry the gradient through the statistics,
    # which every element of the plane feeds, cut by the ReLU or not.
    dy = relu_masked(grad_output.to(mean.dtype), input, mean, scale, shift)
    centred = input.to(mean.dtype) - _planes(mean, dy)
    dx = _planes(c_dy, dy) * dy + _planes(c_x, dy) * centred + _planes(c_0, dy)
    return dx.to(input.dtype)


__all__ = [
    "moments", "affine_apply", "backward_sums", "backward_apply",
    "bin_coefficients", "bin_coefficients_backward", "iebn_coefficients",
    "iebn_coefficients_backward", "assoc_coefficients", "assoc_coefficients_backward",
    "ilm_coefficients", "ilm_coefficients_backward",
]
