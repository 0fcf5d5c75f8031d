"""GPU-only checks (skipped without CUDA): realistic shapes with the real split heuristics,
half-precision inputs, launch counts, determinism, and torch.compile(fullgraph=True) tracing
into the kernels."""
from __future__ import annotations

import pytest
import tk_reference as ref
import torch

pytestmark = pytest.mark.gpu
ops = torch.ops.normfuse_triton
EPS = 1e-5
OUR_KERNELS = ("moments_kernel", "backward_sums_kernel", "affine_apply_kernel",
               "backward_apply_kernel", "bin_forward_kernel", "bin_backward_kernel",
               "iebn_forward_kernel", "iebn_backward_kernel", "assoc_forward_kernel",
               "assoc_backward_kernel", "ilm_forward_kernel", "ilm_backward_kernel")


def _x(shape, dtype, channels_last, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    return ref.to_layout(x, channels_last).to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 512, 512), (64, 256, 14, 14), (8, 96, 7, 7),
                                   (1, 5, 100003)], ids=str)
def test_streaming_gpu(shape, dtype, channels_last):
    x = _x(shape, dtype, channels_last, offset=3.0)
    dy = _x(shape, dtype, channels_last, seed=1)
    mean, m2 = ops.moments(x)
    r_mean, r_m2 = ref.moments(x)
    torch.testing.assert_close(mean.double(), r_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2.double(), r_m2, rtol=1e-5, atol=1e-3)
    scale, shift = torch.rand_like(mean) + 0.5, torch.randn_like(mean)
    y = ops.affine_apply(x, mean, scale, shift)
    assert y.stride() == x.stride()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref.affine_apply(x, mean, scale, shift), rtol=tol,
                               atol=tol)
    g1, g2 = ops.backward_sums(dy, x, mean)
    r1, r2 = ref.backward_sums(dy, x, mean)
    torch.testing.assert_close(g1.double(), r1, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(g2.double(), r2, rtol=1e-4, atol=1e-2)
    dx = ops.backward_apply(dy, x, mean, scale, shift, g1 * 1e-3)
    torch.testing.assert_close(dx.double(), ref.backward_apply(dy, x, mean, scale, shift,
                                                               g1 * 1e-3), rtol=tol, atol=tol)
    again = ops.backward_sums(dy, x, mean)
    assert torch.equal(again[0], g1) and torch.equal(again[1], g2)  # deterministic splits


def test_large_offset_gpu():
    x = _x((4, 8, 64, 64), torch.float32, False, offset=1e4)
    mean, m2 = ops.moments(x)
    r_mean, r_m2 = ref.moments(x)
    assert (mean.double() - r_mean).abs().max() <= 2e-3
    torch.testing.assert_close(m2.double(), r_m2, rtol=1e-5, atol=0)


def _bin_layer(x, gate, weight, bias):
    mean, m2 = ops.moments(x)
    scale, shift = ops.bin_coefficients(mean, m2, x[0, 0].numel(), gate, weight, bias, None,
                                        None, True, 0.1, EPS)
    return ops.affine_apply(x, mean, scale, shift)


def test_launch_counts():
    """3 launches forward and 3 backward, also when the reductions split their planes."""
    x = _x((2, 4, 256, 256), torch.float16, False)
    c = x.shape[1]
    gate, weight, bias = (torch.rand(c, device="cuda") for _ in range(3))
    _bin_layer(x, gate, weight, bias)  # compile and cache the counters
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _bin_layer(x, gate, weight, bias)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sorted(names) == sorted(["moments_kernel", "bin_forward_kernel",
                                    "affine_apply_kernel"]), names


def test_ilm_ops_gpu():
    """ILM-Norm's coefficient ops compiled, at the layer's defaults on C = 2048 (128 key groups
    of 16, 32 groups, E = 8) and 64 samples: the spec's numbers (float64 on the CPU), one CUDA
    kernel each, a bitwise deterministic backward, and torch.compile(fullgraph=True) traces
    into them."""
    from normfuse.coefficients import ilm as spec
    g = torch.Generator().manual_seed(4)
    n, c, L, G, K, E = 64, 2048, 49, 32, 128, 8

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    cpu = (r(n, c) + 1, (r(n, c).abs() + 0.1) * L, L, G, r(E, K, scale=0.2), r(K, E, scale=0.3),
           r(K, E, scale=0.3), r(c) * 0.2 + 1, r(c) * 0.2, EPS)
    dys = (r(n, c), r(n, c))
    f32 = [t.float().cuda() if isinstance(t, torch.Tensor) else t for t in dys + cpu]
    want = (*spec.ilm_coefficients(*cpu), *spec.ilm_coefficients_backward(*dys, *cpu))
    got = (*ops.ilm_coefficients(*f32[2:]), *ops.ilm_coefficients_backward(*f32))
    for a, w in zip(got, want):
        scale = max(1.0, float(w.abs().max()))
        assert float((a.double().cpu() - w).abs().max()) <= 1e-4 * scale
    again = ops.ilm_coefficients_backward(*f32)
    assert all(torch.equal(a, b) for a, b in zip(got[2:], again))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.ilm_coefficients(*f32[2:])
        ops.ilm_coefficients_backward(*f32)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sorted(names) == ["ilm_backward_kernel", "ilm_forward_kernel"], names
    compiled = torch.compile(lambda *a: ops.ilm_coefficients(*a), fullgraph=True)
    torch.testing.assert_close(compiled(*f32[2:]), got[:2])


def test_torch_compile_fullgraph():
    x = _x((4, 6, 9, 9), torch.float32, True)
    c = x.shape[1]
    gate, weight, bias = (torch.rand(c, device="cuda") for _ in range(3))
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rm2, rv2 = rm.clone(), rv.clone()

    def layer(x, rm, rv):
        mean, m2 = ops.moments(x)
        scale, shift = ops.bin_coefficients(mean, m2, x[0, 0].numel(), gate, weight, bias, rm,
                                            rv, True, 0.1, EPS)
        return ops.affine_apply(x, mean, scale, shift)

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, rm, rv), layer(x, rm2, rv2))
    torch.testing.assert_close((rm, rv), (rm2, rv2))  # running stats mutated in both


