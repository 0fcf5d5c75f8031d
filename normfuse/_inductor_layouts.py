"""Layout constraints for ``torch.compile`` (Inductor) on the four generic ops' full-size tensors.

Inductor lays convolutions out channels-last even in a contiguous model. A custom op's default
layout constraint (the strides it was traced with) then converts each normfuse layer's input back
to contiguous, once per op, and the gradient again in the backward: a compiled contiguous ResNet-20
step paid 1.05-1.08x the compiled BatchNorm step for it (docs/performance.md, "A compiled model's
step"). The ops take either dense layout, so their constraint here is:

* ``input``: kept where it already is dense contiguous or channels-last (a convolution's output),
  anything else (a buffer whose layout Inductor has not fixed, a strided view, strides Inductor
  padded for alignment) made contiguous, as the traced strides would;
* ``grad_output``: given exactly the input's strides (the backward ops take one layout for both);
* every other tensor (statistics, coefficients; (N, C)): contiguous.

Inductor's own API for this is private (``torch._inductor.lowering.make_fallback`` with a
``layout_constraint``, ``ir.ExternKernel.require_exact_strides``; the same in torch 2.11 and 2.14).
``ensure()`` registers it from the ops' fake implementations, which run in the compile that will
lower them, once Inductor is loaded (never loading it itself: importing it costs ~1.5 s); where that
API is missing or differs, nothing is registered and the default constraint applies, as before.
"""
from __future__ import annotations

import sys

import torch

# op name -> index of its input (the tensor whose layout decides); the backward ops' grad_output
# is argument 0
OPS = {"moments": 0, "affine_apply": 0, "backward_sums": 1, "backward_apply": 1}
_state = {"done": False, "error": None}


def ensure() -> None:
    """Register the constraints if Inductor is loaded and they are not registered yet."""
    if _state["done"] or "torch._inductor.lowering" not in sys.modules:
        return
    _state["done"] = True
    try:
        _register()
    except Exception as exc:  # (private API: a torch where it differs keeps the default constraint)
        _state["error"] = f"{type(exc).__name__}: {exc}"


def registered() -> bool:
    """Whether the constraints are registered in this process (tests, docs)."""
    return _state["done"] and _state["error"] is None


def _register() -> None:
    from torch._inductor import ir, lowering  # noqa: PLC0415
    from torch._inductor.virtualized import V  # noqa: PLC0415
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    def same(a, b) -> bool:
        return V.graph.sizevars.statically_known_equals(a, b)

    def channels_last_strides(size):
        strides, step = [0] * len(size), 1
        for d in [1, *range(len(size) - 1, 1, -1), 0]:  # C innermost, then the spatial dims, N
            strides[d] = step
            step = step * size[d]
        return strides

    def is_channels_last_dense(x) -> bool:
        if not ir.is_storage_and_layout(x) or isinstance(x.get_layout(), ir.FlexibleLayout):
            return False
        size, stride = x.get_size(), x.get_stride()
        want = channels_last_strides(size)
        return len(size) >= 3 and all(same(n, 1) or same(s, w) for n, s, w in zip(size, stride, want))

    def dense_input(x):
        if is_channels_last_dense(x):
            return x
        return ir.ExternKernel.require_exact_strides(x, ir.FlexibleLayout.contiguous_strides(x.get_size()))

    def contiguous(t):
        return ir.ExternKernel.require_contiguous(t)

    def constraint(input_index):
        def constrain(fx_node, *args, **kwargs):
            x = dense_input(args[input_index])
            # grad_output (the backward ops' argument 0): the input's strides exactly
            head = [ir.ExternKernel.require_exact_strides(args[0], x.get_stride())] if input_index else []
            rest = [contiguous(a) if isinstance(a, ir.IRNode) else a for a in args[input_index + 1:]]
            return (*head, x, *rest), pytree.tree_map_only(ir.IRNode, contiguous, kwargs)
        return constrain

    for name, input_index in OPS.items():
        lowering.make_fallback(getattr(torch.ops.normfuse, name).default,
                               layout_constraint=constraint(input_index), warn=False)
