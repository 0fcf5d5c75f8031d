"""What the four generic CUDA kernels move, counted on the CPU: the shim traces every bulk
access (``NF_TRACE_ACCESS`` in csrc/kernels/numerics.cuh; tests/cuda_shim/cuda_shim.h sums them
up), so the traffic model (docs/architecture.md: 3 passes forward, 5 backward) and the access
pattern a GPU will see are checked on every CI run, without a GPU.

* **Traffic**: each kernel reads each of its full-size inputs exactly once and writes its output
  once (moments 1 read, affine_apply 1 + 1, backward_sums 2, backward_apply 2 + 1; the fused
  ReLU's mask adds nothing: it is recomputed from the x already read). An extra pass, or a bulk
  access the trace misses, changes the byte counts.
* **Vectors**: where 16-byte vectors apply (every contiguous tensor with aligned pointers since
  2026-12-07, channels-last when C is a multiple of the vector), most bytes move in them; before,
  a contiguous plane whose length was not a multiple of the vector (ResNet's 7x7, and 14x14 in
  16-bit types) was read and written with scalar accesses of 2 or 4 bytes.
* **Coalescing**: a warp-wide request's bytes over the 32-byte sectors it touches (ncu's sectors
  per request): near 1 where planes (contiguous) or rows (channels-last) are whole sectors.
* **Single read** (issue 14): its directions read each tensor once (2 + 3 passes); the fused
  layer steps (issue 13) read what their reduction reads.

The shapes are ResNet's planes with a small batch (the access pattern of a plane or a row does
not depend on N) and two awkward ones. ``python tests/csrc/test_cuda_shim_traffic.py`` prints
every case (docs/performance.md quotes some, before and after the contiguous vector change).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda_shim"))
shim_build = pytest.importorskip("shim_build")
from test_cuda_shim_generic import CaseData  # noqa: E402  (the same inputs and case files)

pytestmark = [
    pytest.mark.skipif(not shim_build.compiler_available(), reason="no C++ compiler for the shim"),
    pytest.mark.xdist_group("test_cuda_shim_traffic"),
]

# (N, C, L): ResNet-50's 56x56, 14x14 and 7x7 planes, CIFAR's 32x32; C = 37 and L = 81 as the
# awkward case (channels-last: C not a multiple of the vector, so scalar; contiguous: odd L)
SHAPES = [(2, 64, 3136), (2, 256, 196), (2, 512, 49), (4, 16, 1024), (2, 37, 81)]
DTYPES = {"f32": 4, "bf16": 2}
OPS = ("moments", "backward_sums", "affine_apply", "backward_apply")
RELU_OPS = ("affine_apply_relu", "backward_sums_relu", "backward_apply_relu")
# full-size (inputs read, outputs written) of each op
PASSES = {"moments": (1, 0), "backward_sums": (2, 0), "affine_apply": (1, 1), "backward_apply": (2, 1)}
THREADS = 256  # the launchers' default block (plane_plan.cuh kDefaultThreads)


def _cases():
    for shape in SHAPES:
        for dt in DTYPES:
            for layout in ("contig", "cl"):
                for op in OPS + (RELU_OPS if shape[2] in (196, 49) else ()):
                    yield op, dt, layout, shape


def _run_traced(driver: str, lines: list, tmp: Path) -> list:
    """Run a shim driver (no sanitizer: the kernels' correctness under TSAN / ASAN is the other
    shim tests') on the case ``lines`` with tracing on: [(launch name, {field: int})] of its
    ``trace`` lines, in order."""
    exe = shim_build.build_driver([shim_build.DRIVERS / driver], "none")
    (tmp / "cases.txt").write_text("".join(line + "\n" for line in lines))
    res = subprocess.run([str(exe), str(tmp / "cases.txt")], capture_output=True, text=True,
                         env=dict(os.environ, NF_SHIM_TRACE="1"), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    # "trace WHAT DTYPE LAYOUT key=value ..."
    return [(words[1], {k: int(v) for k, v in (w.split("=") for w in words[4:])})
            for words in (line.split() for line in res.stdout.splitlines()
                          if line.startswith("trace "))]


def _trace(tmp: Path) -> list:
    """[(case, {field: int})] of every case, from one run of the generic driver."""
    gen = torch.Generator().manual_seed(0)
    cases = [CaseData(i, op, dt, layout, (*shape, THREADS, 0), tmp, gen)
             for i, (op, dt, layout, shape) in enumerate(_cases())]
    traces = _run_traced("generic_driver.cpp", [c.line().rstrip("\n") for c in cases], tmp)
    assert [name for name, _ in traces] == [c.op for c in cases], traces
    return [(case, fields) for case, (_, fields) in zip(cases, traces)]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return _trace(tmp_path_factory.mktemp("traffic"))


def _vectors_apply(case) -> bool:
    """Whether the launchers pick 16-byte vectors here (plane_plan.cuh choose_vec; the case files
    are read into 16-byte aligned buffers)."""
    return case.layout == "contig" or case.C % (16 // DTYPES[case.dt]) == 0


def _row(case, t) -> dict:
    size = case.N * case.C * case.L * DTYPES[case.dt]
    moved = t["load"] + t["store"]
    return {"op": case.op, "dtype": case.dt, "layout": case.layout,
            "shape": f"{case.N}x{case.C}x{case.L}", "reads": t["load"] / size,
            "writes": t["store"] / size, "bytes_per_request": moved / t["requests"],
            "vector_share": t["vector_bytes"] / moved, "coalescing": t["ideal"] / t["sectors"]}


def test_each_kernel_moves_its_passes_exactly(traced):
    for case, t in traced:
        reads, writes = PASSES[case.op.split("_relu")[0]]
        size = case.N * case.C * case.L * DTYPES[case.dt]
        assert (t["load"], t["store"]) == (reads * size, writes * size), _row(case, t)


def test_vectors_carry_the_bytes(traced):
    """Where vectors apply, at least 80% of the bytes move in them (the rest: the scalar head and
    tail of contiguous planes that do not start or end on a vector, 7 elements on average and at
    most 14 of a bf16 7x7 plane's 49: 86% in vectors); none where they do not."""
    for case, t in traced:
        row = _row(case, t)
        if _vectors_apply(case):
            assert row["vector_share"] >= 0.8, row
        else:
            assert row["vector_share"] == 0, row


def test_requests_coalesce(traced):
    """Bytes a request asks for over the sectors it touches: at least 0.9 where every plane
    (contiguous) or row (channels-last) is a whole number of 32-byte sectors; elsewhere at least
    0.3 (bf16 7x7 planes: 98 bytes, pairs of lanes reading 32 bytes across a sector boundary, and
    the scalar edges), where an access across planes or channels (a stride of L or C between the
    lanes) would give 1/8 to 1/16."""
    for case, t in traced:
        row = _row(case, t)
        inner = (case.L if case.layout == "contig" else case.C) * DTYPES[case.dt]
        assert row["coalescing"] >= (0.9 if inner % 32 == 0 else 0.3), row


def _batch_case_bytes(line: str) -> int:
    """Bytes of x in a batch_case.h line ("layer dtype layout N C L ...")."""
    _, dt, _, n, c, length = line.split()[:6]
    return int(n) * int(c) * int(length) * {"f32": 4, "f16": 2, "bf16": 2}[dt]


# The single-read directions (issue 14, kernels/single_read.cuh): cases of
# tests/csrc/test_single_read_shim.py's driver (layer dtype layout N C L threads training running
# affine masked misalign): split planes, the GPU's block size, a fused ReLU, 16-bit types.
SINGLE_READ_CASES = ["bin f32 cl 4 40 300 32 1 1 1 1 0", "iebn f16 cl 3 24 130 32 1 1 1 1 0",
                     "bin bf16 cl 2 64 200 256 1 1 1 1 0"]


def test_single_read_reads_each_tensor_once(tmp_path):
    """The single read's claim, counted: forward reads x once and writes y (2 passes, where the
    generic launches make 3), backward reads dy and x once and writes dx (3, against 5); and
    all of it in 16-byte vectors."""
    traces = _run_traced("single_read_driver.cpp", SINGLE_READ_CASES, tmp_path)
    assert [name for name, _ in traces] == ["single_read_forward", "single_read_backward"] * len(
        SINGLE_READ_CASES), traces
    for i, case in enumerate(SINGLE_READ_CASES):
        size = _batch_case_bytes(case)
        for (_, t), (reads, writes) in zip(traces[2 * i:2 * i + 2], [(1, 1), (2, 1)]):
            assert (t["load"], t["store"]) == (reads * size, writes * size), (case, t)
            assert t["vector_bytes"] == t["load"] + t["store"], (case, t)


# The fused layer steps (kernels/layer_steps.cuh: the reduction and the coefficients in one
# launch), cases of tests/csrc/test_layer_steps_shim.py's driver: both layouts, splits, a mask.
LAYER_STEP_CASES = ["bin f32 contig 9 37 3 64 1 1 1 0 0", "iebn f16 contig 2 3 4096 64 1 1 0 1 0",
                    "bin f16 cl 4 16 300 64 1 1 1 1 0", "bin bf16 cl 3 40 64 64 0 0 1 0 0"]


def test_layer_steps_read_like_their_reduction(tmp_path):
    """A fused layer step reads what its reduction alone reads: the forward x once, the
    backward dy and x once (its coefficient epilogue touches only per-plane values), and writes
    nothing full-size."""
    traces = _run_traced("layer_steps_driver.cpp", LAYER_STEP_CASES, tmp_path)
    assert [name for name, _ in traces] == ["moments_step", "sums_step"] * len(LAYER_STEP_CASES), (
        traces)
    for i, case in enumerate(LAYER_STEP_CASES):
        size = _batch_case_bytes(case)
        for (_, t), reads in zip(traces[2 * i:2 * i + 2], (1, 2)):
            assert (t["load"], t["store"]) == (reads * size, 0), (case, t)


def main() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_row(case, t) for case, t in _trace(Path(tmp))]
    print("| op | dtype | layout | N x C x L | reads | writes | bytes / request | in vectors | "
          "coalescing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['dtype']} | {r['layout']} | {r['shape']} | {r['reads']:.2f} | "
              f"{r['writes']:.2f} | {r['bytes_per_request']:.0f} | {r['vector_share']:.0%} | "
              f"{r['coalescing']:.2f} |")


if __name__ == "__main__":
    main()
