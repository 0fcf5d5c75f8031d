"""The single-read layer directions (csrc/kernels/single_read.cuh, issue 14) on the CPU through
the shim's cooperative launch (all blocks at once, grid-wide barriers as a std::barrier), under
ThreadSanitizer and AddressSanitizer.

The driver (tests/cuda_shim/drivers/single_read_driver.cpp) runs, per case, the generic launches
(moments, coefficient forward, affine_apply; backward_sums, coefficient backward, backward_apply)
and the one cooperative launch of each direction on the same inputs and compares every output:
statistics, scale / shift, running statistics, y, the gradient sums, c_dy / c_x / c_0, the
parameter gradients and dx, to rounding (the single-read plan splits planes by its register
budget, so it sums in another order), and num_batches_tracked exactly. Outputs and partials start
as NaN, so anything left unwritten shows. Cases: BIN and IEBN, float32 / float16 / bfloat16,
train / eval with and without running statistics, fused ReLU (forward relu and masked backward),
split planes (up to 19 blocks per plane), channels-last tiles with idle lanes (C = 72 in a
128-channel tile), several channel tiles, fewer blocks than coefficient tiles (each block then
runs several), N = 1 with L = 1. Inputs the kernels do not take (contiguous, misaligned, C not a
multiple of the vector) must be refused by the planner, which sends them to the generic kernels.

Under the shim a grid-wide barrier really waits for every thread of every block, so dropping
one is a data race TSAN reports, or a read of a partial never written (planted below: each of
the four barriers, dropped at run time by the shim). Not detectable here: a plain load where
__ldcg is needed (the shim has no L1), which the GPU tests cover.
"""
from __future__ import annotations

import pytest

shim_build = pytest.importorskip("shim_build")

# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share their driver's sanitizer builds, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_single_read_shim"),
]

DRIVER = shim_build.DRIVERS / "single_read_driver.cpp"
KERNEL = shim_build.ROOT / "csrc" / "kernels" / "single_read.cuh"

# layer dtype layout N C L threads training running affine masked misalign
CASES = [
    "bin f32 cl 4 40 300 32 1 1 1 1 0",    # 10 / 19 splits per plane, 5 coefficient tiles, ReLU
    "iebn bf16 cl 3 40 50 64 1 1 1 0 0",   # 3 blocks run 5 tiles
    "bin f16 cl 2 16 1000 32 1 0 1 1 0",   # splits, no running statistics, ReLU
    "iebn f32 cl 5 12 7 32 0 1 1 0 0",     # eval on running statistics
    "bin bf16 cl 1 8 1 32 0 0 1 0 0",      # eval without running statistics, N = 1, L = 1
    "bin f32 cl 6 72 20 64 1 1 0 1 0",     # idle lanes in the channel tile, no affine, ReLU
    "iebn f32 cl 2 136 9 64 1 1 1 1 0",    # two channel tiles per sample, 17 coefficient tiles
    "iebn f16 cl 3 24 130 32 1 1 1 1 0",   # f16 splits, ReLU
    "bin bf16 cl 2 64 200 256 1 1 1 1 0",  # the GPU's block size (256 threads: 32 rows of 8 lanes)
]
REFUSED = [
    "bin f32 cl 4 40 300 32 1 1 1 1 1",    # misaligned
    "bin f32 contig 4 8 30 32 1 1 1 1 0",  # contiguous
    "bin f32 cl 4 6 30 32 1 1 1 1 0",      # C % 4 != 0: no 16-byte vectors
]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("single_read") / "cases.txt"
    path.write_text("\n".join(CASES + REFUSED) + "\n")
    return path


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_single_read_matches_generic_launches(sanitizer, cases_file):
    exe = shim_build.build_driver([DRIVER], sanitizer)
    res = shim_build.run_driver(exe, [cases_file], sanitizer)
    ok = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    refused = [ln[len("refused "):] for ln in res.stdout.splitlines() if ln.startswith("refused ")]
    assert len(ok) == len(CASES) and refused == REFUSED, res.stdout + res.stderr
    plans = [dict(kv.split("=") for kv in ln.split()[-5:]) for ln in ok]
    assert max(int(p["bwd_splits"]) for p in plans) > 8 and min(int(p["fwd_splits"]) for p in plans) == 1
    assert any(int(p["tiles"]) > int(p["fwd_grid"]) for p in plans)  # blocks looping over tiles


