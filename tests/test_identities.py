"""Identities from issue 2: the layers reduce to PyTorch's own normalizations.

* BIN, gate 1            == nn.BatchNorm*d (same weights), train and eval, same running stats;
* BIN, gate 0            == instance norm followed by the BN affine;
* AssocNorm, AE weights 0 == nn.GroupNorm with weight 0.5 + B_omega, bias B_beta;
* IEBN, gate_weight 0, gate_bias b == BN with weight * sigmoid(b).
"""


import pytest
import torch
import torch.nn.functional as F

from oracles import assert_close_dtype, dtype_supported, make_input, randn, randomize_parameters

BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
SHAPES = {1: [(6, 4), (5, 4, 7)], 2: [(3, 4, 5, 3)], 3: [(2, 4, 3, 2, 3)]}
CASES = [(d, s) for d, ss in SHAPES.items() for s in ss]


def _bn_pair(nf, d, c, seed, device, dtype, **kw):
    ours = getattr(nf, f"BatchInstanceNorm{d}d")(c, **kw)
    randomize_parameters(ours, seed)
    ref = BN[d](c, **kw)
    with torch.no_grad():
        if ours.weight is not None:
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
        if ours.running_mean is not None:
            ref.running_mean.copy_(ours.running_mean)
            ref.running_var.copy_(ours.running_var)
    return ours.to(device, dtype), ref.to(device, dtype)


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    ps = [p for n, p in module.named_parameters() if n in ("weight", "bias")]
    gs = torch.autograd.grad(y, [x] + ps, dy)
    return y, gs


