"""Whole layers through the 3 + 3 op pipeline of docs/architecture.md, against the papers'
formulas applied to ``x`` and differentiated by autograd (float64 on the interpreter, float32 on
a GPU): checks the contract end to end (centring, c_x / c_0 meaning, parameter gradients)."""
from __future__ import annotations

import pytest
import tk_reference as ref
import torch
from tk_common import DEVICE

ops = torch.ops.normfuse_triton
DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = 1e-9 if DTYPE == torch.float64 else 2e-4
EPS = 1e-5
SHAPES = [(4, 6, 7), (1, 6, 3, 5), (5, 6), (2, 6, 2, 3, 3)]


def _data(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    params = [torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(4)]
    cast = lambda t: ref.to_layout(t, channels_last).to(DTYPE).to(DEVICE)  # noqa: E731
    return cast(x), cast(dy), [p.to(DTYPE).to(DEVICE) for p in params]


def _reference(layer, x, dy, params):
    x64 = x.double().cpu().requires_grad_()
    p64 = [p.double().cpu().requires_grad_() for p in params]
    y = layer(x64, *p64)
    grads = torch.autograd.grad((y * dy.double().cpu()).sum(), [x64, *p64])
    return y.detach(), grads


def _close(actual, expected):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=TOL, atol=TOL)


def _pipeline(x, dy, coefficients, coefficients_backward):
    plane = x[0, 0].numel()
    mean, m2 = ops.moments(x)
    scale, shift = coefficients(mean, m2, plane)
    y = ops.affine_apply(x, mean, scale, shift)
    g1, g2 = ops.backward_sums(dy, x, mean)
    c_dy, c_x, c_0, *grads = coefficients_backward(g1, g2, mean, m2, plane)
    return y, ops.backward_apply(dy, x, mean, c_dy, c_x, c_0), grads


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bin_layer(shape, channels_last):
    x, dy, (gate, weight, bias, _) = _data(shape, channels_last, 0)
    gate = gate.sigmoid()
    y, dx, (d_gate, d_weight, d_bias) = _pipeline(
        x, dy,
        lambda m, q, L: ops.bin_coefficients(m, q, L, gate, weight, bias, None, None, True, 0.1,
                                             EPS),
        lambda g1, g2, m, q, L: ops.bin_coefficients_backward(g1, g2, m, q, L, gate, weight,
                                                              bias, None, None, True, EPS))
    y_ref, grads = _reference(lambda *a: ref.bin_layer(*a, EPS), x, dy, [gate, weight, bias])
    for a, e in zip((y, dx, d_gate, d_weight, d_bias), (y_ref, *grads)):
        _close(a, e)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_iebn_layer(shape, channels_last):
    x, dy, (gw, gb, weight, bias) = _data(shape, channels_last, 1)
    y, dx, (d_gw, d_gb, d_weight, d_bias) = _pipeline(
        x, dy,
        lambda m, q, L: ops.iebn_coefficients(m, q, L, gw, gb, weight, bias, None, None, True,
                                              0.1, EPS),
        lambda g1, g2, m, q, L: ops.iebn_coefficients_backward(g1, g2, m, q, L, gw, gb, weight,
                                                               bias, None, None, True, EPS))
    y_ref, grads = _reference(lambda *a: ref.iebn_layer(*a, EPS), x, dy, [gw, gb, weight, bias])
    for a, e in zip((y, dx, d_gw, d_gb, d_weight, d_bias), (y_ref, *grads)):
        _close(a, e)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_assoc_layer(shape, channels_last):
    x, dy, (_, _, weight, bias) = _data(shape, channels_last, 2)
    groups, hidden = 3, 2
    g = torch.Generator().manual_seed(5)
    enc, dec_mu, dec_var = (torch.randn(s, generator=g, dtype=torch.float64).to(DTYPE).to(DEVICE)
                            for s in ((hidden, groups), (groups, hidden), (groups, hidden)))
    params = [enc, dec_mu, dec_var, weight, bias]
    y, dx, grads = _pipeline(
        x, dy,
        lambda m, q, L: ops.assoc_coefficients(m, q, L, groups, *params, EPS),
        lambda g1, g2, m, q, L: ops.assoc_coefficients_backward(g1, g2, m, q, L, groups, *params,
                                                                EPS))
    y_ref, grads_ref = _reference(lambda x_, *p: ref.assoc_layer(x_, groups, *p, EPS), x, dy,
                                  params)
    for a, e in zip((y, dx, *grads), (y_ref, *grads_ref)):
        _close(a, e)
