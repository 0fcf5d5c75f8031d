"""The fused ReLU of the CPU kernels (issue 14): affine_apply(relu=True) and the masked
backward_sums / backward_apply (scale and shift given), against float64 references of the formulas
(normfuse/torch_backend.py is the reference implementation), and against the plain ops:

* forward: affine_apply(relu=True) == torch.relu(affine_apply(relu=False)), bit for bit;
* backward: the masked ops == the plain ops applied to where(y > 0, dy, 0), y the kernel's own
  forward, bit for bit; with inputs built so that a mask computed without the forward's fused
  multiply-add (or with it, where the forward has none) disagrees with the forward's sign;
* the bitwise tests again in a subprocess with ATEN_CPU_CAPABILITY=default: the portable build
  of the kernels (the test process runs the AVX2 build where the CPU has it).

Near-zero pre-activations have an ambiguous sign between the kernel and a float64 reference: the
reference tests set dy = 0 where |v| is within a small band of 0, and check that about half of
the elements are masked, so a kernel without the mask fails them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from normfuse import _extension as ext

pytestmark = pytest.mark.skipif(not ext.HAS_CPU_KERNELS, reason=ext.REASON or "normfuse._C not built")
ops = torch.ops.normfuse

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (2, 3),              # rank 2: L = 1 (one flat row)
    (3, 17, 1),          # L = 1
    (2, 3, 7),           # odd L, shorter than a vector (partial loads)
    (1, 4, 33, 17),      # N = 1, odd L
    (2, 37, 5, 3),       # channels-last column blocks of 4 vectors, 1 vector and a partial one
    (2, 70, 3, 5),       # channels-last wide rows (C >= 64: row by row)
    (3, 6, 2, 3, 5),     # rank 5
    (2, 3, 40000),       # planes longer than a CPU segment (split + merge), several chunks
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BAND = 1e-4  # relative: |v| below BAND * (|x - mean| |scale| + |shift|) counts as ambiguous


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contig" or x.dim() == 2:
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)  # C innermost (channels-last), any rank


def planes(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], t.shape[1], -1)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, layout, seed=0):
    """x, dy (dy = 0 where the sign of v is ambiguous), mean, scale, shift, backward coefficients,
    the float64 pre-activation v and its mask (v > 0)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    per_plane = r(n, c, *([1] * (len(shape) - 2))) * 3
    x = to_layout((r(shape) * 2 + per_plane).to(dtype), layout)
    a = acc(dtype)
    mean = (planes(x).mean(-1) + 0.3 * r(n, c)).to(a)
    scale, shift = r(n, c).to(a), (0.5 * r(n, c)).to(a)
    coef = [r(n, c).to(a) for _ in range(3)]
    px, m, s, b = planes(x), *(t.double()[..., None] for t in (mean, scale, shift))
    v = (px - m) * s + b
    ambiguous = v.abs() <= BAND * ((px - m).abs() * s.abs() + b.abs())
    dy = r(shape)
    dy = dy.reshape(n, c, -1).masked_fill(ambiguous, 0).reshape(shape)
    dy = to_layout(dy.to(dtype), layout)
    return x, dy, mean, scale, shift, coef, v, v > 0


def close(out, ref, tol):
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relu_ops_match_float64_reference(shape, dtype, layout):
    x, dy, mean, scale, shift, (c_dy, c_x, c_0), v, mask = make(shape, dtype, layout, seed=len(shape))
    assert 0.25 < mask.double().mean().item() < 0.75  # a missing mask cannot pass
    tol = TOL[dtype]
    y = ops.affine_apply(x, mean, scale, shift, True)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    close(planes(y), v.clamp_min(0), tol)

    px, pdy, md = planes(x), planes(dy), mean.double()[..., None]
    mdy = torch.where(mask, pdy, 0)
    g1, g2 = ops.backward_sums(dy, x, mean, scale, shift)
    mag = (pdy.abs() * (px - md).abs()).sum(-1).max().item() + pdy.abs().sum(-1).max().item() + 1
    sum_tol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(g1.double(), mdy.sum(-1), rtol=0, atol=sum_tol * mag)
    torch.testing.assert_close(g2.double(), (mdy * (px - md)).sum(-1), rtol=0, atol=sum_tol * mag)

    dx = ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    k = [t.double()[..., None] for t in (c_dy, c_x, c_0)]
    # only the dy term is masked: c_x and c_0 reach every element
    close(planes(dx), k[0] * mdy + k[1] * (px - md) + k[2], tol)


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relu_ops_equal_plain_ops_on_relu_output(shape, dtype, layout):
    """relu=True is torch.relu of the plain forward, and the mask is the plain forward's sign:
    bit for bit (dy is 0 only where v is within the band of 0, where a reduced dtype's rounding
    of v may have flushed a tiny positive v to 0)."""
    x, dy, mean, scale, shift, (c_dy, c_x, c_0), _, _ = make(shape, dtype, layout, seed=7 + len(shape))
    y = ops.affine_apply(x, mean, scale, shift)
    assert torch.equal(ops.affine_apply(x, mean, scale, shift, True), torch.relu(y))
    gated = torch.where(y > 0, dy, 0)
    for got, want in zip(ops.backward_sums(dy, x, mean, scale, shift), ops.backward_sums(gated, x, mean)):
        assert torch.equal(got, want)
    assert torch.equal(ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift),
                       ops.backward_apply(gated, x, mean, c_dy, c_x, c_0))


