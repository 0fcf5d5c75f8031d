"""The fused activation: ``activation="relu"`` on every module and functional form.

``y = relu(norm(x))`` from the layer's own apply kernel, its backward masked by the sign of the
pre-activation recomputed from ``x`` and the saved coefficients (no saved mask).  Checked on
every backend against the float64 oracles followed by ``torch.relu`` (tests/oracles.py), and
against the unfused layer of the same backend: the output is ``torch.relu`` of it, the gradients
are the unfused layer's for ``dy * (y > 0)``.

Near-zero pre-activations: their sign can differ between float32 and float64, so the upstream
gradient ``dy`` is set to 0 there (those elements then do not matter) while about half of the
elements are cut by the ReLU, so that a missing mask fails every test.
"""

import copy

import pytest
import torch

import oracles
from oracles import dtype_supported, make_input, randn, to_layout
from test_ilm import make_ilm
from test_modules import KINDS, make_layer, prepare, run_and_check
from test_numerics import _functional, _params

ALL_KINDS = KINDS + ["ilm"]


def _layer(nf, kind, shape, **kw):
    if kind == "ilm":
        return make_ilm(nf, shape[1], 2, 2, reduction=2, **kw)
    return make_layer(nf, kind, shape, **kw)


def _masked_dy(module, x, seed, band=1e-3):
    """A random ``dy``, zero where the float64 pre-activation of ``module(x)`` is within
    ``band`` of 0 (sign not reproducible in float32); and the fraction cut by the ReLU."""
    plain = copy.deepcopy(module)
    plain.activation = None
    pre = oracles.module_step(plain, x).y
    dy = randn(tuple(x.shape), seed + 7, torch.float32, "cpu").double()
    dy = torch.where(pre.abs() < band, torch.zeros_like(dy), dy)
    cut = (pre <= 0).double().mean().item()
    return dy.to(dtype=x.dtype, device=x.device), cut


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (3, 4, 7), (6, 4), (2, 4, 3, 2, 3), (1, 4, 1, 9)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_oracle(nf, backend, device, seed, kind, shape, training):
    if kind != "ilm" and shape[0] * (shape[2] if len(shape) > 2 else 1) <= 1:
        pytest.skip("one value per channel")
    m = prepare(_layer(nf, kind, shape, activation="relu"), seed, device, training)
    assert m.activation == "relu"
    x = make_input(shape, seed, torch.float32, device)
    dy, cut = _masked_dy(m, x, seed)
    assert 0.1 < cut < 0.9, f"the ReLU cuts {cut:.0%} of the elements: the test would be weak"
    run_and_check(m, x, dy, torch.float32, f"{kind}{shape} relu")


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "cl"])
def test_dtypes_and_layouts(nf, backend, device, seed, kind, dtype, layout):
    if not dtype_supported(device, dtype):
        pytest.skip(f"{dtype} not supported by the {backend} backend on {device}")
    shape = (3, 4, 5, 3)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = prepare(_layer(nf, kind, shape, activation="relu"), seed, device, True, param_dtype)
    x = to_layout(make_input(shape, seed, dtype, device), layout)
    dy, _ = _masked_dy(m, x, seed, band=1e-3 if dtype == torch.float64 else 3e-2)
    y, dx = run_and_check(m, x, to_layout(dy, layout), dtype, f"{kind} {dtype} {layout} relu")
    if layout == "cl":
        assert oracles.layout_of(y) == "channels_last", "the fused layer keeps channels-last"


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_same_backend_unfused_then_relu(nf, backend, device, seed, kind, training):
    """Fused == unfused layer + torch.relu on the same backend: the output bitwise (the same
    affine arithmetic, then max(v, 0)), the gradients those of dy * (y > 0)."""
    shape = (4, 6, 5, 3)
    fused = prepare(_layer(nf, kind, shape, activation="relu"), seed, device, training)
    plain = copy.deepcopy(fused)
    plain.activation = None
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = fused(xf)
    z = plain(xp)
    yp = torch.relu(z)
    assert torch.equal(yf, yp), "fused output != torch.relu(unfused output)"
    if training and kind in ("bin", "iebn"):
        assert torch.equal(fused.running_mean, plain.running_mean)
        assert torch.equal(fused.num_batches_tracked, plain.num_batches_tracked)
    gf = torch.autograd.grad(yf, [xf, *fused.parameters()], dy)
    gp = torch.autograd.grad(z, [xp, *plain.parameters()], dy * (z > 0))
    for a, b, name in zip(gf, gp, ["input", *(n for n, _ in fused.named_parameters())]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{kind}: grad {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(nf, backend, device, seed, kind, training):
    """First and second derivatives (double backward through the differentiable
    recomputation), float64, on the backends that run float64 (the CPU ones)."""
    if device != "cpu":
        pytest.skip("gradcheck runs on the CPU backends (float64)")
    shape = (3, 4, 2, 3)
    c = shape[1]
    x = make_input(shape, seed, torch.float64).requires_grad_()
    params = [p.requires_grad_() for p in _params(kind, c, seed)]
    rm = 0.2 * randn((c,), seed + 20, torch.float64) if not training else None
    rv = 0.8 + torch.rand(c, generator=oracles.gen(seed + 21), dtype=torch.float64) \
        if not training else None
    plain = _functional(nf, kind, training, rm, rv, 2)

    def fn(*args):
        return torch.relu(plain(*args))

    fused = _functional(nf, kind, training, rm, rv, 2, activation="relu")

    inputs = (x, *params)
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fused, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    # and the same numbers as relu after the unfused layer
    torch.testing.assert_close(fused(*inputs), fn(*inputs), rtol=0, atol=0)


def test_ilm_functional(nf, backend, device, seed):
    x = make_input((3, 4, 3, 3), seed, torch.float32, device)
    m = prepare(make_ilm(nf, 4, 2, 2, reduction=2), seed, device, True)
    args = (m.encoder, m.decoder_weight, m.decoder_bias, m.weight, m.bias)
    y = nf.functional.ilm_norm(x, 2, 2, *args, activation="relu")
    assert torch.equal(y, torch.relu(nf.functional.ilm_norm(x, 2, 2, *args)))


# ------------------------------------------------------------------ the module's contract
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_attribute_repr_and_state_dict(nf, kind):
    shape = (2, 4, 3, 3)
    fused = _layer(nf, kind, shape, activation="relu")
    plain = _layer(nf, kind, shape)
    assert plain.activation is None and "activation" not in repr(plain)
    assert "activation='relu'" in repr(fused)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fused.state_dict())  # the same state: loads both ways
    fused.load_state_dict(plain.state_dict())
    fused.activation = None  # a plain attribute: switched off and on again
    fused.activation = "relu"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_activation_is_refused(nf, kind):
    shape = (2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"activation must be None or 'relu', got 'gelu'"):
        _layer(nf, kind, shape, activation="gelu")
    m = _layer(nf, kind, shape)
    m.activation = "sigmoid"
    snap = oracles.snapshot_buffers(m)
    with pytest.raises(ValueError, match=r"activation must be None or 'relu', got 'sigmoid'"):
        m(make_input(shape, 0))
    oracles.assert_buffers_equal(m, snap, "a refused activation changes nothing")


def test_functional_bad_activation(nf):
    x = make_input((2, 4, 3), 0)
    g = torch.ones(4)
    with pytest.raises(ValueError, match=r"batch_instance_norm: activation must be None or "
                                         r"'relu', got 'tanh'"):
        nf.functional.batch_instance_norm(x, None, None, None, None, g, training=True,
                                          activation="tanh")


def test_sync_modules_keep_the_activation(nf):
    """convert_sync carries the attribute (outside a process group: the plain module)."""
    m = nf.BatchInstanceNorm2d(4, activation="relu")
    s = nf.convert_sync(torch.nn.Sequential(m))[0]
    assert s.activation == "relu"
    x = make_input((3, 4, 2, 2), 1)
    assert (s(x) >= 0).all()
