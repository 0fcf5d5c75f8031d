"""torch.ops.normfuse.{moments, affine_apply, backward_sums, backward_apply} (normfuse._C) against
float64 references written from the formulas of docs/architecture.md: every CPU dtype, both
layouts, awkward shapes; opcheck; the fake implementations of all ten ops; CUDA when present."""
from __future__ import annotations

import os
import re

import pytest
import torch

import normfuse
from normfuse import _extension as ext

pytestmark = pytest.mark.skipif(not ext.HAS_CPU_KERNELS, reason=ext.REASON or "normfuse._C not built")
ops = torch.ops.normfuse

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (2, 3),              # rank 2: L = 1
    (3, 5, 1),           # L = 1
    (2, 3, 7),           # odd L
    (1, 4, 33, 17),      # N = 1, odd L
    (2, 1, 9, 9),        # C = 1
    (2, 37, 5, 3),       # C not a multiple of any vector width
    (3, 6, 2, 3, 5),     # rank 5
    (2, 3, 40000),       # planes longer than a CPU segment (split + merge)
    (1, 3, 130, 130),    # channels-last with more rows than a segment
]
TOL = {  # (rtol, atol-factor) for full-size outputs rounded to the dtype
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contig":
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    # rank 2 and 3: C innermost, strides (L*C, 1, C)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def planes(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], t.shape[1], -1)


def make(shape, dtype, layout, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    per_plane = torch.randn(n, c, *([1] * (len(shape) - 2)), generator=g, dtype=torch.float64) * 3
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + per_plane + offset
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = [torch.randn(n, c, generator=g, dtype=torch.float64).to(acc) for _ in range(4)]
    return to_layout(x.to(dtype), layout), to_layout(dy.to(dtype), layout), stats


def ref_moments(x):
    p = planes(x)
    mean = p.mean(-1)
    return mean, ((p - mean[..., None]) ** 2).sum(-1)


def check_moments(x, mean, m2):
    rm, rq = ref_moments(x)
    mag = planes(x).abs().amax(-1).max().item() + 1
    tol = 1e-13 if x.dtype == torch.float64 else 2e-6
    assert mean.dtype == m2.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert mean.shape == (x.shape[0], x.shape[1]) and mean.is_contiguous()
    torch.testing.assert_close(mean.double(), rm, rtol=0, atol=tol * mag)
    torch.testing.assert_close(m2.double(), rq, rtol=10 * tol, atol=tol * mag * mag)


def check_full(out, ref, x):
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride()
    tol = TOL[x.dtype]
    torch.testing.assert_close(planes(out), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))


def run_all_ops(x, dy, stats):
    mean, a, b, c = stats
    m, q = ops.moments(x)
    check_moments(x, m, q)
    px, pdy = planes(x), planes(dy)
    md = mean.double()[..., None]

    g1, g2 = ops.backward_sums(dy, x, mean)
    mag = (pdy.abs() * (px - md).abs()).sum(-1).max().item() + pdy.abs().sum(-1).max().item() + 1
    tol = 1e-13 if x.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(g1.double(), pdy.sum(-1), rtol=0, atol=tol * mag)
    torch.testing.assert_close(g2.double(), (pdy * (px - md)).sum(-1), rtol=0, atol=tol * mag)

    y = ops.affine_apply(x, mean, a, b)
    check_full(y, (px - md) * a.double()[..., None] + b.double()[..., None], x)

    dx = ops.backward_apply(dy, x, mean, a, b, c)
    check_full(dx, a.double()[..., None] * pdy + b.double()[..., None] * (px - md) + c.double()[..., None], x)


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_ops_match_reference(shape, dtype, layout):
    x, dy, stats = make(shape, dtype, layout)
    if layout == "cl" and x.dim() > 2 and x.shape[1] > 1 and planes(x).shape[-1] > 1:
        assert not x.is_contiguous()  # the channels-last path is really taken
    run_all_ops(x, dy, stats)


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_cpu_moments_large_offset_keeps_float32_accuracy(layout):
    # 1e4 + N(0, 1): the mean must be within about half a float32 ulp of 1e4 (design.md sec. 2)
    x, _, _ = make((2, 4, 50, 60), torch.float32, layout, seed=3, offset=1e4)
    x = to_layout((1e4 + torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).float(), layout)
    mean, m2 = ops.moments(x)
    rm, rq = ref_moments(x)
    assert (mean.double() - rm).abs().max().item() <= 0.6 * 2.0 ** -10
    assert ((m2.double() - rq) / rq).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("shape", [(2, 4, 300), (2, 4, 17, 19), (2, 3, 40000)])
def test_cpu_moments_non_finite_planes(shape, layout):
    """A plane holding +-Inf or NaN anywhere has the mean a plain sum gives (Inf, NaN for
    Inf - Inf or NaN), as nn.BatchNorm: planes longer than one chunk of rows / one segment are
    merged, and a merge's ``ma + (mb - ma) * w`` would turn Inf into NaN (it did in the
    channels-last chunk merge); the other planes stay exact."""
    x, _, _ = make(shape, torch.float32, "contig", seed=11)
    L = x[0, 0].numel()
    flat = x.view(x.shape[0], x.shape[1], L)
    flat[0, 0, 0] = float("inf")             # first element (the plane's shift)
    flat[0, 1, L - 1] = float("-inf")        # last element, another chunk
    flat[0, 2, L // 2] = float("inf")        # middle
    flat[1, 0, 0] = float("inf")             # Inf - Inf: NaN
    flat[1, 0, L - 1] = float("-inf")
    flat[1, 1, L // 3] = float("nan")
    mean, _ = ops.moments(to_layout(x, layout))
    want = planes(x).sum(-1) / L
    assert torch.equal(torch.isnan(mean), torch.isnan(want)), (mean, want)
    assert torch.equal(mean.isinf(), want.isinf()) and torch.equal(mean[want.isinf()],
                                                                  want[want.isinf()].float())
    finite = want.isfinite()
    torch.testing.assert_close(mean[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


def test_cpu_results_do_not_depend_on_thread_count():
    x, dy, (mean, *_) = make((2, 3, 70001), torch.float32, "contig", seed=7)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = ops.moments(x) + ops.backward_sums(dy, x, mean)
        torch.set_num_threads(max(2, old))
        r2 = ops.moments(x) + ops.backward_sums(dy, x, mean)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


def test_empty_planes():
    x = torch.randn(2, 3, 0)
    mean, m2 = ops.moments(x)
    assert mean.shape == (2, 3) and torch.isnan(mean).all() and (m2 == 0).all()
    g1, g2 = ops.backward_sums(x, x, torch.zeros(2, 3))
    assert (g1 == 0).all() and (g2 == 0).all()
    assert ops.affine_apply(x, mean, mean, mean).shape == x.shape
    assert ops.moments(torch.randn(0, 3, 4))[0].shape == (0, 3)


def test_clear_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        ops.moments(x[:, :, ::2])
    with pytest.raises(RuntimeError, match="rank 2..5"):
        ops.moments(torch.randn(4))
    with pytest.raises(RuntimeError, match="must be Float"):  # stats dtype must be the acc dtype
        ops.affine_apply(x, *(torch.zeros(2, 3, dtype=torch.float64),) * 3)
    with pytest.raises(RuntimeError, match="shape"):
        ops.affine_apply(x, *(torch.zeros(3, 2),) * 3)
    with pytest.raises(RuntimeError, match="layout"):
        ops.backward_sums(x.contiguous(memory_format=torch.channels_last), x, torch.zeros(2, 3))
    # found by fuzzing: a strided grad_output was reported as "input", and a float8 input
    # (at::isFloatingType) reached the dtype switch: "normfuse: unsupported dtype Float8_e4m3fn"
    with pytest.raises(RuntimeError, match=r"backward_sums: grad_output must be contiguous or channels-last"):
        ops.backward_sums(x.transpose(2, 3), x, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"backward_apply: grad_output must be contiguous or channels-last"):
        ops.backward_apply(x.transpose(2, 3), x, *(torch.zeros(2, 3),) * 4)
    for op, args in (("moments", ()), ("affine_apply", (torch.zeros(2, 3),) * 3)):
        with pytest.raises(RuntimeError, match=rf"normfuse.{op}: input must be float64, float32, float16 or "
                                               "bfloat16, got Float8_e4m3fn"):
            getattr(ops, op)(x.to(torch.float8_e4m3fn), *args)


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_opcheck(layout):
    x, dy, (mean, a, b, c) = make((2, 3, 5, 4), torch.float32, layout, seed=11)
    torch.library.opcheck(ops.moments.default, (x,))
    torch.library.opcheck(ops.affine_apply.default, (x, mean, a, b))
    torch.library.opcheck(ops.backward_sums.default, (dy, x, mean))
    torch.library.opcheck(ops.backward_apply.default, (dy, x, mean, a, b, c))


def test_fake_impls_of_all_ops():
    """Every op (coefficient ones included) has a fake impl with the contract's shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, c, g, m = 4, 6, 3, 2
    with FakeTensorMode():
        x = torch.empty(n, c, 5, 7).contiguous(memory_format=torch.channels_last)
        st = torch.empty(n, c)
        pc = torch.empty(c)
        assert ops.affine_apply(x, st, st, st).stride() == x.stride()
        assert ops.backward_apply(x, x, st, st, st, st).stride() == x.stride()
        assert [t.shape for t in ops.moments(x)] == [(n, c)] * 2
        assert ops.moments(x.double())[0].dtype == torch.float64
        assert [t.shape for t in ops.backward_sums(x, x, st)] == [(n, c)] * 2
        rm, rv = torch.empty(c), torch.empty(c)
        assert [t.shape for t in ops.bin_coefficients(st, st, 35, pc, None, None, rm, rv, True, 0.1, 1e-5)] == [(n, c)] * 2
        r = ops.bin_coefficients_backward(st, st, st, st, 35, pc, pc, None, rm, rv, True, 1e-5)
        assert [t.shape for t in r] == [(n, c)] * 3 + [(c,)] * 3
        assert [t.shape for t in ops.iebn_coefficients(st, st, 35, pc, pc, pc, pc, None, None, True, 0.1, 1e-5)] == [(n, c)] * 2
        nbt = torch.empty((), dtype=torch.int64)  # the forwards' num_batches_tracked
        assert [t.shape for t in ops.bin_coefficients(st, st, 35, pc, None, None, rm, rv, True, 0.1, 1e-5, nbt)] == [(n, c)] * 2
        assert [t.shape for t in ops.iebn_coefficients(st, st, 35, pc, pc, pc, pc, None, None, True, 0.1, 1e-5, nbt)] == [(n, c)] * 2
        r = ops.iebn_coefficients_backward(st, st, st, st, 35, pc, pc, None, None, None, None, True, 1e-5)
        assert [t.shape for t in r] == [(n, c)] * 3 + [(c,)] * 4
        enc, dm, dv = torch.empty(m, g), torch.empty(g, m), torch.empty(g, m)
        assert [t.shape for t in ops.assoc_coefficients(st, st, 35, g, enc, dm, dv, pc, pc, 1e-5)] == [(n, c)] * 2
        r = ops.assoc_coefficients_backward(st, st, st, st, 35, g, enc, dm, dv, pc, pc, 1e-5)
        assert [t.shape for t in r] == [(n, c)] * 3 + [(m, g), (g, m), (g, m), (c,), (c,)]
        k, e = 2, 5  # ILM: K key groups (encoder (E, K)), decoders (K, E)
        enc, dw, db = torch.empty(e, k), torch.empty(k, e), torch.empty(k, e)
        assert [t.shape for t in ops.ilm_coefficients(st, st, 35, g, enc, dw, db, pc, pc, 1e-5)] == [(n, c)] * 2
        r = ops.ilm_coefficients_backward(st, st, st, st, 35, g, enc, dw, db, pc, pc, 1e-5)
        assert [t.shape for t in r] == [(n, c)] * 3 + [(e, k), (k, e), (k, e), (c,), (c,)]


def test_fake_outputs_have_the_real_strides():
    """The full-size outputs have the input's strides exactly, size-1 dimensions included (a
    slice of a channels-last tensor): the fakes used empty_like, which recomputes those, so
    torch.compile saw other strides than eager produced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)[:1, :, :1, :]
    st, gate = torch.randn(1, 4), torch.rand(4)
    calls = {
        "affine_apply": lambda x, st, g: ops.affine_apply(x, st, st, st),
        "backward_apply": lambda x, st, g: ops.backward_apply(x, x, st, st, st, st),
        "bin_layer_forward": lambda x, st, g: ops.bin_layer_forward(x, g, None, None, None, None, True, 0.1, 1e-5,
                                                                    None, False)[0],
        "assoc_layer_forward": lambda x, st, g: ops.assoc_layer_forward(
            x, 2, x.new_ones(1, 2), x.new_zeros(2, 1), x.new_zeros(2, 1), g, g, 1e-5, False)[0],
    }
    for name, call in calls.items():
        real = call(x, st, gate)
        assert real.stride() == x.stride(), name
        with FakeTensorMode() as mode:
            fake = call(mode.from_tensor(x), mode.from_tensor(st), mode.from_tensor(gate))
        assert fake.stride() == real.stride(), name


def test_fake_impls_refuse_what_the_cuda_kernels_refuse():
    """On CUDA tensors the fakes refuse float64 inputs and statistics other than float32, with
    the CUDA ops' messages: a direct op call under torch.compile fails while tracing, not at run
    time (FakeTensorMode makes CUDA tensors without a GPU). CPU float64 and CUDA float32 trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x64 = torch.empty(2, 3, 4, device="cuda", dtype=torch.float64)
        with pytest.raises(RuntimeError, match="moments: float64 is not supported by the CUDA"):
            ops.moments(x64)
        with pytest.raises(RuntimeError, match="bin_layer_forward: float64 is not supported"):
            ops.bin_layer_forward(x64, *[torch.empty(3, device="cuda")] * 3, None, None, True,
                                  0.1, 1e-5, None)
        st = torch.empty(2, 3, device="cuda", dtype=torch.float64)
        net = [torch.empty(1, 1, device="cuda")] * 3 + [torch.empty(3, device="cuda")] * 2
        with pytest.raises(RuntimeError, match="assoc_coefficients: the CUDA kernels take float32"):
            ops.assoc_coefficients(st, st, 4, 1, *net, 1e-5)
        for x in (torch.empty(2, 3, 4, device="cuda"), torch.empty(2, 3, 4, dtype=torch.float64)):
            assert [t.dtype for t in ops.moments(x)] == [x.dtype] * 2


def test_fake_impls_check_devices():
    """One meta tensor among CPU tensors dispatches the whole call to the fake (Meta outranks
    CPU). Found by fuzzing: the fakes returned uninitialised CPU tensors there, with the running
    statistics and num_batches_tracked left alone, where the CPU kernel raises; now they raise
    the kernels' device error. All-meta calls (and FakeTensorMode) still work."""
    n, c, L = 3, 4, 6
    st, m2, pc = torch.randn(n, c), torch.rand(n, c) + 1, torch.rand(c)
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.tensor(0)
    x = torch.randn(n, c, 2, 3)
    meta = lambda t: t.to("meta")  # noqa: E731
    calls = [
        ("running_mean is on meta, mean on cpu",
         lambda: ops.bin_coefficients(st, m2, L, pc, None, None, meta(rm), rv, True, 0.1, 1e-5, nbt)),
        ("gate_bias is on meta, mean on cpu",
         lambda: ops.iebn_coefficients(st, m2, L, pc, meta(pc), None, None, rm, rv, True, 0.1, 1e-5, nbt)),
        ("weight is on meta, mean on cpu",
         lambda: ops.bin_coefficients_backward(st, st, st, m2, L, pc, meta(pc), None, None, None, True, 1e-5)),
        ("encoder is on meta, mean on cpu",
         lambda: ops.assoc_coefficients(st, m2, L, 2, meta(torch.ones(1, 2)), torch.ones(2, 1),
                                        torch.ones(2, 1), pc, pc, 1e-5)),
        ("decoder_weight is on meta, mean on cpu",
         lambda: ops.ilm_coefficients(st, m2, L, 2, torch.ones(1, 2), meta(torch.ones(2, 1)),
                                      torch.ones(2, 1), pc, pc, 1e-5)),
        ("mean is on meta, input on cpu", lambda: ops.affine_apply(x, meta(st), st, st)),
        ("grad_output is on meta, input on cpu", lambda: ops.backward_sums(meta(x), x, st)),
        ("gate is on meta, input on cpu",
         lambda: ops.bin_layer(x, meta(pc), None, None, rm, rv, True, 0.1, 1e-5, nbt)),
        ("gate is on cpu, input on meta",
         lambda: ops.bin_layer_forward(meta(x), pc, None, None, rm, rv, True, 0.1, 1e-5, nbt)),
        ("decoder_var is on meta, input on cpu",
         lambda: ops.assoc_layer_forward(x, 2, torch.ones(1, 2), torch.ones(2, 1), meta(torch.ones(2, 1)),
                                         pc, pc, 1e-5)),
        ("encoder is on cpu, input on meta",
         lambda: ops.ilm_layer_forward(meta(x), 2, torch.ones(1, 2), torch.ones(2, 1), torch.ones(2, 1),
                                       pc, pc, 1e-5)),
        ("m2 is on meta, input on cpu",
         lambda: ops.assoc_layer_backward(x, x, st, meta(m2), 2, torch.ones(1, 2), torch.ones(2, 1),
                                          torch.ones(2, 1), pc, pc, 1e-5)),
        ("decoder_bias is on meta, input on cpu",
         lambda: ops.ilm_layer_backward(x, x, st, m2, 2, torch.ones(1, 2), torch.ones(2, 1),
                                        meta(torch.ones(2, 1)), pc, pc, 1e-5)),
    ]
    for match, call in calls:
        with pytest.raises(RuntimeError, match=match):
            call()
        assert torch.equal(rm, torch.zeros(c)) and torch.equal(rv, torch.ones(c)) and int(nbt) == 0
    out = ops.bin_layer(meta(x), meta(pc), None, None, meta(rm), meta(rv), True, 0.1, 1e-5, meta(nbt))
    assert out.device.type == "meta" and out.shape == x.shape
    meta_net = [meta(torch.ones(1, 2)), meta(torch.ones(2, 1)), meta(torch.ones(2, 1)), meta(pc), meta(pc)]
    for layer in ("assoc", "ilm"):
        out = getattr(ops, f"{layer}_layer")(meta(x), 2, *meta_net, 1e-5)
        assert out.device.type == "meta" and out.shape == x.shape
        grads = getattr(ops, f"{layer}_layer_backward")(meta(x), meta(x), meta(st), meta(m2), 2, *meta_net, 1e-5)
        assert [t.shape for t in grads] == [x.shape, (1, 2), (2, 1), (2, 1), (c,), (c,)]


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(
    not (ext.HAS_CUDA_KERNELS and torch.cuda.is_available()), reason="needs a GPU and the CUDA kernels"
)
GPU_SHAPES = SHAPES[:-2] + [(2, 3, 300000), (1, 1, 1 << 20), (2, 64, 28, 28), (4, 2048, 7, 7), (2, 3, 512, 512)]


@needs_gpu
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_ops_match_reference(shape, dtype, layout):
    x, dy, stats = make(shape, dtype, layout)
    m, q = ops.moments(x.cuda())
    check_moments(x, m.cpu(), q.cpu())
    mean, a, b, c = [s.cuda() for s in stats]
    g1, g2 = ops.backward_sums(dy.cuda(), x.cuda(), mean)
    px, pdy, md = planes(x), planes(dy), stats[0].double()[..., None]
    mag = pdy.abs().sum(-1).max().item() * ((px - md).abs().max().item() + 1) + 1
    torch.testing.assert_close(g1.cpu().double(), pdy.sum(-1), rtol=0, atol=2e-6 * mag)
    torch.testing.assert_close(g2.cpu().double(), (pdy * (px - md)).sum(-1), rtol=0, atol=2e-6 * mag)
    y = ops.affine_apply(x.cuda(), mean, a, b)
    assert y.stride() == x.stride()
    check_full(y.cpu(), (planes(x) - stats[0].double()[..., None]) * stats[1].double()[..., None]
               + stats[2].double()[..., None], x)
    dx = ops.backward_apply(dy.cuda(), x.cuda(), mean, a, b, c)
    s = [t.double()[..., None] for t in stats]
    check_full(dx.cpu(), s[1] * planes(dy) + s[2] * (planes(x) - s[0]) + s[3], x)


@needs_gpu
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_cuda_deterministic_and_offset_accurate(layout):
    x = to_layout(1e4 + torch.randn(2, 3, 700, 900, generator=torch.Generator().manual_seed(2)), layout).float()
    r1 = ops.moments(x.cuda())
    r2 = ops.moments(x.cuda())
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    rm, rq = ref_moments(x)
    assert (r1[0].cpu().double() - rm).abs().max().item() <= 0.6 * 2.0 ** -10
    assert ((r1[1].cpu().double() - rq) / rq).abs().max().item() < 1e-5


@needs_gpu
def test_cuda_rejects_float64():
    with pytest.raises(RuntimeError, match="float64 is not supported"):
        ops.moments(torch.randn(2, 3, 4, device="cuda", dtype=torch.float64))


@needs_gpu
def test_cuda_opcheck():
    x, dy, stats = make((2, 3, 5, 4), torch.float32, "cl", seed=11)
    x, dy = x.cuda(), dy.cuda()
    mean, a, b, c = [s.cuda() for s in stats]
    torch.library.opcheck(ops.moments.default, (x,))
    torch.library.opcheck(ops.affine_apply.default, (x, mean, a, b))
    torch.library.opcheck(ops.backward_sums.default, (dy, x, mean))
    torch.library.opcheck(ops.backward_apply.default, (dy, x, mean, a, b, c))


# ---- launch budget: a layer costs 3 GPU launches forward and 3 backward (GPU only) ----------------------
# A shape whose reductions split their planes across blocks, with a last-block merge on arrival
# counters: contiguous float16 is 8 planes of 65536 (8 blocks each), channels-last has C = 4 (one
# tile per sample, 256 blocks each). The counters must not cost a memset/fill launch per call.
LAUNCH_SHAPE = (2, 4, 256, 256)
LAUNCH_LAYERS = ("bin", "bin_running", "iebn", "iebn_running", "assoc")
# BIN / IEBN of this shape are small layers (one coefficient tile, 8 statistics): their CUDA layer
# steps run fused, the reduction's last block computing the coefficients (csrc/kernels/
# layer_steps.cuh), so 2 + 2 launches, unless NORMFUSE_FUSED_STEPS=0 (docs/architecture.md).
STEPS_FUSED = os.environ.get("NORMFUSE_FUSED_STEPS", "auto") != "0"
# a normfuse CUDA kernel (namespace nf), by its bare name
_OUR_KERNEL = re.compile(r"(?<![\w:])nf::(\w+_kernel)\b")


def _gpu_activities(fn):
    """Names of every GPU activity (kernel, memset, memcpy) that fn() causes."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _ours(names):
    return sorted(m.group(1) for m in map(_OUR_KERNEL.search, names) if m)


def _launch_layer(kind, c):
    make_layer = {
        "bin": lambda: normfuse.BatchInstanceNorm2d(c, track_running_stats=False),
        "bin_running": lambda: normfuse.BatchInstanceNorm2d(c),
        "iebn": lambda: normfuse.IEBN2d(c, track_running_stats=False),
        "iebn_running": lambda: normfuse.IEBN2d(c),
        "assoc": lambda: normfuse.AssocNorm(2, c),
    }[kind]
    return make_layer().cuda().train()


def _coefficients_backward(kind, layer, g1, g2, mean, m2, plane):
    """The layer's coefficient backward op, called as normfuse/_autograd.py does in training."""
    if kind.startswith("bin"):
        return ops.bin_coefficients_backward(g1, g2, mean, m2, plane, layer.gate, layer.weight, layer.bias,
                                             None, None, True, layer.eps)
    if kind.startswith("iebn"):
        return ops.iebn_coefficients_backward(g1, g2, mean, m2, plane, layer.gate_weight, layer.gate_bias,
                                              layer.weight, layer.bias, None, None, True, layer.eps)
    return ops.assoc_coefficients_backward(g1, g2, mean, m2, plane, layer.num_groups, layer.encoder,
                                           layer.decoder_mean, layer.decoder_var, layer.weight, layer.bias,
                                           layer.eps)


@needs_gpu
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("kind", LAUNCH_LAYERS)
def test_cuda_layer_launch_counts(kind, layout):
    x, dy, _ = make(LAUNCH_SHAPE, torch.float16, layout, seed=5)
    x, dy = x.cuda().requires_grad_(), dy.cuda()
    fmt = torch.contiguous_format if layout == "contig" else torch.channels_last
    assert x.is_contiguous(memory_format=fmt) and dy.is_contiguous(memory_format=fmt)
    layer = _launch_layer(kind, x.shape[1])
    inputs = [x, *layer.parameters()]
    part = "contig" if layout == "contig" else "cl"
    coef = "assoc_coef" if kind == "assoc" else "batch_coef"
    fused = STEPS_FUSED and kind != "assoc"
    step_fwd = [f"{part}_step_kernel"] if fused else [f"{part}_reduce_kernel", f"{coef}_forward_kernel"]
    step_bwd = [f"{part}_step_kernel"] if fused else [f"{part}_reduce_kernel", f"{coef}_backward_kernel"]
    with normfuse.use_backend("cuda"):
        torch.autograd.grad(layer(x), inputs, dy)  # warm-up: allocates the persistent counters

        # forward: moments, coefficients, affine map, and nothing else (no memset, no fill); a
        # module tracking running statistics updates them and counts the batch
        # (num_batches_tracked += 1) in the coefficient kernel: no elementwise kernel of its own
        before = int(layer.num_batches_tracked) if kind.endswith("_running") else None
        names = _gpu_activities(lambda: layer(x))
        assert _ours(names) == sorted([*step_fwd, f"{part}_apply_kernel"]), names
        assert len(names) == len(step_fwd) + 1, names
        assert not any("memset" in n.lower() for n in names), names
        if before is not None:
            assert int(layer.num_batches_tracked) == before + 1

        # backward through autograd: our three kernels (autograd may add its own, not counted)
        y = layer(x)
        names = _gpu_activities(lambda: torch.autograd.grad(y, inputs, dy))
        assert _ours(names) == sorted([*step_bwd, f"{part}_apply_kernel"]), names

    # backward, our three (component) ops alone: exactly three GPU activities in all
    expected_backward = sorted([f"{part}_reduce_kernel", f"{coef}_backward_kernel", f"{part}_apply_kernel"])
    with torch.no_grad():
        xd = x.detach()
        mean, m2 = ops.moments(xd)
        plane = xd[0, 0].numel()

        def backward():
            g1, g2 = ops.backward_sums(dy, xd, mean)
            c_dy, c_x, c_0, *_ = _coefficients_backward(kind, layer, g1, g2, mean, m2, plane)
            ops.backward_apply(dy, xd, mean, c_dy, c_x, c_0)

        backward()  # warm-up
        names = _gpu_activities(backward)
    assert len(names) == 3 and _ours(names) == expected_backward, names
