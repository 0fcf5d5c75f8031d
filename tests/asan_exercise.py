"""Calls every ``torch.ops.normfuse.*`` CPU op on awkward shapes, dtypes and both layouts.

Run by tests/test_cpu_asan.py in a subprocess, under
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) <libstdc++>" ASAN_OPTIONS=detect_leaks=0``,
against the AddressSanitizer build of the CPU kernels:

    python tests/asan_exercise.py MODE LIBRARY.so [LIBRARY.so ...]

It loads each LIBRARY.so with ``torch.ops.load_library`` and must not import ``normfuse``
(the library registers the same ``TORCH_LIBRARY(normfuse)`` namespace as ``normfuse._C``; two
registrations of one namespace in a process are an error).  MODE:

* ``ops``:       every op, valid arguments (the fused ReLU's relu=True and masked backward ops
                 included), results checked against float64 formulas here (the layer steps and
                 directions against the component ops called one by one)
                 (so a kernel that reads the wrong element fails even where ASAN cannot see it);
* ``rejects``:   invalid arguments the ops must refuse with a RuntimeError (no memory error);
* ``degenerate``: zero-sized inputs and statistics (N == 0 or C == 0), which only direct op
                 calls can make (the layer directions: an empty batch); ``assoc-c0``: assoc_coefficients_backward on (N > 0, 0)
                 statistics (a SEGV until csrc/cpu/coefficients_assoc.cpp guarded C > 0);
* ``planted``:   ``torch.ops.normfuse_asan_planted.read_past_end`` (tests/test_cpu_asan.py
                 builds it from a planted off-by-one read), to prove the net holds.

Prints ``ASAN-EXERCISE-OK <count>`` and exits 0 when every call returned.
"""
from __future__ import annotations

import math
import sys

import torch

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
COUNT = 0


def acc(dtype):
    return F64 if dtype == F64 else torch.float32


def make(shape, dtype, layout, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) + offset).to(dtype)
    if layout == "cl" and len(shape) > 2:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def ncl(x):
    return x.detach().to(F64).reshape(x.shape[0], x.shape[1], -1)


def close(a, b, what, tol):
    a = a.detach().to(F64)
    b = b.detach().to(F64)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    if not err <= tol * scale:
        raise AssertionError(f"{what}: max error {err:.3g} > {tol * scale:.3g}")


TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def generic_case(shape, dtype, layout, dy_layout, seed):
    """moments, affine_apply, backward_sums, backward_apply on one tensor."""
    global COUNT
    ops = torch.ops.normfuse
    x = make(shape, dtype, layout, seed, offset=3.0)
    dy = make(shape, dtype, dy_layout, seed + 1)
    x3, d3 = ncl(x), ncl(dy)
    mean, m2 = ops.moments(x)
    COUNT += 1
    tol = TOL[dtype]
    close(mean, x3.mean(2), f"moments.mean {shape} {dtype} {layout}", tol)
    close(m2, ((x3 - x3.mean(2, keepdim=True)) ** 2).sum(2), f"moments.m2 {shape} {dtype}",
          tol * max(1, x3.shape[2]))
    a = acc(dtype)
    g = torch.Generator().manual_seed(seed + 2)
    n, c = shape[0], shape[1]
    scale = torch.randn(n, c, generator=g, dtype=F64).to(a)
    shift = torch.randn(n, c, generator=g, dtype=F64).to(a)
    y = ops.affine_apply(x, mean, scale, shift)
    COUNT += 1
    assert y.shape == x.shape and y.stride() == x.stride(), "affine_apply layout"
    m64 = mean.to(F64).unsqueeze(-1)
    close(y.reshape(n, c, -1) if y.is_contiguous() else ncl(y),
          (x3 - m64) * scale.to(F64).unsqueeze(-1) + shift.to(F64).unsqueeze(-1),
          f"affine_apply {shape} {dtype} {layout}", tol * 4)
    if dy.stride() != x.stride() and not (c == 1 or x3.shape[2] == 1):
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "cl" else dy.contiguous()
    g1, g2 = ops.backward_sums(dy, x, mean)
    COUNT += 1
    close(g1, d3.sum(2), f"backward_sums.g1 {shape} {dtype}", tol * max(1, x3.shape[2]))
    close(g2, (d3 * (x3 - m64)).sum(2), f"backward_sums.g2 {shape} {dtype}",
          tol * max(1, x3.shape[2]) * 4)
    k = [torch.randn(n, c, generator=g, dtype=F64).to(a) for _ in range(3)]
    dx = ops.backward_apply(dy, x, mean, *k)
    COUNT += 1
    assert dx.shape == x.shape and dx.stride() == x.stride(), "backward_apply layout"
    kk = [t.to(F64).unsqueeze(-1) for t in k]
    close(ncl(dx), kk[0] * d3 + kk[1] * (x3 - m64) + kk[2],
          f"backward_apply {shape} {dtype} {layout}", tol * 8)
    relu_case(x, dy, mean, scale, shift, k, f"{shape} {dtype} {layout}")


