"""The coefficient CUDA kernels (csrc/kernels/coefficients_{batch,assoc,ilm}.cuh) run on the CPU
through the shim (tests/cuda_shim), under ThreadSanitizer and AddressSanitizer, against the float64
reference (normfuse/coefficients/). The driver calls the same templated launchers as the CUDA
build, so the launch planning (channels x rows per block, segment width, thread counts) is tested.

Shapes are small but awkward: N = 1 (eval, and AssocNorm's per-sample path), C = 1, C not a
multiple of the channel tile (8 or 32 channels), odd L, L = 1, N not a power of two (the ragged reduction tree of
the AssocNorm backward), G = 1 and G = C, M = 1, groups wider than a warp, and an input offset of
1e3 (the shifted merges). Blocks get 32 or 64 threads: TSAN with hundreds of threads is slow.
The AssocNorm backward runs twice per case on the same arrival counters (the driver checks that
they are left zeroed and that both runs agree bit for bit). Planted bugs (a removed barrier, a
write past the workspace, a counter left set) must be reported, so a silently blind sanitizer
setup fails the suite.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_coefficients_cases import OUTPUTS, assert_close, expected, make_inputs

shim_build = pytest.importorskip("shim_build")

# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share their driver's sanitizer builds, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_coefficients_shim"),
]

DRIVER = shim_build.DRIVERS / "coefficients_driver.cpp"
TOL = 2e-5  # float32 kernels vs the float64 oracle

# op, N, C, L, G, M, threads, training, running, affine, offset
BATCH_SHAPES = [
    (4, 5, 7, 64),     # odd L, small C and N
    (1, 3, 9, 32),     # N = 1
    (6, 1, 1, 32),     # C = 1, L = 1
    (9, 37, 3, 64),    # C = 37: 8-channel tiles, the last with 5; N > rows per block (loops)
    (70, 10, 2, 32),   # 4 rows per block: 18 rows per thread, batches of kRowBatch, the last ragged
]
MODES = [  # training, running, affine
    (True, True, True),
    (True, False, False),
    (False, True, True),
    (False, False, True),
]
ASSOC_SHAPES = [  # N, C, L, G, M, threads
    (1, 6, 5, 1, 1, 32),    # N = 1, G = 1, M = 1
    (3, 8, 3, 8, 2, 32),    # G = C (one channel per group)
    (5, 40, 7, 4, 3, 64),   # 10 channels per group (16-lane segments), ragged tree over N = 5
    (4, 70, 1, 2, 5, 64),   # 35 channels per group (> a warp), C > threads, L = 1
    (2, 12, 9, 3, 1, 32),   # M = 1
    (3, 5, 1, 5, 2, 32),    # one-element groups (C/G * L = 1): r_G = 0
]
ILM_SHAPES = [  # N, C, L, G, K, E, threads
    (4, 12, 5, 4, 3, 2, 32),    # key groups of 4 straddle groups of 3
    (1, 8, 6, 2, 4, 3, 32),     # N = 1 (no tree), E > K
    (5, 48, 7, 8, 3, 2, 64),    # ragged tree over N = 5, neither grouping nests
    (3, 70, 1, 2, 35, 5, 64),   # L = 1 (groups of 35 and 2 values), C > threads, K > threads / 2
    (2, 6, 2, 1, 2, 1, 32),     # one group, E = 1
]


def _cases():
    """(op, N, C, L, G, M, threads, training, running, affine, offset, K): M is ILM's E, K its
    key-group count (1 elsewhere)."""
    cases = []
    for layer in ("bin", "iebn"):
        for i, (N, C, L, threads) in enumerate(BATCH_SHAPES):
            modes = MODES if N > 1 else [m for m in MODES if not m[0]]  # N = 1: eval / instance
            for training, running, affine in modes:
                for op in (layer, layer + "_backward"):
                    cases.append((op, N, C, L, 1, 1, threads, training, running, affine, 0.0, 1))
        # large offset: the batch merge works on means relative to the first plane's
        for op in (layer, layer + "_backward"):
            cases.append((op, 5, 3, 4, 1, 1, 32, True, True, True, 1e3, 1))
        # enough channels for full 32-channel tiles (129 blocks, the last one with 4 channels)
        cases.append((layer + "_backward", 3, 4100, 2, 1, 1, 64, True, True, True, 0.0, 1))
    for N, C, L, G, M, threads in ASSOC_SHAPES:
        for op in ("assoc", "assoc_backward"):
            cases.append((op, N, C, L, G, M, threads, False, False, True, 0.0, 1))
    cases.append(("assoc_backward", 3, 6, 5, 2, 2, 32, False, False, True, 1e3, 1))
    for N, C, L, G, K, E, threads in ILM_SHAPES:
        for op in ("ilm", "ilm_backward"):
            cases.append((op, N, C, L, G, E, threads, False, False, True, 0.0, K))
    cases.append(("ilm_backward", 3, 12, 5, 4, 2, 32, False, False, True, 1e3, 3))
    return cases


CASES = _cases()


def _write(t: torch.Tensor, path):
    t.to(torch.float32).contiguous().numpy().tofile(path)


def _read(path, shape):
    return torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape).to(torch.float64)


@pytest.fixture(scope="module")
def case_data(tmp_path_factory):
    """Inputs and expected outputs of every case, written once for both sanitizers."""
    root = tmp_path_factory.mktemp("coef_shim")
    data = []
    for idx, (op, N, C, L, G, M, threads, training, running, affine, offset, K) in enumerate(CASES):
        d = root / f"case{idx}"
        d.mkdir()
        t = make_inputs(op, N, C, L, G, M, seed=1000 + idx, offset=offset, K=K)
        for name, v in t.items():
            _write(v, d / f"{name}.bin")
        want = expected(op, t, L, G, training, running, affine)
        line = f"{op} {N} {C} {L} {G} {M} {threads} {int(training)} {int(running)} {int(affine)} {d}"
        if op.startswith("ilm"):
            line += f" {K}"  # the driver reads ILM's key-group count after dir
        data.append((line, d, want))
    return root, data


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_coefficient_kernels_on_shim(sanitizer, case_data):
    root, data = case_data
    exe = shim_build.build_driver([DRIVER], sanitizer)
    cases_file = root / f"cases_{sanitizer}.txt"
    cases_file.write_text("\n".join(line for line, _, _ in data) + "\n")
    shim_build.run_driver(exe, [cases_file], sanitizer)
    checked = 0
    for line, d, want in data:
        for name, ref in want.items():
            got = _read(d / f"out_{name}.bin", ref.shape)
            assert_close(got, ref, TOL, f"[{line.rsplit(' ', 1)[0]}] {name}")
            checked += 1
    assert checked > 200


def test_cases_cover_every_output():
    """Every output of every op is compared somewhere (guards against a silently empty table)."""
    seen = {}
    for op, *_ in CASES:
        seen.setdefault(op, set()).update(OUTPUTS[op])
    assert set(seen) == set(OUTPUTS)


# ---- planted bugs: the sanitizers and the driver's checks must see them --------------------------------
# Each entry edits one line of a kernel header in a copy (found first on the include path) and
# names what must be reported: a removed barrier in the column tree (TSAN), a write past the last
# sample's partials (ASAN), an arrival counter that is not reset (the driver's own check; the
# samples' tree is AssocNorm's, which the ILM backward calls too: its cases run with it).
PLANTED = {
    "missing_barrier": ("thread", "coefficients_batch.cuh",
                        "        smem[k * T + i] = v[k];\n      }\n    }\n    __syncthreads();",
                        "        smem[k * T + i] = v[k];\n      }\n    }\n", "WARNING: ThreadSanitizer"),
    "partials_overflow": ("address", "coefficients_assoc.cuh", "part[2 * C + M * G + t] =",
                          "part[2 * C + M * G + t + 1] =", "ERROR: AddressSanitizer"),
    "counter_not_reset": ("address", "coefficients_assoc.cuh", "if (ticket == 1) atomicExch",
                          "if (ticket == 2) atomicExch", "arrival counter not reset"),
    # ILM backward: step 2 reads the decoder gradients other threads wrote in step 1
    "ilm_missing_barrier": ("thread", "coefficients_ilm.cuh",
                            "    sm.gvar[g] = coef::ilm_grad_group_var(o, sm.r[g], bg);\n  }\n  __syncthreads();",
                            "    sm.gvar[g] = coef::ilm_grad_group_var(o, sm.r[g], bg);\n  }\n",
                            "WARNING: ThreadSanitizer"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_bug_is_caught(name, case_data):
    import hashlib

    sanitizer, header, old, new, marker = PLANTED[name]
    text = (shim_build.ROOT / "csrc" / "kernels" / header).read_text()
    assert text.count(old) == 1, f"planted edit {name!r} no longer matches {header}"
    planted = text.replace(old, new)
    inc = shim_build.BUILD_DIR / "planted" / f"{name}-{hashlib.sha256(planted.encode()).hexdigest()[:12]}"
    (inc / "kernels").mkdir(parents=True, exist_ok=True)
    (inc / "kernels" / header).write_text(planted)
    exe = shim_build.build_driver([DRIVER], sanitizer, extra_flags=["-I", str(inc)], name=f"coefficients_{name}")
    root, data = case_data
    lines = [line for line, _, _ in data
             if line.startswith(("bin_backward 9 37", "assoc_backward 5 40", "ilm_backward 5 48"))]
    cases_file = root / f"planted_{name}.txt"
    cases_file.write_text("\n".join(lines) + "\n")
    res = shim_build.run_driver(exe, [cases_file], sanitizer, expect_clean=False)
    assert res.returncode != 0 and marker in res.stderr, f"{name}: not caught (rc={res.returncode})\n{res.stderr[-3000:]}"


# ---- NaN / Inf in the plane moments --------------------------------------------------------------------
def _same_non_finite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN where the oracle has NaN, the same +-Inf where it has Inf, close elsewhere."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern\n{got}\n{want}"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: Inf values\n{got}\n{want}"
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite where the oracle is finite"
    assert_close(got[fin], want[fin], TOL, what)


def _run_one(op, t, N, C, L, G, M, threads, training, running, tmp_path):
    """Runs one case through the driver under ASan; returns the outputs by name (float64)."""
    d = tmp_path / "case"
    d.mkdir()
    for name, v in t.items():
        _write(v, d / f"{name}.bin")
    want = expected(op, t, L, G, training, running, True)
    cases_file = tmp_path / "cases.txt"
    cases_file.write_text(f"{op} {N} {C} {L} {G} {M} {threads} {int(training)} {int(running)} 1 {d}\n")
    shim_build.run_driver(shim_build.build_driver([DRIVER], "address"), [cases_file], "address")
    return {name: _read(d / f"out_{name}.bin", ref.shape) for name, ref in want.items()}, want


def test_assoc_encoder_accurate_for_many_groups(tmp_path):
    """G = C = 2048: the encoder's dot products over G stay within TOL. The inputs are those of
    the H200 run's test_assoc_cuda[3x2048x4x2048x8], where one thread summing the G products in
    sequence left shift values off by 9.5e-5 (2.5x TOL; 1.1e-4 here on the shim); a warp per
    output with a shuffle tree is ~10x more accurate."""
    t = make_inputs("assoc", 3, 2048, 4, 2048, 8, seed=13, dtype=torch.float32)
    got, want = _run_one("assoc", t, 3, 2048, 4, 2048, 8, 64, False, False, tmp_path)
    for name, ref in want.items():
        assert_close(got[name], ref, TOL / 2, f"assoc G=2048 {name}")


@pytest.mark.parametrize("op", ["bin", "iebn"])
def test_batch_merge_keeps_inf(op, tmp_path):
    """A plane whose mean is +-Inf (an Inf in the input) gives a +-Inf running_mean, as
    nn.BatchNorm does, also when the Chan merge tree combines it with finite partials (it gave NaN
    on the GPU: Inf + (finite - Inf) * w); a NaN plane gives NaN. Other channels are unaffected."""
    N, C, L, threads = 9, 6, 5, 64
    t = make_inputs(op, N, C, L, seed=77)
    t["mean"][0, 1], t["m2"][0, 1] = float("inf"), float("nan")    # the first plane (the shift)
    t["mean"][5, 3], t["m2"][5, 3] = float("-inf"), float("nan")   # a later plane
    t["mean"][2, 4], t["m2"][2, 4] = float("nan"), float("nan")
    got, want = _run_one(op, t, N, C, L, 1, 1, threads, True, True, tmp_path)
    assert torch.isinf(want["running_mean"][[1, 3]]).all() and torch.isnan(want["running_mean"][4])
    for name, ref in want.items():
        _same_non_finite(got[name], ref, f"{op} {name}")


def test_assoc_backward_keeps_nan_gradient(tmp_path):
    """A NaN in one sample's gradient sums reaches every meta-network gradient it feeds, as in the
    float64 reference, also through the auto-encoder's relu where h <= 0: the relu mask multiplies
    (a select gave 0 there, and an optimizer a finite step the formula does not give)."""
    N, C, L, G, M, threads = 3, 8, 5, 4, 3, 32
    t = make_inputs("assoc_backward", N, C, L, G, M, seed=5)
    t["sum_dy"][0, 2] = float("nan")
    # sample 0's h_mu[0] and h_var[0] < 0 (positive group means, negative encoder row): the relu
    # masks both paths of its column 0, so only a multiplied mask keeps grad_encoder[0] NaN
    t["mean"][0] = (t["mean"][0].abs() + 0.25).float().double()
    t["encoder"][0] = -0.5
    got, want = _run_one("assoc_backward", t, N, C, L, G, M, threads, False, False, tmp_path)
    assert torch.isnan(want["grad_encoder"]).all()
    for name, ref in want.items():
        _same_non_finite(got[name], ref, f"assoc_backward {name}")
