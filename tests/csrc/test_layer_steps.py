"""The four BIN / IEBN layer-step ops (torch.ops.normfuse.{bin,iebn}_moments_coefficients,
{bin,iebn}_sums_coefficients_backward) against the composition of their component ops on the same
inputs: outputs, running statistics and num_batches_tracked BITWISE equal (on CUDA the fused
launch runs the component kernels' code with their plans, so the reduction order is the same;
the CPU registration is the composition itself). torch.library.opcheck on all four, and the
argument errors: the composition's message, nothing mutated.

CUDA parts skip without a GPU. In-process, NORMFUSE_FUSED_STEPS is whatever the environment says
(default auto: the small shapes below fuse, the large ones do not); test_cuda_forced_paths reruns
the CUDA comparisons in child processes with the fused path forced on (1) and off (0).
"""
from __future__ import annotations

import math
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
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a GPU with normfuse CUDA kernels"))]

# (N, C, spatial): fused under auto (<= 4 tiles of 8 channels, <= 4096 statistics) or not
SHAPES = [
    (4, 8, (5, 5)),     # one tile
    (3, 29, (7,)),      # 4 tiles, the last ragged; rank 3
    (2, 3, (64, 64)),   # long planes: split reductions
    (1, 5, (3, 3)),     # N = 1
    (6, 64, (4, 4)),    # 8 tiles: not fused under auto
]
MODES = [(True, True, True), (True, False, False), (False, True, True)]  # training, running, affine


def fwd_tail(t, training, running, affine):
    w, b = (t["weight"], t["bias"]) if affine else (None, None)
    rm, rv = (t["rm"], t["rv"]) if running else (None, None)
    return [*t["gates"], w, b, rm, rv, training, 0.1, 1e-5, t["nbt"]]


def bwd_tail(t, training, running, affine):
    return fwd_tail(t, training, running, affine)[:-3] + [1e-5]


def step_forward(layer, t, mode):
    return getattr(ops, f"{layer}_moments_coefficients")(t["x"], *fwd_tail(t, *mode))


def composed_forward(layer, t, mode):
    mean, m2 = ops.moments(t["x"])
    L = math.prod(t["x"].shape[2:])
    return (mean, m2, *getattr(ops, f"{layer}_coefficients")(mean, m2, L, *fwd_tail(t, *mode)))


def step_backward(layer, t, mode, stats, mask):
    mean, m2, scale, shift = stats
    return getattr(ops, f"{layer}_sums_coefficients_backward")(
        t["dy"], t["x"], mean, m2, *bwd_tail(t, *mode), *((scale, shift) if mask else (None, None)))


def composed_backward(layer, t, mode, stats, mask):
    mean, m2, scale, shift = stats
    g1, g2 = ops.backward_sums(t["dy"], t["x"], mean, *((scale, shift) if mask else (None, None)))
    L = math.prod(t["x"].shape[2:])
    return getattr(ops, f"{layer}_coefficients_backward")(g1, g2, mean, m2, L, *bwd_tail(t, *mode))


