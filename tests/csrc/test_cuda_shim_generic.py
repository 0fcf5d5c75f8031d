"""The generic CUDA kernels (csrc/kernels/plane_{reduce,apply}.cuh) run on the CPU through the
shim (tests/cuda_shim), under ThreadSanitizer and AddressSanitizer, against float64 references
written here from the formulas. The drivers call the same templated launchers as the real build,
so the planning (vector width, sub-warp groups, split planes and their last-block merge) is tested.

Blocks are launched with 32 or 64 threads (TSAN with hundreds of std::threads is slow); the
shapes force every path: L = 1, odd L, C = 1, N = 1, C not a multiple of the vector, misaligned
bases (scalar path), and few planes with long L (split planes merged by the last block).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

shim_build = pytest.importorskip("shim_build")

# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share their driver's sanitizer builds, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_cuda_shim_generic"),
]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
OPS = ("moments", "backward_sums", "affine_apply", "backward_apply")

# (N, C, L, threads, misalign): each line targets a path of plane_plan.cuh
SHAPES = [
    (2, 3, 1, 32, 0),      # L = 1: one element per plane, group of 1 lane
    (2, 3, 17, 64, 0),     # odd L, sub-warp groups: vectors between each plane's scalar head and tail
    (1, 1, 4099, 32, 0),   # N = C = 1, odd long plane: block mode, 32 splits, a scalar tail
    (1, 2, 2400, 32, 0),   # few planes, long L: split planes with 16-byte vectors (contig)
    (1, 3, 2402, 32, 0),   # the same, planes not starting on a vector: each split's scalar head and tail
    (3, 37, 9, 64, 0),     # C = 37: not a multiple of the vector (channels-last scalar)
    (2, 64, 84, 64, 0),    # channels-last 16-byte vectors over C, split rows (odd and even rows per thread)
    (2, 8, 64, 32, 1),     # misaligned base pointers: scalar fallback
]
# TSAN is ~10x slower: races are structural, so it runs f32 on every shape and f16 on the paths
# where the vector width differs; ASAN runs every dtype on those.
REDUCED_SHAPES = [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[6]]
TSAN_DTYPES = ("f32", "f16")


def _cases(sanitizer):
    for dt in DTYPES if sanitizer == "address" else TSAN_DTYPES:
        for shape in SHAPES if dt == "f32" else REDUCED_SHAPES:
            for layout in ("contig", "cl"):
                for op in OPS:
                    yield op, dt, layout, shape


def _to_file(t: torch.Tensor, path):
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    t.numpy().tofile(path)


def _from_file(path, dtype, n):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(np.fromfile(path, dtype=np.int16, count=n)).view(dtype)
    return torch.from_numpy(np.fromfile(path, dtype=np.float32, count=n))


def _storage(t_ncl: torch.Tensor, layout: str) -> torch.Tensor:
    """File contents: (N, C, L) contiguous, or (N, L, C) for channels-last."""
    return t_ncl if layout == "contig" else t_ncl.permute(0, 2, 1)


class CaseData:
    def __init__(self, idx, op, dt, layout, shape, root, gen):
        self.op, self.dt, self.layout = op, dt, layout
        self.N, self.C, self.L, self.threads, self.misalign = shape
        self.dir = root / f"case{idx}"
        self.dir.mkdir()
        N, C, L = self.N, self.C, self.L
        dtype = DTYPES[dt]
        # per-plane offsets and scales so that a mixed-up plane index shows up
        off = torch.randn(N, C, 1, generator=gen, dtype=torch.float64) * 3
        self.x = (torch.randn(N, C, L, generator=gen, dtype=torch.float64) * 2 + off).to(dtype)
        self.dy = torch.randn(N, C, L, generator=gen, dtype=torch.float64).to(dtype)
        self.stats = {k: torch.randn(N, C, generator=gen, dtype=torch.float32)
                      for k in ("mean", "scale", "shift", "c_dy", "c_x", "c_0")}
        _to_file(_storage(self.x, layout), self.dir / "x.bin")
        _to_file(_storage(self.dy, layout), self.dir / "dy.bin")
        for k, v in self.stats.items():
            _to_file(v, self.dir / f"{k}.bin")

    def line(self):
        return f"{self.op} {self.dt} {self.layout} {self.N} {self.C} {self.L} {self.threads} {self.misalign} {self.dir}\n"

    def check(self):
        N, C, L = self.N, self.C, self.L
        x, dy = self.x.double(), self.dy.double()
        s = {k: v.double() for k, v in self.stats.items()}
        tag = f"{self.op} {self.dt} {self.layout} N={N} C={C} L={L} thr={self.threads} mis={self.misalign}"
        if self.op in ("moments", "backward_sums"):
            o0 = _from_file(self.dir / "out0.bin", torch.float32, N * C).view(N, C).double()
            o1 = _from_file(self.dir / "out1.bin", torch.float32, N * C).view(N, C).double()
            if self.op == "moments":
                mean = x.mean(-1)
                m2 = ((x - mean[..., None]) ** 2).sum(-1)
                scale = x.abs().amax(-1) + 1
                assert torch.allclose(o0, mean, rtol=0, atol=2e-6 * scale.max().item()), tag
                assert torch.allclose(o1, m2, rtol=2e-5, atol=1e-5 * scale.max().item() ** 2), tag
            else:
                g1 = dy.sum(-1)
                g2 = (dy * (x - s["mean"][..., None])).sum(-1)
                mag = (dy.abs() * (x - s["mean"][..., None]).abs()).sum(-1) + dy.abs().sum(-1) + 1
                assert torch.allclose(o0, g1, rtol=0, atol=1e-5 * mag.max().item()), tag
                assert torch.allclose(o1, g2, rtol=0, atol=1e-5 * mag.max().item()), tag
        else:
            dtype = DTYPES[self.dt]
            raw = _from_file(self.dir / "out0.bin", dtype, N * C * L)
            out = (raw.view(N, C, L) if self.layout == "contig" else raw.view(N, L, C).permute(0, 2, 1)).double()
            if self.op == "affine_apply":
                ref = (x - s["mean"][..., None]) * s["scale"][..., None] + s["shift"][..., None]
            else:
                ref = s["c_dy"][..., None] * dy + s["c_x"][..., None] * (x - s["mean"][..., None]) + s["c_0"][..., None]
            eps = {"f32": 2e-6, "f16": 2e-3, "bf16": 1.6e-2}[self.dt]
            assert torch.allclose(out, ref, rtol=eps, atol=eps * (ref.abs().max().item() + 1)), tag


def _run_all(tmp_path, sanitizer):
    gen = torch.Generator().manual_seed(1234)
    cases = [CaseData(i, op, dt, lay, shape, tmp_path, gen) for i, (op, dt, lay, shape) in enumerate(_cases(sanitizer))]
    # the 1e4 + N(0,1) case: float32 accuracy of the mean despite the offset (design.md sec. 2)
    big = []
    for lay, shape in (("contig", (2, 3, 5000, 64, 0)), ("cl", (2, 8, 1500, 64, 0))):
        c = CaseData(len(cases) + len(big), "moments", "f32", lay, shape, tmp_path, gen)
        c.x = (1e4 + torch.randn(c.N, c.C, c.L, generator=gen, dtype=torch.float64)).float()
        _to_file(_storage(c.x, lay), c.dir / "x.bin")
        big.append(c)
    # NaN / Inf: a plane holding Inf has mean Inf (NaN for Inf and -Inf, or a NaN), as a plain
    # sum gives and nn.BatchNorm reports, never NaN from Inf - Inf inside a Welford / Chan merge;
    # the other planes are untouched. Planes long enough to split, and the per-lane Welford path.
    poisoned = []
    for lay, shape in (("contig", (1, 2, 2400, 32, 0)), ("cl", (2, 64, 80, 64, 0)),
                       ("contig", (2, 3, 17, 64, 0)), ("cl", (3, 37, 9, 64, 0))):
        c = CaseData(len(cases) + len(big) + len(poisoned), "moments", "f32", lay, shape, tmp_path, gen)
        c.x[0, 0, c.L // 2] = float("inf")                    # not the plane's first element
        c.x[-1, -1, 0] = float("-inf")                        # the first element (the shift)
        c.x[0, -1, 1], c.x[0, -1, c.L - 1] = float("inf"), float("-inf")  # Inf - Inf: NaN
        if c.N * c.C > 3:
            c.x[-1, 1, c.L - 1] = float("nan")
        _to_file(_storage(c.x, lay), c.dir / "x.bin")
        poisoned.append(c)
    case_file = tmp_path / "cases.txt"
    case_file.write_text("".join(c.line() for c in cases + big + poisoned))
    exe = shim_build.build_driver([shim_build.DRIVERS / "generic_driver.cpp"], sanitizer)
    shim_build.run_driver(exe, [case_file], sanitizer, timeout=600)
    for c in cases:
        c.check()
    ulp = 2.0 ** -10  # float32 spacing at 1e4
    for c in big:
        x = c.x.double()
        o0 = _from_file(c.dir / "out0.bin", torch.float32, c.N * c.C).view(c.N, c.C).double()
        o1 = _from_file(c.dir / "out1.bin", torch.float32, c.N * c.C).view(c.N, c.C).double()
        mean = x.mean(-1)
        m2 = ((x - mean[..., None]) ** 2).sum(-1)
        # within ~half an ulp of 1e4: the mean is as good as a float32 can hold it
        assert (o0 - mean).abs().max().item() <= 0.6 * ulp, (c.layout, (o0 - mean).abs().max().item())
        assert ((o1 - m2) / m2).abs().max().item() < 1e-5, c.layout
    for c in poisoned:
        x = c.x.double()
        o0 = _from_file(c.dir / "out0.bin", torch.float32, c.N * c.C).view(c.N, c.C).double()
        o1 = _from_file(c.dir / "out1.bin", torch.float32, c.N * c.C).view(c.N, c.C).double()
        mean = x.mean(-1)  # Inf, -Inf or NaN where poisoned
        tag = f"poisoned {c.layout} N={c.N} C={c.C} L={c.L}"
        assert torch.equal(torch.isnan(o0), torch.isnan(mean)), (tag, o0, mean)
        assert torch.equal(o0[torch.isinf(mean)], mean[torch.isinf(mean)]), (tag, o0, mean)
        ok = torch.isfinite(mean)
        assert torch.isnan(o1[~ok]).all(), (tag, o1)  # sum of (x - Inf)^2 terms: NaN, as BN's var
        if ok.any():
            m2 = ((x - mean[..., None]) ** 2).sum(-1)
            assert torch.allclose(o0[ok], mean[ok], rtol=0, atol=1e-5 * (x[ok].abs().max() + 1)), tag
            assert torch.allclose(o1[ok], m2[ok], rtol=2e-5, atol=1e-4), tag


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_generic_kernels_under_sanitizer(tmp_path, sanitizer):
    _run_all(tmp_path, sanitizer)


# ---- the fused ReLU (issue 14) --------------------------------------------------------------------
# affine_apply(relu=True) and the backward ops' mask (dy where the forward's pre-activation
# v = (x - mean) * scale + shift is > 0, else 0; in backward_apply only the c_dy * dy term). Same
# driver, ops with the suffix _relu; the backward ops read the forward's scale/shift from
# scale.bin/shift.bin. The data are made so that about half of the elements are masked (a missing
# mask fails every check), and dy is 0 where |v| is so small that float32 and float64 may
# disagree on its sign (those elements do not matter either way).
RELU_OPS = ("affine_apply_relu", "backward_sums_relu", "backward_apply_relu")
RELU_TSAN_SHAPES = REDUCED_SHAPES + [SHAPES[2]]  # + the block-mode split plane and its scalar tail


def _relu_cases(sanitizer):
    for dt in DTYPES if sanitizer == "address" else TSAN_DTYPES:
        if sanitizer == "address":
            shapes = SHAPES if dt == "f32" else REDUCED_SHAPES
        else:
            shapes = RELU_TSAN_SHAPES if dt == "f32" else REDUCED_SHAPES
        for shape in shapes:
            for layout in ("contig", "cl"):
                for op in RELU_OPS:
                    yield op, dt, layout, shape


class ReluCase(CaseData):
    def __init__(self, idx, op, dt, layout, shape, root, gen):
        super().__init__(idx, op, dt, layout, shape, root, gen)
        N, C = self.N, self.C
        x = self.x.double()
        # mean near the plane's (as moments gives it), shift ~ N(0, |scale| * std): v changes
        # sign inside most planes and about half of all elements are masked
        self.stats["mean"] = (x.mean(-1) + 0.1 * torch.randn(N, C, generator=gen, dtype=torch.float64)).float()
        self.stats["shift"] = (self.stats["scale"].double() * 2 * torch.randn(N, C, generator=gen,
                                                                             dtype=torch.float64)).float()
        d = x - self.stats["mean"].double()[..., None]
        scale = self.stats["scale"].double()[..., None]
        self.v = d * scale + self.stats["shift"].double()[..., None]
        # float32's v = fmaf(x - mean, scale, shift): x - mean is off by at most half an ulp of
        # |x - mean|, the fma's own rounding keeps the sign; 1e-3 relative is ample
        ambiguous = self.v.abs() <= 1e-3 * scale.abs() * (1 + d.abs())
        self.dy = torch.where(ambiguous, torch.zeros((), dtype=self.dy.dtype), self.dy)
        _to_file(_storage(self.dy, layout), self.dir / "dy.bin")
        for k in ("mean", "shift"):
            _to_file(self.stats[k], self.dir / f"{k}.bin")

    def check(self):
        N, C, L = self.N, self.C, self.L
        x, s = self.x.double(), {k: v.double() for k, v in self.stats.items()}
        dy = torch.where(self.v > 0, self.dy.double(), torch.zeros((), dtype=torch.float64))  # masked dy
        xmu = x - s["mean"][..., None]
        tag = f"{self.op} {self.dt} {self.layout} N={N} C={C} L={L} thr={self.threads} mis={self.misalign}"
        if self.op == "backward_sums_relu":
            o0 = _from_file(self.dir / "out0.bin", torch.float32, N * C).view(N, C).double()
            o1 = _from_file(self.dir / "out1.bin", torch.float32, N * C).view(N, C).double()
            mag = (self.dy.double().abs() * (xmu.abs() + 1)).sum(-1) + 1
            assert torch.allclose(o0, dy.sum(-1), rtol=0, atol=1e-5 * mag.max().item()), tag
            assert torch.allclose(o1, (dy * xmu).sum(-1), rtol=0, atol=1e-5 * mag.max().item()), tag
            return
        raw = _from_file(self.dir / "out0.bin", DTYPES[self.dt], N * C * L)
        out = (raw.view(N, C, L) if self.layout == "contig" else raw.view(N, L, C).permute(0, 2, 1)).double()
        if self.op == "affine_apply_relu":
            ref = self.v.clamp_min(0)
        else:  # only the dy term is masked
            ref = s["c_dy"][..., None] * dy + s["c_x"][..., None] * xmu + s["c_0"][..., None]
        eps = {"f32": 2e-6, "f16": 2e-3, "bf16": 1.6e-2}[self.dt]
        assert torch.allclose(out, ref, rtol=eps, atol=eps * (ref.abs().max().item() + 1)), tag


@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_fused_relu_kernels_under_sanitizer(tmp_path, sanitizer):
    gen = torch.Generator().manual_seed(4321)
    cases = [ReluCase(i, op, dt, lay, shape, tmp_path, gen)
             for i, (op, dt, lay, shape) in enumerate(_relu_cases(sanitizer))]
    # the data do what they are for: about half masked, not only in the planes of one element
    masked = torch.cat([(c.v <= 0).flatten() for c in cases]).double().mean().item()
    assert 0.3 < masked < 0.7, masked
    case_file = tmp_path / "cases.txt"
    case_file.write_text("".join(c.line() for c in cases))
    exe = shim_build.build_driver([shim_build.DRIVERS / "generic_driver.cpp"], sanitizer)
    shim_build.run_driver(exe, [case_file], sanitizer, timeout=600)
    for c in cases:
        c.check()


def test_launchers_refuse_planes_their_indices_cannot_walk():
    """Every launcher (the four generic ones, the fused layer steps, the single read's planner)
    refuses a plane longer than 2^30 elements before touching memory, and up to 2^30 every split
    ends below 2^31 (the kernels walk a plane in 32-bit ints). With the old limit of 2^31 - 1 the
    last split's end wrapped negative and the contiguous kernels went past the plane (no torch
    input could reach it: the glue capped L at 2^30 already); here a launcher that went ahead
    reads far past a 64-float buffer, which ASAN reports."""
    exe = shim_build.build_driver([shim_build.DRIVERS / "limits_driver.cpp"], "address")
    res = shim_build.run_driver(exe, [], "address")
    assert res.stdout.strip() == "ok", res.stdout + res.stderr
