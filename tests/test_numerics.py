"""Numerical robustness on every available backend (the ``backend`` fixture of conftest.py).

* Large offset: float32 inputs ``1e4 + N(0, 1)`` keep the relative error (max |error| / max
  |expected|) of the output and of dx below 1e-3, for all three layers, train and eval, both
  memory formats (the naive ``E[x^2] - E[x]^2`` in float32 loses everything here).
* float16 inputs of magnitude ~2e4: finite outputs and gradients (their squares overflow
  float16: the statistics must be accumulated in float32), close to the oracle.
* Constant planes (zero instance / group variance), whole constant channels in training (zero
  batch variance) and fully constant inputs: finite outputs and finite gradients, equal to the
  oracle's.
* NaN / Inf in the input: every call returns (run under a watchdog), the output is non-finite
  exactly where the float64 oracle's is; in training the running statistics become NaN/Inf as in
  ``nn.BatchNorm`` (BIN with gate 1 is checked against ``nn.BatchNorm2d`` step by step).
* Second-order gradients: ``gradgradcheck`` in float64 for all three layers, train and eval,
  contiguous and channels-last, on every backend that runs on the CPU.
"""
from __future__ import annotations

import threading

import pytest
import torch

import oracles
from oracles import assert_close_dtype, make_input, randn, randomize_parameters, to_layout

KINDS = ["bin", "iebn", "assoc"]
WATCHDOG_S = 120


