"""The four BIN / IEBN layer-direction ops (torch.ops.normfuse.{bin,iebn}_layer_forward,
{bin,iebn}_layer_backward) against the composition they stand for, called op by op on the same
inputs: the layer step (<layer>_moments_coefficients / <layer>_sums_coefficients_backward) then the
full-size op (affine_apply / backward_apply). Outputs, running statistics and num_batches_tracked
BITWISE equal (the CPU registration is that composition; a device kernel of its own must keep the
reduction order of the step and apply kernels). torch.library.opcheck on all four.

CUDA parts skip without a GPU. test_cuda_forced_paths reruns the CUDA comparisons in child
processes with the fused layer steps forced on (NORMFUSE_FUSED_STEPS=1) and off (0).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layer_inputs import clones, make  # tests/csrc/layer_inputs.py
from normfuse import _extension as ext

pytestmark = pytest.mark.skipif(not ext.HAS_CPU_KERNELS, reason=ext.REASON or "normfuse._C not built")
ops = torch.ops.normfuse
CUDA = ext.HAS_CUDA_KERNELS and torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _generic_cuda_path():
    """The CUDA kernels of these ops may run a direction as one single-read launch
    (NORMFUSE_SINGLE_READ=auto), which sums in another order: equal only to rounding
    (tests/csrc/test_single_read.py). Bitwise equality is the generic path's, so pin it."""
    if not ext.HAS_CUDA_KERNELS:
        yield
        return
    previous = ext._C.single_read("0")
    try:
        yield
    finally:
        ext._C.single_read(previous)
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a GPU with normfuse CUDA kernels")

# (N, C, spatial)
SHAPES = [
    (4, 8, (5, 5)),     # 4-d
    (3, 29, (7,)),      # 3-d, odd C
    (2, 3, (33, 17)),   # odd C, long odd planes
    (5, 7, (1,)),       # L = 1 (3-d)
    (6, 5, (1, 1)),     # L = 1 (4-d)
    (1, 5, (3, 3)),     # N = 1: eval only (a batch variance over one element is 0 / 0)
]
CASES = [(shape, layout) for shape in SHAPES for layout in (["contig", "cl"] if len(shape[2]) == 2 else ["contig"])]
CUDA_CASES = CASES + [((6, 64, (4, 4)), layout) for layout in ("contig", "cl")] + [((8, 48, (16, 16)), "cl")]
# (training, affine): training always with running statistics and num_batches_tracked
MODES = [(True, True), (True, False), (False, True), (False, False)]


def fwd_tail(t, training, affine):
    w, b = (t["weight"], t["bias"]) if affine else (None, None)
    return [*t["gates"], w, b, t["rm"], t["rv"], training, 0.1, 1e-5, t["nbt"]]


def bwd_tail(t, training, affine):
    return fwd_tail(t, training, affine)[:-3] + [1e-5]


def direction_forward(layer, t, mode, relu):
    return getattr(ops, f"{layer}_layer_forward")(t["x"], *fwd_tail(t, *mode), relu)


def composed_forward(layer, t, mode, relu):
    mean, m2, scale, shift = getattr(ops, f"{layer}_moments_coefficients")(t["x"], *fwd_tail(t, *mode))
    return ops.affine_apply(t["x"], mean, scale, shift, relu), mean, m2, scale, shift


def direction_backward(layer, t, mode, stats, mask):
    _, mean, m2, scale, shift = stats
    return getattr(ops, f"{layer}_layer_backward")(
        t["dy"], t["x"], mean, m2, *bwd_tail(t, *mode), *((scale, shift) if mask else (None, None)))


def composed_backward(layer, t, mode, stats, mask):
    _, mean, m2, scale, shift = stats
    ss = (scale, shift) if mask else (None, None)
    c_dy, c_x, c_0, *grads = getattr(ops, f"{layer}_sums_coefficients_backward")(
        t["dy"], t["x"], mean, m2, *bwd_tail(t, *mode), *ss)
    return (ops.backward_apply(t["dy"], t["x"], mean, c_dy, c_x, c_0, *ss), *grads)


def assert_same(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride(), (what, i)
        assert u.isfinite().all(), (what, i)  # the shapes above keep every result finite
        assert torch.equal(u, v), (what, i, (u.double() - v.double()).abs().max())


def check_direction_equals_composition(layer, shape, dtype, device, layout, relu):
    N, C, spatial = shape
    for mode in MODES:
        if N == 1 and mode[0]:
            continue
        base = make(layer, N, C, spatial, dtype, device, layout, seed=N * C + len(spatial))
        td, tc = clones(base), clones(base)
        fd, fc = direction_forward(layer, td, mode, relu), composed_forward(layer, tc, mode, relu)
        assert_same(fd, fc, f"forward {mode}")
        assert fd[0].stride() == base["x"].stride(), mode
        assert_same([td["rm"], td["rv"], td["nbt"]], [tc["rm"], tc["rv"], tc["nbt"]], f"mutated {mode}")
        assert td["nbt"].item() == (6 if mode[0] else 5)
        assert torch.equal(td["rm"], base["rm"]) != mode[0]  # updated in training only
        for mask in (False, True):
            bd, bc = direction_backward(layer, td, mode, fd, mask), composed_backward(layer, tc, mode, fc, mask)
            assert_same(bd, bc, f"backward {mode} mask={mask}")
        # the backward takes no buffer to mutate: running statistics and counter as the forward left them
        assert_same([td["rm"], td["rv"], td["nbt"]], [tc["rm"], tc["rv"], tc["nbt"]], f"after backward {mode}")


@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_direction_equals_composition_cpu(layer, shape, layout, dtype, relu):
    check_direction_equals_composition(layer, shape, dtype, "cpu", layout, relu)


@NEEDS_CUDA
@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("shape,layout", CUDA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_direction_equals_composition_cuda(layer, shape, layout, dtype, relu):
    check_direction_equals_composition(layer, shape, dtype, "cuda", layout, relu)


@NEEDS_CUDA
@pytest.mark.parametrize("fused", ["0", "1"])
def test_cuda_forced_paths(fused):
    """The CUDA comparisons again with NORMFUSE_FUSED_STEPS forced (it is read once per process)."""
    env = dict(os.environ, NORMFUSE_FUSED_STEPS=fused)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_direction_equals_composition_cuda or test_opcheck and cuda"],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("shape,layout", [((3, 5, (4, 4)), "contig"), ((3, 5, (4, 4)), "cl"), ((2, 7, (9,)), "contig")],
                         ids=str)
def test_opcheck(device, layer, shape, layout):
    N, C, spatial = shape
    for mode in MODES:
        for relu in (False, True):
            t = make(layer, N, C, spatial, torch.float32, device, layout, seed=3)
            torch.library.opcheck(getattr(ops, f"{layer}_layer_forward").default,
                                  (t["x"], *fwd_tail(t, *mode), relu))
            stats = composed_forward(layer, clones(t), mode, relu)
            for mask in (False, True):
                args = (t["dy"], t["x"], stats[1], stats[2], *bwd_tail(t, *mode),
                        *((stats[3], stats[4]) if mask else (None, None)))
                torch.library.opcheck(getattr(ops, f"{layer}_layer_backward").default, args)
