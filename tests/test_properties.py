"""Property-based tests (hypothesis): random layers and inputs against the float64 oracles.

For every backend in ``normfuse.available_backends()`` and each layer, hypothesis draws a
shape (rank 2..5; N, C and spatial sizes from 1 and small primes, so L = 1, N = 1 and C = 1 all
occur), a dtype (float64/32/16, bfloat16), a memory format (contiguous, channels-last, or a
strided view: stepped, offset or transposed), train/eval, track_running_stats, momentum (incl.
None), the parameter dtype and the layout of the incoming gradient.  The property:

* an input with a single value per channel where batch statistics are needed raises the
  documented ValueError (README error contract, ``single-value``) and changes no buffer;
* otherwise the output, the input gradient, every parameter gradient, the running statistics
  and num_batches_tracked match ``oracles.module_step`` at the dtype's tolerance, the output has
  the input's dtype and shape, and its memory format is the input's (channels-last stays
  channels-last, contiguous stays contiguous, a strided view gives a contiguous output).

The profile is fixed (``derandomize=True``, no example database) so CI sees the same examples on
every run; ``NORMFUSE_HYPOTHESIS_EXAMPLES=500`` asks for a deeper (still reproducible) search.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracles
from oracles import assert_close_dtype, device_for_backend, dtype_supported, make_input, \
    randn, randomize_parameters, to_layout

try:
    import normfuse as nf
except Exception:  # pragma: no cover - conftest reports the import error
    nf = None


def _backends():
    names = ["torch"] if nf is None else list(nf.available_backends())
    only = os.environ.get("NORMFUSE_TEST_BACKENDS")
    if only:
        names = [n for n in names if n in only.split(",")]
    out = []
    for n in names:
        if n == "triton" and device_for_backend(n) == "cpu":  # the interpreter: ~0.5 s a call
            out.append(pytest.param(n, marks=pytest.mark.slow))
        else:
            out.append(n)
    return out


BACKENDS = _backends()
KINDS = ["bin", "iebn", "assoc"]
EXAMPLES = int(os.environ.get("NORMFUSE_HYPOTHESIS_EXAMPLES", "100"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])

SIZES = st.sampled_from([1, 1, 2, 3, 5, 7, 11, 13])
SPATIAL = st.sampled_from([1, 1, 2, 3, 5, 7])
CHANNELS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 12])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])
MAX_NUMEL = 3000


def divisors(c):
    return [g for g in range(1, c + 1) if c % g == 0]


@st.composite
def cases(draw, kind):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    n, c = draw(SIZES), draw(CHANNELS)
    spatial = [draw(SPATIAL) for _ in range(rank - 2)]
    if rank == 3 and draw(st.booleans()):
        spatial = [draw(st.sampled_from([17, 31, 64, 97]))]  # longer planes (vector tails)
    shape = (n, c, *spatial)
    while math.prod(shape) > MAX_NUMEL:  # keep examples cheap: shrink the batch
        shape = (max(1, shape[0] // 2),) + shape[1:]
        if shape[0] == 1:
            break
    case = dict(kind=kind, shape=shape, dtype=draw(DTYPES),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                view=draw(st.sampled_from(["chan_step", "batch_step", "offset", "last_step",
                                           "transpose"])),
                dy_same_layout=draw(st.booleans()),
                training=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 20)))
    case["param_lowp"] = case["dtype"] in (torch.float16, torch.bfloat16) and draw(st.booleans())
    if kind == "assoc":
        case["groups"] = draw(st.sampled_from(divisors(c)))
        case["embed_dim"] = draw(st.integers(1, 3))
    else:
        case["track"] = draw(st.booleans())
        case["momentum"] = draw(st.sampled_from([0.1, 0.5, None]))
        case["tracked_before"] = draw(st.sampled_from([0, 3]))
        case["affine"] = draw(st.booleans()) if kind == "bin" else True
    return case


def make_module(case, device):
    kind, shape = case["kind"], case["shape"]
    c = shape[1]
    d = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    if kind == "assoc":
        m = nf.AssocNorm(case["groups"], c, embed_dim=case["embed_dim"])
    else:
        kw = dict(track_running_stats=case["track"], momentum=case["momentum"])
        if kind == "bin":
            m = getattr(nf, f"BatchInstanceNorm{d}d")(c, affine=case["affine"], **kw)
        else:
            m = getattr(nf, f"InstanceEnhancementBatchNorm{d}d")(c, **kw)
    m = randomize_parameters(m, case["seed"])
    if kind != "assoc" and case["track"]:
        m.num_batches_tracked.fill_(case["tracked_before"])
    dtype = case["dtype"]
    pdtype = dtype if (dtype == torch.float64 or case["param_lowp"]) else torch.float32
    return m.to(device=device, dtype=pdtype).train(case["training"])


def make_x(case, device):
    """(x, xin, grad_target): x the values, xin what the module sees (requires grad through a
    leaf), grad_target the tensor whose gradient is compared (xin itself)."""
    shape, dtype, seed = case["shape"], case["dtype"], case["seed"]
    layout = case["layout"]
    if layout == "channels_last" and len(shape) > 2:
        x = make_input(shape, seed, dtype, device, layout="cl")
        leaf = x.detach().clone().requires_grad_()  # clone keeps the strides
        return x, leaf
    if layout != "strided":
        x = make_input(shape, seed, dtype, device)
        leaf = x.detach().clone().requires_grad_()
        return x, leaf
    n, c, *sp = shape
    view = case["view"]
    if view == "last_step" and not sp:
        view = "chan_step"
    if view == "transpose" and len(sp) < 2:
        view = "offset"
    if view == "chan_step":
        base_shape, fn = (n, 2 * c, *sp), (lambda b: b[:, ::2])
    elif view == "batch_step":
        base_shape, fn = (2 * n, c, *sp), (lambda b: b[::2])
    elif view == "offset":
        base_shape, fn = (n + 1, c, *sp), (lambda b: b[1:])
    elif view == "last_step":
        base_shape, fn = (n, c, *sp[:-1], 2 * sp[-1]), (lambda b: b[..., ::2])
    else:  # transpose the last two spatial dims
        base_shape = (n, c, *sp[:-2], sp[-1], sp[-2])
        fn = (lambda b: b.transpose(-1, -2))
    base = make_input(base_shape, seed, dtype, device)
    x = fn(base)
    assert tuple(x.shape) == tuple(shape)
    leaf = base.detach().clone().requires_grad_()
    return x, fn(leaf)


def needs_batch_stats(case):
    return case["kind"] != "assoc" and (case["training"] or not case["track"])


def is_channels_last(t):
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def check_case(case, backend):
    device = device_for_backend(backend)
    dtype = case["dtype"]
    if not dtype_supported(device, dtype):
        return
    m = make_module(case, device)
    x, xin = make_x(case, device)
    shape = case["shape"]
    what = f"{backend} {case}"
    if needs_batch_stats(case) and shape[0] * math.prod(shape[2:]) <= 1:
        snap = oracles.snapshot_buffers(m)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m(xin)
        oracles.assert_buffers_equal(m, snap, what)
        return
    dy = randn(shape, case["seed"] + 7, dtype, device)
    if case["dy_same_layout"] and is_channels_last(x):
        dy = to_layout(dy, "cl")
    exp = oracles.module_step(m, x, dy)
    low = oracles.module_step(m, x, dy, torch.float32) if dtype != torch.float64 else None
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]

    y = m(xin)
    assert y.dtype == dtype and tuple(y.shape) == tuple(shape), what
    if xin.is_contiguous():
        assert y.is_contiguous(), f"{what}: contiguous input, output strides {y.stride()}"
    elif is_channels_last(xin):
        assert y.stride() == xin.stride(), f"{what}: channels-last lost: {y.stride()}"
    else:
        assert y.is_contiguous(), f"{what}: strided view, output strides {y.stride()}"
    grads = torch.autograd.grad(y, [xin] + params, dy, allow_unused=True)

    def lowp(f):
        return None if low is None else f(low)

    assert_close_dtype(y, exp.y, dtype, f"{what}: output", lowp=lowp(lambda r: r.y))
    assert_close_dtype(grads[0], exp.grads["input"], dtype, f"{what}: dx",
                       lowp=lowp(lambda r: r.grads["input"]))
    for name, g, p in zip(names, grads[1:], params):
        assert g is not None and g.dtype == p.dtype, f"{what}: grad {name}"
        assert_close_dtype(g, exp.grads[name], dtype, f"{what}: grad {name}",
                           lowp=lowp(lambda r, k=name: r.grads[k]))
    if exp.running_mean is not None:
        bdtype = m.running_mean.dtype
        tol_dtype = bdtype if bdtype in (torch.float16, torch.bfloat16) else (
            torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_dtype(m.running_mean, exp.running_mean, tol_dtype, f"{what}: running_mean")
        assert_close_dtype(m.running_var, exp.running_var, tol_dtype, f"{what}: running_var")
    if exp.num_batches_tracked is not None:
        assert int(m.num_batches_tracked) == exp.num_batches_tracked, f"{what}: nbt"


def examples_for(backend):
    """Triton on the CPU runs through its interpreter (~0.5 s a call): a tenth of the examples."""
    if backend == "triton" and device_for_backend(backend) == "cpu":
        return max(5, EXAMPLES // 10)
    return EXAMPLES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_oracle(backend, kind):
    @settings(PROFILE, max_examples=examples_for(backend))
    @given(case=cases(kind))
    def check(case):
        with nf.use_backend(backend):
            check_case(case, backend)

    check()


# ----------------------------------------------------------------- functional: eval / no stats
@st.composite
def functional_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4]))
    shape = (draw(SIZES), draw(CHANNELS), *[draw(SPATIAL) for _ in range(rank - 2)])
    return dict(kind=draw(st.sampled_from(["bin", "iebn"])), shape=shape,
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                training=draw(st.booleans()), with_running=draw(st.booleans()),
                with_affine=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.0, 0.1, 1.0])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                seed=draw(st.integers(0, 2 ** 20)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_oracle(backend):
    """The functional forms with every combination of optional arguments (weight/bias None,
    running stats None in eval = batch statistics), eps and momentum values."""
    settings(PROFILE, max_examples=examples_for(backend))(
        given(case=functional_cases())(lambda case: check_functional(case, backend)))()


def check_functional(case, backend):
    device = device_for_backend(backend)
    dtype, shape, seed = case["dtype"], case["shape"], case["seed"]
    if not dtype_supported(device, dtype):
        return
    c = shape[1]
    x = make_input(shape, seed, dtype, device)
    f = dict(dtype=dtype, device=device)
    rm = (0.3 * randn((c,), seed + 1, **f)) if case["with_running"] else None
    rv = (0.5 + randn((c,), seed + 2, **f).abs()) if case["with_running"] else None
    w = (1 + 0.3 * randn((c,), seed + 3, **f)) if case["with_affine"] else None
    b = (0.2 * randn((c,), seed + 4, **f)) if case["with_affine"] else None
    g1, g2 = 0.5 * randn((c,), seed + 5, **f), 0.5 * randn((c,), seed + 6, **f)
    use_batch = case["training"] or rm is None
    if use_batch and shape[0] * math.prod(shape[2:]) <= 1:
        return  # the error contract covers it
    kw = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"])
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()
    with nf.use_backend(backend):
        if case["kind"] == "bin":
            y = nf.functional.batch_instance_norm(x, rm, rv, w, b, g1, **kw)
            exp = oracles.run("bin", x, {"weight": w, "bias": b, "gate": g1}, running_mean=rm0,
                              running_var=rv0, **kw)
        else:
            y = nf.functional.instance_enhancement_batch_norm(x, rm, rv, w, b, g1, g2, **kw)
            exp = oracles.run("iebn", x, {"weight": w, "bias": b, "gate_weight": g1,
                                          "gate_bias": g2}, running_mean=rm0, running_var=rv0,
                              **kw)
    low = None
    if dtype != torch.float64:
        low = oracles.run(case["kind"], x, {"weight": w, "bias": b, "gate": g1,
                                            "gate_weight": g1, "gate_bias": g2},
                          running_mean=rm0, running_var=rv0, compute_dtype=torch.float32,
                          **kw).y
    assert_close_dtype(y, exp.y, dtype, f"{backend} {case}: output", lowp=low)
    if rm is not None:
        if case["training"]:
            assert_close_dtype(rm, exp.running_mean, dtype, f"{case}: running_mean")
            assert_close_dtype(rv, exp.running_var, dtype, f"{case}: running_var")
        else:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval changed running stats"
