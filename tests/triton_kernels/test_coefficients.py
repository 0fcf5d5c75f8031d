"""The six coefficient ops against float64 references (formulas for the forward, autograd of a
surrogate for the backward), training and eval, with and without affine parameters, running
statistics updates; plus agreement with normfuse's own PyTorch coefficient functions."""
from __future__ import annotations

import pytest
import tk_reference as ref
import torch
from tk_common import DEVICE

ops = torch.ops.normfuse_triton
ACCS = [torch.float32] + ([torch.float64] if DEVICE == "cpu" else [])
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
EPS, MOMENTUM = 1e-5, 0.1


def _rand(shape, seed, dtype, low=None, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    if low is not None:
        t = t.abs() + low
    return t.to(dtype).to(DEVICE)


def _stats(n, c, L, dtype, seed=0):
    """Plane means around 3 (so batch deviations are small against them) and m2 of unit-ish
    variance."""
    return _rand((n, c), seed, dtype, offset=3.0), _rand((n, c), seed + 1, dtype, low=0.2) * L


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=TOL[dtype],
                               atol=TOL[dtype])


def _check_all(actual, expected, dtype):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        _close(a, e, dtype)


NC = [(1, 1), (3, 5), (40, 70), (300, 3)]
MODES = ["train", "train_no_running", "eval", "eval_no_running"]


def _mode(mode, c, dtype):
    training = mode.startswith("train")
    if mode.endswith("no_running"):
        return training, None, None
    return training, _rand((c,), 7, dtype), _rand((c,), 8, dtype, low=0.5)


def batch_grid(test):
    """BIN's and IEBN's grid: every accumulator dtype, mode and (N, C), with and without the
    affine parameters."""
    for mark in (pytest.mark.parametrize("affine", [True, False]),
                 pytest.mark.parametrize("n,c", NC, ids=str),
                 pytest.mark.parametrize("mode", MODES),
                 pytest.mark.parametrize("acc", ACCS, ids=str)):
        test = mark(test)
    return test


@batch_grid
def test_bin(n, c, mode, affine, acc):
    L = 7
    mean, m2 = _stats(n, c, L, acc)
    gate = _rand((c,), 2, acc).sigmoid()
    weight, bias = (_rand((c,), 3, acc), _rand((c,), 4, acc)) if affine else (None, None)
    training, rm, rv = _mode(mode, c, acc)
    rm0, rv0 = (None, None) if rm is None else (rm.clone(), rv.clone())
    scale, shift = ops.bin_coefficients(mean, m2, L, gate, weight, bias, rm, rv, training,
                                        MOMENTUM, EPS)
    _check_all((scale, shift), ref.bin_coefficients(mean.double(), m2.double(), L, gate.double(),
                                                    *(None if t is None else t.double() for t in
                                                      (weight, bias, rm0, rv0)), training, EPS),
               acc)
    if rm is not None:
        if training:
            _check_all((rm, rv), ref.running_update(mean.double(), m2.double(), L, rm0.double(),
                                                    rv0.double(), MOMENTUM), acc)
        else:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0)

    g1, g2 = _rand((n, c), 5, acc), _rand((n, c), 6, acc)
    out = ops.bin_coefficients_backward(g1, g2, mean, m2, L, gate, weight, bias, rm0, rv0,
                                        training, EPS)
    params = [gate, weight]

    def forward(m, q, gate_, weight_):
        return ref.bin_coefficients(m, q, L, gate_, weight_, None if bias is None else
                                    bias.double(), *(None if t is None else t.double()
                                                     for t in (rm0, rv0)), training, EPS)
    expected = ref.coefficients_backward(forward, g1, g2, mean, m2, L, params)
    c_dy, c_x, c_0, d_gate, *d_weight = expected
    d_weight = d_weight[0] if affine else torch.zeros(c, dtype=torch.float64)
    _check_all(out[:4], (c_dy, c_x, c_0, d_gate), acc)
    if affine:
        _close(out[4], d_weight, acc)
    _close(out[5], g1.double().sum(0), acc)


