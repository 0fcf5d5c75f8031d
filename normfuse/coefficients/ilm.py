"""Instance-Level Meta Normalization (ILM-Norm; Jia, Chen & Chen, CVPR 2019): coefficients and
backward, as the authors' ``ilm_gn`` layer computes them (docs/layers.md).

Two groupings of the channels of a sample, both of consecutive channels:

* K **key groups** of ``C / K`` channels (the module's ``key_group_size``) feed the meta network
  with their mean ``kmu`` and their *unbiased* variance ``kvar`` (length K each):

      D_w = sigmoid(W_w relu(W_e kvar))      D_b = tanh(W_b relu(W_e kmu))
      W_e = encoder (E, K), shared;  W_w = decoder_weight, W_b = decoder_bias (K, E)
      omega[c] = D_w[key(c)] + weight[c]       beta[c] = D_b[key(c)] + bias[c]

  The weight is driven by the variances, the bias by the means.
* G **normalisation groups** (``num_groups``) standardise, also with the *unbiased* variance:
  ``y = (x - mu_G) / sqrt(var_G + eps) * omega + beta``.

Centred form (docs/architecture.md): ``scale = omega * r_G`` with ``r_G = (var_G + eps)^-1/2``,
``shift = beta + scale * (m - mu_G)``.  K is the encoder's column count.

Unbiased variances need more than one value per group: groups of one value (``C / G * L == 1``
or ``C / K * L == 1``) are refused here; the layers refuse such inputs first, with a message
naming the layer (the authors' layer returns NaN there).

These functions are the spec of the ops ``ilm_coefficients[_backward]``: the "torch" backend's
(normfuse/torch_backend.py), and the one the C++ (csrc/cpu/coefficients_ilm_impl.h), CUDA
(csrc/kernels/coefficients_ilm.cuh) and Triton (normfuse/triton_kernels/coefficients_ilm.py)
kernels are tested against (docs/architecture.md, "ILM-Norm").
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_op_groups, check_op_parameters, check_op_statistics
from ._autocast import autocast_off
from ._merge import group_merge, group_merge_backward


def _check_arguments(op, mean, m2, plane_size, num_groups, encoder, decoder_weight,
                     decoder_bias, weight, bias, gradients=()):
    """What the C++ and Triton ops refuse, refused here too, with their messages
    (csrc/common/coefficients_glue.h, ``ilm_params``): PyTorch ops would compute with an empty
    meta network (E = 0: D_w = 1/2, D_b = 0) or promote a float32 statistic beside float64
    ones."""
    check_op_statistics(op, mean, m2, plane_size, gradients)
    c = mean.shape[1]
    check_op_groups(op, num_groups, c)
    if not (isinstance(encoder, Tensor) and encoder.dim() == 2 and encoder.shape[0] >= 1
            and encoder.shape[1] >= 1 and c % encoder.shape[1] == 0):
        got = list(encoder.shape) if isinstance(encoder, Tensor) else type(encoder).__name__
        raise RuntimeError(f"normfuse.{op}: encoder must be (E, K) with E >= 1 and K (the "
                           f"key-group count) >= 1 dividing the number of channels ({c}), got "
                           f"{got}")
    e, k = encoder.shape
    check_op_parameters(op, mean, (("encoder", encoder, (e, k)),
                                   ("decoder_weight", decoder_weight, (k, e)),
                                   ("decoder_bias", decoder_bias, (k, e)),
                                   ("weight", weight, (c,)), ("bias", bias, (c,))))


def _count(channels: int, groups: int, plane_size: int, what: str) -> int:
    count = channels // groups * plane_size
    if count <= 1:
        raise ValueError(f"ilm_coefficients: the unbiased variance needs more than one value per "
                         f"{what}, got {count}")
    return count


def _bessel(n, like: Tensor):
    """``n / (n - 1)``: a Python float, or under ``torch.jit.trace`` (where ``n`` comes from
    ``aten::size`` as an int64 tensor, whose true division is float32) a tensor of the
    statistics' dtype, so a float64 trace keeps float64 accuracy."""
    if isinstance(n, Tensor):
        n = n.to(like.dtype)
    return n / (n - 1)


def _statistics(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int, key_groups: int):
    """Key-group and normalisation-group means and unbiased variances, with the deviations of
    the plane means from them (``(N, K, C / K)`` and ``(N, G, C / G)``), and the two Bessel
    factors ``n / (n - 1)``."""
    c = mean.shape[1]
    n_k = _count(c, key_groups, plane_size, "key group")
    n_g = _count(c, num_groups, plane_size, "group")
    bessel_k, bessel_g = _bessel(n_k, mean), _bessel(n_g, mean)
    kmu, kvar, kdev = group_merge(mean, m2, plane_size, key_groups)
    mu, var, dev = group_merge(mean, m2, plane_size, num_groups)
    return kmu, kvar * bessel_k, kdev, mu, var * bessel_g, dev, bessel_k, bessel_g