def relu_case(x, dy, mean, scale, shift, k, what):
    """The fused ReLU: affine_apply(relu=True), backward_sums / backward_apply with the mask. dy is
    zeroed where the sign of v is ambiguous between the kernel and the float64 formula."""
    global COUNT
    ops = torch.ops.normfuse
    tol = TOL[x.dtype]
    x3, m64 = ncl(x), mean.to(F64).unsqueeze(-1)
    s64, b64 = scale.to(F64).unsqueeze(-1), shift.to(F64).unsqueeze(-1)
    v = (x3 - m64) * s64 + b64
    y = ops.affine_apply(x, mean, scale, shift, True)
    COUNT += 1
    assert y.shape == x.shape and y.stride() == x.stride(), "affine_apply(relu) layout"
    close(ncl(y), v.clamp_min(0), f"affine_apply(relu) {what}", tol * 4)
    keep = (v.abs() > 1e-4 * ((x3 - m64).abs() * s64.abs() + b64.abs())).reshape(x.shape)
    dz = torch.empty_like(dy).copy_(dy * keep)
    d3 = ncl(dz) * (v > 0)
    g1, g2 = ops.backward_sums(dz, x, mean, scale, shift)
    COUNT += 1
    plane = max(1, x3.shape[2])
    close(g1, d3.sum(2), f"backward_sums(mask).g1 {what}", tol * plane)
    close(g2, (d3 * (x3 - m64)).sum(2), f"backward_sums(mask).g2 {what}", tol * plane * 4)
    dx = ops.backward_apply(dz, x, mean, *k, scale, shift)
    COUNT += 1
    assert dx.shape == x.shape and dx.stride() == x.stride(), "backward_apply(mask) layout"
    kk = [t.to(F64).unsqueeze(-1) for t in k]
    close(ncl(dx), kk[0] * d3 + kk[1] * (x3 - m64) + kk[2], f"backward_apply(mask) {what}",
          tol * 8)


def stats(n, c, a, seed, plane):
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(n, c, generator=g, dtype=F64) + 0.5).to(a)
    m2 = (torch.rand(n, c, generator=g, dtype=F64) * plane).to(a)
    s1 = torch.randn(n, c, generator=g, dtype=F64).to(a)
    s2 = torch.randn(n, c, generator=g, dtype=F64).to(a)
    return mean, m2, s1, s2