@pytest.mark.parametrize("d,shape", CASES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bin_gate_one_is_batchnorm(nf, backend, device, seed, d, shape, momentum, dtype):
    if not dtype_supported(device, dtype):
        pytest.skip("dtype")
    c = shape[1]
    ours, ref = _bn_pair(nf, d, c, seed, device, dtype, momentum=momentum)
    with torch.no_grad():
        ours.gate.fill_(1.0)
    for step in range(3):
        ours.train(), ref.train()
        x = make_input(shape, seed + step, dtype, device, scale=1 + step, offset=step)
        dy = randn(shape, seed + 50 + step, dtype, device)
        y, gs = _grads(ours, x, dy)
        yr, gr = _grads(ref, x, dy)
        assert_close_dtype(y, yr, dtype, f"train step {step} output")
        for name, a, b in zip(["dx", "dweight", "dbias"], gs, gr):
            assert_close_dtype(a, b, dtype, f"train step {step} {name}")
        assert_close_dtype(ours.running_mean, ref.running_mean, dtype, "running_mean")
        assert_close_dtype(ours.running_var, ref.running_var, dtype, "running_var")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        ours.eval(), ref.eval()
        y, gs = _grads(ours, x, dy)
        yr, gr = _grads(ref, x, dy)
        assert_close_dtype(y, yr, dtype, f"eval step {step} output")
        for name, a, b in zip(["dx", "dweight", "dbias"], gs, gr):
            assert_close_dtype(a, b, dtype, f"eval step {step} {name}")


@pytest.mark.parametrize("d,shape", [(1, (6, 4)), (2, (3, 4, 5, 3))], ids=str)
@pytest.mark.parametrize("kw", [dict(affine=False), dict(track_running_stats=False)], ids=str)
def test_bin_gate_one_is_batchnorm_options(nf, backend, device, seed, d, shape, kw):
    c = shape[1]
    ours, ref = _bn_pair(nf, d, c, seed, device, torch.float32, **kw)
    with torch.no_grad():
        ours.gate.fill_(1.0)
    x = make_input(shape, seed, torch.float32, device)
    for training in (True, False, True):
        ours.train(training), ref.train(training)
        assert_close_dtype(ours(x), ref(x), torch.float32, f"{kw} training={training}")
    if ref.running_mean is not None:
        assert_close_dtype(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
        assert_close_dtype(ours.running_var, ref.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("d,shape", [(1, (5, 4, 7)), (2, (3, 4, 5, 3)), (2, (1, 4, 3, 3)),
                                     (3, (2, 4, 3, 2, 3))], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_gate_zero_is_instance_norm(nf, backend, device, seed, d, shape, training):
    c = shape[1]
    m = randomize_parameters(getattr(nf, f"BatchInstanceNorm{d}d")(c), seed).to(device)
    with torch.no_grad():
        m.gate.zero_()
    m.train(training)
    x = make_input(shape, seed, torch.float32, device).requires_grad_()
    dy = randn(shape, seed + 1, torch.float32, device)
    y = m(x)
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x2 = x.detach().clone().requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    yr = F.instance_norm(x2, eps=m.eps) * w.reshape(bshape) + b.reshape(bshape)
    assert_close_dtype(y, yr, torch.float32, "output")
    g = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    gr = torch.autograd.grad(yr, (x2, w, b), dy)
    for name, a, r in zip(["dx", "dweight", "dbias"], g, gr):
        assert_close_dtype(a, r, torch.float32, name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_1d_gate_zero_no_spatial_is_bias(nf, backend, device, seed, training):
    m = randomize_parameters(nf.BatchInstanceNorm1d(5), seed).to(device).train(training)
    with torch.no_grad():
        m.gate.zero_()
    y = m(make_input((7, 5), seed, torch.float32, device))
    torch.testing.assert_close(y, m.bias.detach().expand(7, 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,groups", [((3, 6, 4, 5), 3), ((2, 8, 7), 2), ((1, 4, 3, 2, 2), 4),
                                          ((4, 6, 5), 1), ((2, 6, 3, 3), 6), ((4, 6), 2)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_assoc_zero_autoencoder_is_group_norm(nf, backend, device, seed, shape, groups, dtype):
    if not dtype_supported(device, dtype):
        pytest.skip("dtype")
    c = shape[1]
    m = randomize_parameters(nf.AssocNorm(groups, c, embed_dim=3), seed).to(device, dtype)
    with torch.no_grad():
        m.encoder.zero_(), m.decoder_mean.zero_(), m.decoder_var.zero_()
    gn = torch.nn.GroupNorm(groups, c, eps=m.eps).to(device, dtype)
    with torch.no_grad():
        gn.weight.copy_(0.5 + m.weight)
        gn.bias.copy_(m.bias)
    x = make_input(shape, seed, dtype, device).requires_grad_()
    dy = randn(shape, seed + 1, dtype, device)
    y, yr = m(x), gn(x)
    assert_close_dtype(y, yr, dtype, "output")
    g = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    gr = torch.autograd.grad(yr, (x, gn.weight, gn.bias), dy)
    for name, a, r in zip(["dx", "dweight", "dbias"], g, gr):
        assert_close_dtype(a, r, dtype, name)


@pytest.mark.parametrize("d,shape", CASES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_iebn_constant_gate_is_scaled_batchnorm(nf, backend, device, seed, d, shape, momentum):
    c = shape[1]
    m = getattr(nf, f"InstanceEnhancementBatchNorm{d}d")(c, momentum=momentum)
    randomize_parameters(m, seed)
    with torch.no_grad():
        m.gate_weight.zero_()
    m = m.to(device)
    ref = BN[d](c, momentum=momentum).to(device)
    with torch.no_grad():
        ref.weight.copy_(m.weight * torch.sigmoid(m.gate_bias))
        ref.bias.copy_(m.bias)
        ref.running_mean.copy_(m.running_mean)
        ref.running_var.copy_(m.running_var)
    for step in range(3):
        x = make_input(shape, seed + step, torch.float32, device, scale=1 + step)
        dy = randn(shape, seed + 9 + step, torch.float32, device)
        for training in (True, False):
            m.train(training), ref.train(training)
            xa = x.clone().requires_grad_()
            xb = x.clone().requires_grad_()
            y, yr = m(xa), ref(xb)
            assert_close_dtype(y, yr, torch.float32, f"step {step} training={training}")
            (ga,), (gb,) = torch.autograd.grad(y, xa, dy), torch.autograd.grad(yr, xb, dy)
            assert_close_dtype(ga, gb, torch.float32, f"dx step {step} training={training}")
        assert_close_dtype(m.running_mean, ref.running_mean, torch.float32, "running_mean")
        assert_close_dtype(m.running_var, ref.running_var, torch.float32, "running_var")
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)


def test_iebn_default_init_is_half_scaled_batchnorm(nf, backend, device, seed):
    """Fresh IEBN: gate_weight 0, gate_bias -1 -> BN with weight sigmoid(-1)."""
    m = nf.IEBN2d(4).to(device)
    x = make_input((3, 4, 5, 5), seed, torch.float32, device)
    ref = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        ref.weight.fill_(torch.sigmoid(torch.tensor(-1.0)).item())
    assert_close_dtype(m(x), ref(x), torch.float32, "output")


def test_identities_are_sensitive(nf, backend, device, seed):
    """The identities above must not hold trivially: a gate of 0.5 differs from BatchNorm."""
    m = randomize_parameters(nf.BatchInstanceNorm2d(4), seed).to(device)
    ref = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        m.gate.fill_(0.5)
        ref.weight.copy_(m.weight), ref.bias.copy_(m.bias)
    x = make_input((3, 4, 5, 3), seed, torch.float32, device)
    assert (m(x) - ref(x)).abs().max() > 1e-2
