"""The fused ReLU of the streaming ops (issue 14) against float64 references:
``affine_apply(relu=True)``, and ``backward_sums`` / ``backward_apply`` with the forward's
``scale``/``shift`` (the mask ``v > 0``, ``v = scale * (x - mean) + shift`` recomputed).

Every shape / dtype / layout draws coefficients such that about half of the elements are cut
by the ReLU (checked, so a kernel that ignores the mask fails), and sets ``dy = 0`` where the
float64 pre-activation is within a small band of 0 (there the sign may differ between float32
and float64, so those elements must not matter).  The mask itself is also compared bit for bit
with the forward's sign (``test_mask_is_forward_sign``), on values clustered around 0.
"""
from __future__ import annotations

import pytest
import tk_reference as ref
import torch
from tk_common import DEVICE

from normfuse.triton_kernels import heuristics

ops = torch.ops.normfuse_triton
F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16] + ([F64] if DEVICE == "cpu" else [])
TOL = {F64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# planes of 1, 1, 17, 1100, 21, 24 elements; N*C = 15, 7, 6, 2, 10, 3; ranks 2..5
SHAPES = [(3, 5), (1, 7, 1), (2, 3, 17), (1, 2, 1100), (2, 5, 3, 7), (1, 3, 2, 3, 4)]
BAND = 1e-3  # |v64| < BAND * (1 + |scale| * |x - mean| + |shift|): dy = 0 there


def _close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.to(F64).cpu(), expected.to(F64).cpu(), rtol=tol, atol=tol)


def _case(shape, dtype, channels_last, seed=0):
    """``x, dy, mean, scale, shift, v64``: half of ``v64`` (roughly) <= 0, ``dy`` zeroed in the
    band around ``v64 == 0`` (and nowhere else)."""
    g = torch.Generator().manual_seed(seed)
    acc = F64 if dtype == F64 else torch.float32
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)
    dy = (torch.randn(shape, generator=g, dtype=F64) + 0.1).to(dtype)
    # mean near the plane's mean and a small shift: about half of every plane is cut
    mean = (x.to(F64).reshape(n, c, -1).mean(-1)
            + torch.randn((n, c), generator=g, dtype=F64) * 0.2).to(acc)
    scale = (torch.randn((n, c), generator=g, dtype=F64) * 1.5).to(acc)
    shift = (torch.randn((n, c), generator=g, dtype=F64) * 0.3 * scale.abs()).to(acc)
    if n * c == 15:  # one plane (of one element) with v exactly 0: ReLU's derivative there is 0
        scale[0, 0], shift[0, 0] = 0.0, 0.0
    xc = x.to(F64) - ref.planes(mean.to(F64), x)
    v64 = ref.planes(scale.to(F64), x) * xc + ref.planes(shift.to(F64), x)
    band = BAND * (1 + (ref.planes(scale.to(F64), x) * xc).abs() + ref.planes(shift, x).abs())
    near = (v64.abs() < band) & (v64 != 0)
    dy = torch.where(near, torch.zeros((), dtype=dtype), dy)
    x, dy = (ref.to_layout(t, channels_last).to(DEVICE) for t in (x, dy))
    return x, dy, mean.to(DEVICE), scale.to(DEVICE), shift.to(DEVICE), v64