@batch_grid
def test_iebn(n, c, mode, affine, acc):
    L = 5
    mean, m2 = _stats(n, c, L, acc, seed=10)
    gw, gb = _rand((c,), 12, acc) * 0.3, _rand((c,), 13, acc) - 1
    weight, bias = (_rand((c,), 14, acc), _rand((c,), 15, acc)) if affine else (None, None)
    training, rm, rv = _mode(mode, c, acc)
    rm0, rv0 = (None, None) if rm is None else (rm.clone(), rv.clone())
    scale, shift = ops.iebn_coefficients(mean, m2, L, gw, gb, weight, bias, rm, rv, training,
                                         MOMENTUM, EPS)
    d = [None if t is None else t.double() for t in (weight, bias, rm0, rv0)]
    _check_all((scale, shift), ref.iebn_coefficients(mean.double(), m2.double(), L, gw.double(),
                                                     gb.double(), *d, training, EPS), acc)
    if rm is not None and training:
        _check_all((rm, rv), ref.running_update(mean.double(), m2.double(), L, rm0.double(),
                                                rv0.double(), MOMENTUM), acc)

    g1, g2 = _rand((n, c), 16, acc), _rand((n, c), 17, acc)
    out = ops.iebn_coefficients_backward(g1, g2, mean, m2, L, gw, gb, weight, bias, rm0, rv0,
                                         training, EPS)

    def forward(m, q, gw_, gb_, weight_):
        return ref.iebn_coefficients(m, q, L, gw_, gb_, weight_, d[1], d[2], d[3], training, EPS)
    expected = ref.coefficients_backward(forward, g1, g2, mean, m2, L, [gw, gb, weight])
    _check_all(out[:5], expected[:5], acc)
    if affine:
        _close(out[5], expected[5], acc)
    _close(out[6], g1.double().sum(0), acc)


@pytest.mark.parametrize("acc", ACCS, ids=str)
@pytest.mark.parametrize("n,c,groups,hidden", [(1, 4, 1, 1), (3, 12, 4, 3), (10, 6, 3, 2),
                                               (19, 260, 2, 5), (2, 660, 20, 17),
                                               (3, 128, 64, 70)], ids=str)
def test_assoc(n, c, groups, hidden, acc):
    L = 6
    mean, m2 = _stats(n, c, L, acc, seed=20)
    mean = mean - 3.0 + 0.1 * _rand((n, c), 29, acc)  # keep the encoder's relu inputs mixed
    enc = _rand((hidden, groups), 21, acc)
    dec_mu, dec_var = _rand((groups, hidden), 22, acc), _rand((groups, hidden), 23, acc)
    weight, bias = _rand((c,), 24, acc) + 1, _rand((c,), 25, acc)
    scale, shift = ops.assoc_coefficients(mean, m2, L, groups, enc, dec_mu, dec_var, weight,
                                          bias, EPS)
    params = [enc, dec_mu, dec_var, weight, bias]

    def forward(m, q, *p):
        return ref.assoc_coefficients(m, q, L, groups, *p, EPS)
    _check_all((scale, shift), forward(mean.double(), m2.double(), *(p.double() for p in params)),
               acc)
    g1, g2 = _rand((n, c), 26, acc), _rand((n, c), 27, acc)
    out = ops.assoc_coefficients_backward(g1, g2, mean, m2, L, groups, enc, dec_mu, dec_var,
                                          weight, bias, EPS)
    _check_all(out, ref.coefficients_backward(forward, g1, g2, mean, m2, L, params), acc)
    again = ops.assoc_coefficients_backward(g1, g2, mean, m2, L, groups, enc, dec_mu, dec_var,
                                            weight, bias, EPS)
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # deterministic


def test_matches_normfuse_reference():
    """Same numbers as the PyTorch coefficient functions of normfuse.coefficients."""
    coefficients = pytest.importorskip("normfuse.coefficients")
    acc = ACCS[-1]
    n, c, L = 4, 6, 9
    mean, m2 = _stats(n, c, L, acc, seed=30)
    g1, g2 = _rand((n, c), 31, acc), _rand((n, c), 32, acc)
    gate, weight, bias = _rand((c,), 33, acc).sigmoid(), _rand((c,), 34, acc), _rand((c,), 35, acc)
    rm, rv = _rand((c,), 36, acc), _rand((c,), 37, acc, low=0.5)
    rm2, rv2 = rm.clone(), rv.clone()
    _check_all(ops.bin_coefficients(mean, m2, L, gate, weight, bias, rm, rv, True, 0.1, EPS),
               coefficients.bin_coefficients(mean, m2, L, gate, weight, bias, rm2, rv2, True,
                                             0.1, EPS), acc)
    _check_all((rm, rv), (rm2, rv2), acc)
    _check_all(ops.bin_coefficients_backward(g1, g2, mean, m2, L, gate, weight, bias, rm, rv,
                                             False, EPS),
               coefficients.bin_coefficients_backward(g1, g2, mean, m2, L, gate, weight, bias,
                                                      rm, rv, False, EPS), acc)
    _check_all(ops.iebn_coefficients_backward(g1, g2, mean, m2, L, gate, weight, weight, bias,
                                              None, None, True, EPS),
               coefficients.iebn_coefficients_backward(g1, g2, mean, m2, L, gate, weight, weight,
                                                       bias, None, None, True, EPS), acc)
    enc, dec = _rand((2, 3), 38, acc), _rand((3, 2), 39, acc)
    _check_all(ops.assoc_coefficients_backward(g1, g2, mean, m2, L, 3, enc, dec, dec, weight,
                                               bias, EPS),
               coefficients.assoc_coefficients_backward(g1, g2, mean, m2, L, 3, enc, dec, dec,
                                                        weight, bias, EPS), acc)


