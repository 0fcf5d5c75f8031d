"""Every CUDA op raises a clear RuntimeError for bad arguments and the process survives (GPU only).

The first GPU run lost four pytest workers to crashes in error paths of the CUDA coefficient ops
(tests/csrc/test_coefficients_ops.py: the AssocNorm shared-memory limit and bad batch counters),
all raised after the op had taken its device guard. Every op now checks all its arguments before
it guards, allocates or launches; these cases cover a late check of each of the ten ops, and run
each in a child process first, so that a crash is reported as a failure naming the op (with the
C++ stack of the fatal signal) instead of taking the test worker down.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from normfuse import _extension

pytestmark = pytest.mark.skipif(not (_extension.HAS_CUDA_KERNELS and torch.cuda.is_available()),
                                reason="needs a CUDA device and normfuse._C built with CUDA")

_SETUP = """
import torch, normfuse
ops = torch.ops.normfuse
d = "cuda"
x = torch.randn(2, 4, 3, 5, device=d)
st = torch.randn(2, 4, device=d)
pc = torch.rand(4, device=d)
m2 = st.abs() + 1
"""

# id -> (statement that must raise, a phrase of the message)
CASES = {
    "moments-planes": ("ops.moments(torch.randn(2, 3, 4, device=d)[:, :, ::2])",
                       "contiguous or channels-last"),
    "affine_apply-stats-shape": ("ops.affine_apply(x, st[:1], st[:1], st[:1])", "shape"),
    "backward_sums-dy-layout": ("ops.backward_sums(x.contiguous(memory_format=torch.channels_last), x, st)",
                                "memory layout"),
    "backward_apply-stats-device": ("ops.backward_apply(x, x, st.cpu(), st, st, st)", "is on cpu"),
    # the fused ReLU's mask: scale without shift, and a mask statistic on the wrong device
    "backward_sums-mask-pair": ("ops.backward_sums(x, x, st, st, None)", "both be given"),
    "backward_apply-mask-device": ("ops.backward_apply(x, x, st, st, st, st, st, st.cpu())",
                                   "is on cpu"),
    "bin-counter-cpu": ("ops.bin_coefficients(st, m2, 15, pc, None, None, None, None, True, 0.1, 1e-5,"
                        " torch.tensor(1))", "num_batches_tracked must be a 0-dim"),
    "bin-counter-int32": ("ops.bin_coefficients(st, m2, 15, pc, None, None, None, None, True, 0.1, 1e-5,"
                          " torch.tensor(1, dtype=torch.int32, device=d))",
                          "num_batches_tracked must be a 0-dim"),
    "bin_backward-gate-shape": ("ops.bin_coefficients_backward(st, st, st, m2, 15, pc[:3], None, None,"
                                " None, None, True, 1e-5)", "gate must have shape"),
    "iebn-running-pair": ("ops.iebn_coefficients(st, m2, 15, pc, pc, None, None, pc.clone(), None, True,"
                          " 0.1, 1e-5)", "running_mean and running_var"),
    "iebn_backward-sum-dtype": ("ops.iebn_coefficients_backward(st.double(), st, st, m2, 15, pc, pc, None,"
                                " None, None, None, True, 1e-5)", "sum_dy"),
    "assoc-smem": ("ops.assoc_coefficients(*[torch.randn(2, 16384, device=d)] * 2, 1, 16384,"
                   " torch.randn(1, 16384, device=d), *[torch.randn(16384, 1, device=d)] * 2,"
                   " *[torch.randn(16384, device=d)] * 2, 1e-5)", "shared memory"),
    "assoc_backward-smem": ("ops.assoc_coefficients_backward(*[torch.randn(2, 16384, device=d)] * 4, 1,"
                            " 16384, torch.randn(1, 16384, device=d), *[torch.randn(16384, 1, device=d)] * 2,"
                            " *[torch.randn(16384, device=d)] * 2, 1e-5)", "shared memory"),
    # 2^28 + 64 channels (1 GiB per (1, C) tensor): past the kernels' 32-bit sample indexing,
    # said before any allocation (it surfaced as "CUDA launch failed: invalid argument")
    "assoc-channels-32bit": ("ops.assoc_coefficients(*[torch.empty(1, 2**28 + 64, device=d)] * 2, 1, 1,"
                             " *[torch.ones(1, 1, device=d)] * 3, *[torch.empty(2**28 + 64, device=d)] * 2,"
                             " 1e-5)", "32-bit indexing"),
    "assoc-groups": ("ops.assoc_coefficients(st, m2, 15, 3, torch.randn(2, 3, device=d),"
                     " torch.randn(3, 2, device=d), torch.randn(3, 2, device=d), pc, pc, 1e-5)", "num_groups"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_op_error_in_child_process(case):
    stmt, phrase = CASES[case]
    code = _SETUP + textwrap.dedent(f"""
        torch._C._set_print_stack_traces_on_fatal_signal(True)
        try:
            {stmt}
        except RuntimeError as e:
            print("RAISED:", e)
        else:
            print("NO ERROR")
        torch.cuda.synchronize()  # no launch was left failing behind the error
        print("ALIVE")
    """)
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                         text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{case}: the process died (rc {res.returncode})\n{out[-4000:]}"
    assert "RAISED:" in res.stdout and phrase in res.stdout, f"{case}: {out[-2000:]}"
    assert "ALIVE" in res.stdout


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_op_error_in_process_changes_nothing(case):
    """Same calls in this process: the error is raised and the running statistics / counters of
    the call are untouched."""
    stmt, phrase = CASES[case]
    env: dict = {}
    exec(_SETUP, env)  # noqa: S102  (test-local statements above)
    before = {k: v.clone() for k, v in env.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=phrase):
        exec(stmt, env)  # noqa: S102
    for k, v in before.items():
        assert torch.equal(env[k], v), f"{case}: {k} changed by a call that raised"
