"""Ahead-of-time compilation for sm_80 and sm_90 without a GPU (``normfuse.triton_kernels.aot``,
run in a subprocess without TRITON_INTERPRET): every kernel in every configuration the
heuristics can choose compiles, nothing spills to local memory, and the elementwise passes use
128-bit global loads and stores for aligned float32/float16/bfloat16 data.

Every configuration is compiled with and without the fused ReLU (the ``RELU`` / ``MASK``
constexprs of affine_apply, backward_sums and backward_apply).  Default: ``aot --quick``
(streaming kernels with float32 data, the two apply kernels in every dtype); ``NORMFUSE_AOT_FULL=1`` compiles every dtype of every streaming kernel too.  Triton's
compilation cache makes reruns take seconds; the first run takes minutes on two cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share one AOT compile of every configuration, which a second
# worker would redo.
pytestmark = [
    pytest.mark.aot,
    pytest.mark.xdist_group("test_aot"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = os.environ.get("NORMFUSE_AOT_FULL") == "1"
# NORMFUSE_AOT_ARCHS: the lowest-torch CI job checks sm_90 only (the GPU machines that ship that
# torch are H100 / H200), half the compiles; the README's test command checks both.
ARCHS = tuple(int(a) for a in os.environ.get("NORMFUSE_AOT_ARCHS", "80 90").split())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "normfuse.triton_kernels.aot", "--arch", *map(str, ARCHS),
           "--jobs", "2", "--json", str(out)] + ([] if FULL else ["--quick"])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


def test_every_configuration_compiles(results):
    from normfuse.triton_kernels import aot
    expected = {(name, dtype, tuple(sorted(meta.items())), aligned, arch)
                for name, dtype, meta, _, aligned in aot.specs(quick=not FULL) for arch in ARCHS}
    got = {(r["kernel"], r["dtype"], tuple(sorted(r["constexprs"].items())), r["aligned"],
            r["arch"]) for r in results}
    assert any(not aligned for *_, aligned, _ in got)  # the variant with the most registers
    assert got == expected
    kernels = {r["kernel"] for r in results}
    assert kernels == set(aot.STREAM_KERNELS + aot.COEFF_KERNELS + aot.ASSOC_KERNELS
                           + aot.ILM_KERNELS)


def test_no_spills(results):
    spilled = [r for r in results if r["local"] or r["stack"] or r["local_ops"]]
    assert not spilled, spilled


def test_128bit_accesses(results):
    apply = [r for r in results if r["kernel"] in ("affine_apply", "backward_apply")
             and r["aligned"]]  # (sizes not multiples of 16: no 128-bit access is possible)
    assert {r["dtype"] for r in apply} == {"float32", "float16", "bfloat16"}
    narrow = [r for r in apply if not (r["ldg128"] and r["stg128"])]
    assert not narrow, narrow
    # the unmasked main loops of the reductions vectorize too
    reductions = [r for r in results if r["kernel"] in ("moments", "backward_sums")
                  and r["aligned"]]
    assert all(r["ldg128"] for r in reductions), [r for r in reductions if not r["ldg128"]]