@pytest.mark.skipif(torch.float64 not in ACCS, reason="float64 statistics: not on this device")
@pytest.mark.parametrize("layer", ["bin", "iebn"])
def test_float64_counts_past_float32(layer):
    """N * L = 50331651 values per channel and L = 2**24 + 1, both odd and past 2**24, which
    float32 cannot hold: a float64 call keeps the batch count and 2 L in float64 (formed as
    int * float literal in a kernel they are float32, ~2e-8 and ~6e-8 off), forward (with the
    running-statistics update) and backward, against normfuse's float64 reference."""
    coefficients = pytest.importorskip("normfuse.coefficients")
    acc, n, c, L = torch.float64, 3, 4, 2**24 + 1
    mean, m2 = _stats(n, c, L, acc, seed=70)
    gates = [_rand((c,), 71, acc).sigmoid()] + ([_rand((c,), 72, acc)] if layer == "iebn" else [])
    weight, bias = _rand((c,), 73, acc), _rand((c,), 74, acc)
    g1, g2 = _rand((n, c), 75, acc), _rand((n, c), 76, acc)
    run, want_run = ([_rand((c,), 77, acc), _rand((c,), 78, acc, low=0.5)] for _ in range(2))
    forward = f"{layer}_coefficients"
    got = (*getattr(ops, forward)(mean, m2, L, *gates, weight, bias, *run, True, MOMENTUM, EPS),
           *run,
           *getattr(ops, f"{forward}_backward")(g1, g2, mean, m2, L, *gates, weight, bias, None,
                                                None, True, EPS))
    want = (*getattr(coefficients, forward)(mean, m2, L, *gates, weight, bias, *want_run, True,
                                            MOMENTUM, EPS),
            *want_run,
            *getattr(coefficients, f"{forward}_backward")(g1, g2, mean, m2, L, *gates, weight,
                                                          bias, None, None, True, EPS))
    names = ("scale", "shift", "running_mean", "running_var", "c_dy", "c_x", "c_0",
             *(f"grad_{g}" for g in (["gate"] if layer == "bin" else ["gate_weight",
                                                                     "gate_bias"])),
             "grad_weight", "grad_bias")
    # relative to each output's own size (c_0 ~ 1/L)
    errors = {name: float((a.cpu() - w.cpu()).abs().max() / w.abs().max())
              for name, a, w in zip(names, got, want, strict=True)}
    bad = {name: f"{err:.1e}" for name, err in errors.items() if err >= 1e-12}
    assert not bad, f"off by more than 1e-12 of their largest value: {bad}"


def test_assoc_limits():
    mean = torch.zeros(2, 130, device=DEVICE)
    with pytest.raises(RuntimeError, match="<= 64"):
        ops.assoc_coefficients(mean, mean, 4, 65, torch.zeros(3, 65, device=DEVICE),
                               torch.zeros(65, 3, device=DEVICE), torch.zeros(65, 3, device=DEVICE),
                               mean[0], mean[0], EPS)
    with pytest.raises(RuntimeError, match="groups"):
        ops.assoc_coefficients(mean, mean, 4, 3, torch.zeros(3, 3, device=DEVICE),
                               torch.zeros(3, 3, device=DEVICE), torch.zeros(3, 3, device=DEVICE),
                               mean[0], mean[0], EPS)