def vec(c, a, seed, base=0.0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (base + scale * torch.randn(c, generator=g, dtype=F64)).to(a)


def batch_coefficients_case(n, c, plane, a, seed):
    """bin / iebn coefficient ops, forward and backward, every combination of optional args."""
    global COUNT
    ops = torch.ops.normfuse
    mean, m2, s1, s2 = stats(n, c, a, seed, plane)
    for with_affine in (True, False):
        w = vec(c, a, seed + 1, 1.0) if with_affine else None
        b = vec(c, a, seed + 2) if with_affine else None
        for with_running in (True, False):
            for training in (True, False):
                if training and n * plane <= 1 and with_running:
                    continue  # the unbiased running variance needs two values (Python refuses)
                rm = vec(c, a, seed + 3) if with_running else None
                rv = vec(c, a, seed + 4, 1.0, 0.1).abs() if with_running else None
                gate = vec(c, a, seed + 5, 0.5, 0.3)
                nbt = torch.tensor(0)
                scale, shift = ops.bin_coefficients(mean, m2, plane, gate, w, b, rm, rv, training,
                                                    0.1, 1e-5, nbt)
                out = ops.bin_coefficients_backward(s1, s2, mean, m2, plane, gate, w, b, rm, rv,
                                                    training, 1e-5)
                gw, gb = vec(c, a, seed + 6), vec(c, a, seed + 7, -1.0)
                scale2, shift2 = ops.iebn_coefficients(mean, m2, plane, gw, gb, w, b, rm, rv,
                                                       training, 0.1, 1e-5, nbt)
                assert int(nbt) == 2 * training, "num_batches_tracked"
                out2 = ops.iebn_coefficients_backward(s1, s2, mean, m2, plane, gw, gb, w, b, rm,
                                                      rv, training, 1e-5)
                COUNT += 4
                for t in (scale, shift, scale2, shift2, *out, *out2):
                    assert t.dtype == a, "coefficient dtype"
                    if n * plane > 1 or not training:
                        assert torch.isfinite(t).all(), "non-finite coefficient"


def assoc_case(n, c, g, m, plane, a, seed):
    global COUNT
    ops = torch.ops.normfuse
    mean, m2, s1, s2 = stats(n, c, a, seed, plane)
    gen = torch.Generator().manual_seed(seed + 9)
    enc = torch.randn(m, g, generator=gen, dtype=F64).to(a)
    dm = torch.randn(g, m, generator=gen, dtype=F64).to(a)
    dv = torch.randn(g, m, generator=gen, dtype=F64).to(a)
    w, b = vec(c, a, seed + 1, 1.0), vec(c, a, seed + 2)
    scale, shift = ops.assoc_coefficients(mean, m2, plane, g, enc, dm, dv, w, b, 1e-5)
    out = ops.assoc_coefficients_backward(s1, s2, mean, m2, plane, g, enc, dm, dv, w, b, 1e-5)
    COUNT += 2
    for t in (scale, shift, *out):
        assert torch.isfinite(t).all(), f"assoc non-finite n={n} c={c} g={g} m={m}"
    assert out[3].shape == enc.shape and out[4].shape == dm.shape and out[6].shape == (c,)


def ilm_case(n, c, g, k, e, plane, a, seed):
    """ILM-Norm: G groups and K key groups (need not nest), meta network of E hidden units."""
    global COUNT
    ops = torch.ops.normfuse
    mean, m2, s1, s2 = stats(n, c, a, seed, plane)
    gen = torch.Generator().manual_seed(seed + 9)
    enc = torch.randn(e, k, generator=gen, dtype=F64).to(a)
    dw = torch.randn(k, e, generator=gen, dtype=F64).to(a)
    db = torch.randn(k, e, generator=gen, dtype=F64).to(a)
    w, b = vec(c, a, seed + 1, 1.0), vec(c, a, seed + 2)
    scale, shift = ops.ilm_coefficients(mean, m2, plane, g, enc, dw, db, w, b, 1e-5)
    out = ops.ilm_coefficients_backward(s1, s2, mean, m2, plane, g, enc, dw, db, w, b, 1e-5)
    COUNT += 2
    for t in (scale, shift, *out):
        assert torch.isfinite(t).all(), f"ilm non-finite n={n} c={c} g={g} k={k} e={e}"
    assert out[3].shape == enc.shape and out[4].shape == dw.shape and out[6].shape == (c,)


def same(a, b, what):
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype and torch.equal(u, v), what


def check_direction(layer, x, dy, relu, forward_args, reference_args, backward_args):
    """``<layer>_layer_forward(x, *forward_args, relu)`` against moments ->
    ``<layer>_coefficients(mean, m2, plane, *reference_args)`` -> affine_apply, and
    ``<layer>_layer_backward(dy, x, mean, m2, *backward_args, mask)`` against backward_sums ->
    ``<layer>_coefficients_backward(g1, g2, mean, m2, plane, *backward_args)`` ->
    backward_apply: equal results (``reference_args``: the forward's, with their own copies of
    what the forward writes)."""
    global COUNT
    ops = torch.ops.normfuse
    plane = math.prod(x.shape[2:])
    out = getattr(ops, f"{layer}_layer_forward")(x, *forward_args, relu)
    mean, m2 = ops.moments(x)
    scale, shift = getattr(ops, f"{layer}_coefficients")(mean, m2, plane, *reference_args)
    same(out, (ops.affine_apply(x, mean, scale, shift, relu), mean, m2, scale, shift),
         f"{layer}_layer_forward")
    ss = (scale, shift) if relu else (None, None)
    back = getattr(ops, f"{layer}_layer_backward")(dy, x, mean, m2, *backward_args, *ss)
    g1, g2 = ops.backward_sums(dy, x, mean, *ss)
    c_dy, c_x, c_0, *grads = getattr(ops, f"{layer}_coefficients_backward")(
        g1, g2, mean, m2, plane, *backward_args)
    same(back, (ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, *ss), *grads),
         f"{layer}_layer_backward")
    COUNT += 2


