"""The layer-direction ops (torch.ops.normfuse.<layer>_layer_forward / <layer>_layer_backward) against
the composition they stand for, called op by op on the same inputs. BIN / IEBN: the layer step
(<layer>_moments_coefficients / <layer>_sums_coefficients_backward) then the full-size op
(affine_apply / backward_apply); AssocNorm / ILM-Norm: moments -> <layer>_coefficients ->
affine_apply and backward_sums -> <layer>_coefficients_backward -> backward_apply. Outputs, running
statistics and num_batches_tracked BITWISE equal (csrc/common/layer_compositions.h: on the CPU the
same kernels called without the dispatcher; a device kernel of its own must keep the reduction order
of the step and apply kernels), refusals the same. torch.library.opcheck on all eight.

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
# every input dtype the CPU kernels take (statistics and parameters float32, float64 for float64)
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
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
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
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


# ---- AssocNorm / ILM-Norm directions

META_LAYERS = ["assoc", "ilm"]
META_SHAPES = [(4, 8, (5, 5)), (3, 8, (7,)), (2, 16, (33, 17)), (5, 8, (1, 1)), (1, 8, (3, 3))]
META_CASES = [(shape, layout) for shape in META_SHAPES
              for layout in (["contig", "cl"] if len(shape[2]) == 2 else ["contig"])]


def meta_inputs(layer, shape, dtype, device, layout, seed):
    """x, dy and the layer's parameters (random, none zero) as the module has them: AssocNorm with
    4 groups, ILM-Norm with 2 groups and key groups of 4 channels."""
    import normfuse
    N, C, spatial = shape
    t = make("bin", N, C, spatial, dtype, device, layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    m = (normfuse.AssocNorm(4, C) if layer == "assoc"
         else normfuse.ILMNorm(C, num_groups=2, key_group_size=4))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    names = ["encoder", *(("decoder_mean", "decoder_var") if layer == "assoc" else ("decoder_weight", "decoder_bias")),
             "weight", "bias"]
    params = [(0.5 * torch.randn(getattr(m, n).shape, generator=g)).to(device, acc) for n in names]
    params[3] = params[3] + 1  # weight around 1
    return t["x"], t["dy"], m.num_groups, params, m.eps


def composed_meta_forward(layer, x, groups, params, eps, relu):
    mean, m2 = ops.moments(x)
    plane = x[0, 0].numel()
    scale, shift = getattr(ops, f"{layer}_coefficients")(mean, m2, plane, groups, *params, eps)
    return ops.affine_apply(x, mean, scale, shift, relu), mean, m2, scale, shift


def composed_meta_backward(layer, dy, x, stats, groups, params, eps, mask):
    _, mean, m2, scale, shift = stats
    ss = (scale, shift) if mask else (None, None)
    g1, g2 = ops.backward_sums(dy, x, mean, *ss)
    c_dy, c_x, c_0, *grads = getattr(ops, f"{layer}_coefficients_backward")(
        g1, g2, mean, m2, x[0, 0].numel(), groups, *params, eps)
    return (ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, *ss), *grads)


def check_meta_direction(layer, shape, dtype, device, layout, relu):
    x, dy, groups, params, eps = meta_inputs(layer, shape, dtype, device, layout, seed=sum(shape[2]) + shape[1])
    fd = getattr(ops, f"{layer}_layer_forward")(x, groups, *params, eps, relu)
    fc = composed_meta_forward(layer, x, groups, params, eps, relu)
    assert_same(fd, fc, "forward")
    assert fd[0].stride() == x.stride()
    for mask in (False, True):
        ss = (fd[3], fd[4]) if mask else (None, None)
        bd = getattr(ops, f"{layer}_layer_backward")(dy, x, fd[1], fd[2], groups, *params, eps, *ss)
        bc = composed_meta_backward(layer, dy, x, fc, groups, params, eps, mask)
        assert_same(bd, bc, f"backward mask={mask}")
        assert bd[0].stride() == x.stride()


@pytest.mark.parametrize("layer", META_LAYERS)
@pytest.mark.parametrize("shape,layout", META_CASES, ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_meta_direction_equals_composition_cpu(layer, shape, layout, dtype, relu):
    check_meta_direction(layer, shape, dtype, "cpu", layout, relu)


@NEEDS_CUDA
@pytest.mark.parametrize("layer", META_LAYERS)
@pytest.mark.parametrize("shape,layout", META_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_meta_direction_equals_composition_cuda(layer, shape, layout, dtype, relu):
    check_meta_direction(layer, shape, dtype, "cuda", layout, relu)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("layer", META_LAYERS)
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_meta_opcheck(device, layer, layout):
    x, dy, groups, params, eps = meta_inputs(layer, (3, 8, (4, 4)), torch.float32, device, layout, seed=4)
    for relu in (False, True):
        torch.library.opcheck(getattr(ops, f"{layer}_layer_forward").default, (x, groups, *params, eps, relu))
        stats = composed_meta_forward(layer, x, groups, params, eps, relu)
        for mask in (False, True):
            ss = (stats[3], stats[4]) if mask else (None, None)
            torch.library.opcheck(getattr(ops, f"{layer}_layer_backward").default,
                                  (dy, x, stats[1], stats[2], groups, *params, eps, *ss))


def _message(fn):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("layer", META_LAYERS)
def test_meta_direction_refuses_as_its_components(layer):
    """A bad argument gets the component op's own message from the direction (the same check runs),
    in both directions: a meta network matrix of the wrong shape, statistics of the wrong dtype, a
    gradient of the wrong shape."""
    x, dy, groups, params, eps = meta_inputs(layer, (3, 8, (4, 4)), torch.float32, "cpu", "contig", seed=5)
    fwd, bwd = getattr(ops, f"{layer}_layer_forward"), getattr(ops, f"{layer}_layer_backward")
    coef, coef_bwd = getattr(ops, f"{layer}_coefficients"), getattr(ops, f"{layer}_coefficients_backward")
    _, mean, m2, _, _ = fwd(x, groups, *params, eps, False)
    bad = [params[0][:, :-1], *params[1:]]
    assert _message(lambda: fwd(x, groups, *bad, eps, False)) == _message(
        lambda: coef(mean, m2, x[0, 0].numel(), groups, *bad, eps))
    g1, g2 = ops.backward_sums(dy, x, mean)
    assert _message(lambda: bwd(dy, x, mean, m2, groups, *bad, eps)) == _message(
        lambda: coef_bwd(g1, g2, mean, m2, x[0, 0].numel(), groups, *bad, eps))
    assert _message(lambda: bwd(dy, x, mean.double(), m2, groups, *params, eps)) == _message(
        lambda: ops.backward_sums(dy, x, mean.double()))
    assert _message(lambda: bwd(dy[:, :, :-1], x, mean, m2, groups, *params, eps)) == _message(
        lambda: ops.backward_sums(dy[:, :, :-1], x, mean))