@pytest.mark.parametrize("acc", ACCS, ids=str)
def test_single_element_planes(acc):
    """L = 1 (BIN's instance part) and one-element groups (AssocNorm): the zero-factor
    convention of normfuse.coefficients, checked against both references."""
    coefficients = pytest.importorskip("normfuse.coefficients")
    n, c = 6, 4
    mean, m2 = _rand((n, c), 40, acc), torch.zeros(n, c, dtype=acc, device=DEVICE)
    g1, g2 = _rand((n, c), 41, acc), torch.zeros(n, c, dtype=acc, device=DEVICE)
    gate, weight, bias = _rand((c,), 42, acc).sigmoid(), _rand((c,), 43, acc), _rand((c,), 44, acc)
    args = (gate, weight, bias, None, None, True)
    out = ops.bin_coefficients_backward(g1, g2, mean, m2, 1, *args, EPS)
    _check_all(out, coefficients.bin_coefficients_backward(g1, g2, mean, m2, 1, *args, EPS), acc)
    _check_all(ops.bin_coefficients(mean, m2, 1, *args, 0.1, EPS),
               ref.bin_coefficients(mean.double(), m2.double(), 1, *(t.double() for t in args[:3]),
                                    None, None, True, EPS), acc)
    enc, dec = _rand((2, 4), 45, acc), _rand((4, 2), 46, acc)
    params = (enc, dec, dec, weight, bias)
    _check_all(ops.assoc_coefficients(mean, m2, 1, 4, *params, EPS),
               coefficients.assoc_coefficients(mean, m2, 1, 4, *params, EPS), acc)
    _check_all(ops.assoc_coefficients_backward(g1, g2, mean, m2, 1, 4, *params, EPS),
               coefficients.assoc_coefficients_backward(g1, g2, mean, m2, 1, 4, *params, EPS), acc)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("n,c", [(3, 70), (40, 5)], ids=str)
def test_batch_counter(impl, layer, n, c):
    """num_batches_tracked (the forwards' last argument): +1 per training call, by program 0 of
    the one launch even when there are several programs, with or without running statistics;
    untouched in eval; the results do not change; a bad counter raises before any write."""
    coefficients = pytest.importorskip("normfuse.coefficients")
    fn = getattr(ops if impl == "triton" else coefficients, f"{layer}_coefficients")
    acc, L = ACCS[-1], 5
    mean, m2 = _stats(n, c, L, acc, seed=50)
    gates = [_rand((c,), 51, acc).sigmoid()] + ([_rand((c,), 52, acc)] if layer == "iebn" else [])
    weight, bias = _rand((c,), 53, acc), _rand((c,), 54, acc)
    for mode in MODES:
        training, rm, rv = _mode(mode, c, acc)
        run = [None if t is None else t.clone() for t in (rm, rv)]
        nbt = torch.tensor(9, device=DEVICE)
        version = nbt._version
        got = fn(mean, m2, L, *gates, weight, bias, *run, training, MOMENTUM, EPS, nbt)
        want = fn(mean, m2, L, *gates, weight, bias, rm, rv, training, MOMENTUM, EPS)
        assert int(nbt) == 9 + training, mode
        if impl == "triton":
            assert (nbt._version > version) == training, "version bumped iff written"
        _check_all(got, want, acc)
        if rm is not None:
            _check_all(run, (rm, rv), acc)
    nbt = torch.zeros(1, dtype=torch.int64, device=DEVICE)  # 1-element 1-d: accepted
    fn(mean, m2, L, *gates, None, None, None, None, True, MOMENTUM, EPS, num_batches_tracked=nbt)
    assert int(nbt) == 1
    for bad in (torch.tensor(1.0, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE),
                torch.tensor(1, dtype=torch.int32, device=DEVICE)):
        rm, rv = _rand((c,), 7, acc), _rand((c,), 8, acc, low=0.5)
        rm0, rv0, bad0 = rm.clone(), rv.clone(), bad.clone()
        with pytest.raises(RuntimeError, match="num_batches_tracked must be a 0-dim"):
            fn(mean, m2, L, *gates, weight, bias, rm, rv, True, MOMENTUM, EPS, bad)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and torch.equal(bad, bad0)


