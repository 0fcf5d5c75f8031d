"""``torch.library.opcheck`` of every ``normfuse_triton`` op.

On a GPU all of opcheck's tests run.  In the CPU interpreter only the schema and autograd
registration tests can: the fake-tensor and AOT tests run the op on fake (meta) tensors, and the
interpreter's kernels need real storage.  The schema test is the one that catches a mutation
the schema does not declare (running statistics, num_batches_tracked), on every torch version
CI runs (.ci/lowest_torch.sh).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from tk_common import DEVICE, HAS_CUDA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
from test_coefficients_cases import make_inputs, op_args, op_name, opcheck_cases  # noqa: E402

UTILS = None if HAS_CUDA else ("test_schema", "test_autograd_registration")
OPS = torch.ops.normfuse_triton


def _opcheck(name, args):
    import normfuse.triton_kernels  # noqa: F401  (registers the ops)
    kwargs = {} if UTILS is None else {"test_utils": UTILS}
    torch.library.opcheck(getattr(OPS, name).default, tuple(args), **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_streaming_ops(channels_last):
    g = torch.Generator().manual_seed(5)
    x, dy = (torch.randn(2, 3, 5, 4, generator=g).to(DEVICE) for _ in range(2))
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    mean, a, b, c = (torch.randn(2, 3, generator=g).to(DEVICE) for _ in range(4))
    _opcheck("moments", (x,))
    _opcheck("affine_apply", (x, mean, a, b))
    _opcheck("backward_sums", (dy, x, mean))
    _opcheck("backward_apply", (dy, x, mean, a, b, c))
    # the fused ReLU: relu=True and the backward ops' mask (scale, shift)
    _opcheck("affine_apply", (x, mean, a, b, True))
    _opcheck("backward_sums", (dy, x, mean, a, b))
    _opcheck("backward_apply", (dy, x, mean, a, b, c, a, b))


@pytest.mark.parametrize("op,shape,mode", list(opcheck_cases()))
def test_coefficient_ops(op, shape, mode):
    N, C, L, G, M = shape
    t = make_inputs(op, N, C, L, G, M, seed=11, dtype=torch.float32)
    _opcheck(op_name(op), op_args(op, {k: v.float().to(DEVICE) for k, v in t.items()}, L, G, *mode))


@pytest.mark.parametrize("op", ["bin", "iebn"])
@pytest.mark.parametrize("training", [True, False])
def test_forwards_with_batch_counter(op, training):
    t = make_inputs(op, 3, 4, 5, seed=11, dtype=torch.float32)
    args = op_args(op, {k: v.float().to(DEVICE) for k, v in t.items()}, 5, 1, training, True, True)
    _opcheck(op_name(op), (*args, torch.tensor(7, device=DEVICE)))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_ilm_coefficient_ops(backward):
    """ILM-Norm's ops on key groups straddling groups (the shared C++ cases,
    tests/csrc/test_coefficients_cases.py, build theirs for the C++ ops)."""
    g = torch.Generator().manual_seed(13)
    n, c, L, G, K, E = 3, 12, 3, 4, 3, 2

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)
    args = (r(n, c) + 1, r(n, c).abs() * L + 0.1, L, G, r(E, K), r(K, E), r(K, E), r(c) + 1,
            r(c), 1e-5)
    if backward:
        args = (r(n, c), r(n, c), *args)
    _opcheck("ilm_coefficients_backward" if backward else "ilm_coefficients", args)
