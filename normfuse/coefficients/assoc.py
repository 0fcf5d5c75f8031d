"""Associate Normalization (ICLR 2019 submission): coefficients and backward.

GroupNorm standardisation whose per-(sample, channel) scale and shift come from a small
auto-encoder of the sample's group means ``mu`` and group variances ``v`` (length G each):

    E_mu = relu(W1 mu)    E_v = relu(W1 v)            W1 = encoder (M, G), shared
    D_mu = sigmoid(W2 E_mu)   D_v = tanh(W3 E_v)       W2 = decoder_mean, W3 = decoder_var (G, M)
    omega = D_mu[group(c)] + B_omega[c]      beta = D_v[group(c)] + B_beta[c]
    y = xhat_G * omega + beta

Centred form (docs/architecture.md): ``scale = omega * r_G``, ``shift = beta + scale (m - mu_G)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_op_groups, check_op_parameters, check_op_statistics
from ._autocast import autocast_off
from ._merge import group_merge, group_merge_backward


def _check_arguments(op, mean, m2, plane_size, num_groups, encoder, decoder_mean, decoder_var,
                     weight, bias, gradients=()):
    """What the C++ and Triton ops refuse, refused here too, with their messages
    (csrc/common/coefficients_glue.h, ``assoc_params``): PyTorch ops would compute with an empty
    auto-encoder (M = 0: D_mu = 1/2, D_var = 0) or promote a float32 statistic beside float64
    ones."""
    check_op_statistics(op, mean, m2, plane_size, gradients)
    c = mean.shape[1]
    check_op_groups(op, num_groups, c)
    if not (isinstance(encoder, Tensor) and encoder.dim() == 2 and encoder.shape[0] >= 1
            and encoder.shape[1] == num_groups):
        got = list(encoder.shape) if isinstance(encoder, Tensor) else type(encoder).__name__
        raise RuntimeError(f"normfuse.{op}: encoder must be (M, num_groups) = (M, {num_groups}) "
                           f"with M >= 1, got {got}")
    m = encoder.shape[0]
    check_op_parameters(op, mean, (("encoder", encoder, (m, num_groups)),
                                   ("decoder_mean", decoder_mean, (num_groups, m)),
                                   ("decoder_var", decoder_var, (num_groups, m)),
                                   ("weight", weight, (c,)), ("bias", bias, (c,))))


def _group_invstd(var: Tensor, count: int, eps: float) -> Tensor:
    """``r_G``, except 0 for one-element groups, where ``xhat_G`` is exactly 0 (as in BIN's
    instance part: the factor 1/sqrt(eps) would only add cancellation error to dx)."""
    return torch.zeros_like(var) if count == 1 else torch.rsqrt(var + eps)


def _autoencoder(mu: Tensor, var: Tensor, encoder: Tensor, decoder_mean: Tensor,
                 decoder_var: Tensor):
    h_mu, h_var = mu @ encoder.t(), var @ encoder.t()
    e_mu, e_var = torch.relu(h_mu), torch.relu(h_var)
    return h_mu, h_var, e_mu, e_var, torch.sigmoid(e_mu @ decoder_mean.t()), \
        torch.tanh(e_var @ decoder_var.t())


@autocast_off
def assoc_coefficients(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int,
                       encoder: Tensor, decoder_mean: Tensor, decoder_var: Tensor, weight: Tensor,
                       bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_arguments("assoc_coefficients", mean, m2, plane_size, num_groups, encoder,
                     decoder_mean, decoder_var, weight, bias)
    n, c = mean.shape
    mu, var, dev = group_merge(mean, m2, plane_size, num_groups)
    r = _group_invstd(var, mean.shape[1] // num_groups * plane_size, eps)
    *_, d_mu, d_var = _autoencoder(mu, var, encoder, decoder_mean, decoder_var)
    omega = d_mu.unsqueeze(2) + weight.reshape(num_groups, -1)
    scale = omega * r.unsqueeze(2)
    shift = d_var.unsqueeze(2) + bias.reshape(num_groups, -1) + scale * dev
    return scale.reshape(n, c), shift.reshape(n, c)


@autocast_off
def assoc_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                                plane_size: int, num_groups: int, encoder: Tensor,
                                decoder_mean: Tensor, decoder_var: Tensor, weight: Tensor,
                                bias: Tensor, eps: float):
    """Returns ``(c_dy, c_x, c_0, grad_encoder, grad_decoder_mean, grad_decoder_var,
    grad_weight, grad_bias)``."""
    _check_arguments("assoc_coefficients_backward", mean, m2, plane_size, num_groups, encoder,
                     decoder_mean, decoder_var, weight, bias,
                     (("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)))
    n, c = mean.shape
    g = num_groups
    mu, var, dev = group_merge(mean, m2, plane_size, g)
    r = _group_invstd(var, mean.shape[1] // num_groups * plane_size, eps)
    h_mu, h_var, e_mu, e_var, d_mu, d_var = _autoencoder(mu, var, encoder, decoder_mean,
                                                         decoder_var)
    omega = d_mu.unsqueeze(2) + weight.reshape(g, -1)
    scale = omega * r.unsqueeze(2)
    g1 = sum_dy.reshape(n, g, c // g)
    grad_scale = sum_dy_xmu.reshape(n, g, c // g) + g1 * dev   # direct + through the shift
    grad_omega = grad_scale * r.unsqueeze(2)
    grad_bias = g1.sum(0).reshape(c)
    grad_weight = grad_omega.sum(0).reshape(c)
    # auto-encoder, backwards: decoders, then the shared encoder
    grad_z_mu = grad_omega.sum(2) * d_mu * (1 - d_mu)
    grad_z_var = g1.sum(2) * (1 - d_var * d_var)
    grad_decoder_mean = grad_z_mu.t() @ e_mu
    grad_decoder_var = grad_z_var.t() @ e_var
    grad_h_mu = (grad_z_mu @ decoder_mean) * (h_mu > 0)
    grad_h_var = (grad_z_var @ decoder_var) * (h_var > 0)
    grad_encoder = grad_h_mu.t() @ mu + grad_h_var.t() @ var
    # group statistics: explicit m cancels between the shift and (x - m)
    grad_mu = grad_h_mu @ encoder - (g1 * scale).sum(2)
    grad_var = grad_h_var @ encoder + (grad_scale * omega).sum(2) * (-0.5) * r ** 3
    grad_mean, grad_m2 = group_merge_backward(grad_mu, grad_var, dev, plane_size)
    return (scale.reshape(n, c), 2 * grad_m2, grad_mean / plane_size, grad_encoder,
            grad_decoder_mean, grad_decoder_var, grad_weight, grad_bias)