def call_with_timeout(fn, timeout=WATCHDOG_S):
    """Run ``fn()`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"call did not return within {timeout} s (hang)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def make_layer(nf, kind, shape, **kw):
    c = shape[1]
    d = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    if kind == "bin":
        return getattr(nf, f"BatchInstanceNorm{d}d")(c, **kw)
    if kind == "iebn":
        return getattr(nf, f"InstanceEnhancementBatchNorm{d}d")(c, **kw)
    groups = kw.pop("groups", 2 if c % 2 == 0 else 1)
    return nf.AssocNorm(groups, c, embed_dim=2, **kw)


def prepare(nf, kind, shape, seed, device, training, dtype=torch.float32, **kw):
    m = randomize_parameters(make_layer(nf, kind, shape, **kw), seed)
    return m.to(device=device, dtype=dtype).train(training)


def rel_err(actual, expected):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def run(m, x, dy):
    """(y, dx, parameter grads) of module ``m`` on ``x`` (a leaf copy keeping its strides)."""
    leaf = x.detach().clone().requires_grad_()
    params = [p for _, p in m.named_parameters()]
    y = m(leaf)
    grads = torch.autograd.grad(y, [leaf] + params, dy, allow_unused=True)
    return y, grads[0], dict(zip([n for n, _ in m.named_parameters()], grads[1:]))


def test_watchdog_reports_a_hang():
    """The net holds: a call that does not return fails the test instead of hanging it."""
    import time

    with pytest.raises(pytest.fail.Exception, match="did not return"):
        call_with_timeout(lambda: time.sleep(3), timeout=0.2)
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0)
    assert call_with_timeout(lambda: 7) == 7


# ------------------------------------------------------------------------------ large offset
OFFSET_SHAPES = [((4, 3, 8, 8), "contiguous"), ((4, 3, 8, 8), "cl"), ((2, 3, 2000), "contiguous"),
                 ((2, 5, 3, 4, 5), "cl"), ((64, 5), "contiguous"), ((256, 3), "contiguous")]
# One value per plane, groups of 3 or 5 planes: a group mean of values at 1e4 taken as a plain
# float32 mean is off by ~1e-3 absolute, which the group's inverse std multiplies into every
# output; every backend merges relative to the first plane (coefficients/_merge.py).


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,layout", OFFSET_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_large_offset(nf, backend, device, seed, kind, shape, layout, training):
    m = prepare(nf, kind, shape, seed, device, training)
    with torch.no_grad():
        if kind == "iebn":  # a gate that sees mean ~1e4 and is not saturated
            m.gate_weight.copy_(1e-4 * randn(m.gate_weight.shape, seed + 3))
            m.gate_bias.copy_(-1.0 + 0.3 * randn(m.gate_bias.shape, seed + 4))
        if kind != "assoc":  # eval: running statistics of the same data
            m.running_mean.copy_(1e4 + 0.1 * randn(m.running_mean.shape, seed + 5))
            m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape))
    x = to_layout(randn(shape, seed, torch.float32, device, offset=1e4), layout)
    assert x.dtype == torch.float32 and float(x.mean()) == pytest.approx(1e4, abs=1)
    dy = randn(shape, seed + 7, torch.float32, device)
    exp = oracles.module_step(m, x, dy)
    y, dx, _ = run(m, x, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    e_y, e_dx = rel_err(y, exp.y), rel_err(dx, exp.grads["input"])
    assert e_y < 1e-3, f"output relative error {e_y:.2e} with a 1e4 offset"
    assert e_dx < 1e-3, f"dx relative error {e_dx:.2e} with a 1e4 offset"
    if training and kind != "assoc":
        assert rel_err(m.running_mean, exp.running_mean) < 1e-6
        assert rel_err(m.running_var, exp.running_var) < 1e-3


# ----------------------------------------------------------------------- float16 magnitude 2e4
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["offset", "spread", "extreme"])
@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_large_magnitude(nf, backend, device, seed, kind, pattern, layout, training):
    """|x| ~ 2e4 in float16: x^2 ~ 4e8 overflows float16 (max 65504), so any float16
    accumulation of squares gives inf/NaN.  'offset': 2e4 + N(0, 50); 'spread': +-2e4 * U(0.5,
    1) (variance ~2e8); 'extreme': values up to +-6e4 (the float16 range)."""
    shape = (4, 6, 5, 5)
    m = prepare(nf, kind, shape, seed, device, training)
    if pattern == "offset":
        xd = randn(shape, seed, torch.float64, scale=50.0, offset=2e4)
    else:
        g = oracles.gen(seed)
        sign = torch.randint(0, 2, shape, generator=g, dtype=torch.float64) * 2 - 1
        mag = 0.5 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
        xd = sign * mag * (2e4 if pattern == "spread" else 6e4)
    with torch.no_grad():
        if kind != "assoc" and pattern == "offset":
            m.running_mean.fill_(2e4)
            m.running_var.fill_(2500.0)
        if kind != "assoc" and pattern != "offset":
            m.running_mean.zero_()
            m.running_var.fill_(float(xd.var()))
        if kind == "iebn":
            m.gate_weight.mul_(1e-4)
    x = to_layout(xd.to(device=device, dtype=torch.float16), layout)
    assert torch.isfinite(x).all()
    dy = randn(shape, seed + 7, torch.float16, device)
    exp = oracles.module_step(m, x, dy)
    low = oracles.module_step(m, x, dy, torch.float32)
    y, dx, pgrads = run(m, x, dy)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all(), "non-finite output for float16 input of magnitude 2e4"
    assert torch.isfinite(dx).all(), "non-finite dx for float16 input of magnitude 2e4"
    for n, g in pgrads.items():
        assert g is not None and torch.isfinite(g).all(), f"non-finite grad {n}"
    assert_close_dtype(y, exp.y, torch.float16, "output", lowp=low.y)
    assert_close_dtype(dx, exp.grads["input"], torch.float16, "dx", lowp=low.grads["input"])
    if training and kind != "assoc":
        assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
        assert_close_dtype(m.running_mean, exp.running_mean, torch.float32, "running_mean")
        assert_close_dtype(m.running_var, exp.running_var, torch.float32, "running_var")


# --------------------------------------------------------------------------- constant planes
def constant_input(pattern, shape, seed, dtype, device, offset=0.0):
    """'planes': every (n, c) plane constant (zero instance variance, nonzero batch variance);
    'channel': channel 1 constant over the whole batch (zero batch variance) and plane 0 of
    sample 0 constant; 'all': one value everywhere."""
    n, c = shape[0], shape[1]
    x = randn(shape, seed, torch.float64, scale=1.5, offset=0.3)
    if pattern == "planes":
        x = randn((n, c) + (1,) * (len(shape) - 2), seed, torch.float64).expand(shape).clone()
    elif pattern == "channel":
        x[:, 1] = 2.5
        x[0, 0] = -1.25
    else:
        x = torch.full(shape, 0.75, dtype=torch.float64)
    return (x + offset).to(device=device, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["planes", "channel", "all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_constant_planes(nf, backend, device, seed, kind, pattern, dtype, training):
    if not oracles.dtype_supported(device, dtype):
        pytest.skip(f"{dtype} not supported on {device}")
    shape = (3, 4, 3, 5)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    groups = {"planes": 4, "channel": 2, "all": 1}[pattern]  # one channel per group: zero var
    kw = {"groups": groups} if kind == "assoc" else {}
    offset = 0.0 if dtype in (torch.float16, torch.bfloat16) else 1e3
    x = constant_input(pattern, shape, seed, dtype, device, offset)
    for layout in ("contiguous", "cl"):
        xl = to_layout(x, layout)
        dy = randn(shape, seed + 7, dtype, device)
        mm = prepare(nf, kind, shape, seed, device, training, pdtype, **kw)
        exp = oracles.module_step(mm, xl, dy)
        low = oracles.module_step(mm, xl, dy, torch.float32) if dtype != torch.float64 else None
        y, dx, pgrads = run(mm, xl, dy)
        what = f"{pattern} {layout}"
        assert torch.isfinite(y).all(), f"{what}: non-finite output"
        assert torch.isfinite(dx).all(), f"{what}: non-finite dx"
        for n, g in pgrads.items():
            assert torch.isfinite(g).all(), f"{what}: non-finite grad {n}"
        assert_close_dtype(y, exp.y, dtype, f"{what}: output",
                           lowp=None if low is None else low.y)
        assert_close_dtype(dx, exp.grads["input"], dtype, f"{what}: dx",
                           lowp=None if low is None else low.grads["input"])
        if training and kind != "assoc":
            assert torch.isfinite(mm.running_mean).all() and torch.isfinite(mm.running_var).all()


# ------------------------------------------------------------------------------- NaN and Inf
def poisoned(kind_of_poison, shape, seed, dtype, device, layout):
    x = make_input(shape, seed, torch.float64)
    if kind_of_poison == "nan":
        x[1, 2, 1, 3] = float("nan")
    elif kind_of_poison == "inf":
        x[0, 1, 2, 0] = float("inf")
    elif kind_of_poison == "inf_first":  # a plane's first element: the torch backend's pivot
        x[0, 1, 0, 0] = float("inf")
    elif kind_of_poison == "-inf":
        x[2, 3, 0, 0] = float("-inf")
        x[2, 3, 0, 1] = float("inf")
    else:
        x[:] = float("nan")
    return to_layout(x.to(device=device, dtype=dtype), layout)


class FiniteWhereOracleIsNot(AssertionError):
    """An output is finite where the float64 oracle's is NaN/Inf."""


