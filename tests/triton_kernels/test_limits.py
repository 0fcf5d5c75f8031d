"""AssocNorm's limits on the Triton backend, through the public module: ``num_groups`` and the
hidden size (``embed_dim``) up to 64 run (the register tiles of heuristics.ASSOC_BLOCKS), larger
ones are refused with a clear error naming both sizes (docs/architecture.md, "Triton backend")."""
from __future__ import annotations

import pytest
import torch
from tk_common import DEVICE

import normfuse


def _run(groups, channels, embed_dim):
    m = normfuse.AssocNorm(groups, channels, embed_dim=embed_dim).to(DEVICE)
    x = torch.randn(2, channels, 3, device=DEVICE, requires_grad=True)
    with normfuse.use_backend("triton"):
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    return m, x, y, grads


def test_assoc_largest_supported_sizes():
    m, x, y, grads = _run(64, 64, 64)
    with normfuse.use_backend("torch"):
        y_ref = m(x)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *m.parameters()])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("groups,embed_dim", [(65, 8), (8, 65)])
def test_assoc_sizes_over_64_are_refused(groups, embed_dim):
    with pytest.raises(RuntimeError, match=r"num_groups and hidden size <= 64, got "
                                           rf"{groups} and {embed_dim}"):
        _run(groups, 2 * groups if groups > 64 else 64, embed_dim)