def test_statistics_on_another_device_are_refused():
    """Every statistic, coefficient and parameter is checked to be on the statistics' (or the
    input's) device before a launch.  Through the ops a tensor on another device only shows on a
    GPU (test_gpu.py); here the checks themselves, with a meta tensor as the stranger."""
    from normfuse.triton_kernels import coefficient_ops, runtime
    mean = torch.zeros(2, 3, device=DEVICE)
    stranger = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="weight is on meta, expected"):
        coefficient_ops._param(stranger, mean, "weight", "normfuse_triton.bin_coefficients")
    with pytest.raises(RuntimeError, match="running_var is on meta, expected"):
        coefficient_ops._running(torch.zeros(3, device=DEVICE), stranger, mean,
                                 "normfuse_triton.bin_coefficients")
    with pytest.raises(RuntimeError, match="m2 is on meta, expected"):
        runtime.stats_tensor(torch.zeros(2, 3, device="meta"), (2, 3), mean.dtype, "m2",
                             mean.device)


def _good_arguments(op, n=2, c=4, L=3):
    """The arguments of a good call of ``op`` (one of ``COEFFICIENT_OPS``), by their schema
    names."""
    acc = ACCS[-1]
    mean, m2 = _stats(n, c, L, acc, seed=80)
    a = dict(mean=mean, m2=m2, plane_size=L)
    if op.startswith("assoc"):
        a.update(num_groups=2, encoder=_rand((1, 2), 81, acc), decoder_mean=_rand((2, 1), 82, acc),
                 decoder_var=_rand((2, 1), 83, acc))
    elif op.startswith("ilm"):  # 2 groups, 2 key groups (the encoder's columns) of 2 channels
        a.update(num_groups=2, encoder=_rand((1, 2), 81, acc),
                 decoder_weight=_rand((2, 1), 82, acc), decoder_bias=_rand((2, 1), 83, acc))
    elif op.startswith("bin"):
        a.update(gate=_rand((c,), 84, acc).sigmoid())
    else:
        a.update(gate_weight=_rand((c,), 84, acc), gate_bias=_rand((c,), 85, acc))
    a.update(weight=_rand((c,), 86, acc), bias=_rand((c,), 87, acc))
    if op.startswith(("bin", "iebn")):
        a.update(running_mean=_rand((c,), 88, acc), running_var=_rand((c,), 89, acc, low=0.5),
                 training=True, **({} if op.endswith("_backward") else {"momentum": MOMENTUM}))
    a.update(eps=EPS)
    if op.endswith("_backward"):
        a = dict(sum_dy=_rand((n, c), 90, acc), sum_dy_xmu=_rand((n, c), 91, acc), **a)
    return a


def _bad_value(name, n=2, c=4):
    """A value of argument ``name`` that the ops refuse (for the (2, 4) statistics above)."""
    def z(*shape):
        return torch.zeros(*shape, dtype=ACCS[-1], device=DEVICE)
    return {"plane_size": 0, "mean": z(n, c, 1), "m2": z(n, c + 1), "sum_dy": z(n, c + 1),
            "weight": z(c, 1), "bias": z(c + 1), "gate": None, "gate_weight": None,
            "encoder": None, "num_groups": 3,
            "running_mean": None}[name]  # no running_mean: running_var alone is refused


COEFFICIENT_OPS = [f"{layer}_coefficients{direction}" for layer in ("bin", "iebn", "assoc", "ilm")
                   for direction in ("", "_backward")]
BAD_ARGUMENTS = ["plane_size", "mean", "m2", "sum_dy", "weight", "bias", "gate", "gate_weight",
                 "encoder", "num_groups", "running_mean"]


@pytest.mark.parametrize("op,name", [(op, name) for op in COEFFICIENT_OPS
                                     for name in BAD_ARGUMENTS if name in _good_arguments(op)])
def test_refusals_name_the_op(op, name):
    """Every refusal starts with ``normfuse_triton.<op>:``, as the C++ ops' messages start with
    ``normfuse.<op>:``: which op refused, forward or backward, is in the message."""
    with pytest.raises(RuntimeError, match=rf"^normfuse_triton\.{op}: "):
        getattr(ops, op)(**{**_good_arguments(op), name: _bad_value(name)})


@pytest.mark.parametrize("op,name", [(op, name) for op in COEFFICIENT_OPS
                                     for name in ("mean", "m2", "sum_dy", "sum_dy_xmu")
                                     if name in _good_arguments(op)])
