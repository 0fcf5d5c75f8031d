"""Batch-Instance Normalization (Nam & Kim, 2018): the coefficient function and its backward.

    y = gamma * (rho * xhat_B + (1 - rho) * xhat_I) + beta

In the centred form of docs/architecture.md, ``y = scale * (x - m) + shift`` with

    scale = gamma * (rho * r_B + (1 - rho) * r_I)
    shift = beta + gamma * rho * r_B * (m - mu_B)

(``r = (var + eps)^-1/2``; the instance part is centred on ``m`` itself, so it leaves no shift).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_op_batch_counter, check_op_parameters, check_op_statistics
from ._merge import (LOCAL_BATCH, BatchMerge, batch_statistics, batch_statistics_backward,
                     count_batch, recompute_batch_statistics)


def instance_invstd(m2: Tensor, plane_size: int, eps: float) -> Tensor:
    """``r_I``, except 0 for one-element planes: there ``xhat_I = 0 / sqrt(eps)`` is exactly 0,
    and a zero factor keeps its huge ``1/sqrt(eps)`` from entering (and cancelling in) dx."""
    if plane_size == 1:
        return torch.zeros_like(m2)
    return torch.rsqrt(m2 / plane_size + eps)


def check_batch_arguments(op, mean, m2, plane_size, gates, weight, bias, running_mean,
                          running_var, merge, gradients=()) -> None:
    """What the C++ and Triton ops refuse, refused here too with their messages, before any
    running statistic is written (csrc/common/coefficients_glue.h, ``batch_params``): ``gates``
    and the optional weight, bias and running statistics are ``(C,)`` tensors of the
    statistics' dtype and device, the running statistics both or neither.  PyTorch ops would
    broadcast a ``(1,)`` parameter, promote a float32 statistic beside float64 ones, or compute
    zeros for ``plane_size`` 0.  (A synchronized layer's rank with empty planes still joins the
    exchange of statistics, normfuse/distributed.py: its ``plane_size`` 0 is not refused.)"""
    check_op_statistics(op, mean, m2, plane_size if merge is LOCAL_BATCH else None, gradients)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"normfuse.{op}: running_mean and running_var must be given together")
    c = mean.shape[1]
    optional = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                ("running_var", running_var))
    check_op_parameters(op, mean, [(name, t, (c,)) for name, t in (*gates, *optional)
                                   if t is not None])


def _affine(weight, bias, like: Tensor):
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return (one if weight is None else weight), (one * 0 if bias is None else bias)


def batch_prologue(op, mean, m2, plane_size, weight, bias, running_mean, running_var, training,
                   momentum, eps, num_batches_tracked, merge):
    """What the BIN and IEBN forwards share: the counter's check, the affine parameters
    ``(gamma, beta)`` and the batch statistics ``(mu_b, r_b)`` (running statistics updated in
    training); the caller counts the batch after its own step."""
    check_op_batch_counter(num_batches_tracked, mean, op, running=(
        ("running_mean", running_mean), ("running_var", running_var)), training=training)
    gamma, beta = _affine(weight, bias, mean)
    _, mu_b, r_b = batch_statistics(mean, m2, plane_size, running_mean, running_var, training,
                                    momentum, eps, merge)
    return gamma, beta, mu_b, r_b


def bin_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate: Tensor, weight, bias,
                     running_mean, running_var, training: bool, momentum: float, eps: float,
                     num_batches_tracked=None,
                     merge: BatchMerge = LOCAL_BATCH) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``; in training updates the running statistics and adds 1 to
    ``num_batches_tracked`` (each where given)."""
    check_batch_arguments("bin_coefficients", mean, m2, plane_size, (("gate", gate),), weight,
                          bias, running_mean, running_var, merge)
    gamma, beta, mu_b, r_b = batch_prologue("bin_coefficients", mean, m2, plane_size, weight,
                                            bias, running_mean, running_var, training,
                                            momentum, eps, num_batches_tracked, merge)
    r_i = instance_invstd(m2, plane_size, eps)
    scale = gamma * (gate * r_b + (1 - gate) * r_i)
    shift = beta + gamma * gate * r_b * (mean - mu_b)
    count_batch(num_batches_tracked, training)
    return scale, shift


def bin_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                              plane_size: int, gate: Tensor, weight, bias, running_mean,
                              running_var, training: bool, eps: float,
                              merge: BatchMerge = LOCAL_BATCH):
    """Returns ``(c_dy, c_x, c_0, grad_gate, grad_weight, grad_bias)``.

    ``sum_dy_xmu`` is the gradient w.r.t. ``scale``, ``sum_dy`` the one w.r.t. ``shift``.
    """
    check_batch_arguments("bin_coefficients_backward", mean, m2, plane_size, (("gate", gate),),
                          weight, bias, running_mean, running_var, merge,
                          (("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)))
    gamma, _ = _affine(weight, bias, mean)
    use_batch, mu_b, r_b = recompute_batch_statistics(mean, m2, plane_size, running_mean,
                                                      running_var, training, eps, merge)
    r_i = instance_invstd(m2, plane_size, eps)
    dev = mean - mu_b
    g1, g2 = sum_dy, sum_dy_xmu
    mix = gate * r_b + (1 - gate) * r_i
    scale = gamma * mix
    # d(scale)/d(...) * g2 + d(shift)/d(...) * g1, summed over samples for per-channel parameters
    grad_bias = g1.sum(0)
    grad_weight = (g2 * mix + g1 * gate * r_b * dev).sum(0)
    grad_gate = (gamma * (g2 * (r_b - r_i) + g1 * r_b * dev)).sum(0)
    # instance statistics: r_I = (q / L + eps)^-1/2
    grad_r_i = g2 * gamma * (1 - gate)
    grad_m2 = grad_r_i * (-0.5) * r_i ** 3 / plane_size
    # explicit m: +gamma rho r_B g1 through shift, -scale g1 through (x - m)
    grad_mean = -g1 * gamma * (1 - gate) * r_i
    if use_batch:
        grad_mu_b = -g1 * gamma * gate * r_b
        grad_r_b = gamma * gate * (g2 + g1 * dev)
        gm, gq = batch_statistics_backward(grad_mu_b, grad_r_b, r_b, dev, plane_size, merge)
        grad_mean = grad_mean + gm
        grad_m2 = grad_m2 + gq
    c_x = 2 * grad_m2
    c_0 = grad_mean / plane_size
    return scale, c_x, c_0, grad_gate, grad_weight, grad_bias
