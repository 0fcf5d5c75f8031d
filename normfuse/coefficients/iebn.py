"""Instance Enhancement Batch Normalization (Liang et al., AAAI 2020): coefficients and backward.

    delta = sigmoid(m * gate_weight + gate_bias)          (m: the plane mean, per sample)
    y = xhat_B * (gamma * delta) + beta

Centred form (docs/architecture.md): ``scale = gamma * delta * r_B``,
``shift = beta + scale * (m - mu_B)``.  The explicit ``m`` of the shift cancels the ``-m`` of
``x - m``, so ``m`` reaches the output only through ``delta`` and the batch statistics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._merge import (LOCAL_BATCH, BatchMerge, batch_statistics_backward, count_batch,
                     recompute_batch_statistics)
from .bin import _affine, batch_prologue, check_batch_arguments


def iebn_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate_weight: Tensor,
                      gate_bias: Tensor, weight, bias, running_mean, running_var, training: bool,
                      momentum: float, eps: float, num_batches_tracked=None,
                      merge: BatchMerge = LOCAL_BATCH) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``; in training updates the running statistics and adds 1 to
    ``num_batches_tracked`` (each where given)."""
    check_batch_arguments("iebn_coefficients", mean, m2, plane_size,
                          (("gate_weight", gate_weight), ("gate_bias", gate_bias)), weight, bias,
                          running_mean, running_var, merge)
    gamma, beta, mu_b, r_b = batch_prologue("iebn_coefficients", mean, m2, plane_size, weight,
                                            bias, running_mean, running_var, training,
                                            momentum, eps, num_batches_tracked, merge)
    delta = torch.sigmoid(mean * gate_weight + gate_bias)
    scale = gamma * delta * r_b
    count_batch(num_batches_tracked, training)
    return scale, beta + scale * (mean - mu_b)


def iebn_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                               plane_size: int, gate_weight: Tensor, gate_bias: Tensor, weight,
                               bias, running_mean, running_var, training: bool, eps: float,
                               merge: BatchMerge = LOCAL_BATCH):
    """Returns ``(c_dy, c_x, c_0, grad_gate_weight, grad_gate_bias, grad_weight, grad_bias)``."""
    check_batch_arguments("iebn_coefficients_backward", mean, m2, plane_size,
                          (("gate_weight", gate_weight), ("gate_bias", gate_bias)), weight, bias,
                          running_mean, running_var, merge,
                          (("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)))
    gamma, _ = _affine(weight, bias, mean)
    use_batch, mu_b, r_b = recompute_batch_statistics(mean, m2, plane_size, running_mean,
                                                      running_var, training, eps, merge)
    dev = mean - mu_b
    delta = torch.sigmoid(mean * gate_weight + gate_bias)
    scale = gamma * delta * r_b
    g1 = sum_dy
    grad_scale = sum_dy_xmu + g1 * dev  # scale reaches y directly and through the shift
    grad_bias = g1.sum(0)
    grad_weight = (grad_scale * delta * r_b).sum(0)
    grad_logit = grad_scale * gamma * r_b * delta * (1 - delta)
    grad_gate_weight = (grad_logit * mean).sum(0)
    grad_gate_bias = grad_logit.sum(0)
    grad_mean = grad_logit * gate_weight
    grad_m2 = torch.zeros_like(m2)
    if use_batch:
        gm, gq = batch_statistics_backward(-g1 * scale, grad_scale * gamma * delta, r_b, dev,
                                           plane_size, merge)
        grad_mean = grad_mean + gm
        grad_m2 = grad_m2 + gq
    return (scale, 2 * grad_m2, grad_mean / plane_size, grad_gate_weight, grad_gate_bias,
            grad_weight, grad_bias)