def direction_case(shape, dtype, layout, seed):
    """The layer steps and layer directions (cpu/layer_directions_cpu.cpp: the component kernels
    called without the dispatcher) against the component ops called one by one: equal results,
    with and without the fused ReLU, running statistics written alike."""
    c = shape[1]
    x, dy = make(shape, dtype, layout, seed, 0.5), make(shape, dtype, layout, seed + 1)
    a = acc(dtype)
    gate, gw, gb = vec(c, a, seed + 2, 0.5, 0.3), vec(c, a, seed + 3), vec(c, a, seed + 4)
    w, b = vec(c, a, seed + 5, 1.0), vec(c, a, seed + 6)

    def running():  # running mean, variance and batch counter, the same values at every call
        return vec(c, a, seed + 7), vec(c, a, seed + 8, 1.0, 0.1).abs(), torch.tensor(0)

    for relu in (False, True):
        for layer, gates in (("bin", (gate,)), ("iebn", (gw, gb))):
            (rm, rv, nbt), (rm2, rv2, nbt2) = running(), running()
            check_direction(layer, x, dy, relu,
                            (*gates, w, b, rm, rv, True, 0.1, 1e-5, nbt),
                            (*gates, w, b, rm2, rv2, True, 0.1, 1e-5, nbt2),
                            (*gates, w, b, rm, rv, True, 1e-5))
            same((rm, rv, nbt), (rm2, rv2, nbt2), f"{layer}_layer_forward running statistics")
        gen = torch.Generator().manual_seed(seed + 9)
        for layer, groups, shapes in (("assoc", 4, ((2, 4), (4, 2), (4, 2))),  # M = 2 hidden units
                                      ("ilm", 2, ((3, 2), (2, 3), (2, 3)))):   # 2 key groups, E = 3
            meta = [torch.randn(*sh, generator=gen, dtype=F64).to(a) for sh in shapes]
            args = (groups, *meta, w, b, 1e-5)
            check_direction(layer, x, dy, relu, args, args, args)


def iebn_pointwise_case(n, c, dtype, relu, seed):
    """iebn_pointwise_apply / _backward (IEBN with one value per plane) against their formulas."""
    global COUNT
    ops = torch.ops.normfuse
    a = acc(dtype)
    x = make((n, c), dtype, "contiguous", seed)
    dy = make((n, c), dtype, "contiguous", seed + 1)
    mean, rstd = vec(c, a, seed + 2), vec(c, a, seed + 3, base=1.0, scale=0.25)
    gw, gb, w, b = (vec(c, a, seed + k) for k in (4, 5, 6, 7))
    y = ops.iebn_pointwise_apply(x, mean, rstd, gw, gb, w, b, relu)
    xd = x.to(F64).requires_grad_()
    v = torch.sigmoid(xd * gw.to(F64) + gb.to(F64)) * (xd - mean.to(F64)) * rstd.to(F64) * w.to(F64) + b.to(F64)
    ref = v.relu() if relu else v
    close(y, ref, f"iebn_pointwise_apply {n}x{c} {dtype}", TOL[dtype])
    dx = ops.iebn_pointwise_backward(dy, x, mean, rstd, gw, gb, w, b, False, relu)[0]
    (want,) = torch.autograd.grad(ref, xd, dy.to(F64))
    close(dx, want, f"iebn_pointwise_backward {n}x{c} {dtype}", TOL[dtype])
    ops.iebn_pointwise_backward(dy, x, mean, rstd, gw, gb, None, None, True, relu)
    COUNT += 3