def _masked(dy, v64):
    return torch.where(v64 > 0, dy.to(F64).cpu(), torch.zeros((), dtype=F64))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_relu(shape, dtype, channels_last):
    x, dy, mean, scale, shift, v64 = _case(shape, dtype, channels_last)
    acc = mean.dtype
    cut = (v64 <= 0).double().mean().item()
    if v64.numel() >= 30:  # a kernel without the mask must fail
        assert 0.3 < cut < 0.7, cut

    # forward: relu of the unfused result, bit for bit (rounding keeps the sign), and the
    # float64 formula
    y = ops.affine_apply(x, mean, scale, shift, True)
    assert y.dtype == dtype and y.stride() == x.stride()
    plain = ops.affine_apply(x, mean, scale, shift)
    assert torch.equal(y, torch.relu(plain))
    _close(y, torch.relu(v64), dtype, scale=4)

    # backward_sums: the sums of the masked dy
    g1, g2 = ops.backward_sums(dy, x, mean, scale, shift)
    assert g1.dtype == g2.dtype == acc and g1.shape == shape[:2]
    r1, r2 = ref.backward_sums(_masked(dy, v64), x.cpu(), mean.cpu())
    _close(g1, r1, acc, scale=10)
    _close(g2, r2, acc, scale=10)

    # backward_apply: only the c_dy term sees the mask
    g = torch.Generator().manual_seed(7)
    c_dy, c_x, c_0 = (torch.randn(shape[:2], generator=g, dtype=F64).to(acc).to(DEVICE)
                      for _ in range(3))
    dx = ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    expected = ref.backward_apply(_masked(dy, v64), x.cpu(), mean.cpu(), c_dy.cpu(), c_x.cpu(),
                                  c_0.cpu())
    _close(dx, expected, dtype, scale=4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_split_reduction(force_splits, channels_last):
    """backward_sums with the mask on planes shared by several programs."""
    shape = (2, 3, 20, 30)
    x, dy, mean, scale, shift, v64 = _case(shape, torch.float32, channels_last, seed=4)
    n, c = shape[:2]
    cfg = heuristics.stream_config(c, 600, channels_last)
    keep = n * -(-c // cfg.block_p) if channels_last else -(-n * c // cfg.block_p)
    assert heuristics.split_plan(cfg, keep, 600, heuristics.num_sms(x.device))[0] > 1
    g1, g2 = ops.backward_sums(dy, x, mean, scale, shift)
    r1, r2 = ref.backward_sums(_masked(dy, v64), x.cpu(), mean.cpu())
    _close(g1, r1, torch.float32, scale=10)
    _close(g2, r2, torch.float32, scale=10)


@pytest.mark.parametrize("dtype", [torch.float32] + ([F64] if DEVICE == "cpu" else []), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_is_forward_sign(dtype, channels_last):
    """Pre-activations clustered within a few ulps of 0 (``shift = -scale * (x0 - mean)``, x a
    few ulps around x0), where a different operation order or fma contraction would flip signs:
    the backward's mask equals the forward's ``y > 0`` for every element (acc dtype = input
    dtype, so y is v itself)."""
    n, c, l = 2, 3, 64
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(n, c, 1, generator=g, dtype=F64).to(dtype)
    steps = torch.arange(-(l // 2), l - l // 2, dtype=F64)
    x = (x0 + steps * x0.abs().clamp_min(1e-3) * torch.finfo(dtype).eps).to(dtype)
    mean = torch.randn(n, c, generator=g, dtype=F64).to(dtype)
    scale = (torch.randn(n, c, generator=g, dtype=F64) * 3).to(dtype)
    shift = -(scale * (x0[..., 0] - mean))  # in the acc dtype (= dtype), as a caller would
    x = ref.to_layout(x.reshape(n, c, 8, 8), channels_last).to(DEVICE)
    mean, scale, shift = (t.to(DEVICE) for t in (mean, scale, shift))
    y = ops.affine_apply(x, mean, scale, shift)
    positive = (y > 0).to(dtype)
    assert 0 < positive.mean().item() < 1
    ones, zeros = torch.ones_like(x), torch.zeros_like(mean)
    mask = ops.backward_apply(ones, x, mean, torch.ones_like(mean), zeros, zeros, scale, shift)
    assert torch.equal(mask, positive)
    g1, _ = ops.backward_sums(ones, x, mean, scale, shift)
    assert torch.equal(g1, positive.sum((2, 3)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
def test_relu_keeps_nan():
    x = torch.tensor([[[1.0, float("nan"), -1.0, float("inf"), float("-inf"), 0.0]]],
                     device=DEVICE)
    one = torch.ones(1, 1, device=DEVICE)
    zero = torch.zeros(1, 1, device=DEVICE)
    y = ops.affine_apply(x, zero, one, zero, True)
    expected = torch.tensor([[[1.0, float("nan"), 0.0, float("inf"), 0.0, 0.0]]])
    torch.testing.assert_close(y.cpu(), expected, equal_nan=True, rtol=0, atol=0)
    # the mask is v > 0: 0 for NaN, -Inf and 0, so sum_dy counts 1.0 and Inf
    g1, _ = ops.backward_sums(torch.ones_like(x), x, zero, one, zero)
    assert g1.item() == 2.0


def test_mask_argument_checks():
    x = torch.randn(2, 3, 4, device=DEVICE)
    dy = torch.randn(2, 3, 4, device=DEVICE)
    mean, a, b, c = (torch.randn(2, 3, device=DEVICE) for _ in range(4))
    for kwargs, match in [({"scale": a}, "must both be given or both be None, got scale only"),
                          ({"shift": a}, "must both be given or both be None, got shift only"),
                          ({"scale": a, "shift": b[:1]}, r"shift must be \(2, 3\)"),
                          ({"scale": a.double(), "shift": b}, r"scale must be \(2, 3\) "
                                                              r"torch.float32")]:
        with pytest.raises(RuntimeError, match=match):
            ops.backward_sums(dy, x, mean, **kwargs)
        with pytest.raises(RuntimeError, match=match):
            ops.backward_apply(dy, x, mean, a, b, c, **kwargs)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="scale is on cpu"):
            ops.backward_sums(dy, x, mean, a.cpu(), b)