def affected_region(kind, training, x):
    """Where a NaN/Inf of the input may legitimately reach the output: the poisoned channels
    (all samples) for BIN/IEBN with batch statistics, the poisoned planes in eval mode, the
    poisoned samples for AssocNorm (its auto-encoder mixes every group of a sample)."""
    bad = ~torch.isfinite(x.detach().cpu().double())
    dims = tuple(range(2, x.dim()))
    plane = bad.any(dim=dims, keepdim=True)  # (N, C, 1, 1)
    if kind == "assoc":
        region = plane.any(dim=1, keepdim=True)
    elif training:
        region = plane.any(dim=0, keepdim=True)
    else:
        region = plane
    return region.expand(x.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "all-nan"])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"), (torch.float32, "cl"),
                                          (torch.float16, "contiguous")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_inf_input_returns(nf, backend, device, seed, kind, poison, dtype, layout, training):
    """The call (forward and backward) returns (under a watchdog), and:

    * wherever the float64 oracle's output is NaN/Inf, ours is too (nothing non-finite becomes
      silently finite);
    * non-finite values stay inside the affected region (``affected_region``): a NaN never
      leaks into other channels (BIN/IEBN) or samples;
    * outside that region the output equals the oracle's; dx is finite there too.

    Inside the region we may be non-finite where the oracle is not: the centred form
    ``scale * (x - m) + shift`` with ``m = Inf`` makes a whole plane NaN where e.g. IEBN's
    saturated gate would leave the other elements finite."""
    shape = (3, 4, 3, 4)
    m = prepare(nf, kind, shape, seed, device, training)
    x = poisoned(poison, shape, seed, dtype, device, layout)
    dy = randn(shape, seed + 7, dtype, device)
    exp = oracles.module_step(m, x, dy)
    y, dx, pgrads = call_with_timeout(lambda: run(m, x, dy))
    assert y.shape == x.shape and dx.shape == x.shape
    y, dx = y.cpu(), dx.cpu()
    region = affected_region(kind, training, x)
    bad_y, bad_exp = ~torch.isfinite(y), ~torch.isfinite(exp.y)
    assert not (bad_y & ~region).any(), \
        f"non-finite output outside the affected region at {(bad_y & ~region).nonzero()[:8]}"
    assert not (~region).any() or torch.isfinite(dx[~region]).all(), \
        "non-finite dx outside the affected region"
    if (~region).any():
        assert_close_dtype(y[~region], exp.y[~region], dtype, "outputs outside the region")
    missing = bad_exp & ~bad_y
    if missing.any():
        raise FiniteWhereOracleIsNot(
            f"finite output where the oracle's is NaN/Inf, at {missing.nonzero()[:8].tolist()}")
    # the gradients too: an optimizer must not take a finite step the formula does not give
    for name, got in {"input": dx, **pgrads}.items():
        missing = ~torch.isfinite(exp.grads[name]) & torch.isfinite(got.cpu())
        if missing.any():
            raise FiniteWhereOracleIsNot(
                f"finite {name} gradient where the oracle's is NaN/Inf, at "
                f"{missing.nonzero()[:8].tolist()}")
    if kind != "assoc" and training:
        # running statistics: non-finite exactly for the poisoned channels, as nn.BatchNorm
        for name, want in (("running_mean", exp.running_mean), ("running_var", exp.running_var)):
            got = getattr(m, name).cpu()
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), \
                f"{name}: {got.tolist()} vs oracle {want.tolist()}"
        assert int(m.num_batches_tracked) == exp.num_batches_tracked