def mode_ops():
    seed = 0
    # ranks 2..5, N/C/L of 1, primes, sizes around the vector width (4/8/16), the 512-element
    # chunk and the 32768-element segment of the CPU kernels; C around kTile (64).
    shapes = [(1, 1), (2, 1), (1, 3), (5, 7), (3, 17, 1), (1, 1, 1), (2, 3, 13),
              (2, 5, 1, 1), (1, 1, 7, 11), (3, 2, 3, 5), (2, 9, 4, 4), (1, 65, 3, 3),
              (2, 3, 1, 2, 5), (1, 2, 3, 3, 3), (1, 1, 2, 2, 2),
              (1, 2, 513), (1, 1, 32768 + 9), (1, 70, 1, 600), (1, 33, 1000),
              (2, 4099, 3)]
    for shape in shapes:
        for dtype in DTYPES:
            big = math.prod(shape) > 20000
            if big and dtype in (torch.float64,):
                continue
            for layout in ("contiguous", "cl") if len(shape) > 2 else ("contiguous",):
                for dy_layout in ("contiguous", "cl") if len(shape) > 2 else ("contiguous",):
                    seed += 1
                    generic_case(shape, dtype, layout, dy_layout, seed)
    for a in (torch.float32, torch.float64):
        for n, c, plane in [(1, 1, 1), (1, 1, 5), (2, 1, 1), (1, 7, 3), (3, 63, 2), (2, 64, 1),
                            (5, 65, 7), (1, 130, 4), (17000, 2, 1), (4, 3, 32769)]:
            seed += 1
            batch_coefficients_case(n, c, plane, a, seed)
        for n, c, g, m, plane in [(1, 1, 1, 1, 1), (1, 1, 1, 1, 4), (2, 4, 4, 1, 1),
                                  (3, 6, 2, 1, 5), (2, 6, 3, 3, 2), (1, 130, 65, 70, 3),
                                  (5, 12, 1, 2, 1), (2, 128, 32, 16, 9), (9000, 2, 1, 1, 2)]:
            seed += 1
            assoc_case(n, c, g, m, plane, a, seed)
        # ILM: key groups straddling groups, one sample, plane size 1, K > E and E > K, a
        # channel count past the backward's 256-channel tile, a batch at::parallel_for splits
        for n, c, g, k, e, plane in [(4, 12, 4, 3, 2, 5), (1, 8, 2, 4, 3, 2), (2, 64, 16, 4, 2, 1),
                                     (3, 10, 5, 5, 1, 3), (2, 6, 1, 2, 7, 2), (2, 300, 6, 20, 3, 2),
                                     (2000, 4, 2, 2, 2, 3)]:
            seed += 1
            ilm_case(n, c, g, k, e, plane, a, seed)
    # IEBN with one value per plane: C below, at and past the vector width and the reduction's
    # 64-channel block, rows past its 64-row chunk
    for n, c in [(1, 1), (2, 3), (5, 8), (3, 9), (70, 65), (130, 17), (2, 300)]:
        for dtype in DTYPES:
            for relu in (False, True):
                seed += 1
                iebn_pointwise_case(n, c, dtype, relu, seed)
    # the layer directions: C = 8 (AssocNorm's 4 groups, ILM-Norm's 2 groups and 2 key groups)
    for shape in [(2, 8, 3, 3), (3, 8, 7), (2, 8, 1, 1)]:
        for dtype in DTYPES:
            for layout in ("contiguous", "cl") if len(shape) == 4 else ("contiguous",):
                seed += 1
                direction_case(shape, dtype, layout, seed)


def expect_error(fn, what):
    global COUNT
    try:
        fn()
    except RuntimeError:
        COUNT += 1
        return
    raise AssertionError(f"{what}: no error")


