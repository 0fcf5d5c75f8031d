"""``normfuse_triton::ilm_coefficients[_backward]`` against the spec, the PyTorch-ops functions
of ``normfuse.coefficients.ilm`` run in float64 on the very values the kernels see (float32
inputs rounded first): float64 kernels to ~1e-12, float32 ones to a tolerance relative to the
scale of each output.  Shapes chosen to hit the kernels' edges: key groups straddling groups
(C = 12, G = 4, key_group_size 4), one sample, one-element planes, more groups than a group
block (the kernels walk them), 256 key groups (the largest key tile), hidden sizes past a chunk,
more samples than a row group of the backward's sum tree.  Also non-finite statistics (the
spec's NaN / Inf pattern), refused arguments (messages naming them), bitwise determinism."""
from __future__ import annotations

import pytest
import torch
from tk_common import DEVICE

from normfuse.coefficients import ilm as spec

ops = torch.ops.normfuse_triton
F64 = torch.float64
ACCS = [torch.float32] + ([F64] if DEVICE == "cpu" else [])
TOL = {F64: 1e-11, torch.float32: 3e-5}
EPS = 1e-5
OUTPUTS = ("scale", "shift", "c_dy", "c_x", "c_0", "grad_encoder", "grad_decoder_weight",
           "grad_decoder_bias", "grad_weight", "grad_bias")


