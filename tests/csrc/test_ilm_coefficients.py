"""The compiled ILM-Norm coefficient ops (torch.ops.normfuse.ilm_coefficients[_backward], CPU
kernels in csrc/cpu/coefficients_ilm_impl.h) against their spec, the PyTorch-ops reference
normfuse/coefficients/ilm.py: float64 on fresh random inputs and awkward shapes (key groups that
straddle groups, one sample, plane size 1, one- and two-unit embeddings), float32 against the
float64 reference, non-finite inputs, refused arguments, torch.library.opcheck, determinism, and
ILMNorm end to end on the "cpu" backend against the "torch" backend (and gradcheck)."""
from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse.coefficients.ilm import ilm_coefficients as ref_forward
from normfuse.coefficients.ilm import ilm_coefficients_backward as ref_backward
from test_coefficients_cases import assert_close

try:
    from normfuse import _extension
except Exception as exc:  # pragma: no cover
    pytest.skip(f"normfuse does not import: {exc}", allow_module_level=True)

if not _extension.HAS_CPU_KERNELS:
    pytest.skip(_extension.REASON, allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("normfuse::ilm_coefficients", "CPU"):
    pytest.skip("normfuse._C predates the ILM coefficient kernels: rebuild it (csrc/README.md)",
                allow_module_level=True)
OPS = torch.ops.normfuse
F64 = torch.float64
FORWARD_OUT = ("scale", "shift")
BACKWARD_OUT = ("c_dy", "c_x", "c_0", "grad_encoder", "grad_decoder_weight", "grad_decoder_bias",
                "grad_weight", "grad_bias")

# N, C, L, G, key_group_size, E  (K = C / key_group_size)
SHAPES = [
    (4, 12, 5, 4, 4, 2),    # K = 3 key groups of 4 over G = 4 groups of 3: key groups straddle groups
    (1, 8, 6, 2, 2, 3),     # one sample
    (3, 48, 7, 8, 16, 2),   # K = 3, G = 8: neither grouping nests in the other
    (2, 64, 1, 16, 16, 2),  # plane size 1: groups of 4 and 16 values
    (5, 32, 9, 4, 4, 1),    # one hidden unit
    (3, 10, 3, 5, 2, 2),    # groups and key groups of two channels
    (2, 6, 2, 1, 3, 4),     # one group; more hidden units than key groups
]


def _ids(shape):
    return "x".join(map(str, shape))


def make_inputs(n, c, plane, groups, key_size, embed, seed, offset=0.0):
    """Float64 inputs in the op's argument order (the reference takes the same)."""
    gen = torch.Generator().manual_seed(seed)
    k = c // key_size

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    return dict(
        sum_dy=rnd(n, c), sum_dy_xmu=rnd(n, c, scale=1.5),
        mean=rnd(n, c, scale=0.7) + rnd(1, c, scale=0.8) + 0.3 + offset,
        m2=plane * (torch.rand(n, c, generator=gen, dtype=F64) * 1.95 + 0.05),
        plane_size=plane, num_groups=groups,
        encoder=rnd(embed, k, scale=0.6), decoder_weight=rnd(k, embed, scale=0.6),
        decoder_bias=rnd(k, embed, scale=0.6), weight=1.0 + rnd(c, scale=0.4),
        bias=rnd(c, scale=0.5), eps=1e-5)


def _args(t, dtype=F64, backward=False):
    keys = (("sum_dy", "sum_dy_xmu") if backward else ()) + (
        "mean", "m2", "plane_size", "num_groups", "encoder", "decoder_weight", "decoder_bias",
        "weight", "bias", "eps")
    return [t[k].to(dtype) if isinstance(t[k], torch.Tensor) else t[k] for k in keys]


def _run_both(t, dtype):
    """{name: result} of the compiled forward and backward on `t` in `dtype`."""
    got = dict(zip(FORWARD_OUT, OPS.ilm_coefficients(*_args(t, dtype))))
    got.update(zip(BACKWARD_OUT, OPS.ilm_coefficients_backward(*_args(t, dtype, backward=True))))
    return got


def _reference(t):
    want = dict(zip(FORWARD_OUT, ref_forward(*_args(t))))
    want.update(zip(BACKWARD_OUT, ref_backward(*_args(t, backward=True))))
    return want


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_float64_matches_reference(shape):
    for seed in (1, 2):  # fresh inputs per seed
        t = make_inputs(*shape, seed=seed + sum(shape))
        got, want = _run_both(t, F64), _reference(t)
        for name, ref in want.items():
            assert got[name].dtype == F64 and got[name].is_contiguous()
            assert_close(got[name], ref, 1e-12, f"{name} {shape} seed {seed}")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_float32_close_to_float64_reference(shape):
    """float32 statistics: the reference in float64 on the same (rounded) values; the kernel
    computes in double and rounds once per result."""
    t = make_inputs(*shape, seed=7 + sum(shape), offset=0.0)
    t = {k: v.float().double() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    got, want = _run_both(t, torch.float32), _reference(t)
    for name, ref in want.items():
        assert got[name].dtype == torch.float32
        assert_close(got[name], ref, 1e-6, f"{name} {shape} float32")


def test_float32_large_offset():
    """Plane means at 1e4: each merge is relative to its first plane's mean, as the reference."""
    t = make_inputs(3, 12, 5, 4, 4, 2, seed=5, offset=1e4)
    t = {k: v.float().double() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    got, want = _run_both(t, torch.float32), _reference(t)
    for name in ("scale", "shift", "c_dy", "c_x", "grad_weight", "grad_bias"):
        assert_close(got[name], want[name], 1e-6, f"{name} at offset 1e4")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["mean", "m2", "sum_dy"])
def test_non_finite_as_the_reference(poison, where):
    """A non-finite statistic gives non-finite results exactly where the reference's are (NaN
    stays NaN, never a silent 0), and the other samples' per-sample results stay equal."""
    t = make_inputs(3, 12, 5, 4, 4, 2, seed=13)
    t[where] = t[where].clone()
    t[where][1, 5] = poison
    got, want = _run_both(t, F64), _reference(t)
    for name, ref in want.items():
        g = got[name]
        assert torch.equal(torch.isnan(g), torch.isnan(ref)), f"{name}: NaN where the reference has"
        assert torch.equal(torch.isinf(g), torch.isinf(ref)), f"{name}: Inf where the reference has"
        finite = torch.isfinite(ref)
        assert_close(torch.where(finite, g, 0), torch.where(finite, ref, 0), 1e-12, name)
    for name in ("scale", "shift", "c_dy", "c_x", "c_0"):
        assert torch.isfinite(got[name][[0, 2]]).all(), f"{name}: sample 1's poison leaked"


def test_empty_batch():
    """N = 0: empty coefficients, zero parameter gradients (a sum over no samples), as the
    reference gives them."""
    t = make_inputs(0, 12, 5, 4, 4, 2, seed=3)
    got, want = _run_both(t, F64), _reference(t)
    for name in FORWARD_OUT + BACKWARD_OUT[:3]:
        assert got[name].shape == want[name].shape == (0, 12), name
    params = ("encoder", "decoder_weight", "decoder_bias", "weight", "bias")
    for name, param in zip(BACKWARD_OUT[3:], params):
        assert torch.equal(got[name], torch.zeros_like(t[param])), name
        assert torch.equal(want[name], got[name]), name


def test_backward_is_deterministic_and_thread_independent():
    """Parameter gradients are summed over samples in a fixed order: two calls agree bit for
    bit, and so do 1 and 2 threads on a batch that at::parallel_for splits."""
    t = make_inputs(600, 24, 3, 4, 4, 3, seed=17)
    args = _args(t, torch.float32, backward=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = OPS.ilm_coefficients_backward(*args)
        b = OPS.ilm_coefficients_backward(*args)
        torch.set_num_threads(1)
        one = OPS.ilm_coefficients_backward(*args)
    finally:
        torch.set_num_threads(threads)
    for name, x, y, z in zip(BACKWARD_OUT, a, b, one):
        assert torch.equal(x, y), f"{name}: two calls differ"
        assert torch.equal(x, z), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=_ids)
def test_opcheck(shape, dtype):
    t = make_inputs(*shape, seed=11)
    torch.library.opcheck(OPS.ilm_coefficients.default, tuple(_args(t, dtype)))
    torch.library.opcheck(OPS.ilm_coefficients_backward.default,
                          tuple(_args(t, dtype, backward=True)))


def _bad_calls():
    t = {k: (v.float() if isinstance(v, torch.Tensor) else v)
         for k, v in make_inputs(2, 12, 5, 4, 4, 2, seed=0).items()}

    def fwd(**override):
        return lambda: OPS.ilm_coefficients(*_args({**t, **override}, torch.float32))

    def bwd(**override):
        return lambda: OPS.ilm_coefficients_backward(*_args({**t, **override}, torch.float32,
                                                            backward=True))

    meta_encoder = t["encoder"].to("meta")
    return [
        ("dtype", lambda: OPS.ilm_coefficients(*[a.half() if isinstance(a, torch.Tensor) else a
                                                 for a in _args(t, torch.float32)]),
         "ilm_coefficients: mean .*must be float32 or float64"),
        ("m2-shape", fwd(m2=t["m2"][:, :6]), "ilm_coefficients: m2 must be"),
        ("groups", fwd(num_groups=5), r"ilm_coefficients: num_groups \(5\) must be >= 1 and divide"),
        ("groups-0", fwd(num_groups=0), r"ilm_coefficients: num_groups \(0\)"),
        ("encoder-K", fwd(encoder=torch.randn(2, 5)),  # K = 5 does not divide C = 12
         r"ilm_coefficients: encoder must be \(E, K\)"),
        ("encoder-rank", fwd(encoder=t["encoder"].flatten()), r"encoder must be \(E, K\)"),
        ("decoder_weight", fwd(decoder_weight=t["decoder_weight"].t().contiguous()),
         "ilm_coefficients: decoder_weight must have shape"),
        ("decoder_bias", fwd(decoder_bias=t["decoder_bias"][:, :1].contiguous()),
         "ilm_coefficients: decoder_bias must have shape"),
        ("decoder_bias-dtype", lambda: OPS.ilm_coefficients(
            t["mean"], t["m2"], 5, 4, t["encoder"], t["decoder_weight"], t["decoder_bias"].double(),
            t["weight"], t["bias"], 1e-5), "decoder_bias must be Float like the statistics"),
        ("weight", fwd(weight=t["weight"][:6]), "ilm_coefficients: weight must have shape"),
        ("bias-noncontig", fwd(bias=torch.randn(12, 2)[:, 0]), "bias must be contiguous"),
        ("plane_size", fwd(plane_size=0), "plane_size must be >= 1"),
        ("one-value-groups", fwd(plane_size=1, num_groups=12),
         "ilm_coefficients: the unbiased variance needs more than one value per group, got 1"),
        ("one-value-key-groups", fwd(plane_size=1, encoder=torch.randn(2, 12),
                                     decoder_weight=torch.randn(12, 2),
                                     decoder_bias=torch.randn(12, 2)),
         "needs more than one value per key group, got 1"),
        ("backward-sum_dy", bwd(sum_dy=t["sum_dy"][:1]), "ilm_coefficients_backward: sum_dy must be"),
        ("backward-groups", bwd(num_groups=12, plane_size=1),
         "ilm_coefficients_backward: the unbiased variance needs more than one value per group"),
        ("device", fwd(encoder=meta_encoder), "ilm_coefficients: encoder is on meta"),
        ("backward-device", bwd(decoder_bias=t["decoder_bias"].to("meta")),
         "ilm_coefficients_backward: decoder_bias is on meta"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_is_refused_with_a_named_message(case):
    _, call, match = case
    with pytest.raises(RuntimeError, match=match):
        call()


def test_reference_refuses_the_same_groups():
    """The Python spec refuses groups of one value too (ValueError; the op: RuntimeError)."""
    t = make_inputs(2, 12, 1, 12, 4, 2, seed=0)
    with pytest.raises(ValueError, match="more than one value per group"):
        ref_forward(*_args(t))


# ---- ILMNorm on the cpu backend ------------------------------------------------------------------
def _module(c, groups, key_size, reduction, seed, dtype=torch.float32):
    m = normfuse.ILMNorm(c, num_groups=groups, key_group_size=key_size, reduction=reduction)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # non-default values: the decoders start at zero
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return m.to(dtype)


def _step(m, x, backend):
    x = x.detach().clone().requires_grad_()
    m.zero_grad()
    with normfuse.use_backend(backend):
        y = m(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        (y * dy).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("shape,groups,key_size,reduction", [((4, 12, 5, 3), 4, 4, 2),
                                                             ((1, 16, 3, 3), 4, 8, 1),
                                                             ((3, 48, 4, 4), 8, 16, 2)],
                         ids=["straddle", "one-sample", "c48"])
def test_module_cpu_backend_equals_torch_backend(shape, groups, key_size, reduction):
    m = _module(shape[1], groups, key_size, reduction, seed=sum(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 1
    y, dx, grads = _step(m, x, "cpu")
    y_ref, dx_ref, grads_ref = _step(m, x, "torch")
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=2e-5, rtol=1e-4)
    for (name, _), g, g_ref in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=name)


def test_module_cpu_backend_calls_the_ops():
    """The cpu backend runs the compiled ops (not the reference): a spy on the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    m = _module(12, 4, 4, 2, seed=0)
    x = torch.randn(2, 12, 3, 3, requires_grad=True)
    with normfuse.use_backend("cpu"), Spy():
        m(x).sum().backward()
    # each direction one op (its CPU kernel calls the coefficient kernels without the
    # dispatcher: csrc/cpu/layer_directions_cpu.cpp), and none of the reference's matrix products
    assert [f for f in seen if f.startswith("normfuse.")] == [
        "normfuse.ilm_layer_forward.default", "normfuse.ilm_layer_backward.default"], seen
    assert not [f for f in seen if f.startswith("aten.mm")], seen


def test_module_gradcheck_float64_cpu_backend():
    m = _module(6, 3, 2, 2, seed=4, dtype=F64)
    x = torch.randn(2, 6, 2, 3, dtype=F64, requires_grad=True)
    params = list(m.parameters())

    def fn(x, *p):
        return normfuse.functional.ilm_norm(x, 3, 2, *p)

    assert [n for n, _ in m.named_parameters()] == ["encoder", "decoder_weight", "decoder_bias",
                                                    "weight", "bias"]
    with normfuse.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---- CUDA kernels (kernels/coefficients_ilm.cuh; skipped without a GPU) --------------------------
# The shim runs the same kernels on the CPU under TSAN / ASAN (tests/csrc/test_coefficients_shim.py);
# these check the glue and the real device. The cuda backend's layers call them once these have
# passed on a GPU (normfuse/_autograd.py, _ILM_KERNELS).
HAS_GPU = _extension.HAS_CUDA_KERNELS and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU and the CUDA kernels")


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_cuda_matches_reference(shape):
    t = make_inputs(*shape, seed=21 + sum(shape))
    t = {k: v.float().double() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    cuda = {k: v.float().cuda() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    got = dict(zip(FORWARD_OUT, OPS.ilm_coefficients(*_args(cuda, torch.float32))))
    back = OPS.ilm_coefficients_backward(*_args(cuda, torch.float32, backward=True))
    again = OPS.ilm_coefficients_backward(*_args(cuda, torch.float32, backward=True))
    got.update(zip(BACKWARD_OUT, back))
    want = _reference(t)
    for name, ref in want.items():
        assert got[name].is_cuda
        assert_close(got[name].cpu(), ref, 2e-5, f"cuda {name} {shape}")
    for name, a, b in zip(BACKWARD_OUT, back, again):
        assert torch.equal(a, b), f"cuda {name}: two calls differ"


@needs_gpu
def test_cuda_opcheck_and_refusals():
    t = {k: v.float().cuda() if isinstance(v, torch.Tensor) else v
         for k, v in make_inputs(*SHAPES[0], seed=5).items()}
    torch.library.opcheck(OPS.ilm_coefficients.default, tuple(_args(t, torch.float32)))
    torch.library.opcheck(OPS.ilm_coefficients_backward.default,
                          tuple(_args(t, torch.float32, backward=True)))
    with pytest.raises(RuntimeError, match="CUDA kernels take float32 statistics"):
        OPS.ilm_coefficients(*_args(t, F64))
    big = dict(t, encoder=torch.randn(4096, 12, device="cuda"),
               decoder_weight=torch.randn(12, 4096, device="cuda"),
               decoder_bias=torch.randn(12, 4096, device="cuda"))
    big_g = dict(t, mean=torch.randn(2, 1 << 16, device="cuda"), m2=torch.rand(2, 1 << 16, device="cuda"),
                 weight=torch.randn(1 << 16, device="cuda"), bias=torch.randn(1 << 16, device="cuda"),
                 num_groups=1 << 15, encoder=torch.randn(2, 1 << 15, device="cuda"),
                 decoder_weight=torch.randn(1 << 15, 2, device="cuda"),
                 decoder_bias=torch.randn(1 << 15, 2, device="cuda"))
    OPS.ilm_coefficients(*_args(big, torch.float32))  # E = 4096: 34 KB of shared memory, fine
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        OPS.ilm_coefficients(*_args(big_g, torch.float32))
