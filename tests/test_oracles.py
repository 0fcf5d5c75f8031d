"""Self-tests of the float64 oracles against PyTorch's own normalization ops.

These do not touch normfuse: they check that tests/oracles.py is right, so that a failure
elsewhere points at the implementation, not at the oracle.
"""

import pytest
import torch
import torch.nn.functional as F

import oracles

F64 = torch.float64


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64)


SHAPES = [(4, 3), (4, 3, 7), (3, 5, 4, 3), (2, 3, 3, 2, 5), (1, 4, 5, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_bin_gate_one_is_batch_norm(shape, training):
    c = shape[1]
    x = _rand(shape, 1) * 2 + 0.5
    w, b = _rand((c,), 2) + 1, _rand((c,), 3)
    rm, rv = _rand((c,), 4), _rand((c,), 5).abs() + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    dy = _rand(shape, 6)
    res = oracles.run("bin", x, {"weight": w, "bias": b, "gate": torch.ones(c, dtype=F64)}, dy,
                      running_mean=rm, running_var=rv, training=training, momentum=0.1)
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = F.batch_norm(xr, rm2, rv2, wr, br, training=training, momentum=0.1, eps=1e-5)
    gx, gw, gb = torch.autograd.grad(y, (xr, wr, br), dy)
    torch.testing.assert_close(res.y, y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["input"], gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["weight"], gw, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["bias"], gb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.running_mean, rm2, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(res.running_var, rv2, atol=1e-14, rtol=1e-14)
    # the oracle never modifies its arguments
    assert torch.equal(rm, _rand((c,), 4))


@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 5, 4, 3), (2, 3, 3, 2, 5), (1, 4, 5, 3)])
def test_bin_gate_zero_is_instance_norm(shape):
    c = shape[1]
    x = _rand(shape, 7)
    w, b = _rand((c,), 8), _rand((c,), 9)
    rm, rv = _rand((c,), 4), _rand((c,), 5).abs() + 0.5
    for training in (True, False):
        res = oracles.run("bin", x, {"weight": w, "bias": b, "gate": torch.zeros(c, dtype=F64)},
                          running_mean=rm, running_var=rv, training=training)
        ref = F.instance_norm(x, eps=1e-5) * w.reshape(1, c, *[1] * (len(shape) - 2)) \
            + b.reshape(1, c, *[1] * (len(shape) - 2))
        torch.testing.assert_close(res.y, ref, atol=1e-12, rtol=1e-12)


def test_bin_one_element_per_plane_instance_part_is_zero():
    x = _rand((5, 3), 10)
    w, b = _rand((3,), 11), _rand((3,), 12)
    res = oracles.run("bin", x, {"weight": w, "bias": b, "gate": torch.zeros(3, dtype=F64)},
                      training=True)
    torch.testing.assert_close(res.y, b.expand(5, 3), atol=0, rtol=0)


@pytest.mark.parametrize("shape,groups", [((3, 6, 4, 5), 3), ((2, 8, 7), 2), ((1, 4, 3, 2, 2), 4),
                                          ((4, 6), 3)])
def test_assoc_zero_autoencoder_is_group_norm(shape, groups):
    c = shape[1]
    m = 5
    x = _rand(shape, 13) * 3 - 1
    w, b = _rand((c,), 14), _rand((c,), 15)
    dy = _rand(shape, 16)
    zeros = dict(encoder=torch.zeros(m, groups, dtype=F64),
                 decoder_mean=torch.zeros(groups, m, dtype=F64),
                 decoder_var=torch.zeros(groups, m, dtype=F64))
    res = oracles.run("assoc", x, dict(zeros, weight=w, bias=b), dy, num_groups=groups)
    xr = x.clone().requires_grad_()
    wr, br = (w + 0.5).requires_grad_(), b.clone().requires_grad_()
    y = F.group_norm(xr, groups, wr, br, eps=1e-5)
    gx, gw, gb = torch.autograd.grad(y, (xr, wr, br), dy)
    torch.testing.assert_close(res.y, y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["input"], gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["weight"], gw, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res.grads["bias"], gb, atol=1e-12, rtol=1e-12)