def make(n, c, L, G, key_size, hidden, seed, dtype=torch.float32):
    """Random op arguments (float64 tensors holding values exact in ``dtype``): plane means
    around 1 with per-sample and per-channel offsets, m2 = L * var, an encoder whose first row
    is positive so that the first hidden unit of both branches is live (the others mixed)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale + shift

    k = c // key_size
    enc = rnd(hidden, k, scale=0.6)
    enc[0] = enc[0].abs()
    t = dict(mean=rnd(n, c, scale=0.8, shift=1.0) + rnd(1, c, scale=0.4) + rnd(n, 1, scale=0.2),
             m2=L * (torch.rand(n, c, generator=g, dtype=F64) * 1.9 + 0.05),
             sum_dy=rnd(n, c), sum_dy_xmu=rnd(n, c, scale=1.5),
             encoder=enc, decoder_weight=rnd(k, hidden, scale=0.6),
             decoder_bias=rnd(k, hidden, scale=0.6),
             weight=rnd(c, scale=0.4, shift=1.0), bias=rnd(c, scale=0.5))
    return {name: v.to(dtype).to(F64) for name, v in t.items()}


PARAMS = ("encoder", "decoder_weight", "decoder_bias", "weight", "bias")


def forward_args(t, L, G, dtype):
    cast = {k: v.to(dtype).to(DEVICE) for k, v in t.items()}
    return (cast["mean"], cast["m2"], L, G, *(cast[p] for p in PARAMS), EPS)


def backward_args(t, L, G, dtype):
    cast = {k: v.to(dtype).to(DEVICE) for k, v in t.items()}
    return (cast["sum_dy"], cast["sum_dy_xmu"], *forward_args(t, L, G, dtype))


def assert_close(actual, want, tol, what):
    """|actual - want| <= tol * (max(1, max|want|) + |want|), NaN where the spec has NaN."""
    a = actual.detach().to("cpu", F64)
    assert a.shape == want.shape, f"{what}: shape {tuple(a.shape)} != {tuple(want.shape)}"
    assert torch.equal(a.isnan(), want.isnan()), f"{what}: NaN pattern differs\n{a}\n{want}"
    assert torch.equal(a.isinf(), want.isinf()), f"{what}: Inf pattern differs\n{a}\n{want}"
    finite = want.isfinite()
    a, want = a[finite], want[finite]
    if want.numel() == 0:
        return
    assert torch.equal(a.isfinite(), torch.ones_like(finite[finite])), what
    scale = max(1.0, float(want.abs().max()))
    bad = (a - want).abs() > tol * (scale + want.abs())
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {want.numel()} off; worst "
                                 f"{float((a - want).abs().max()):.3e} (scale {scale:.3e})")


def check(t, L, G, dtype):
    got = (*ops.ilm_coefficients(*forward_args(t, L, G, dtype)),
           *ops.ilm_coefficients_backward(*backward_args(t, L, G, dtype)))
    params = [t[p] for p in PARAMS]
    want = (*spec.ilm_coefficients(t["mean"], t["m2"], L, G, *params, EPS),
            *spec.ilm_coefficients_backward(t["sum_dy"], t["sum_dy_xmu"], t["mean"], t["m2"], L,
                                            G, *params, EPS))
    for name, a, w in zip(OUTPUTS, got, want):
        assert a.dtype == dtype and a.device.type == torch.device(DEVICE).type, name
        assert_close(a, w, TOL[dtype], name)
    return got, want


# (N, C, L, G, key_group_size, hidden)
CASES = [
    (2, 12, 3, 4, 4, 2),      # key groups of 4 channels straddle groups of 3
    (1, 16, 4, 4, 4, 2),      # one sample
    (3, 48, 5, 4, 4, 2),      # 12 key groups, 4 groups
    (4, 64, 2, 8, 2, 9),      # 32 key groups, a hidden size past one chunk, not a multiple
    (3, 32, 1, 4, 4, 2),      # one-element planes: 4 values per key group, 8 per group
    (3, 512, 4, 32, 16, 2),   # the module's defaults on C = 512: K = 32
    (2, 160, 2, 80, 16, 3),   # 80 groups: two group blocks of 64
    (2, 256, 2, 4, 1, 17),    # 256 key groups of one channel: the largest key tile
    (19, 24, 3, 6, 4, 3),     # 19 samples: three row groups in the backward's sum tree
]


@pytest.mark.parametrize("dtype", ACCS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_spec(case, dtype, seed):
    n, c, L, G, key_size, hidden = case
    t = make(n, c, L, G, key_size, hidden, seed, dtype)
    _, want = check(t, L, G, dtype)
    # the case reaches both branches of the meta network (no dead relu everywhere)
    assert float(want[6].abs().max()) > 0 and float(want[7].abs().max()) > 0


@pytest.mark.skipif(F64 not in ACCS, reason="float64 statistics: not on this device")
def test_float64_counts_past_float32(seed):
    """Group sizes C / G * L past 2**24, which float32 cannot hold: a float64 call keeps every
    count in float64 (a count formed as int * float literal in a kernel is float32, 6e-8 off)."""
    L = 5592407  # C / G * L = 16777221 > 2**24
    t = make(2, 6, L, 2, 3, 2, seed, F64)
    got, want = check(t, L, 2, F64)
    for name, a, w in zip(OUTPUTS, got, want):  # relative to each output's own size (c_x ~ 1/L)
        err = float((a.cpu() - w).abs().max() / w.abs().max())
        assert err < 1e-12, f"{name}: {err:.1e} of its largest value"


@pytest.mark.parametrize("dtype", ACCS, ids=str)
def test_large_offset(dtype, seed):
    """Plane means at 1e4 (the shifted merges keep the variances accurate) and an encoder scaled
    down so that the bias branch sees key means ~1e4 without saturating."""
    t = make(3, 16, 6, 4, 2, 2, seed, dtype)
    t["mean"] = (t["mean"] + 1e4).to(dtype).to(F64)
    t["encoder"] = (t["encoder"] * 1e-4).to(dtype).to(F64)
    check(t, 6, 4, dtype)


@pytest.mark.parametrize("poison", ["nan_mean", "inf_mean", "nan_m2", "inf_first"])
def test_non_finite_statistics_as_the_spec(poison, seed):
    """A NaN / Inf statistic gives the spec's pattern of NaN / Inf in every output (its sample's
    coefficients, and the parameter gradients summed over samples); the other samples'
    coefficients stay finite.  ``inf_first``: Inf in a group's first plane (the merge's shift
    falls back to 0, so the mean is Inf rather than NaN)."""
    dtype = ACCS[-1]
    t = make(3, 12, 3, 4, 4, 2, seed, dtype)
    where, what = {"nan_mean": ("mean", float("nan")), "inf_mean": ("mean", float("inf")),
                   "nan_m2": ("m2", float("nan")), "inf_first": ("mean", float("inf"))}[poison]
    t[where][1, 0 if poison == "inf_first" else 5] = what
    got, _ = check(t, 3, 4, dtype)
    for out in got[:5]:
        assert torch.isfinite(out[[0, 2]]).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="float64: the interpreter only")
def test_overflowing_encoder_activation(seed):
    """Finite statistics whose bias-branch activation overflows (key means ~1e10 times an
    encoder row of 1e300): tanh saturates, so the spec's c_x, c_0 and encoder gradient stay
    finite (only ``0 * Inf`` in the decoder_bias gradient is NaN).  The kernels' padded key
    groups and hidden units must not turn that Inf into NaN for every key group."""
    t = make(3, 12, 3, 4, 4, 2, seed, F64)
    t["mean"] = t["mean"] + 1e10
    t["encoder"][0] = 1e300
    got, want = check(t, 3, 4, F64)
    assert torch.isfinite(want[5]).all() and torch.isfinite(want[3]).all()  # what is tested


@pytest.mark.parametrize("n", [1, 19])
def test_backward_is_bitwise_deterministic(n, seed):
    t = make(n, 48, 3, 4, 4, 5, seed)
    args = backward_args(t, 3, 4, torch.float32)
    first = ops.ilm_coefficients_backward(*args)
    for _ in range(2):
        again = ops.ilm_coefficients_backward(*args)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_empty_batch():
    t = make(2, 12, 3, 4, 4, 2, 0)
    t = {k: (v[:0] if k in ("mean", "m2", "sum_dy", "sum_dy_xmu") else v) for k, v in t.items()}
    scale, shift = ops.ilm_coefficients(*forward_args(t, 3, 4, torch.float32))
    assert scale.shape == shift.shape == (0, 12)
    out = ops.ilm_coefficients_backward(*backward_args(t, 3, 4, torch.float32))
    assert [tuple(o.shape) for o in out] == [(0, 12)] * 3 + [(2, 3), (3, 2), (3, 2), (12,), (12,)]
    assert all(int((o != 0).sum()) == 0 for o in out[3:])


def _refused(change, match, backward=False):
    """The op with the arguments of a good call, ``change`` replacing some, raises ``match``."""
    t = make(2, 12, 3, 4, 4, 2, 1)
    a = dict(zip(("sum_dy", "sum_dy_xmu", "mean", "m2", "L", "G", *PARAMS, "eps"),
                 backward_args(t, 3, 4, torch.float32)))
    a.update(change)
    args = list(a.values())
    op = ops.ilm_coefficients_backward if backward else ops.ilm_coefficients
    with pytest.raises(RuntimeError, match=match):
        op(*(args if backward else args[2:]))


def _z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


REFUSED = [  # (what replaces the good call's arguments, the message)
    ({"L": 0}, "plane_size must be >= 1, got 0"),
    ({"mean": _z(2, 12, 1)}, r"mean must be \(N, C\)"),
    ({"m2": _z(2, 11)}, r"m2 must be \(2, 12\)"),
    ({"G": 0}, r"num_groups \(0\) must be >= 1 and divide"),
    ({"G": 5}, r"num_groups \(5\) must be >= 1 and divide"),
    ({"encoder": None}, "encoder must be a Tensor, got NoneType"),
    ({"encoder": _z(2)}, r"encoder must be \(E, K\)"),
    ({"encoder": _z(2, 5)}, r"encoder must be \(E, K\) .* dividing .* got \(2, 5\)"),
    ({"decoder_weight": _z(2, 3)}, r"decoder_weight must be \(3, 2\)"),
    ({"decoder_bias": _z(3, 2, dtype=F64)}, r"decoder_bias must be \(3, 2\) torch.float32"),
    ({"weight": _z(12, 1)}, r"weight must be \(12,\)"),
    ({"bias": None}, "bias must be a Tensor, got NoneType"),
    ({"G": 12, "L": 1}, "needs more than one value per group, got 1"),
    ({"encoder": _z(2, 12), "decoder_weight": _z(12, 2), "decoder_bias": _z(12, 2), "L": 1},
     "needs more than one value per key group, got 1"),
]
REFUSED_GRADIENTS = [
    ({"sum_dy": _z(2, 11)}, r"sum_dy must be \(2, 12\)"),
    ({"sum_dy_xmu": None}, "sum_dy_xmu must be a Tensor"),
]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("change,match", REFUSED, ids=str)
def test_bad_arguments_are_refused(change, match, backward):
    _refused(change, match, backward)


def test_bad_gradients_are_refused():
    for change, match in REFUSED_GRADIENTS:
        _refused(change, match, backward=True)


@pytest.mark.parametrize("op,change", [
    *(("ilm_coefficients", change) for change, _ in REFUSED),
    *(("ilm_coefficients_backward", change) for change, _ in REFUSED + REFUSED_GRADIENTS),
], ids=str)
def test_refusals_name_the_op(op, change):
    """Every refusal starts with ``normfuse_triton.<op>:``, as the C++ ops' messages start with
    ``normfuse.<op>:`` (tests/csrc/test_ilm_coefficients.py): which op refused, forward or
    backward, is in the message."""
    _refused(change, rf"^normfuse_triton\.{op}: ", backward=op.endswith("_backward"))


def test_more_than_256_key_groups_are_refused():
    c = 514
    with pytest.raises(RuntimeError, match=r"^normfuse_triton\.ilm_coefficients: ILM-Norm kernels "
                                           r"support C / key_group_size <= 256 key groups, "
                                           r"got 257"):
        ops.ilm_coefficients(_z(1, c), _z(1, c) + 1, 2, 2, _z(2, 257), _z(257, 2), _z(257, 2),
                             _z(c), _z(c), EPS)


def test_workspace_past_32_bit_indexing_is_refused(monkeypatch):
    """The backward's workspace rows (2C + 3 E K values a sample) are indexed in int32: a batch
    whose workspace would pass 2**31 values is refused with the sizes, before any launch (meta
    tensors: nothing allocated; the device check is the only one they would fail)."""
    from normfuse.triton_kernels import coefficient_ops

    monkeypatch.setattr(coefficient_ops, "check_device", lambda t, what, who: None)
    n, c, k, e = 2**14, 1024, 64, 1024   # N*C = 2**24, but N * (2C + 3 E K) > 2**31

    def m(*shape):
        return torch.empty(*shape, device="meta")

    args = (m(n, c), m(n, c), m(n, c), m(n, c), 4, 32, m(e, k), m(k, e), m(k, e), m(c), m(c), EPS)
    with pytest.raises(RuntimeError, match=r"^normfuse_triton\.ilm_coefficients_backward: .*"
                                           r"N \* \(2C \+ 3 \* E \* K\) < 2\*\*31, got 16384 \* "):
        coefficient_ops.ilm_coefficients_backward._init_fn(*args)
