"""ILM-Norm (``normfuse.ILMNorm``, ``normfuse.functional.ilm_norm``) against the float64 oracle
``oracles.ilm_ref`` (written from the paper and the authors' ``ilm_gn`` layer) and against a
re-creation of the authors' layer with their parameter names (``_AuthorsILMgn``).

Every test that takes the ``backend`` fixture runs once per available backend: the generic
kernels (moments, apply, backward sums, backward apply) are the backend's; the coefficient step
is the C++ ops ``torch.ops.normfuse.ilm_coefficients[_backward]`` on the "cpu" backend and the
PyTorch-ops reference ``normfuse.coefficients.ilm`` on the others
(tests/csrc/test_ilm_coefficients.py tests the ops themselves).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import oracles
from oracles import (assert_close_dtype, dtype_supported, layout_of, make_input, randn,
                     randomize_parameters, to_layout)
from test_export import ONNX_ROUTES, onnx_round_trip
from test_modules import run_and_check

REDUCED = (torch.float16, torch.bfloat16)


def make_ilm(nf, c, groups, key_size, reduction=16, **kw):
    return nf.ILMNorm(c, num_groups=groups, key_group_size=key_size, reduction=reduction, **kw)


def prepare(module, seed, device, training=True, param_dtype=torch.float32):
    module = randomize_parameters(module, seed)
    return module.to(device=device, dtype=param_dtype).train(training)


# ------------------------------------------------------------- the authors' layer, re-created
class _AuthorsILMgn(nn.Module):
    """The authors' ``ilm_gn`` (github Gasoonjia/ILM-Norm, lib/nn/ilm_gn.py) re-created with the
    same submodules, parameter names and shapes, so that its ``state_dict`` has the keys of
    their checkpoints: ``weight_bias``, ``bias_bias`` (1, C, 1, 1), the embedding layer shared
    by both branches (``fc_embed.0`` = ``fc_weight.0.0`` = ``fc_bias.0.0``), ``fc_weight.1``,
    ``fc_bias.1``.  Its forward follows their computation for any rank: key-group mean and
    unbiased variance into the branches, GroupNorm with unbiased variance."""

    def __init__(self, channel, num_groups=32, key_group_size=16, reduction=16, eps=1e-5):
        super().__init__()
        keys = channel // key_group_size
        embed = keys // reduction if keys >= reduction else 2
        self.num_groups, self.key_groups, self.key_group_size, self.eps = (
            num_groups, keys, key_group_size, eps)
        self.fc_embed = nn.Sequential(nn.Linear(keys, embed, bias=False), nn.ReLU(inplace=True))
        self.fc_weight = nn.Sequential(self.fc_embed, nn.Linear(embed, keys, bias=False),
                                       nn.Sigmoid())
        self.weight_bias = nn.Parameter(torch.ones(1, channel, 1, 1))
        self.fc_bias = nn.Sequential(self.fc_embed, nn.Linear(embed, keys, bias=False),
                                     nn.Tanh())
        self.bias_bias = nn.Parameter(torch.zeros(1, channel, 1, 1))

    def forward(self, x):
        n, c = x.shape[:2]
        per_channel = (n, c) + (1,) * (x.dim() - 2)
        xk = x.reshape(n, self.key_groups, -1)
        w = self.fc_weight(xk.var(-1)).repeat_interleave(self.key_group_size, 1)
        b = self.fc_bias(xk.mean(-1)).repeat_interleave(self.key_group_size, 1)
        weight = w.reshape(per_channel) + self.weight_bias.reshape(1, c, *per_channel[2:])
        bias = b.reshape(per_channel) + self.bias_bias.reshape(1, c, *per_channel[2:])
        xg = x.reshape(n, self.num_groups, -1)
        xhat = (xg - xg.mean(-1, keepdim=True)) / (xg.var(-1, keepdim=True) + self.eps).sqrt()
        return xhat.reshape(x.shape) * weight + bias


OURS_FROM_THEIRS = {"encoder": "fc_embed.0.weight", "decoder_weight": "fc_weight.1.weight",
                    "decoder_bias": "fc_bias.1.weight", "weight": "weight_bias",
                    "bias": "bias_bias"}


# ------------------------------------------------------------------------------ construction
def test_defaults(nf):
    m = nf.ILMNorm(64)
    assert (m.num_channels, m.num_groups, m.key_group_size, m.reduction, m.eps) == \
        (64, 32, 16, 16, 1e-5)
    assert (m.key_groups, m.embed_size) == (4, 2)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"encoder": (2, 4), "decoder_weight": (4, 2), "decoder_bias": (4, 2),
                      "weight": (64,), "bias": (64,)}
    assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert "key_group_size=16" in repr(m)


@pytest.mark.parametrize("c,key_size,reduction", [(64, 16, 16), (512, 16, 16), (1024, 16, 16),
                                                  (256, 16, 16), (2048, 16, 16), (96, 2, 4),
                                                  (12, 4, 3), (16, 16, 1), (8, 1, 16)])
def test_embed_size_and_shapes_match_the_authors(nf, c, key_size, reduction):
    """E = K // reduction when K >= reduction, else 2 (ilm_gn; K == reduction gives 1)."""
    groups = math.gcd(c, 8)
    ours = nf.ILMNorm(c, groups, key_size, reduction)
    theirs = _AuthorsILMgn(c, groups, key_size, reduction)
    for name, key in OURS_FROM_THEIRS.items():
        assert getattr(ours, name).numel() == theirs.state_dict()[key].numel(), name
    keys = c // key_size
    assert ours.embed_size == (keys // reduction if keys >= reduction else 2)
    assert ours.encoder.shape == theirs.state_dict()["fc_embed.0.weight"].shape


def test_initialised_like_the_authors(nf):
    """Same draws in the same order: nn.Linear's Kaiming-uniform for the three matrices, then
    weight_bias 1 and bias_bias 0."""
    torch.manual_seed(123)
    theirs = _AuthorsILMgn(64, 32, 8, 4)
    torch.manual_seed(123)
    ours = nf.ILMNorm(64, 32, 8, 4)
    sd = theirs.state_dict()
    for name, key in OURS_FROM_THEIRS.items():
        assert torch.equal(getattr(ours, name).detach(), sd[key].reshape(-1) if
                           name in ("weight", "bias") else sd[key]), name


def test_factory_kwargs(nf):
    m = nf.ILMNorm(8, 4, 2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m = nf.ILMNorm(8, 4, 2, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())


# ------------------------------------------------------------------- forward / backward
# (shape, num_groups, key_group_size, reduction)
CASES = [
    ((3, 8, 4, 3), 4, 2, 2),        # K = 4 >= reduction: E = 2
    ((2, 12, 3, 5), 4, 4, 16),      # key groups straddle the normalisation groups (3 | 4)
    ((2, 6, 5), 3, 3, 16),          # K = 2 < reduction: E = 2
    ((1, 8, 3, 5), 2, 4, 16),       # N = 1
    ((4, 6, 1), 3, 2, 2),           # L = 1 (2 values a group)
    ((5, 4), 2, 2, 16),             # (N, C)
    ((2, 12, 3, 2, 3), 6, 3, 2),    # 5-d
    ((3, 6, 7), 6, 6, 16),          # one channel per group, one key group
    ((2, 9, 1, 1), 3, 3, 1),        # odd C, L = 1, K == reduction: E = 1
    ((2, 64, 3, 3), 32, 16, 16),    # the authors' defaults
]


def _ids(case):
    shape, g, k, r = case
    return f"{shape}-G{g}-k{k}-r{r}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_float32(nf, backend, device, seed, case, training):
    shape, g, k, r = case
    m = prepare(make_ilm(nf, shape[1], g, k, r), seed, device, training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"ilm{shape}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape", [(3, 8, 4, 3), (4, 6, 5), (5, 4)], ids=str)
def test_dtypes(nf, backend, device, seed, dtype, shape):
    if not dtype_supported(device, dtype):
        pytest.skip(f"{dtype} not supported by the {backend} backend on {device}")
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = prepare(make_ilm(nf, shape[1], 2, 2), seed, device, True, param_dtype)
    x = make_input(shape, seed, dtype, device)
    dy = randn(shape, seed + 7, dtype, device)
    run_and_check(m, x, dy, dtype, f"ilm{shape}")
    assert all(p.dtype == param_dtype for p in m.parameters())


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_reduced_precision_module(nf, backend, device, seed, dtype):
    """module.to(float16 / bfloat16): parameters in half precision, statistics in float32."""
    shape = (4, 8, 3, 3)
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device, True, dtype)
    x = make_input(shape, seed, dtype, device)
    y = m(x)
    assert y.dtype == dtype
    assert_close_dtype(y, oracles.module_step(m, x).y, dtype, "output", factor=2)


@pytest.mark.parametrize("shape", [(3, 8, 4, 3), (2, 12, 3, 2, 3), (4, 6, 5), (2, 4, 1, 3)],
                         ids=str)
@pytest.mark.parametrize("dtype,dy_layout", [(torch.float32, "same"),
                                             (torch.float32, "contiguous"),
                                             (torch.float16, "same")], ids=str)
def test_channels_last(nf, backend, device, seed, shape, dtype, dy_layout):
    """channels_last / channels_last_3d / (N, L, C): output and dx keep the input's layout."""
    m = prepare(make_ilm(nf, shape[1], 2, 2), seed, device, True)
    x = make_input(shape, seed, dtype, device, layout="cl")
    assert layout_of(x) in ("nlc", "channels_last", "channels_last_3d") or shape[2:] == (1, 3)
    dy = randn(shape, seed + 7, dtype, device)
    if dy_layout == "same":
        dy = to_layout(dy, "cl")
    y, dx = run_and_check(m, x, dy, dtype, f"ilm{shape}")
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize("view", ["chan_step", "transposed_sliced", "spatial_step"])
def test_strided_views(nf, backend, device, seed, view):
    c = 6
    base_shape, fn = {"chan_step": ((3, 2 * c, 4, 3), lambda b: b[:, ::2]),
                      "transposed_sliced": ((3, 4, c, 5), lambda b: b.transpose(1, 2)[..., 1:]),
                      "spatial_step": ((3, c, 4, 7), lambda b: b[:, :, 1:, ::2])}[view]
    base = make_input(base_shape, seed, torch.float32, device)
    x = fn(base)
    assert not x.is_contiguous()
    m = prepare(make_ilm(nf, c, 3, 2, 2), seed, device)
    dy = randn(tuple(x.shape), seed + 7, torch.float32, device)
    leaf = base.detach().clone().requires_grad_()

    def expected_dx(gx):
        full = torch.zeros(base_shape, dtype=torch.float64)
        fn(full).copy_(gx)
        return full

    run_and_check(m, x, dy, torch.float32, f"ilm {view}", grad_wrt=(leaf, fn(leaf)),
                  expected_dx=expected_dx)


def test_contiguous_output_is_contiguous(nf, backend, device, seed):
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    x = make_input((3, 8, 4, 3), seed, torch.float32, device).requires_grad_()
    y = m(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y.is_contiguous() and dx.is_contiguous()


# ------------------------------------------------------------------------------ functional
def _fparams(c, groups_k, embed, seed, device, dtype=torch.float32):
    def r(shape, k, scale=0.7, offset=0.0):
        return randn(shape, seed + k, dtype, device, scale=scale, offset=offset)
    return dict(encoder=r((embed, groups_k), 1), decoder_weight=r((groups_k, embed), 2),
                decoder_bias=r((groups_k, embed), 3), weight=r((c,), 4, 0.3, 1.0),
                bias=r((c,), 5, 0.2))


@pytest.mark.parametrize("shape,groups,key_size,embed", [((3, 8, 4, 3), 4, 2, 3),
                                                         ((4, 6, 5), 2, 3, 1),
                                                         ((4, 6), 3, 2, 2)], ids=str)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_functional_matches_oracle(nf, backend, device, seed, shape, groups, key_size, embed,
                                   eps):
    """Any embedding size (the functional takes the encoder as given)."""
    c = shape[1]
    p = _fparams(c, c // key_size, embed, seed, device)
    x = make_input(shape, seed, torch.float32, device).requires_grad_()
    leaves = {n: t.clone().requires_grad_() for n, t in p.items()}
    y = nf.functional.ilm_norm(x, groups, key_size, leaves["encoder"], leaves["decoder_weight"],
                               leaves["decoder_bias"], leaves["weight"], leaves["bias"], eps=eps)
    dy = randn(shape, seed + 7, torch.float32, device)
    grads = torch.autograd.grad(y, [x, *leaves.values()], dy)
    exp = oracles.run("ilm", x, p, dy, eps=eps, num_groups=groups, key_group_size=key_size)
    lp = oracles.run("ilm", x, p, dy, eps=eps, num_groups=groups, key_group_size=key_size,
                     compute_dtype=torch.float32)
    assert_close_dtype(y, exp.y, torch.float32, "output", lowp=lp.y)
    for name, g in zip(["input", *leaves], grads):
        assert_close_dtype(g, exp.grads[name], torch.float32, f"grad {name}",
                           lowp=lp.grads[name])


@pytest.mark.parametrize("shape,layout", [((2, 4, 2, 3), "contiguous"), ((2, 4, 3, 2), "cl"),
                                          ((3, 4), "contiguous")], ids=str)
def test_gradcheck_float64(nf, backend, device, seed, shape, layout):
    """First and second derivatives in float64 (the backward is hand-written; the double
    backward recomputes the layer with differentiable torch ops)."""
    if device != "cpu":
        pytest.skip("gradcheck runs on the CPU backends (float64)")
    if backend == "triton" and layout != "contiguous":
        pytest.skip("Triton interpreter: the contiguous shape only")
    c = shape[1]
    x = to_layout(make_input(shape, seed, torch.float64), layout).requires_grad_()
    p = [t.requires_grad_() for t in _fparams(c, 2, 3, seed, "cpu", torch.float64).values()]

    def fn(x, enc, dw, db, w, b):
        return nf.functional.ilm_norm(x, 2, 2, enc, dw, db, w, b)

    assert torch.autograd.gradcheck(fn, (x, *p), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, (x, *p), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_coefficient_backward_is_the_derivative_of_the_forward():
    """The reference's hand-written backward (the spec of a future fused kernel) against
    autograd through its own forward, in float64, with the op contract's c_x and c_0:
    ``c_x = 2 dL/dm2``, ``c_0 = (dL/dmean - c_dy * sum_dy) / L`` (the explicit plane mean of
    ``y = scale (x - mean) + shift``)."""
    from normfuse.coefficients import ilm_coefficients, ilm_coefficients_backward

    torch.manual_seed(0)
    n, c, plane, g, k, e = 3, 12, 5, 4, 3, 2
    f64 = dict(dtype=torch.float64)
    mean = (torch.randn(n, c, **f64) + 0.5).requires_grad_()
    m2 = (torch.rand(n, c, **f64) * plane + 0.2).requires_grad_()
    params = [(0.7 * torch.randn(*s, **f64)).requires_grad_()
              for s in ((e, k), (k, e), (k, e))]
    params += [(1 + 0.3 * torch.randn(c, **f64)).requires_grad_(),
               (0.2 * torch.randn(c, **f64)).requires_grad_()]
    g1, g2 = torch.randn(n, c, **f64), torch.randn(n, c, **f64)
    scale, shift = ilm_coefficients(mean, m2, plane, g, *params, 1e-3)
    grads = torch.autograd.grad((scale * g2 + shift * g1).sum(), [mean, m2, *params])
    c_dy, c_x, c_0, *pgrads = ilm_coefficients_backward(g1, g2, mean.detach(), m2.detach(),
                                                        plane, g, *params, 1e-3)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_dy, scale.detach(), **tol)
    torch.testing.assert_close(c_x, 2 * grads[1], **tol)
    torch.testing.assert_close(c_0, (grads[0] - scale.detach() * g1) / plane, **tol)
    for got, want in zip(pgrads, grads[2:]):
        torch.testing.assert_close(got, want, **tol)


# ----------------------------------------------------------- the authors' checkpoints
@pytest.mark.parametrize("nested", [False, True])
def test_loads_the_authors_checkpoint(nf, backend, device, seed, nested):
    """Their state_dict (their names, the shared embedding under three keys, (1, C, 1, 1)
    biases) loads strictly, and the loaded layer computes what theirs does: output, input
    gradient and every parameter gradient (their shared embedding's gradient is ours)."""
    c, groups, key_size, reduction = 16, 4, 4, 2
    theirs = _AuthorsILMgn(c, groups, key_size, reduction)
    with torch.no_grad():
        for i, (name, p) in enumerate(theirs.named_parameters()):
            p.copy_(randn(p.shape, seed + i, scale=0.5, offset=1.0 if name == "weight_bias"
                          else 0.0))
    ours = nf.ILMNorm(c, groups, key_size, reduction)
    src = nn.Sequential(nn.Identity(), theirs) if nested else theirs
    dst = nn.Sequential(nn.Identity(), ours) if nested else ours
    sd = src.state_dict()
    pre = "1." if nested else ""
    assert {pre + "fc_weight.0.0.weight", pre + "fc_bias.0.0.weight"} <= set(sd)
    assert sd[pre + "weight_bias"].shape == (1, c, 1, 1)
    dst.load_state_dict(sd, strict=True)
    tsd = theirs.state_dict()
    for name, key in OURS_FROM_THEIRS.items():
        torch.testing.assert_close(getattr(ours, name).detach(), tsd[key].reshape(
            getattr(ours, name).shape), rtol=0, atol=0, msg=name)
    ours, theirs = ours.to(device), theirs.to(device).double()
    x = make_input((3, c, 4, 5), seed, torch.float32, device).requires_grad_()
    dy = randn(tuple(x.shape), seed + 7, torch.float32, device)
    y = ours(x)
    gx, *gp = torch.autograd.grad(y, [x, *ours.parameters()], dy)
    xd = x.detach().double().requires_grad_()
    yt = theirs(xd)
    gxt, *gpt = torch.autograd.grad(yt, [xd, *theirs.parameters()], dy.double())
    gpt = dict(zip([n for n, _ in theirs.named_parameters()], gpt))
    assert_close_dtype(y, yt, torch.float32, "output")
    assert_close_dtype(gx, gxt, torch.float32, "dx")
    for (name, g) in zip([n for n, _ in ours.named_parameters()], gp):
        assert_close_dtype(g, gpt[OURS_FROM_THEIRS[name]].reshape(g.shape), torch.float32,
                           f"grad {name}")
    fresh = nf.ILMNorm(c, groups, key_size, reduction)   # our own names round-trip
    fresh.load_state_dict(ours.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(OURS_FROM_THEIRS)


def test_inconsistent_shared_embedding_is_refused(nf):
    theirs = _AuthorsILMgn(8, 2, 2, 16)
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    sd["fc_bias.0.0.weight"] += 1
    ours = nf.ILMNorm(8, 2, 2)
    before = ours.encoder.detach().clone()
    with pytest.raises(RuntimeError, match="fc_bias.0.0.weight differs from fc_embed.0.weight"):
        ours.load_state_dict(sd)
    assert torch.equal(ours.encoder.detach(), before)


def test_state_dict_round_trip(nf, backend, device, seed):
    a = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    b = make_ilm(nf, 8, 4, 2).to(device)
    b.load_state_dict(a.state_dict())
    x = make_input((3, 8, 5, 2), seed, torch.float32, device)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------- numerics
def test_float32_large_offset(nf, backend, device, seed):
    """1e4 + N(0, 1): the key-group and group statistics stay float32-accurate."""
    shape = (3, 8, 4, 3)
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    with torch.no_grad():  # keep the bias branch out of saturation at key means ~1e4
        m.encoder.mul_(1e-4)
    x = randn(shape, seed, torch.float32, device, offset=1e4)
    dy = randn(shape, seed + 7, torch.float32, device)
    exp = oracles.module_step(m, x, dy)
    leaf = x.clone().requires_grad_()
    y = m(leaf)
    (dx,) = torch.autograd.grad(y, leaf, dy)

    def rel(a, b):
        return float((a.detach().double().cpu() - b).abs().max() / b.abs().max())

    assert rel(y, exp.y) < 1e-3 and rel(dx, exp.grads["input"]) < 1e-3


@pytest.mark.parametrize("pattern", ["planes", "all"])
def test_constant_input(nf, backend, device, seed, pattern):
    """Constant planes (every m2 = 0) and a constant input (zero key-group and group
    variances: the variance branch sees relu(encoder @ 0) = 0): finite output and gradients,
    equal to the oracle's."""
    shape = (3, 8, 3, 3)
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    if pattern == "all":
        x = torch.full(shape, 0.7, device=device)
    else:
        x = randn(shape[:2] + (1, 1), seed, torch.float32, device).expand(shape).contiguous()
    dy = randn(shape, seed + 7, torch.float32, device)
    y, dx = run_and_check(m, x, dy, torch.float32, f"constant {pattern}")
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_inf_stays_in_its_sample(nf, backend, device, seed, poison):
    """No statistic crosses samples: a NaN/Inf in sample 1 leaves samples 0 and 2 exact."""
    shape = (3, 8, 3, 3)
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    x = make_input(shape, seed, torch.float32, device)
    x[1, 5, 1, 2] = poison
    y = m(x)
    assert not torch.isfinite(y[1]).all()
    clean = x[[0, 2]]
    assert_close_dtype(y[[0, 2]], oracles.module_step(m, clean).y, torch.float32, "clean")


# ------------------------------------------------------------------------ the common path
def _ilm_call_variants():
    """(name, input, num_groups, key_group_size, params, eps): a valid call and one variant per
    check of ``check_ilm``."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 2, 2, generator=g)
    enc, dec = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    ok = (x, 4, 2, (enc, dec, dec.clone(), w, b), 1e-5)

    def but(**kw):
        x_, groups, keys, (e, dw, db, w_, b_), eps = ok
        names = ("enc", "dw", "db", "w", "b")
        params = [kw.get(n, v) for n, v in zip(names, (e, dw, db, w_, b_))]
        return (kw.get("x", x_), kw.get("groups", groups), kw.get("keys", keys), tuple(params),
                kw.get("eps", eps))

    per_key = dict(x=x[:, :, :1, :1], keys=1, enc=torch.randn(2, 8), dw=torch.randn(8, 2),
                   db=torch.randn(8, 2))
    return [("valid", ok), ("empty-batch", but(x=x[:0])),
            ("rank-6", but(x=x.reshape(3, 8, 1, 2, 2, 1))), ("int-input", but(x=x.long())),
            ("groups-not-dividing", but(groups=3)), ("groups-bool", but(groups=True)),
            ("keys-not-dividing", but(keys=3)), ("keys-zero", but(keys=0)),
            ("one-value-per-group", but(x=x[:, :, :1, :1], groups=8)),
            ("one-value-per-key-group", but(**per_key)),
            ("encoder-1d", but(enc=enc[0])), ("encoder-no-rows", but(enc=enc[:0])),
            ("encoder-columns", but(enc=torch.randn(2, 3))),
            ("decoder-transposed", but(dw=dec.t())), ("weight-shape", but(w=w[:4])),
            ("bias-float64", but(b=b.double())), ("eps-negative", but(eps=-1.0)),
            ("eps-bool", but(eps=True))]


_VARIANTS = _ilm_call_variants()


@pytest.mark.parametrize("name,call", _VARIANTS, ids=[name for name, _ in _VARIANTS])
def test_common_path_predicate_agrees_with_the_checks(name, call):
    """``ilm_layer_ok`` (the module's and ``ilm_norm``'s common path, which skips the checks)
    is True only where ``check_ilm`` passes; where it is False the checks run and decide."""
    from normfuse._checks import ilm_layer_ok
    from normfuse.functional import check_ilm
    x, groups, keys, params, eps = call
    fast = ilm_layer_ok(x, None, groups, keys, *params, eps)
    try:
        check_ilm(x, groups, keys, *params, eps)
        passes = True
    except (ValueError, TypeError, RuntimeError):
        passes = False
    assert not fast or passes, name
    if name == "valid":
        assert fast
    if name != "empty-batch":  # an empty batch passes the checks, not the predicate (numel 0)
        assert fast == passes, name


# -------------------------------------------------------------------------- which kernels run
def test_generic_kernels_come_from_the_backend(nf, backend, device, seed, monkeypatch):
    """The four full-size steps are the backend's ops, and so is the coefficient step where
    its ILM kernels are trusted ("torch": the reference; "cpu": the C++ kernels, called by the
    whole-layer op ``normfuse::ilm_layer``); "cuda" and
    "triton" run the reference for it until their ILM kernels have passed on a GPU
    (``_autograd._ILM_KERNELS``)."""
    from normfuse import _autograd

    used = []
    real = _autograd.ops_for

    class Spy:
        def __init__(self, ops):
            self._ops = ops

        def __getattr__(self, name):
            used.append(name)
            return getattr(self._ops, name)

    monkeypatch.setattr(_autograd, "ops_for", lambda name: Spy(real(name)))
    m = prepare(make_ilm(nf, 8, 4, 2), seed, device)
    x = make_input((2, 8, 3, 3), seed, torch.float32, device).requires_grad_()
    if backend == "cpu":  # one whole-layer op (csrc/layer_autograd.cpp) calls the C++ ops
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = m(x)
            y.sum().backward()
        assert y.grad_fn.name() == "NormfuseIlmLayerBackward" and used == []
        ran = [e.name for e in prof.events() if e.name.startswith("normfuse::")]
        # each direction one op, whose CPU kernel calls the component kernels without the
        # dispatcher (csrc/cpu/layer_directions_cpu.cpp)
        assert ran == ["normfuse::ilm_layer", "normfuse::ilm_layer_forward", "normfuse::ilm_layer_backward"], ran
        return
    m(x).sum().backward()
    if backend in _autograd._ILM_KERNELS:
        assert used == ["moments", "ilm_coefficients", "affine_apply", "backward_sums",
                        "ilm_coefficients_backward", "backward_apply"]
    else:
        assert used == ["moments", "affine_apply", "backward_sums", "backward_apply"]
    assert nf.resolve_backend(x) == backend


# ------------------------------------------------------------------------------ convert
class _GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.gn = nn.GroupNorm(8, 32)
        self.block = nn.Sequential(nn.Conv2d(32, 16, 1), nn.GroupNorm(4, 16, affine=False),
                                   nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.gn(self.conv(x)))).mean((2, 3)))


def test_convert_group_norm_model(nf, seed):
    torch.manual_seed(seed)
    model = _GNNet().double()
    with torch.no_grad():
        model.gn.weight.copy_(1 + 0.3 * torch.randn(32))
        model.gn.bias.copy_(0.3 * torch.randn(32))
    model.block.eval()
    gn_model = __import__("copy").deepcopy(model)
    out = nf.convert(model, "ilm", key_group_size=8)
    assert out is model
    assert type(model.gn) is nf.ILMNorm and type(model.block[1]) is nf.ILMNorm
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    gn, new = gn_model.gn, model.gn
    assert (new.num_groups, new.key_group_size, new.eps) == (8, 8, gn.eps)
    assert new.encoder.dtype == torch.float64 and new.training and not model.block[1].training
    torch.testing.assert_close(new.weight.detach(), gn.weight.detach() - 0.5)
    torch.testing.assert_close(new.bias.detach(), gn.bias.detach())
    assert torch.all(new.decoder_weight == 0) and torch.all(new.decoder_bias == 0)
    assert torch.all(model.block[1].weight == 0.5) and torch.all(model.block[1].bias == 0)
    # The GroupNorm function, with the unbiased group variance: per group of n values the
    # standardised values are sqrt((n - 1) / n) of GroupNorm's (up to eps).
    x = make_input((2, 3, 5, 4), seed, torch.float64)
    h = gn_model.conv(x)
    y = model.gn(h)
    # (h - mu) / sqrt(s2 var + eps) = group_norm(h, eps / s2) / sqrt(s2), s2 = n / (n - 1)
    n = 32 // 8 * 20
    s2 = n / (n - 1)
    ref = torch.nn.functional.group_norm(h, 8, gn.weight / math.sqrt(s2), gn.bias, gn.eps / s2)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    # trains: the decoders get gradients from the first step
    model(x).sum().backward()
    assert model.gn.decoder_weight.grad.abs().sum() > 0


def test_convert_refuses_without_touching_the_model(nf):
    model = nn.Sequential(nn.GroupNorm(2, 32), nn.Sequential(nn.GroupNorm(4, 24)))
    with pytest.raises(ValueError, match=r"the GroupNorm at '1.0' .* num_channels \(24\) must "
                                         r"be divisible by key_group_size \(16\)"):
        nf.convert(model, "ilm")
    assert type(model[0]) is nn.GroupNorm, "a failed convert must not replace any layer"
    with pytest.raises(ValueError, match="takes no option 'key_group_size'"):
        nf.convert(model, "assoc", key_group_size=8)
    with pytest.raises(ValueError, match="takes no option 'embed'"):
        nf.convert(model, "ilm", embed=8)
    single = nf.convert(nn.GroupNorm(2, 16, affine=False), "ilm")
    assert type(single) is nf.ILMNorm and torch.all(single.weight == 0.5)
    if "bias" in inspect.signature(nn.GroupNorm).parameters:  # GroupNorm(bias=False): newer torch
        single = nf.convert(nn.GroupNorm(2, 16, bias=False), "ilm")
        assert torch.all(single.bias == 0) and torch.all(single.weight == 0.5)


# ------------------------------------------------------------------------------ bad input
def _fcall(nf, x, groups=2, key_size=2, **override):
    c = x.shape[1]
    p = _fparams(c, c // key_size if key_size and c % key_size == 0 else 2, 2, 0, x.device)
    p.update(override)
    return nf.functional.ilm_norm(x, groups, key_size, p["encoder"], p["decoder_weight"],
                                  p["decoder_bias"], p["weight"], p["bias"])


@pytest.mark.parametrize("bad,message", [
    (dict(num_channels=0), "num_channels must be a positive int, got 0"),
    (dict(num_groups=3), r"num_channels \(8\) must be divisible by num_groups \(3\)"),
    (dict(key_group_size=3), r"num_channels \(8\) must be divisible by key_group_size \(3\)"),
    (dict(reduction=0), "reduction must be a positive int, got 0"),
    (dict(key_group_size=2.0), "key_group_size must be a positive int, got 2.0"),
])
def test_module_arguments(nf, bad, message):
    kw = dict(num_channels=8, num_groups=4, key_group_size=2, reduction=16, **{})
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        nf.ILMNorm(**kw)


def test_module_bad_input(nf, backend, device):
    m = make_ilm(nf, 4, 2, 2).to(device)
    x = make_input((3, 4, 2, 3), 0, torch.float32, device)
    with pytest.raises(ValueError, match=r"ILMNorm: expected input with 4 channels "
                                         r"\(num_channels\) in dim 1, got 6"):
        m(make_input((3, 6, 2, 3), 0, torch.float32, device))
    with pytest.raises(ValueError, match="ILMNorm: expected input of rank"):
        m(torch.randn(2, 4, 2, 2, 2, 2, device=device))
    with pytest.raises(ValueError, match="ILMNorm: input must have at least one element per sample"):
        m(torch.empty(2, 4, 0, device=device))
    with pytest.raises(ValueError, match=r"more than 1 value per group .* num_groups=4"):
        make_ilm(nf, 4, 4, 2).to(device)(x[:, :, 0, :1])
    with pytest.raises(ValueError, match=r"more than 1 value per key group .* "
                                         r"key_group_size=1"):
        make_ilm(nf, 4, 2, 1).to(device)(x[:, :, :1, :1])
    assert torch.isfinite(make_ilm(nf, 4, 2, 1).to(device)(x)).all()  # L > 1: fine


def test_functional_bad_input(nf, backend, device):
    x = make_input((3, 4, 2, 3), 0, torch.float32, device)
    cases = [
        (dict(groups=3), r"ilm_norm: the input's channel count \(4\) must be divisible by "
                         r"num_groups \(3\)"),
        (dict(key_size=3), r"ilm_norm: the input's channel count \(4\) must be divisible by "
                           r"key_group_size \(3\)"),
        (dict(key_size=0), "ilm_norm: key_group_size must be a positive int, got 0"),
        (dict(groups=True), "ilm_norm: num_groups must be a positive int, got True"),
        (dict(encoder=torch.ones(2, 3, device=device)),
         r"ilm_norm: encoder must have shape \(2, 2\), got \(2, 3\)"),
        (dict(encoder=torch.ones(2, device=device)), "ilm_norm: encoder must be a 2-d tensor"),
        (dict(encoder=torch.ones(0, 2, device=device)), "embed_size >= 1"),
        (dict(decoder_bias=torch.ones(2, 3, device=device)),
         r"ilm_norm: decoder_bias must have shape \(2, 2\), got \(2, 3\)"),
        (dict(weight=torch.ones(1, 4, 1, 1, device=device)),
         r"ilm_norm: weight must have shape \(4,\)"),
        (dict(bias=torch.ones(4, dtype=torch.int64, device=device)),
         "ilm_norm: bias must be a floating-point tensor"),
        (dict(decoder_weight=torch.ones(2, 2, device="meta")),
         "ilm_norm: decoder_weight must be on the input's device"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            _fcall(nf, x, **override)
    with pytest.raises(ValueError, match="ilm_norm: eps must be >= 0.0"):
        p = _fparams(4, 2, 2, 0, device)
        nf.functional.ilm_norm(x, 2, 2, *p.values(), eps=-1.0)


# ------------------------------------------------------------------------------ export
def test_export_is_portable_and_matches_eager(nf, seed):
    """torch.export of an ILM model holds standard ATen ops only (the "torch" backend, traced)
    and computes what eager computes."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), make_ilm(nf, 8, 4, 2)).double()
    randomize_parameters(model[1], seed)
    x = make_input((2, 3, 4, 5), seed, torch.float64)
    ep = torch.export.export(model, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(o.startswith(("normfuse.", "normfuse_triton.")) for o in ops), ops
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("route", ONNX_ROUTES)
def test_onnx_round_trip(nf, seed, route, tmp_path):
    """ONNX through onnxruntime matches eager for an ILM model, by both routes of
    ``test_export.onnx_round_trip``."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), make_ilm(nf, 8, 4, 2)).eval()
    randomize_parameters(model[1], seed)
    onnx_round_trip(model, make_input((2, 3, 4, 5), seed, torch.float32),
                    [make_input((2, 3, 4, 5), seed + 1, torch.float32)], route,
                    tmp_path / "ilm.onnx")