def test_assoc_autoencoder_matters_and_formula():
    """Hand-computed auto-encoder for one sample, G=2, M=1 (checks orientation of W1/W2/W3)."""
    x = torch.tensor([[[1.0, 3.0], [2.0, 6.0], [0.0, 4.0], [1.0, 1.0]]], dtype=F64)  # (1, 4, 2)
    enc = torch.tensor([[1.0, -0.5]], dtype=F64)          # (M=1, G=2)
    dm = torch.tensor([[2.0], [-1.0]], dtype=F64)          # (G, M)
    dv = torch.tensor([[0.5], [0.25]], dtype=F64)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    b = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    y = oracles.run("assoc", x, dict(encoder=enc, decoder_mean=dm, decoder_var=dv, weight=w,
                                     bias=b), num_groups=2).y
    g0 = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=F64)
    g1 = torch.tensor([0.0, 4.0, 1.0, 1.0], dtype=F64)
    mu = torch.stack([g0.mean(), g1.mean()])
    v = torch.stack([g0.var(unbiased=False), g1.var(unbiased=False)])
    e_mu = torch.relu(mu[0] * 1.0 + mu[1] * -0.5)
    e_v = torch.relu(v[0] * 1.0 + v[1] * -0.5)
    d_mu = torch.sigmoid(torch.stack([2.0 * e_mu, -1.0 * e_mu]))
    d_v = torch.tanh(torch.stack([0.5 * e_v, 0.25 * e_v]))
    xs = torch.cat([(g0 - mu[0]) / torch.sqrt(v[0] + 1e-5), (g1 - mu[1]) / torch.sqrt(v[1] + 1e-5)])
    omega = torch.stack([d_mu[0], d_mu[0], d_mu[1], d_mu[1]]) + w
    beta = torch.stack([d_v[0], d_v[0], d_v[1], d_v[1]]) + b
    expected = (xs.reshape(4, 2) * omega[:, None] + beta[:, None]).reshape(1, 4, 2)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 5, 4, 3), (6, 2)])
def test_iebn_formula(shape):
    c = shape[1]
    x = _rand(shape, 20) + 1
    w, b = _rand((c,), 21), _rand((c,), 22)
    gw, gb = _rand((c,), 23), _rand((c,), 24)
    res = oracles.run("iebn", x, dict(weight=w, bias=b, gate_weight=gw, gate_bias=gb),
                      training=True)
    x3 = x.reshape(shape[0], c, -1)
    delta = torch.sigmoid(x3.mean(-1) * gw + gb)
    bn = F.batch_norm(x, None, None, training=True).reshape(shape[0], c, -1)
    expected = bn * (w * delta).unsqueeze(-1) + b.reshape(1, c, 1)
    torch.testing.assert_close(res.y, expected.reshape(shape), atol=1e-12, rtol=1e-12)
    # eval: running statistics for the batch part, delta from the sample
    rm, rv = _rand((c,), 25), _rand((c,), 26).abs() + 0.2
    res = oracles.run("iebn", x, dict(weight=w, bias=b, gate_weight=gw, gate_bias=gb),
                      running_mean=rm, running_var=rv, training=False)
    bn = F.batch_norm(x, rm, rv, training=False).reshape(shape[0], c, -1)
    expected = bn * (w * delta).unsqueeze(-1) + b.reshape(1, c, 1)
    torch.testing.assert_close(res.y, expected.reshape(shape), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_step_running_stats_match_batchnorm(momentum):
    """oracles.module_step on an nn.BatchNorm2d-shaped stand-in reproduces nn.BatchNorm2d."""
    bn = torch.nn.BatchNorm2d(3, momentum=momentum).double()

    class Stand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3, dtype=F64))
            self.bias = torch.nn.Parameter(torch.zeros(3, dtype=F64))
            self.gate = torch.nn.Parameter(torch.ones(3, dtype=F64))
            self.register_buffer("running_mean", torch.zeros(3, dtype=F64))
            self.register_buffer("running_var", torch.ones(3, dtype=F64))
            self.register_buffer("num_batches_tracked", torch.tensor(0))
            self.eps, self.momentum, self.track_running_stats = 1e-5, momentum, True

    st = Stand()
    for step in range(4):
        x = _rand((4, 3, 2, 5), 30 + step) * (step + 1) + step
        res = oracles.module_step(st, x)
        y = bn(x)
        torch.testing.assert_close(res.y, y, atol=1e-12, rtol=1e-12)
        st.running_mean.copy_(res.running_mean)
        st.running_var.copy_(res.running_var)
        st.num_batches_tracked.fill_(res.num_batches_tracked)
        torch.testing.assert_close(st.running_mean, bn.running_mean, atol=1e-14, rtol=1e-14)
        torch.testing.assert_close(st.running_var, bn.running_var, atol=1e-14, rtol=1e-14)
        assert int(st.num_batches_tracked) == int(bn.num_batches_tracked)
    st.eval()
    bn.eval()
    x = _rand((2, 3, 4, 4), 40)
    torch.testing.assert_close(oracles.module_step(st, x).y, bn(x), atol=1e-12, rtol=1e-12)