class NanInfKindMismatch(AssertionError):
    """A buffer is NaN where nn.BatchNorm's is Inf (or the reverse); both are non-finite."""


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("poison", ["nan", "inf", "inf_first"])
@pytest.mark.parametrize("layout", ["contiguous", "cl"])
def test_bin_gate1_matches_batchnorm_with_nan_inf(nf, backend, device, seed, momentum, poison,
                                                 layout):
    """BIN with gate 1 is nn.BatchNorm2d, also when a batch holds NaN/Inf: the same outputs
    (NaN pattern and finite values), the same input gradient pattern, the same running
    statistics (NaN/Inf for the poisoned channel, normal updates elsewhere) and
    num_batches_tracked, over a poisoned step, a clean step and an eval step."""
    c = 4
    kind_mismatch = []
    ours = nf.BatchInstanceNorm2d(c, momentum=momentum).to(device)
    ref = torch.nn.BatchNorm2d(c, momentum=momentum).to(device)
    with torch.no_grad():
        w = 1 + 0.3 * randn((c,), seed + 1, device=device)
        b = 0.2 * randn((c,), seed + 2, device=device)
        for mod in (ours, ref):
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    assert torch.all(ours.gate == 1)
    shape = (3, c, 4, 5)
    steps = [("train", poisoned(poison, shape, seed, torch.float32, device, layout)),
             ("train", to_layout(make_input(shape, seed + 1, device=device), layout)),
             ("eval", to_layout(make_input(shape, seed + 2, device=device), layout))]
    for i, (mode, x) in enumerate(steps):
        ours.train(mode == "train")
        ref.train(mode == "train")
        dy = randn(shape, seed + 10 + i, device=device)
        y1, dx1, _ = call_with_timeout(lambda: run(ours, x, dy))
        y2, dx2, _ = run(ref, x, dy)
        what = f"step {i} ({mode})"
        assert torch.equal(torch.isnan(y1), torch.isnan(y2)), f"{what}: output NaN pattern"
        fin = torch.isfinite(y2)
        torch.testing.assert_close(y1[fin], y2[fin], rtol=1e-4, atol=1e-4, msg=what)
        assert torch.equal(torch.isfinite(dx1), torch.isfinite(dx2)), f"{what}: dx pattern"
        for name in ("running_mean", "running_var"):
            a, r = getattr(ours, name), getattr(ref, name)
            assert torch.equal(torch.isfinite(a), torch.isfinite(r)), \
                f"{what}: {name} non-finite pattern {a.tolist()} vs {r.tolist()}"
            if not (torch.equal(torch.isnan(a), torch.isnan(r))
                    and torch.equal(torch.isinf(a), torch.isinf(r))):
                kind_mismatch.append(f"{what}: {name} {a.tolist()} vs nn.BatchNorm {r.tolist()}")
            f = torch.isfinite(r)
            torch.testing.assert_close(a[f], r[f], rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked), what
    # the poisoned channel stays poisoned (as in nn.BatchNorm) until reset
    assert not torch.isfinite(ours.running_var).all()
    ours.reset_running_stats()
    assert torch.isfinite(ours.running_var).all()
    if kind_mismatch:
        raise NanInfKindMismatch("; ".join(kind_mismatch))


