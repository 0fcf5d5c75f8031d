"""The fused BIN / IEBN layer steps (csrc/kernels/layer_steps.cuh) on the CPU through the shim
(tests/cuda_shim), under ThreadSanitizer and AddressSanitizer.

The driver (tests/cuda_shim/drivers/layer_steps_driver.cpp) runs, per case, the separate launches
(moments then the coefficient forward; backward_sums, masked or not, then the coefficient
backward) and the fused launch on the same inputs, and requires BITWISE equal outputs: the fused
epilogue runs the standalone coefficient kernel's tiles with its plan (cx x ny, the same trees)
and the reduction body is the same code, so the reduction order is the same. It also requires
equal running statistics and num_batches_tracked, and every arrival counter (the split planes'
and the grid's) left zero; the fused launches run twice on the same counters.

Cases cover BIN and IEBN, float32 / float16 / bfloat16, contiguous and channels-last, split and
unsplit planes, aligned (vector) and misaligned (scalar) inputs, ragged channel tiles (C = 37, 40),
several coefficient tiles, tiles with fewer threads than the block (N = 2: 16 of 32 threads), N
larger than a tile's rows (loops), eval with and without running statistics, and grids of 1 to 40
blocks, so the grid's last block (always the highest index under the shim, which runs blocks in
order) is not always block 0. Under the shim __threadfence is a no-op and blocks never overlap:
a missing fence or a plain (non-__ldcg) load is NOT caught here (only on a GPU, by the CUDA
tests); a last block that reads before every block has arrived, a skipped tile, a tile index
ignored and a counter left set are (checked by planting each, see the report of issue 13's
change).
"""
from __future__ import annotations

import pytest

shim_build = pytest.importorskip("shim_build")

# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share their driver's sanitizer builds, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_layer_steps_shim"),
]

DRIVER = shim_build.DRIVERS / "layer_steps_driver.cpp"

# layer dtype layout N C L threads training running affine masked misalign
CASES = [
    "bin f32 contig 9 37 3 64 1 1 1 0 0",     # sub-warp groups, 6 blocks; 5 tiles (last: 5 channels); N > rows
    "iebn f32 contig 9 37 3 64 1 1 1 1 0",    # the same, masked backward
    "bin f16 cl 4 16 300 64 1 1 1 1 0",       # channels-last, 2 splits per tile, 2 coefficient tiles
    "iebn bf16 cl 2 5 7 32 0 1 1 0 1",        # eval with running stats, scalar, 16 of 32 threads in the tile
    "bin f32 contig 3 2 4096 64 1 0 0 1 0",   # whole-block planes, 4 splits (24 blocks), no affine
    "iebn f16 contig 2 3 4096 64 1 1 0 1 0",  # f16 vectors, 2 splits
    "bin bf16 cl 3 40 64 64 0 0 1 0 0",       # eval on batch statistics (no running), 5 tiles, splits
    "iebn f32 cl 5 12 64 32 1 1 1 1 1",       # misaligned channels-last, 8 splits (40 blocks)
    "bin f32 contig 1 3 9 32 0 1 1 0 0",      # N = 1, one block
    "iebn f32 contig 6 1 1 32 1 1 1 0 0",     # C = 1, L = 1
    "bin f16 contig 2 2 2048 64 1 1 1 1 1",   # misaligned f16 contiguous, 8 splits, masked
]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("layer_steps") / "cases.txt"
    path.write_text("\n".join(CASES) + "\n")
    return path


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_fused_equals_separate_launches(sanitizer, cases_file):
    exe = shim_build.build_driver([DRIVER], sanitizer)
    res = shim_build.run_driver(exe, [cases_file], sanitizer)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == len(CASES), res.stdout + res.stderr
    plans = [dict(kv.split("=") for kv in ln.split()[-3:]) for ln in lines]
    grids = {int(p["grid"]) for p in plans}
    # the grid's last block takes many positions; splits and several tiles are exercised
    assert len(grids) >= 6 and max(grids) >= 32, grids
    assert any(int(p["splits"]) > 1 for p in plans) and any(int(p["tiles"]) > 1 for p in plans)