def mode_rejects():
    ops = torch.ops.normfuse
    x = make((2, 3, 4, 5), torch.float32, "contiguous", 1)
    mean, m2 = ops.moments(x)
    st = torch.zeros(2, 3)
    expect_error(lambda: ops.moments(torch.randn(3)), "rank 1")
    expect_error(lambda: ops.moments(torch.randn(2, 3, 1, 1, 1, 2)), "rank 6")
    expect_error(lambda: ops.moments(torch.ones(2, 3, dtype=torch.int32)), "int input")
    expect_error(lambda: ops.moments(x.transpose(2, 3)), "strided input")
    expect_error(lambda: ops.affine_apply(x, mean[:1], st, st), "short mean")
    expect_error(lambda: ops.affine_apply(x, mean.double(), st, st), "f64 mean")
    expect_error(lambda: ops.affine_apply(x, mean, torch.zeros(3, 2).t(), st), "strided scale")
    expect_error(lambda: ops.backward_sums(x[:1], x, mean), "dy shape")
    expect_error(lambda: ops.backward_sums(x.double(), x, mean), "dy dtype")
    expect_error(lambda: ops.backward_sums(x.contiguous(memory_format=torch.channels_last), x,
                                           mean), "dy layout")
    expect_error(lambda: ops.backward_apply(x, x, mean, st, st, torch.zeros(2, 4)), "c_0 shape")
    expect_error(lambda: ops.backward_sums(x, x, mean, st, None), "mask: scale only")
    expect_error(lambda: ops.backward_apply(x, x, mean, st, st, st, None, st), "mask: shift only")
    expect_error(lambda: ops.backward_sums(x, x, mean, st[:1], st[:1]), "mask: scale shape")
    expect_error(lambda: ops.backward_apply(x, x, mean, st, st, st, st, st.double()),
                 "mask: shift dtype")
    gate = torch.ones(3)
    expect_error(lambda: ops.bin_coefficients(mean, m2, 0, gate, None, None, None, None, True,
                                              0.1, 1e-5), "plane_size 0")
    expect_error(lambda: ops.bin_coefficients(mean, m2, 20, torch.ones(4), None, None, None,
                                              None, True, 0.1, 1e-5), "gate shape")
    expect_error(lambda: ops.bin_coefficients(mean, m2, 20, gate, None, None, torch.zeros(3),
                                              None, True, 0.1, 1e-5), "running_var missing")
    expect_error(lambda: ops.bin_coefficients(mean, m2, 20, gate.double(), None, None, None,
                                              None, True, 0.1, 1e-5), "gate dtype")
    expect_error(lambda: ops.bin_coefficients(mean, m2[:, :2], 20, gate, None, None, None, None,
                                              True, 0.1, 1e-5), "m2 shape")
    expect_error(lambda: ops.bin_coefficients(mean.half(), m2.half(), 20, gate.half(), None,
                                              None, None, None, True, 0.1, 1e-5), "f16 stats")
    expect_error(lambda: ops.bin_coefficients(mean, m2, 20, gate, None, None, None, None, True,
                                              0.1, 1e-5, torch.zeros(2, dtype=torch.int64)),
                 "counter shape")
    expect_error(lambda: ops.iebn_coefficients(mean, m2, 20, gate, gate, None, None, None, None,
                                               True, 0.1, 1e-5, torch.tensor(0.0)),
                 "counter dtype")
    expect_error(lambda: ops.bin_coefficients_backward(st[:1], st, mean, m2, 20, gate, None,
                                                       None, None, None, True, 1e-5), "sum_dy")
    expect_error(lambda: ops.iebn_coefficients(mean, m2, 20, gate, torch.ones(2), None, None,
                                               None, None, True, 0.1, 1e-5), "gate_bias shape")
    enc, dec = torch.ones(1, 3), torch.zeros(3, 1)
    w3, b3 = torch.ones(3), torch.zeros(3)
    expect_error(lambda: ops.assoc_coefficients(mean, m2, 20, 2, torch.ones(1, 2), dec[:2],
                                                dec[:2], w3, b3, 1e-5), "groups do not divide")
    expect_error(lambda: ops.assoc_coefficients(mean, m2, 20, 0, enc, dec, dec, w3, b3, 1e-5),
                 "zero groups")
    expect_error(lambda: ops.assoc_coefficients(mean, m2, 20, 3, torch.ones(0, 3),
                                                torch.zeros(3, 0), torch.zeros(3, 0), w3, b3,
                                                1e-5), "M = 0")
    expect_error(lambda: ops.assoc_coefficients(mean, m2, 20, 3, enc, torch.zeros(3, 2), dec,
                                                w3, b3, 1e-5), "decoder shape")
    expect_error(lambda: ops.assoc_coefficients_backward(st, st, mean, m2, 20, 3, enc, dec, dec,
                                                         torch.ones(2), b3, 1e-5), "weight shape")
    expect_error(lambda: ops.ilm_coefficients(mean, m2, 20, 3, torch.ones(1, 2), dec[:2], dec[:2],
                                              w3, b3, 1e-5), "key groups do not divide")
    expect_error(lambda: ops.ilm_coefficients(mean, m2, 1, 3, enc, dec, dec, w3, b3, 1e-5),
                 "one value per group")
    expect_error(lambda: ops.ilm_coefficients(mean, m2, 20, 3, torch.ones(0, 3),
                                              torch.zeros(3, 0), torch.zeros(3, 0), w3, b3,
                                              1e-5), "E = 0")
    expect_error(lambda: ops.ilm_coefficients_backward(st, st, mean, m2, 20, 3, enc, dec, dec,
                                                       torch.ones(2), b3, 1e-5), "ilm weight shape")