def test_strided_statistics_are_refused(op, name):
    """(N, C) statistics that are not contiguous (here the same values, transposed in memory)
    are refused, naming the argument, before anything is written, as the C++ ops refuse them:
    the op contract (docs/architecture.md, "Tensors") has them contiguous, and the layers pass
    them so.  (The ops copied them.)"""
    a = _good_arguments(op)
    strided = a[name].t().contiguous().t()
    assert torch.equal(strided, a[name]) and not strided.is_contiguous()
    written = {k: a[k].clone() for k in ("running_mean", "running_var") if k in a}
    with pytest.raises(RuntimeError, match=rf"^normfuse_triton\.{op}: {name} must be contiguous"):
        getattr(ops, op)(**{**a, name: strided})
    assert all(torch.equal(a[k], v) for k, v in written.items())


def test_malformed_arguments_are_refused_before_any_write():
    """Arguments the C++ ops refuse (tests/csrc/test_coefficients_ops.py), refused here too with
    a message naming the argument, before the kernel runs: running statistics and the counter
    untouched.  Found by fuzzing the ops: a plane_size of 0 or less gave NaN or garbage, a
    missing gate failed inside the kernel after num_batches_tracked was incremented, (2, C/2) or
    (C, 1) parameters were flattened, an expanded running statistic failed in the write-back
    after the other one was updated, and running statistics sharing memory with each other or
    with an input gave wrong statistics or coefficients."""
    n, c, L, acc = 3, 4, 5, ACCS[-1]
    mean, m2 = _stats(n, c, L, acc, seed=60)
    gate, weight, bias = _rand((c,), 61, acc).sigmoid(), _rand((c,), 62, acc), _rand((c,), 63, acc)

    def fresh():
        return _rand((c,), 64, acc), _rand((c,), 65, acc, low=0.5), torch.tensor(2, device=DEVICE)

    expanded = _rand((1,), 66, acc).expand(c)
    cases = [  # (what to replace, by what, message)
        ({"L": 0}, "plane_size must be >= 1, got 0"),
        ({"L": -1}, "plane_size must be >= 1, got -1"),
        ({"gate": None}, "gate must be a Tensor, got NoneType"),
        ({"weight": weight.reshape(2, c // 2)}, r"weight must be \(4,\)"),
        ({"bias": bias.reshape(c, 1)}, r"bias must be \(4,\)"),
        ({"rm": expanded}, "running_mean must not have overlapping elements"),
        ({"rv": expanded}, "running_var must not have overlapping elements"),
        ({"rv": "rm"}, "running_mean must not share memory with running_var"),
        ({"rm": gate}, "running_mean must not share memory with gate"),
        ({"rv": mean[1]}, "running_var must not share memory with mean"),
    ]
    for change, match in cases:
        rm, rv, nbt = fresh()
        a = dict(L=L, gate=gate, weight=weight, bias=bias, rm=rm, rv=rv)
        a.update(change)
        if a["rv"] == "rm":
            a["rv"] = a["rm"]
        state = [t.clone() for t in (a["rm"], a["rv"], nbt, gate, mean)]
        with pytest.raises(RuntimeError, match=match):
            ops.bin_coefficients(mean, m2, a["L"], a["gate"], a["weight"], a["bias"], a["rm"],
                                 a["rv"], True, MOMENTUM, EPS, nbt)
        after = (a["rm"], a["rv"], nbt, gate, mean)
        assert all(torch.equal(x, y) for x, y in zip(state, after)), change
    # eval mode only reads the running statistics: sharing memory there is fine
    ops.bin_coefficients(mean, m2, L, gate, weight, bias, gate, gate, False, MOMENTUM, EPS)
    with pytest.raises(RuntimeError, match=r"bias must be \(4,\)"):  # checked, though not read
        ops.bin_coefficients_backward(mean, m2, mean, m2, L, gate, weight, bias[:2], None, None,
                                      True, EPS)
    enc, dec = _rand((1, 2), 67, acc), _rand((2, 1), 68, acc)
    with pytest.raises(RuntimeError, match=r"num_groups \(0\) must be >= 1 and divide"):
        ops.assoc_coefficients(mean, m2, L, 0, enc, dec, dec, weight, bias, EPS)
    with pytest.raises(RuntimeError, match=r"encoder must be \(M, num_groups\)"):
        ops.assoc_coefficients(mean, m2, L, 2, enc[0, 0], dec, dec, weight, bias, EPS)
    with pytest.raises(RuntimeError, match="mean must be a Tensor, got NoneType"):
        ops.affine_apply(torch.zeros(n, c, 2, device=DEVICE), None, mean, mean)