# Each planted bug removes one grid-wide barrier: the shim's NF_SHIM_DROP_GRID_SYNC="file:line"
# skips the NF_GRID_SYNC() at that line, as if it were deleted, in the same ThreadSanitizer build
# the test above uses (one build for all plants: a build per plant cost ~1 min each). TSAN reports
# a race where the unguarded read meets the write (named by `where`); where the write of a partial
# and its read may not overlap in time, the reader finds the partials' NaN fill instead and the
# driver fails (where None: any failure will do). Each plant is (the text that holds the barrier,
# ending with it, the function TSAN names).
PLANTS = {
    "apply_before_coefficients": (
        "    batch_coef_forward_tile<Math, true, kCoefRows>(c, cx, ny, tile, smem);\n  NF_GRID_SYNC();",
        "single_read_forward_kernel",
    ),
    "backward_apply_before_coefficients": (
        "    batch_coef_backward_tile<Math, true, kCoefRows>(c, cx, ny, tile, smem);\n  NF_GRID_SYNC();",
        "single_read_backward_kernel",
    ),
    "coefficients_before_merge": (
        "    merge_splits<Op, VEC>(op, pl, t, ctx, partials, smem);\n    NF_GRID_SYNC();",
        "merge_splits",
    ),
    "merge_before_partials": (
        "  publish_partial<Op, VEC>(op, pl, t, st, ctx, partials, smem);\n  NF_GRID_SYNC();",
        None,
    ),
}


def barrier_line(text: str) -> int:
    """The line of single_read.cuh holding the NF_GRID_SYNC() that ends ``text``."""
    src = KERNEL.read_text()
    assert src.count(text) == 1, "the planted barrier no longer matches single_read.cuh"
    return src[:src.index(text) + len(text)].count("\n") + 1


def test_planted_barriers_are_the_kernels_barriers():
    """Every grid-wide barrier of single_read.cuh has a plant: a new one gets one too."""
    src = KERNEL.read_text().splitlines()
    lines = {i + 1 for i, ln in enumerate(src) if ln.strip() == "NF_GRID_SYNC();"}
    assert lines == {barrier_line(text) for text, _ in PLANTS.values()}


@pytest.fixture
def first_case(tmp_path):
    """CASES[0] alone: split planes, several coefficient tiles, both directions."""
    path = tmp_path / "cases.txt"
    path.write_text(CASES[0] + "\n")
    return path


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_missing_grid_barrier_is_reported(plant, first_case):
    text, where = PLANTS[plant]
    exe = shim_build.build_driver([DRIVER], "thread")
    drop = {"NF_SHIM_DROP_GRID_SYNC": f"single_read.cuh:{barrier_line(text)}"}
    res = shim_build.run_driver(exe, [first_case], "thread", expect_clean=False, env=drop)
    assert res.returncode != 0, res.stdout[-2000:]
    if where is not None:
        assert "WARNING: ThreadSanitizer: data race" in res.stderr and where in res.stderr, res.stderr[-3000:]


def test_dropping_a_line_without_a_barrier_changes_nothing(first_case):
    """The control for the plants: the drop only acts on the barrier at its line."""
    exe = shim_build.build_driver([DRIVER], "thread")
    other = barrier_line(PLANTS["apply_before_coefficients"][0]) - 1
    res = shim_build.run_driver(exe, [first_case], "thread",
                                env={"NF_SHIM_DROP_GRID_SYNC": f"single_read.cuh:{other}"})
    assert res.stdout.startswith("ok "), res.stdout