def mode_degenerate():
    """Zero-sized statistics.  The Python layer never makes them (it refuses empty input), but
    the ops are public (torch.ops.normfuse.*): they must return, not read out of bounds."""
    global COUNT
    ops = torch.ops.normfuse
    for dtype in DTYPES:
        for shape in [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0), (2, 0), (0, 2, 2, 2)]:
            x = torch.empty(shape, dtype=dtype)
            mean, m2 = ops.moments(x)
            y = ops.affine_apply(x, mean, mean, mean)
            g1, g2 = ops.backward_sums(x, x, mean)
            dx = ops.backward_apply(x, x, mean, g1, g1, g1)
            yr = ops.affine_apply(x, mean, mean, mean, True)
            ops.backward_sums(x, x, mean, mean, mean)
            dxr = ops.backward_apply(x, x, mean, g1, g1, g1, mean, mean)
            COUNT += 7
            assert yr.shape == x.shape and dxr.shape == x.shape
            assert y.shape == x.shape and dx.shape == x.shape
    for a in (torch.float32, torch.float64):
        for n, c in [(0, 3), (3, 0), (0, 0)]:
            st = torch.zeros(n, c, dtype=a)
            p = torch.ones(c, dtype=a)
            ops.bin_coefficients(st, st, 4, p, p, p, p.clone(), p.clone(), True, 0.1, 1e-5,
                                 torch.zeros(1, dtype=torch.int64))
            ops.bin_coefficients_backward(st, st, st, st, 4, p, p, p, None, None, True, 1e-5)
            ops.iebn_coefficients(st, st, 4, p, p, None, None, None, None, True, 0.1, 1e-5)
            ops.iebn_coefficients_backward(st, st, st, st, 4, p, p, p, p, p, p, False, 1e-5)
            enc, dec = torch.ones(1, 1, dtype=a), torch.zeros(1, 1, dtype=a)
            ops.assoc_coefficients(st, st, 4, 1, enc, dec, dec, p, p, 1e-5)
            COUNT += 5
            if n > 0 and c == 0:
                continue  # mode "assoc-c0"
            out = ops.assoc_coefficients_backward(st, st, st, st, 4, 1, enc, dec, dec, p, p, 1e-5)
            COUNT += 1
            for t in out[3:]:
                assert torch.equal(t, torch.zeros_like(t)), \
                    f"assoc backward: parameter gradient of an empty batch must be 0 (n={n}, c={c})"
            if c > 0:  # ILM refuses C = 0 (no value per group); N = 0 returns zero gradients
                ops.ilm_coefficients(st, st, 4, 1, enc, dec, dec, p, p, 1e-5)
                out = ops.ilm_coefficients_backward(st, st, st, st, 4, 1, enc, dec, dec, p, p, 1e-5)
                COUNT += 2
                for t in out[3:]:
                    assert torch.equal(t, torch.zeros_like(t)), "ilm: empty batch gradient != 0"
    for dtype in DTYPES:  # IEBN with one value per plane: an empty batch, no channels
        for n, c in [(0, 3), (3, 0), (0, 0)]:
            x = torch.empty(n, c, dtype=dtype)
            p = torch.ones(c, dtype=acc(dtype))
            y = ops.iebn_pointwise_apply(x, p, p, p, p, p, p, True)
            dx, *grads = ops.iebn_pointwise_backward(x, x, p, p, p, p, p, p, True, True)
            COUNT += 2
            assert y.shape == x.shape and dx.shape == x.shape
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), "empty batch gradient != 0"
    degenerate_directions()


