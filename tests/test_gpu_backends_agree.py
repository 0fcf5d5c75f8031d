"""On a GPU: the triton backend agrees with the cuda backend (two independent implementations
of the same kernels) for every layer, dtype and layout, in training and eval; both are checked
against the float64 oracles elsewhere (test_modules.py and friends, backend-parametrized).
Skipped unless both backends can run."""
from __future__ import annotations

import copy

import pytest
import torch
from oracles import make_input, randn, randomize_parameters, to_layout

import normfuse

pytestmark = pytest.mark.skipif(
    not all(b in normfuse.available_backends() for b in ("cuda", "triton"))
    or not torch.cuda.is_available(), reason="needs a GPU with the cuda and triton backends")

TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _layer(kind, c):
    if kind == "bin":
        return normfuse.BatchInstanceNorm2d(c)
    if kind == "iebn":
        return normfuse.IEBN2d(c)
    return normfuse.AssocNorm(8, c)


def _step(module, backend, x, dy):
    leaf = x.detach().clone().requires_grad_()
    with normfuse.use_backend(backend):
        y = module(leaf)
        grads = torch.autograd.grad(y, [leaf, *module.parameters()], dy)
    return [y, *grads, *(b for b in module.buffers() if b.is_floating_point())]


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 64, 14, 14), (3, 40, 7, 9)], ids=str)
def test_triton_matches_cuda(kind, dtype, layout, training, shape, seed):
    base = randomize_parameters(_layer(kind, shape[1]), seed).cuda().train(training)
    x = to_layout(make_input(shape, seed, dtype, "cuda"), layout)
    dy = to_layout(randn(shape, seed + 1, dtype, "cuda"), layout)
    a = _step(copy.deepcopy(base), "cuda", x, dy)
    b = _step(copy.deepcopy(base), "triton", x, dy)
    rtol, atol = TOL[dtype]
    for i, (u, v) in enumerate(zip(a, b)):
        scale = max(1.0, float(u.detach().abs().max()))
        torch.testing.assert_close(v.float(), u.float(), rtol=rtol, atol=atol * scale, msg=f"output {i}")