def _meta(kmu: Tensor, kvar: Tensor, encoder: Tensor, decoder_weight: Tensor,
          decoder_bias: Tensor):
    """The meta network, per sample: the variances drive the weight, the means the bias."""
    h_w, h_b = kvar @ encoder.t(), kmu @ encoder.t()
    e_w, e_b = torch.relu(h_w), torch.relu(h_b)   # relu keeps NaN (docs/architecture.md)
    return h_w, h_b, e_w, e_b, torch.sigmoid(e_w @ decoder_weight.t()), \
        torch.tanh(e_b @ decoder_bias.t())


def _per_channel(v: Tensor, channels: int) -> Tensor:
    """``(N, K)`` per key group -> ``(N, C)``: each key group's value on its channels."""
    n, k = v.shape
    return v.unsqueeze(2).expand(n, k, channels // k).reshape(n, channels)


@autocast_off
def ilm_coefficients(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int,
                     encoder: Tensor, decoder_weight: Tensor, decoder_bias: Tensor,
                     weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_arguments("ilm_coefficients", mean, m2, plane_size, num_groups, encoder,
                     decoder_weight, decoder_bias, weight, bias)
    n, c = mean.shape
    g = num_groups
    kmu, kvar, _, mu, var, dev, _, _ = _statistics(mean, m2, plane_size, g, encoder.shape[1])
    *_, d_w, d_b = _meta(kmu, kvar, encoder, decoder_weight, decoder_bias)
    omega = (_per_channel(d_w, c) + weight).reshape(n, g, c // g)
    beta = (_per_channel(d_b, c) + bias).reshape(n, g, c // g)
    scale = omega * torch.rsqrt(var + eps).unsqueeze(2)
    shift = beta + scale * dev
    return scale.reshape(n, c), shift.reshape(n, c)


@autocast_off
def ilm_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                              plane_size: int, num_groups: int, encoder: Tensor,
                              decoder_weight: Tensor, decoder_bias: Tensor, weight: Tensor,
                              bias: Tensor, eps: float):
    """Returns ``(c_dy, c_x, c_0, grad_encoder, grad_decoder_weight, grad_decoder_bias,
    grad_weight, grad_bias)`` (the op contract of docs/architecture.md)."""
    _check_arguments("ilm_coefficients_backward", mean, m2, plane_size, num_groups, encoder,
                     decoder_weight, decoder_bias, weight, bias,
                     (("sum_dy", sum_dy), ("sum_dy_xmu", sum_dy_xmu)))
    n, c = mean.shape
    g, k = num_groups, encoder.shape[1]
    kmu, kvar, kdev, mu, var, dev, bessel_k, bessel_g = _statistics(mean, m2, plane_size, g, k)
    h_w, h_b, e_w, e_b, d_w, d_b = _meta(kmu, kvar, encoder, decoder_weight, decoder_bias)
    omega = (_per_channel(d_w, c) + weight).reshape(n, g, c // g)
    r = torch.rsqrt(var + eps)
    scale = omega * r.unsqueeze(2)
    g1 = sum_dy.reshape(n, g, c // g)
    grad_scale = sum_dy_xmu.reshape(n, g, c // g) + g1 * dev   # direct + through the shift
    grad_omega = grad_scale * r.unsqueeze(2)
    grad_weight = grad_omega.sum(0).reshape(c)
    grad_bias = sum_dy.sum(0)
    # meta network, backwards: decoders, then the shared encoder
    grad_z_w = grad_omega.reshape(n, k, c // k).sum(2) * d_w * (1 - d_w)
    grad_z_b = sum_dy.reshape(n, k, c // k).sum(2) * (1 - d_b * d_b)
    grad_decoder_weight = grad_z_w.t() @ e_w
    grad_decoder_bias = grad_z_b.t() @ e_b
    grad_h_w = (grad_z_w @ decoder_weight) * (h_w > 0)
    grad_h_b = (grad_z_b @ decoder_bias) * (h_b > 0)
    grad_encoder = grad_h_w.t() @ kvar + grad_h_b.t() @ kmu
    # key-group statistics (d var_biased = d var_unbiased * n / (n - 1))
    key_mean, key_m2 = group_merge_backward(grad_h_b @ encoder,
                                            (grad_h_w @ encoder) * bessel_k, kdev, plane_size)
    # normalisation-group statistics: the explicit m cancels between the shift and (x - m)
    grad_mu = -(g1 * scale).sum(2)
    grad_var = (grad_scale * omega).sum(2) * (-0.5 * bessel_g) * r ** 3
    grp_mean, grp_m2 = group_merge_backward(grad_mu, grad_var, dev, plane_size)
    return (scale.reshape(n, c), 2 * (key_m2 + grp_m2), (key_mean + grp_mean) / plane_size,
            grad_encoder, grad_decoder_weight, grad_decoder_bias, grad_weight, grad_bias)