def test_float64_rejected():
    with pytest.raises(RuntimeError, match="float64"):
        ops.moments(torch.randn(2, 3, 4, device="cuda", dtype=torch.float64))


@pytest.mark.parametrize("stranger", ["weight", "running_mean", "sum_dy", "scale"])
def test_tensor_on_another_device_raises(stranger):
    """A statistic, coefficient or parameter on the CPU with CUDA statistics: a clear error
    naming it, before any launch, running statistics untouched."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = "cuda"
    n, c = 4, 6
    mean, m2 = torch.randn(n, c, device=dev), torch.rand(n, c, device=dev) + 1
    gate, weight, bias = (torch.rand(c, device=dev) for _ in range(3))
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    before = (rm.clone(), rv.clone())
    args = dict(weight=weight, running_mean=rm, sum_dy=mean.clone(), scale=mean.clone())
    args[stranger] = args[stranger].cpu()
    with pytest.raises(RuntimeError, match=f"{stranger} is on cpu"):
        if stranger == "sum_dy":
            ops.bin_coefficients_backward(args["sum_dy"], mean, mean, m2, 4, gate, weight, bias,
                                          None, None, True, 1e-5)
        elif stranger == "scale":
            x = torch.randn(n, c, 2, 2, device=dev)
            ops.affine_apply(x, mean, args["scale"], mean.clone())
        else:
            ops.bin_coefficients(mean, m2, 4, gate, args["weight"], bias, args["running_mean"],
                                 rv, True, 0.1, 1e-5)
    torch.testing.assert_close((rm, rv), before)
