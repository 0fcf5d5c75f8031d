"""moments, affine_apply, backward_sums, backward_apply against float64 references: awkward
shapes (L = 1, odd L, C not a multiple of any block, N = 1, C = 1), both layouts, every dtype,
split planes, and a 1e4 offset."""
from __future__ import annotations

import pytest
import tk_reference as ref
import torch
from tk_common import DEVICE

from normfuse.triton_kernels import heuristics

ops = torch.ops.normfuse_triton

SHAPES = [(3, 5), (1, 7, 1), (2, 3, 13), (1, 1, 37), (3, 17, 5, 7), (2, 20, 3, 3, 3),
          (1, 70, 2, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16] + (
    [torch.float64] if DEVICE == "cpu" else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               rtol=tol, atol=tol)


def _inputs(shape, dtype, channels_last, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return (ref.to_layout(x, channels_last).to(DEVICE), ref.to_layout(dy, channels_last).to(DEVICE))


def _coeffs(shape, acc, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape[:2], generator=g, dtype=torch.float64).to(acc).to(DEVICE)
            for _ in range(3)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streaming_ops(shape, dtype, channels_last):
    x, dy = _inputs(shape, dtype, channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    mean, m2 = ops.moments(x)
    assert mean.dtype == m2.dtype == acc and mean.shape == shape[:2]
    r_mean, r_m2 = ref.moments(x)
    _close(mean, r_mean, acc)
    _close(m2, r_m2, acc, scale=10)

    mu, scale, shift = _coeffs(shape, acc)
    y = ops.affine_apply(x, mu, scale, shift)
    assert y.dtype == dtype and y.stride() == x.stride()
    _close(y, ref.affine_apply(x, mu, scale, shift), dtype, scale=4)

    g1, g2 = ops.backward_sums(dy, x, mu)
    r1, r2 = ref.backward_sums(dy, x, mu)
    _close(g1, r1, acc, scale=10)
    _close(g2, r2, acc, scale=10)

    c_dy, c_x, c_0 = _coeffs(shape, acc, seed=2)
    dx = ops.backward_apply(dy, x, mu, c_dy, c_x, c_0)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    _close(dx, ref.backward_apply(dy, x, mu, c_dy, c_x, c_0), dtype, scale=4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 300), (1, 5, 35, 20), (3, 2, 1500)], ids=str)
def test_split_reductions(force_splits, monkeypatch, shape, channels_last):
    """Planes shared by several programs, merged by the last one; a 1e4 offset on top.  The
    ticket counters must come back zeroed (they are reused across launches on a GPU)."""
    from normfuse.triton_kernels import runtime
    used, counters = [], runtime.counters
    monkeypatch.setattr(runtime, "counters", lambda *a: used.append(counters(*a)) or used[-1])
    x, dy = _inputs(shape, torch.float32, channels_last, offset=1e4)
    n, c = shape[:2]
    cfg = heuristics.stream_config(c, x[0, 0].numel(), channels_last)
    keep = n * -(-c // cfg.block_p) if channels_last else -(-n * c // cfg.block_p)
    splits, _ = heuristics.split_plan(cfg, keep, x[0, 0].numel(), heuristics.num_sms(x.device))
    assert splits > 1
    mean, m2 = ops.moments(x)
    r_mean, r_m2 = ref.moments(x)
    torch.testing.assert_close(mean.double().cpu(), r_mean.cpu(), rtol=0, atol=2e-3)
    torch.testing.assert_close(m2.double().cpu(), r_m2.cpu(), rtol=2e-5, atol=0)
    g1, g2 = ops.backward_sums(dy, x, mean)
    r1, r2 = ref.backward_sums(dy, x, mean)
    torch.testing.assert_close(g1.double().cpu(), r1.cpu(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g2.double().cpu(), r2.cpu(), rtol=1e-4, atol=1e-3)
    assert len(used) == 2 and all(int(b.abs().sum()) == 0 for b in used)


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_offset_float32(channels_last):
    """1e4 + N(0, 1): mean within ~2 ulp(1e4), m2 to float32 relative accuracy."""
    x, _ = _inputs((2, 3, 40, 50), torch.float32, channels_last, offset=1e4)
    mean, m2 = ops.moments(x)
    r_mean, r_m2 = ref.moments(x)
    assert (mean.double().cpu() - r_mean.cpu()).abs().max() <= 2e-3
    torch.testing.assert_close(m2.double().cpu(), r_m2.cpu(), rtol=1e-5, atol=0)
    # centred apply: unit-scale output stays accurate although mean ~ 1e4
    y = ops.affine_apply(x, mean, torch.ones_like(mean), torch.zeros_like(mean))
    torch.testing.assert_close(y.double().cpu(), ref.affine_apply(x, mean, torch.ones_like(mean),
                                                                  torch.zeros_like(mean)).cpu(),
                               rtol=0, atol=1e-6)


def test_rejects_other_layouts():
    x = torch.randn(2, 3, 4, 5, device=DEVICE).transpose(2, 3)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        ops.moments(x)
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    dy = ref.to_layout(torch.randn(2, 3, 4, 5), True).to(DEVICE)
    mean = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="memory format"):
        ops.backward_sums(dy, x, mean)


def test_deterministic():
    x, dy = _inputs((3, 4, 50), torch.float32, False, seed=3)
    first = ops.backward_sums(dy, x, ops.moments(x)[0])
    second = ops.backward_sums(dy, x, ops.moments(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
