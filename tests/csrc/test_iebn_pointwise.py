"""IEBN with one value per plane on the CPU (torch.ops.normfuse.iebn_pointwise_apply / _backward,
csrc/cpu/iebn_pointwise_*): what iebn_layer runs for a 2-d (N, C) input on the CPU. Against float64
references of the formulas the ops stand for (given per-channel mean and rstd, the gate per
element), every dtype the CPU kernels take, shapes with vector tails and several reduction blocks;
bad arguments refused by name; torch.library.opcheck; gradcheck of iebn_layer on 2-d float64
input (its C++ backward runs iebn_pointwise_backward)."""
from __future__ import annotations

import pytest
import torch

from normfuse import _extension as ext

pytestmark = pytest.mark.skipif(not ext.HAS_CPU_KERNELS, reason=ext.REASON or "normfuse._C not built")
ops = torch.ops.normfuse

# (N, C): C < 8 lanes, a tail, more rows than a reduction chunk (64), several column blocks (64)
SHAPES = [(1, 1), (3, 5), (8, 16), (65, 9), (130, 67), (4, 300)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, c, dtype, seed, affine=True):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    mean = x.double().mean(0) + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    rstd = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    p = {k: torch.randn(c, generator=g, dtype=torch.float64) for k in ("gate_weight", "gate_bias", "weight", "bias")}
    if not affine:
        p["weight"] = p["bias"] = None
    low = {k: (v.to(acc) if v is not None else None) for k, v in p.items()}
    return x, mean.to(acc), rstd.to(acc), low


def _reference(x, mean, rstd, p, relu, dy=None, batch_stats=False):
    """float64: y = g (x - mean) rstd weight + bias, g = sigmoid(gate_weight x + gate_bias) (weight 1
    and bias 0 where there are none); with dy also the gradients (x, gate_weight, gate_bias,
    weight, bias) by autograd, mean and rstd x's own batch statistics when batch_stats."""
    xd = x.double().requires_grad_()
    c = x.shape[1]
    pd = {k: (v.double() if v is not None else torch.full((c,), 1.0 if k == "weight" else 0.0, dtype=torch.float64))
          .requires_grad_() for k, v in p.items()}
    if batch_stats:
        mu, r = xd.mean(0), (xd.var(0, unbiased=False) + 1e-5).rsqrt()
    else:
        mu, r = mean.double(), rstd.double()
    y = torch.sigmoid(xd * pd["gate_weight"] + pd["gate_bias"]) * (xd - mu) * r * pd["weight"] + pd["bias"]
    if relu:
        y = y.relu()
    if dy is None:
        return y
    names = ("gate_weight", "gate_bias", "weight", "bias")
    return y, torch.autograd.grad(y, [xd] + [pd[k] for k in names], dy.double())


