"""Float64 references for the Triton backend tests, written from the formulas (design section 2,
docs/architecture.md and the papers), independent of the kernels and of normfuse's own code.

* streaming ops: direct float64 PyTorch;
* coefficient ops forward: the centred formulas; backward: autograd through the forward of a
  surrogate ``phi = sum g2 scale + g1 shift - g1 stop_grad(scale) m`` whose gradients are exactly
  the contract's ``dL/dm`` (``-scale g1`` being the explicit ``x - m`` term) and ``dL/dq``;
* whole layers: the papers' formulas applied to ``x`` itself, differentiated by autograd.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last or x.dim() == 2:
        return x.contiguous()
    perm = (0, *range(2, x.dim()), 1)
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(perm).contiguous().permute(inv)


def planes(t, x):
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def moments(x):
    xd = x.to(F64).reshape(x.shape[0], x.shape[1], -1)
    mean = xd.mean(-1)
    return mean, ((xd - mean[..., None]) ** 2).sum(-1)


def affine_apply(x, mean, scale, shift):
    return planes(scale, x) * (x.to(F64) - planes(mean, x)) + planes(shift, x)


def backward_sums(dy, x, mean):
    d = dy.to(F64).reshape(dy.shape[0], dy.shape[1], -1)
    xc = x.to(F64).reshape(d.shape) - mean.to(F64)[..., None]
    return d.sum(-1), (d * xc).sum(-1)


def backward_apply(dy, x, mean, c_dy, c_x, c_0):
    return (planes(c_dy, x) * dy.to(F64) + planes(c_x, x) * (x.to(F64) - planes(mean, x))
            + planes(c_0, x))


# ---------------------------------------------------------------- coefficient functions (F64)


def _batch(mean, m2, L, rm, rv, training, eps):
    """(mu_B, r_B, q_total) of the batch half; running stats in eval mode."""
    if training or rm is None:
        mu = mean.mean(0)
        q = m2.sum(0) + L * ((mean - mu) ** 2).sum(0)
        return mu, (q / (mean.shape[0] * L) + eps).rsqrt(), q
    return rm, (rv + eps).rsqrt(), None


def running_update(mean, m2, L, rm, rv, momentum):
    mu = mean.mean(0)
    q = m2.sum(0) + L * ((mean - mu) ** 2).sum(0)
    return ((1 - momentum) * rm + momentum * mu,
            (1 - momentum) * rv + momentum * q / (mean.shape[0] * L - 1))


def bin_coefficients(mean, m2, L, gate, weight, bias, rm, rv, training, eps):
    gamma = 1.0 if weight is None else weight
    beta = 0.0 if bias is None else bias
    mu, r_b, _ = _batch(mean, m2, L, rm, rv, training, eps)
    # one-element planes: x - m == 0, and normfuse's convention is r_I = 0 there (keeps the
    # 1/sqrt(eps) factor out of c_dy / c_0 where it would only cancel)
    r_i = torch.zeros_like(m2) if L == 1 else (m2 / L + eps).rsqrt()
    scale = gamma * (gate * r_b + (1 - gate) * r_i)
    return scale, beta + gamma * gate * r_b * (mean - mu)


def iebn_coefficients(mean, m2, L, gw, gb, weight, bias, rm, rv, training, eps):
    gamma = 1.0 if weight is None else weight
    beta = 0.0 if bias is None else bias
    mu, r_b, _ = _batch(mean, m2, L, rm, rv, training, eps)
    scale = gamma * torch.sigmoid(mean * gw + gb) * r_b
    return scale, beta + scale * (mean - mu)


def assoc_coefficients(mean, m2, L, G, enc, dec_mu, dec_var, weight, bias, eps):
    n, c = mean.shape
    mg, qg = mean.reshape(n, G, -1), m2.reshape(n, G, -1)
    mu = mg.mean(2)
    var = (qg.sum(2) + L * ((mg - mu[..., None]) ** 2).sum(2)) / (L * (c // G))
    d_mu = torch.sigmoid(torch.relu(mu @ enc.T) @ dec_mu.T)
    d_var = torch.tanh(torch.relu(var @ enc.T) @ dec_var.T)
    r = torch.zeros_like(var) if L * (c // G) == 1 else (var + eps).rsqrt()  # as r_I above
    scale = (d_mu[..., None] + weight.reshape(G, -1)) * r[..., None]
    shift = d_var[..., None] + bias.reshape(G, -1) + scale * (mg - mu[..., None])
    return scale.reshape(n, c), shift.reshape(n, c)


def coefficients_backward(forward, g1, g2, mean, m2, L, params):
    """``(c_dy, c_x, c_0, *param grads)`` of the contract, by autograd through ``forward(mean,
    m2, *params) -> (scale, shift)`` (params that are None get no gradient)."""
    mean = mean.to(F64).requires_grad_()
    m2 = m2.to(F64).requires_grad_()
    params = [None if p is None else p.to(F64).requires_grad_() for p in params]
    scale, shift = forward(mean, m2, *params)
    g1, g2 = g1.to(F64), g2.to(F64)
    phi = (g2 * scale + g1 * shift - g1 * scale.detach() * mean).sum()
    leaves = [mean, m2] + [p for p in params if p is not None]
    grads = torch.autograd.grad(phi, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return (scale.detach(), 2 * grads[1], grads[0] / L, *grads[2:])


# ---------------------------------------------------------------- whole layers on x (F64)


def _standardize(x, dims, eps):
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    return (x - mu) * (var + eps).rsqrt()


def bin_layer(x, gate, weight, bias, eps):
    spatial = tuple(range(2, x.dim()))
    xb = _standardize(x, (0,) + spatial, eps)
    xi = _standardize(x, spatial, eps) if spatial else x - x  # L = 1: x - m = 0
    return (planes(gate, x) * xb + (1 - planes(gate, x)) * xi) * planes(weight, x) \
        + planes(bias, x)


def iebn_layer(x, gw, gb, weight, bias, eps):
    spatial = tuple(range(2, x.dim()))
    m = x.mean(spatial) if spatial else x
    delta = torch.sigmoid(m * gw + gb)
    return _standardize(x, (0,) + spatial, eps) * planes(weight * delta, x) + planes(bias, x)


def assoc_layer(x, G, enc, dec_mu, dec_var, weight, bias, eps):
    n, c = x.shape[:2]
    xg = x.reshape(n, G, -1)
    mu = xg.mean(2)
    var = ((xg - mu[..., None]) ** 2).mean(2)
    xhat = ((xg - mu[..., None]) * (var + eps).rsqrt()[..., None]).reshape(x.shape)
    d_mu = torch.sigmoid(torch.relu(mu @ enc.T) @ dec_mu.T)
    d_var = torch.tanh(torch.relu(var @ enc.T) @ dec_var.T)
    omega = d_mu.repeat_interleave(c // G, 1) + weight
    beta = d_var.repeat_interleave(c // G, 1) + bias
    return xhat * planes(omega, x) + planes(beta, x)