def product_error(a, b, p):
    """a * b - p exactly, for p = a * b rounded (float32: in double; float64: Dekker's product)."""
    if a.dtype == torch.float32:
        return a.double() * b.double() - p.double()

    def split(t):
        c = 134217729.0 * t
        hi = c - (c - t)
        return hi, t - hi

    (ah, al), (bh, bl) = split(a), split(b)
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("shape", [(64, 67), (16, 67, 9), (4, 67, 3, 5), (8, 44, 7), (3, 5, 3000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mask_recomputes_the_forwards_arithmetic(dtype, shape, layout):
    """One element per plane sits on a knife's edge: shift = -round((x - mean) * scale), so
    (x - mean) * scale + shift is exactly 0 without a fused multiply-add and the product's rounding
    error (either sign) with one. A mask that does not repeat the forward's own arithmetic (fma or
    not) disagrees with the forward's sign on about half of these elements. No band here: every dy
    counts."""
    g = torch.Generator().manual_seed(5)
    n, c = shape[0], shape[1]
    x = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    dy = to_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    mean = (torch.randn(n, c, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    scale = (torch.randn(n, c, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    px = x.reshape(n, c, -1) if x.is_contiguous() else x.movedim(1, -1).reshape(n, -1, c).transpose(1, 2)
    j = torch.arange(n * c).reshape(n, c) % px.shape[-1]  # the edge element of each plane
    xj = px.gather(2, j[..., None])[..., 0]
    xm = xj - mean  # rounded like the kernel's x - mean, then the product, in dtype
    prod = xm * scale
    shift = -prod
    exact = product_error(xm, scale, prod)  # the value with a fused multiply-add
    assert (exact > 0).sum() > n * c // 5 and (exact < 0).sum() > n * c // 5  # discriminating

    y = ops.affine_apply(x, mean, scale, shift)
    gated = torch.where(y > 0, dy, 0)
    for got, want in zip(ops.backward_sums(dy, x, mean, scale, shift), ops.backward_sums(gated, x, mean)):
        assert torch.equal(got, want)
    c_dy, c_x, c_0 = (torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    assert torch.equal(ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift),
                       ops.backward_apply(gated, x, mean, c_dy, c_x, c_0))
    assert torch.equal(ops.affine_apply(x, mean, scale, shift, True), torch.relu(y))


def test_relu_keeps_nan_and_masks_it():
    x = torch.randn(2, 3, 21)
    x[0, 1, 4] = float("nan")
    mean, scale, shift = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3)
    y = ops.affine_apply(x, mean, scale, shift, True)
    assert torch.isnan(y[0, 1, 4]) and torch.isnan(y).sum() == 1  # like torch.relu
    dy = torch.ones_like(x)
    g1, _ = ops.backward_sums(dy, x, mean, scale, shift)
    assert torch.equal(g1, (x > 0).sum(-1).float())  # NaN is not > 0: its dy is masked


def test_masked_sums_do_not_depend_on_thread_count():
    x, dy, mean, scale, shift, *_ = make((2, 3, 70001), torch.float32, "contig", seed=3)
    xc, dyc, mc, sc, bc, *_ = make((1, 9, 150, 150), torch.float32, "cl", seed=4)
    old = torch.get_num_threads()
    try:
        res = []
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            res.append(ops.backward_sums(dy, x, mean, scale, shift) + ops.backward_sums(dyc, xc, mc, sc, bc))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_mask_arguments_checked():
    x, dy, mean, scale, shift, (c_dy, c_x, c_0), _, _ = make((2, 3, 5), torch.float32, "contig")
    with pytest.raises(RuntimeError, match="both"):
        ops.backward_sums(dy, x, mean, scale, None)
    with pytest.raises(RuntimeError, match="both"):
        ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, None, shift)
    with pytest.raises(RuntimeError, match="shape"):
        ops.backward_sums(dy, x, mean, scale[:1], shift[:1])


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_opcheck_relu(layout):
    x, dy, mean, scale, shift, (c_dy, c_x, c_0), _, _ = make((2, 3, 5, 4), torch.float32, layout, seed=11)
    torch.library.opcheck(ops.affine_apply.default, (x, mean, scale, shift, True))
    torch.library.opcheck(ops.backward_sums.default, (dy, x, mean, scale, shift))
    torch.library.opcheck(ops.backward_apply.default, (dy, x, mean, c_dy, c_x, c_0, scale, shift))


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default", reason="already the portable build")
def test_portable_build_too():
    """The bitwise tests above with ATEN_CPU_CAPABILITY=default: generic_ops_cpu.cpp then runs the
    portable build of the kernels (a * b + c where the AVX2 build has a fused multiply-add). Those
    compare with the plain ops (every dtype, shape, layout), whose float64 accuracy
    test_generic_ops.py checks."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cap = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cap.stdout.strip() == "DEFAULT", cap.stdout + cap.stderr
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "equal_plain or forwards_arithmetic or nan"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