# ---------------------------------------------------------------------- second-order gradients
def _functional(nf, kind, training, rm, rv, groups, activation=None):
    F = nf.functional
    if kind == "bin":
        def fn(x, w, b, gate):
            return F.batch_instance_norm(x, None if rm is None else rm.clone(),
                                         None if rv is None else rv.clone(), w, b, gate,
                                         training=training, activation=activation)
    elif kind == "iebn":
        def fn(x, w, b, gw, gb):
            return F.instance_enhancement_batch_norm(x, None if rm is None else rm.clone(),
                                                     None if rv is None else rv.clone(), w, b,
                                                     gw, gb, training=training,
                                                     activation=activation)
    else:
        def fn(x, enc, dm, dv, w, b):
            return F.assoc_norm(x, groups, enc, dm, dv, w, b, activation=activation)
    return fn


def _params(kind, c, seed, groups=2, embed=2):
    f = dict(dtype=torch.float64)
    if kind == "bin":
        return [1 + 0.3 * randn((c,), seed + 1, **f), 0.2 * randn((c,), seed + 2, **f),
                torch.rand(c, generator=oracles.gen(seed + 3), **f)]
    if kind == "iebn":
        return [1 + 0.3 * randn((c,), seed + 1, **f), 0.2 * randn((c,), seed + 2, **f),
                0.5 * randn((c,), seed + 3, **f), 0.5 * randn((c,), seed + 4, **f)]
    return [0.7 * randn((embed, groups), seed + 1, **f),
            0.7 * randn((groups, embed), seed + 2, **f),
            0.7 * randn((groups, embed), seed + 3, **f), 1 + 0.3 * randn((c,), seed + 4, **f),
            0.2 * randn((c,), seed + 5, **f)]


# Triton's interpreter runs the first backward once per perturbed input (~2 min a case at 72
# elements): its case is this 16-element shape, enough to prove its kernels differentiate as the
# CPU backends' do (the second derivative is the torch recomputation on every backend).
GRADGRAD_TRITON_SHAPE = (2, 4, 2, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((3, 4, 2, 3), "contiguous"), ((2, 4, 3, 2), "cl"),
                                          ((4, 4), "contiguous"),
                                          (GRADGRAD_TRITON_SHAPE, "contiguous")], ids=str)
def test_gradgradcheck_float64(nf, backend, device, seed, kind, training, shape, layout):
    if device != "cpu":
        pytest.skip("gradgradcheck runs on the CPU backends (float64)")
    if backend == "triton" and shape != GRADGRAD_TRITON_SHAPE:
        pytest.skip("Triton interpreter: the smallest shape only")
    c = shape[1]
    x = to_layout(make_input(shape, seed, torch.float64), layout).requires_grad_()
    params = [p.requires_grad_() for p in _params(kind, c, seed)]
    rm = 0.2 * randn((c,), seed + 20, torch.float64) if not training else None
    rv = 0.8 + torch.rand(c, generator=oracles.gen(seed + 21), dtype=torch.float64) \
        if not training else None
    fn = _functional(nf, kind, training, rm, rv, 2)
    inputs = (x, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_double_backward_matches_oracle(nf, backend, device, seed):
    """A gradient penalty (||dL/dx||^2 backpropagated) through a module equals the float64
    oracle's: the create_graph path is the real second derivative, not a detached one.
    float64 where the backend runs it (the CPU ones), float32 on the GPU backends (whose kernels
    take float32/16/bf16: forcing float64 there is refused, by design)."""
    shape = (3, 4, 3, 3)
    dtype = torch.float64 if device == "cpu" else torch.float32
    tol = dict(rtol=1e-8, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    m = prepare(nf, "bin", shape, seed, device, True, dtype)
    x = make_input(shape, seed, dtype, device).requires_grad_()
    dy = randn(shape, seed + 7, dtype, device)
    (gx,) = torch.autograd.grad(m(x), x, dy, create_graph=True)
    (gx ** 2).sum().backward()
    xo = x.detach().double().cpu().requires_grad_()
    po = {n: p.detach().double().cpu().requires_grad_() for n, p in m.named_parameters()}
    y, _, _ = oracles.bin_ref(xo, None, None, po["weight"], po["bias"], po["gate"], True)
    (go,) = torch.autograd.grad(y, xo, dy.double().cpu(), create_graph=True)
    (go ** 2).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), xo.grad, **tol)
    for n, p in m.named_parameters():
        got, want = p.grad, po[n].grad
        if got is None or want is None:  # the penalty does not reach it (bias): None or zeros
            assert (got is None or not got.any()) and (want is None or not want.any()), n
            continue
        torch.testing.assert_close(got.double().cpu(), want, **tol, msg=n)
