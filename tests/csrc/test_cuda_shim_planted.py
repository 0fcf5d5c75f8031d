"""The sanitizer net holds: planted bugs in CUDA kernels run through the CPU shim are reported.

* a block reduction missing its __syncthreads -> ThreadSanitizer "data race" on the kernel line;
* an off-by-one read past the end of an input -> AddressSanitizer "heap-buffer-overflow".
The fixed variants of the same kernels run clean, so the reports are not noise.
"""
from __future__ import annotations

import pytest

shim_build = pytest.importorskip("shim_build")
# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share their driver's sanitizer builds, which a second worker
# would redo.
pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_cuda_shim_planted"),
]

DRIVER = shim_build.DRIVERS / "planted_driver.cpp"
KERNELS = shim_build.SHIM_DIR / "planted" / "planted_kernels.cuh"


def _line_of(snippet: str) -> str:
    """file:line of the statement holding `snippet`, as the sanitizers print it."""
    for i, line in enumerate(KERNELS.read_text().splitlines(), 1):
        if snippet in line:
            return f"planted_kernels.cuh:{i}"
    raise AssertionError(snippet)


def _run(sanitizer, kernel, variant):
    exe = shim_build.build_driver([DRIVER], sanitizer)
    return shim_build.run_driver(exe, [kernel, variant], sanitizer, expect_clean=(variant == "fixed"), timeout=300)


def test_missing_syncthreads_is_a_data_race():
    res = _run("thread", "race", "buggy")
    assert res.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in res.stderr, res.stderr[-3000:]
    # reported on the tree step that reads a neighbour's slot before the barrier that is missing
    assert _line_of("s[t] += s[t + half]") in res.stderr and "block_sum" in res.stderr, res.stderr[-3000:]


def test_fixed_reduction_is_race_free():
    res = _run("thread", "race", "fixed")
    assert "sum 4950" in res.stdout


def test_out_of_bounds_read_is_a_heap_buffer_overflow():
    res = _run("address", "oob", "buggy")
    assert res.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-3000:]
    assert "READ of size 4" in res.stderr and "forward_diff" in res.stderr, res.stderr[-3000:]
    assert _line_of("x[i + 1] - x[i]") in res.stderr, res.stderr[-3000:]


def test_fixed_diff_is_clean():
    _run("address", "oob", "fixed")