def degenerate_directions():
    """An empty batch (N = 0) through the layer steps and directions: empty results, no read."""
    global COUNT
    ops = torch.ops.normfuse
    for dtype in DTYPES:
        a = acc(dtype)
        x = torch.empty(0, 8, 3, dtype=dtype)
        p = torch.ones(8, dtype=a)
        nbt = torch.zeros((), dtype=torch.int64)
        for relu in (False, True):
            y, mean, m2, scale, shift = ops.bin_layer_forward(x, p, p, p, p.clone(), p.clone(), True, 0.1,
                                                              1e-5, nbt, relu)
            ss = (scale, shift) if relu else (None, None)
            ops.bin_layer_backward(x, x, mean, m2, p, p, p, None, None, True, 1e-5, *ss)
            ops.iebn_layer_forward(x, p, p, None, None, None, None, True, 0.1, 1e-5, None, relu)
            ops.iebn_layer_backward(x, x, mean, m2, p, p, p, p, None, None, True, 1e-5, *ss)
            enc, dec = torch.ones(2, 4, dtype=a), torch.zeros(4, 2, dtype=a)
            ops.assoc_layer_forward(x, 4, enc, dec, dec, p, p, 1e-5, relu)
            grads = ops.assoc_layer_backward(x, x, mean, m2, 4, enc, dec, dec, p, p, 1e-5, *ss)
            enc, dec = torch.ones(3, 2, dtype=a), torch.zeros(2, 3, dtype=a)
            ops.ilm_layer_forward(x, 2, enc, dec, dec, p, p, 1e-5, relu)
            grads += ops.ilm_layer_backward(x, x, mean, m2, 2, enc, dec, dec, p, p, 1e-5, *ss)
            COUNT += 8
            assert y.shape == x.shape and int(nbt) == 1 + relu
            for t in grads:
                assert torch.equal(t, torch.zeros_like(t)), "a gradient of an empty batch != 0"


def mode_assoc_c0():
    """assoc_coefficients_backward on (N > 0, C = 0) statistics: zero parameter gradients."""
    global COUNT
    ops = torch.ops.normfuse
    for a in (torch.float32, torch.float64):
        st = torch.zeros(3, 0, dtype=a)
        p = torch.ones(0, dtype=a)
        enc, dec = torch.ones(1, 1, dtype=a), torch.zeros(1, 1, dtype=a)
        out = ops.assoc_coefficients_backward(st, st, st, st, 4, 1, enc, dec, dec, p, p, 1e-5)
        COUNT += 1
        for t in out[3:]:
            assert torch.equal(t, torch.zeros_like(t)), "parameter gradient of no channels != 0"


def mode_planted():
    global COUNT
    x = torch.randn(1000)
    torch.ops.normfuse_asan_planted.read_past_end(x)
    COUNT += 1


def main():
    mode, libraries = sys.argv[1], sys.argv[2:]
    assert "normfuse" not in sys.modules, "must not import normfuse (namespace registered twice)"
    for library in libraries:
        torch.ops.load_library(library)
    {"ops": mode_ops, "rejects": mode_rejects, "degenerate": mode_degenerate,
     "assoc-c0": mode_assoc_c0, "planted": mode_planted}[mode]()
    assert "normfuse._C" not in sys.modules
    print(f"ASAN-EXERCISE-OK {COUNT}", flush=True)


if __name__ == "__main__":
    main()
