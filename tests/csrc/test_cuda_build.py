"""sm_80 / sm_90 build check of the CUDA kernels, without a GPU (skipped when nvcc is absent).

Runs .ci/check_cuda_build.py: compiles csrc/cuda/*.cu for sm_80 and sm_90 as setup.py does
(cached under build/cuda_check), and checks cubins for both archs (objects and the built
extension), no spills / local memory in the bandwidth kernels, and 128-bit loads in their
vectorised instantiations; the AssocNorm and ILM-Norm coefficient kernels without spills.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_cuda_build", ROOT / ".ci" / "check_cuda_build.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

pytestmark = pytest.mark.skipif(check.find_cuda_home() is None, reason="no CUDA toolkit (nvcc)")


def test_sm80_sm90_cubins_no_spills_vector_loads():
    summary = check.run(check_extension=True, verbose=True)
    assert not summary["failures"], "\n".join(summary["failures"])
    bw = [r for r in summary["rows"] if r["bandwidth"]]
    # 2 reduce kernels x 3 ops (moments, backward_sums, its ReLU-masked variant) + 2 apply
    # kernels x 4 ops (affine_apply, its ReLU variant, backward_apply, its masked variant), each
    # x 2 vector widths x 3 dtypes, for both archs
    assert {r["arch"] for r in bw} == {"80", "90"} and len(bw) == (2 * 3 + 2 * 4) * 2 * 3 * 2
    # <= 64 registers keeps 4 blocks of 256 threads resident per SM (half the H100's thread slots)
    assert all(r["registers"] <= 64 for r in bw)
    assert summary["vector_kernels_checked"] == len(bw) // 2
    # the fused layer steps (kernels/layer_steps.cuh): 2 layouts x (moments + backward_sums and its
    # masked variant) x (BIN, IEBN), each x 2 vector widths x 3 dtypes, for both archs; the
    # reduction they carry is a bandwidth kernel, so the same budget
    st = [r for r in summary["rows"] if r["step"]]
    assert {r["arch"] for r in st} == {"80", "90"} and len(st) == 2 * 3 * 2 * 2 * 3 * 2
    assert all(r["registers"] <= 64 for r in st)
    assert summary["step_vector_kernels_checked"] == len(st) // 2
    # the single-read directions (kernels/single_read.cuh): (forward x ReLU + backward x mask) x
    # (BIN, IEBN) x 3 dtypes, 16-byte vectors only, for both archs; registers and spills checked by
    # the script (<= 128, none)
    sr = [r for r in summary["rows"] if r["single_read"]]
    assert {r["arch"] for r in sr} == {"80", "90"} and len(sr) == 2 * 2 * 2 * 3 * 2
    assert all(r["registers"] <= 128 and r["spill_stores"] == r["spill_loads"] == r["stack"] == 0 for r in sr)
    assert summary["single_read_kernels_checked"] == len(sr)
    # the per-sample coefficient kernels (kernels/coefficients_{assoc,ilm}.cuh): forward and
    # backward on both archs, no spill or stack (their vectors live in shared memory)
    coef_kernel = re.compile(r"(assoc|ilm)_coef_(forward|backward)_kernel")
    coef = [(coef_kernel.search(r["kernel"]), r) for r in summary["rows"]]
    coef = [(m.group(1), m.group(2), r) for m, r in coef if m]
    assert sorted((layer, d, r["arch"]) for layer, d, r in coef) == sorted(
        (layer, d, arch) for layer in ("assoc", "ilm") for d in ("forward", "backward") for arch in ("80", "90"))
    coef = [r for *_, r in coef]
    assert all(r["spill_stores"] == r["spill_loads"] == r["stack"] == 0 for r in coef), coef
    objects = {k: v for k, v in summary["archs"].items() if k.endswith(".cu")}
    assert "generic_launchers.cu" in objects and "layer_steps_forward.cu" in objects
    assert "single_read_forward.cu" in objects and "single_read_backward.cu" in objects
    for name, archs in objects.items():
        assert {"80", "90"} <= set(archs), name
