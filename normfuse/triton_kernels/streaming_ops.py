"""The four full-size passes as ``triton_op``s: ``torch.ops.normfuse_triton.{moments,
affine_apply, backward_sums, backward_apply}`` (docs/architecture.md).  Each op validates its
inputs, allocates outputs (and O(N*C) workspaces), asks ``heuristics`` for a launch configuration
and launches exactly one kernel through ``wrap_triton``, so that ``torch.compile`` traces into
the kernels.  Schemas are inferred from the annotations (see ops.py)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from . import heuristics
from . import runtime as rt
from .runtime import (NAMESPACE, OptTensor, acc_dtype, check_input, check_pair, kernels, launcher,
                      stats_tensor)


def _relu_coefficients(op: str, scale: OptTensor, shift: OptTensor, input: Tensor, shape, acc,
                       mean: Tensor) -> tuple[bool, Tensor, Tensor]:
    """``(mask, scale, shift)`` of a backward op: the fused ReLU's mask is on when the forward's
    coefficients are given (both or neither, ``(N, C)`` in the acc dtype, on the input's device);
    else ``mean`` stands in for the two unused kernel pointers (``runtime.absent``)."""
    if (scale is None) != (shift is None):
        raise RuntimeError(f"normfuse_triton.{op}: scale and shift (the forward's coefficients, "
                           f"for the fused ReLU's mask) must both be given or both be None, got "
                           f"{'scale' if shift is None else 'shift'} only")
    if scale is None:
        traced = rt.tracing(input)
        return False, rt.absent(mean, traced), rt.absent(mean, traced)
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t.device != input.device:
            raise RuntimeError(f"normfuse_triton.{op}: {name} is on {t.device}, input on "
                               f"{input.device}")
    return (True, stats_tensor(scale, shape, acc, "scale", input.device),
            stats_tensor(shift, shape, acc, "shift", input.device))


@triton_op(f"{NAMESPACE}::moments", mutates_args=())
def moments(input: Tensor) -> tuple[Tensor, Tensor]:
    n, c, plane, cl = check_input(input)
    acc = acc_dtype(input.dtype)
    mean = input.new_empty((n, c), dtype=acc)
    m2 = input.new_empty((n, c), dtype=acc)
    if n * c == 0 or plane == 0:
        return mean.fill_(float("nan")), m2.zero_()
    cfg, c_blocks, keep, splits, chunk, part, counter = rt.split_reduction(input, n, c, plane, cl,
                                                                           mean)
    launcher(kernels().moments, input)[(keep, splits)](
        input, mean, m2, part, counter, c, plane, n * c, c_blocks, chunk // cfg.block_l, splits,
        **rt.stream_meta(cfg))
    return mean, m2


@triton_op(f"{NAMESPACE}::affine_apply", mutates_args=())
def affine_apply(input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                 relu: bool = False) -> Tensor:
    n, c, plane, cl = check_input(input)
    acc = acc_dtype(input.dtype)
    mean, scale, shift = (stats_tensor(t, (n, c), acc, name, input.device) for t, name in
                          ((mean, "mean"), (scale, "scale"), (shift, "shift")))
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    cfg = heuristics.stream_config(c, plane, cl)
    rows, l_blocks, grid = rt.stream_grid(n, c, plane, cfg)
    launcher(kernels().affine_apply, input)[grid](
        input, out, mean, scale, shift, c, plane, n * c, rows, l_blocks, RELU=relu,
        **rt.stream_meta(cfg))
    return out


@triton_op(f"{NAMESPACE}::backward_sums", mutates_args=())
def backward_sums(grad_output: Tensor, input: Tensor, mean: Tensor, scale: OptTensor = None,
                  shift: OptTensor = None) -> tuple[Tensor, Tensor]:
    n, c, plane, cl = check_pair(grad_output, input)
    acc = acc_dtype(input.dtype)
    mean = stats_tensor(mean, (n, c), acc, "mean", input.device)
    mask, scale, shift = _relu_coefficients("backward_sums", scale, shift, input, (n, c), acc,
                                            mean)
    g1 = mean.new_empty((n, c))
    g2 = mean.new_empty((n, c))
    if n * c == 0 or plane == 0:
        return g1.zero_(), g2.zero_()
    cfg, c_blocks, keep, splits, chunk, part, counter = rt.split_reduction(input, n, c, plane, cl,
                                                                           g1)
    launcher(kernels().backward_sums, input)[(keep, splits)](
        grad_output, input, mean, scale, shift, g1, g2, part, counter, c, plane, n * c, c_blocks,
        chunk // cfg.block_l, splits, MASK=mask, **rt.stream_meta(cfg))
    return g1, g2


@triton_op(f"{NAMESPACE}::backward_apply", mutates_args=())
def backward_apply(grad_output: Tensor, input: Tensor, mean: Tensor, c_dy: Tensor, c_x: Tensor,
                   c_0: Tensor, scale: OptTensor = None,
                   shift: OptTensor = None) -> Tensor:
    n, c, plane, cl = check_pair(grad_output, input)
    acc = acc_dtype(input.dtype)
    mean, c_dy, c_x, c_0 = (stats_tensor(t, (n, c), acc, name, input.device) for t, name in
                            ((mean, "mean"), (c_dy, "c_dy"), (c_x, "c_x"), (c_0, "c_0")))
    mask, scale, shift = _relu_coefficients("backward_apply", scale, shift, input, (n, c), acc,
                                            mean)
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    cfg = heuristics.stream_config(c, plane, cl)
    rows, l_blocks, grid = rt.stream_grid(n, c, plane, cfg)
    launcher(kernels().backward_apply, input)[grid](
        grad_output, input, out, mean, c_dy, c_x, c_0, scale, shift, c, plane, n * c, rows,
        l_blocks, MASK=mask, **rt.stream_meta(cfg))
    return out