def _close(got, want, dtype, what):
    err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    # reduced input dtypes: the ops compute in float32 and round the output once
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_apply_matches_reference(shape, dtype, relu, affine):
    x, mean, rstd, p = _inputs(*shape, dtype, seed=hash((shape, str(dtype))) % 1000, affine=affine)
    y = ops.iebn_pointwise_apply(x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"], relu)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    _close(y, _reference(x, mean, rstd, p, relu), dtype, "output")


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > 1], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_backward_matches_reference(shape, dtype, relu, affine, batch_stats):
    """Every gradient; with batch_stats the statistics are x's own (biased variance, eps 1e-5),
    so dx carries their gradient, as batch norm's does."""
    x, mean, rstd, p = _inputs(*shape, dtype, seed=7 + shape[1], affine=affine)
    if batch_stats:
        mean = x.double().mean(0).to(mean.dtype)
        rstd = (x.double().var(0, unbiased=False) + 1e-5).rsqrt().to(rstd.dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    got = ops.iebn_pointwise_backward(dy, x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"],
                                      batch_stats, relu)
    _, want = _reference(x, mean, rstd, p, relu, dy, batch_stats)
    # without weight / bias: the gradients of a weight of 1 and a bias of 0
    for name, g, w in zip(("input", "gate_weight", "gate_bias", "weight", "bias"), got, want):
        _close(g, w, dtype, f"grad {name}")
    assert got[0].dtype == dtype and all(g.dtype == mean.dtype and g.shape == (shape[1],) for g in got[1:])


def test_relu_backward_mask_matches_forward():
    """The backward's mask is the forward's sign of v, recomputed: where y = 0 no gradient flows
    into x through the map, where y > 0 it does (with running statistics, dx = dy dy/dx exactly
    elementwise, so a mask off by an element shows)."""
    x, mean, rstd, p = _inputs(200, 13, torch.float32, seed=5)
    y = ops.iebn_pointwise_apply(x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"], True)
    dy = torch.ones_like(x)
    dx = ops.iebn_pointwise_backward(dy, x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"],
                                     False, True)[0]
    assert (y == 0).any() and (y > 0).any()
    assert torch.equal(dx[y == 0], torch.zeros_like(dx[y == 0]))
    assert (dx[y > 0] != 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_gate_parameters_give_nan_not_a_closed_gate(dtype):
    """A NaN gate_weight / gate_bias (a diverged parameter) gives NaN outputs and gradients in its
    channel, as the general path and the papers' formula do, not a silent gate of 0 (at::vec's
    fast exp clamps its argument with min / max, which turn NaN into a bound)."""
    x, mean, rstd, p = _inputs(20, 11, dtype, seed=8)
    p["gate_bias"][0] = float("nan")
    p["gate_weight"][9] = float("nan")
    y = ops.iebn_pointwise_apply(x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"], False)
    grads = ops.iebn_pointwise_backward(torch.ones_like(x), x, mean, rstd, p["gate_weight"], p["gate_bias"],
                                        p["weight"], p["bias"], True, False)
    for c in (0, 9):
        assert y[:, c].isnan().all(), f"output of channel {c}"
        assert grads[0][:, c].isnan().all(), f"grad input of channel {c}"
        for name, g in zip(("gate_weight", "gate_bias", "weight"), grads[1:4]):
            assert g[c].isnan(), f"grad {name} of channel {c}"
    assert not y[:, 1:9].isnan().any() and not grads[0][:, 1:9].isnan().any()


def test_eval_layer_refuses_a_malformed_batch_counter():
    """iebn_layer in eval mode on (N, C) input reads the running statistics directly, but a
    malformed num_batches_tracked is refused as on any other input (by the general path)."""
    args = (torch.zeros(5), torch.zeros(5) - 1, None, None, torch.zeros(5), torch.ones(5), False, 0.1, 1e-5)
    for counter in (torch.tensor(0.5), torch.zeros(2, dtype=torch.int64), torch.tensor(1, dtype=torch.int32)):
        for x in (torch.randn(6, 5, 1), torch.randn(6, 5)):
            with pytest.raises(RuntimeError, match="num_batches_tracked must be"):
                ops.iebn_layer(x, *args, counter)


def test_results_do_not_depend_on_the_thread_count():
    x, mean, rstd, p = _inputs(300, 200, torch.float32, seed=11)
    dy = torch.randn_like(x)
    args = (dy, x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"], True, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.iebn_pointwise_backward(*args)
        torch.set_num_threads(max(2, threads))
        many = ops.iebn_pointwise_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_layer_gradcheck_on_2d_input(training, relu):
    """iebn_layer on (N, C) float64: its C++ node's backward is iebn_pointwise_backward."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ps = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    rm, rv = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g) + 0.5

    def f(x, gw, gb, w, b):
        return ops.iebn_layer(x, gw, gb, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, None, relu)
    with torch.profiler.profile() as prof:
        f(x, *ps).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"normfuse::iebn_pointwise_apply", "normfuse::iebn_pointwise_backward"} <= names
    torch.autograd.gradcheck(f, (x, *ps))


def _good():
    x, mean, rstd, p = _inputs(6, 4, torch.float32, seed=1)
    return dict(input=x, mean=mean, rstd=rstd, gate_weight=p["gate_weight"], gate_bias=p["gate_bias"],
                weight=p["weight"], bias=p["bias"])


@pytest.mark.parametrize("name,bad,match", [
    ("input", lambda a: a["input"].unsqueeze(-1), "input must be 2-d"),
    ("input", lambda a: torch.randn(4, 6).t(), "input must be contiguous"),
    ("input", lambda a: a["input"].to(torch.int32), "input"),
    ("mean", lambda a: a["mean"][:3], "mean must be"),
    ("mean", lambda a: a["mean"].double(), "mean must be"),
    ("rstd", lambda a: a["rstd"][:3], "rstd must have shape"),
    ("gate_weight", lambda a: a["gate_weight"].double(), "gate_weight must be"),
    ("gate_bias", lambda a: a["gate_bias"].reshape(2, 2), "gate_bias must have shape"),
    ("weight", lambda a: torch.randn(8)[::2], "weight must be contiguous"),
    ("bias", lambda a: a["bias"].to("meta"), "bias is on meta"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_are_refused_by_name(name, bad, match):
    args = _good()
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        ops.iebn_pointwise_apply(*args.values(), False)
    if args["input"].dim() == 2 and args["input"].dtype == torch.float32:
        with pytest.raises(RuntimeError, match=match):
            ops.iebn_pointwise_backward(torch.randn(6, 4), *args.values(), True, False)


def test_backward_refuses_a_mismatched_gradient():
    args = _good()
    for dy in (torch.randn(6, 5), torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 6).t()):
        with pytest.raises(RuntimeError, match="grad_output must be a contiguous"):
            ops.iebn_pointwise_backward(dy, *args.values(), True, False)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_opcheck(affine):
    x, mean, rstd, p = _inputs(9, 5, torch.float32, seed=4, affine=affine)
    args = (x, mean, rstd, p["gate_weight"], p["gate_bias"], p["weight"], p["bias"])
    torch.library.opcheck(ops.iebn_pointwise_apply.default, args + (True,))
    torch.library.opcheck(ops.iebn_pointwise_backward.default, (torch.randn_like(x),) + args + (True, False))