def assert_same(a, b, what):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, (what, i)
        assert torch.equal(u, v) or (u.isnan() == v.isnan()).all() and torch.equal(u.nan_to_num(), v.nan_to_num()), (
            what, i, (u - v).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_step_equals_composition(device, layer, shape, layout, dtype):
    N, C, spatial = shape
    if layout == "cl" and len(spatial) != 2:
        pytest.skip("channels-last is 4-d")
    if device == "cpu" and (dtype != torch.float32 or shape[1] == 64):
        pytest.skip("the CPU op is the composition itself: one dtype is enough there")
    for mode in MODES:
        base = make(layer, N, C, spatial, dtype, device, layout, seed=N * C)
        ts, tc = clones(base), clones(base)
        fs, fc = step_forward(layer, ts, mode), composed_forward(layer, tc, mode)
        assert_same(fs, fc, f"forward {mode}")
        assert_same([ts["rm"], ts["rv"], ts["nbt"]], [tc["rm"], tc["rv"], tc["nbt"]], f"mutated {mode}")
        assert ts["nbt"].item() == (6 if mode[0] else 5)
        for mask in (False, True):
            bs, bc = step_backward(layer, ts, mode, fs, mask), composed_backward(layer, tc, mode, fc, mask)
            assert_same(bs, bc, f"backward {mode} mask={mask}")


@pytest.mark.skipif(not CUDA, reason="needs a GPU with normfuse CUDA kernels")
@pytest.mark.parametrize("fused", ["0", "1"])
def test_cuda_forced_paths(fused):
    """The CUDA comparisons again with NORMFUSE_FUSED_STEPS forced (it is read once per process)."""
    env = dict(os.environ, NORMFUSE_FUSED_STEPS=fused)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_step_equals_composition and cuda or test_opcheck and cuda"],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("shape", [(3, 5, (4, 4)), (2, 40, (9,))], ids=str)
def test_opcheck(device, layer, shape):
    N, C, spatial = shape
    for mode in MODES:
        t = make(layer, N, C, spatial, torch.float32, device, "contig", seed=3)
        torch.library.opcheck(getattr(ops, f"{layer}_moments_coefficients").default, (t["x"], *fwd_tail(t, *mode)))
        stats = composed_forward(layer, clones(t), mode)
        for mask in (False, True):
            args = (t["dy"], t["x"], stats[0], stats[1], *bwd_tail(t, *mode),
                    *((stats[2], stats[3]) if mask else (None, None)))
            torch.library.opcheck(getattr(ops, f"{layer}_sums_coefficients_backward").default, args)


def _error_cases(layer, device):
    """(name, forward?, mutate(t) -> extra) pairs: each leaves one argument wrong."""
    def wrong_gate(t):
        t["gates"][0] = t["gates"][0][:-1]

    def one_running(t):
        t["rv"] = None

    def bad_counter(t):
        t["nbt"] = t["nbt"].float()

    def bad_weight_dtype(t):
        t["weight"] = t["weight"].double()

    cases = [("gate shape", wrong_gate), ("running_var missing", one_running), ("weight dtype", bad_weight_dtype)]
    return cases + [("counter dtype", bad_counter)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["bin", "iebn"])
def test_errors_match_composition_and_mutate_nothing(device, layer):
    mode = (True, True, True)
    for name, mutate in _error_cases(layer, device):
        msgs = []
        for run in (step_forward, composed_forward):
            t = make(layer, 3, 5, (4, 4), torch.float32, device, "contig")
            mutate(t)
            rm, rv, nbt = (None if t[k] is None else t[k].clone() for k in ("rm", "rv", "nbt"))
            if t["rv"] is None:  # fwd_tail would drop both; keep running_mean alone
                args = [*t["gates"], t["weight"], t["bias"], t["rm"], None, True, 0.1, 1e-5, t["nbt"]]
                call = (lambda: getattr(ops, f"{layer}_moments_coefficients")(t["x"], *args)) if run is step_forward \
                    else (lambda: getattr(ops, f"{layer}_coefficients")(*ops.moments(t["x"]), 16, *args))
            else:
                call = lambda: run(layer, t, mode)  # noqa: E731
            with pytest.raises(RuntimeError) as e:
                call()
            msgs.append(str(e.value).splitlines()[0])
            assert torch.equal(t["rm"], rm) and (rv is None or torch.equal(t["rv"], rv)), name
            assert torch.equal(t["nbt"], nbt), name
        assert msgs[0] == msgs[1], (name, msgs)
    # the backward: the ReLU mask's scale without shift, m2 of the wrong shape
    t = make(layer, 3, 5, (4, 4), torch.float32, device, "contig")
    stats = composed_forward(layer, clones(t), (True, False, True))
    for name, mean, m2, scale, shift in [("scale without shift", stats[0], stats[1], stats[2], None),
                                         ("m2 shape", stats[0], stats[1][:, :-1], None, None)]:
        msgs = []
        for step in (True, False):
            tail = bwd_tail(t, True, False, True)
            with pytest.raises(RuntimeError) as e:
                if step:
                    getattr(ops, f"{layer}_sums_coefficients_backward")(t["dy"], t["x"], mean, m2, *tail, scale, shift)
                else:
                    g1, g2 = ops.backward_sums(t["dy"], t["x"], mean, scale, shift)
                    getattr(ops, f"{layer}_coefficients_backward")(g1, g2, mean, m2, 16, *tail)
            msgs.append(str(e.value).splitlines()[0])
        assert msgs[0] == msgs[1], (name, msgs)


@pytest.mark.skipif(not CUDA, reason="needs a GPU with normfuse CUDA kernels")
def test_cuda_float64_refused():
    t = make("bin", 2, 3, (4, 4), torch.float32, "cuda", "contig")
    x = t["x"].double()
    with pytest.raises(RuntimeError, match="float64 is not supported by the CUDA kernels"):
        ops.bin_moments_coefficients(x, *fwd_tail(t, True, True, True))
    assert t["nbt"].item() == 5


@pytest.mark.skipif(not CUDA, reason="needs a GPU with normfuse CUDA kernels")
@pytest.mark.parametrize("shape", [(4, 8, (5, 5)), (2, 3, (64, 64)), (6, 64, (4, 4))], ids=str)
def test_cuda_launches_per_step(shape):
    """One GPU activity per step for a small layer (fused), two otherwise (issue 13)."""
    N, C, spatial = shape
    env = os.environ.get("NORMFUSE_FUSED_STEPS", "auto")
    fused = env == "1" or (env != "0" and C <= 32)  # kFusedStepMaxTiles = 4 tiles of 8 channels
    t = make("bin", N, C, spatial, torch.float32, "cuda", "contig")
    mode = (True, True, True)

    def activities(fn):
        fn()  # warm-up: the persistent counters
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    names = activities(lambda: step_forward("bin", t, mode))
    assert len(names) == (1 if fused else 2), names
    stats = step_forward("bin", t, mode)
    names = activities(lambda: step_backward("bin", t, mode, stats, True))
    assert len(names) == (1 if fused else 2), names
    assert any("step_kernel" in n for n in names) == fused, names
