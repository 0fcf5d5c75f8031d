"""Portable export: exported programs of standard ATen ops only (README, "Export and
deployment").

Two routes lead there:

* ``torch.export.export(model, args)`` of a model run with the default backend ``"auto"``
  traces the ``"torch"`` backend (``normfuse.backends`` picks it while
  ``torch.compiler.is_exporting()``), so the program holds no normfuse op to begin with;
  ``torch.onnx.export(model, args, dynamo=True)`` works on such a model as it stands.
* A program that does hold normfuse ops (exported under an explicit ``use_backend("cpu")``,
  ``"cuda"`` or ``"triton"``) becomes portable with ``portable(ep)``: every op of the
  ``normfuse`` and ``normfuse_triton`` namespaces is decomposed into the ``"torch"`` backend's
  implementation of it (``normfuse/torch_backend.py``, whose coefficient functions are the
  reference ones of ``normfuse/coefficients/``): the math exists once.

``decompositions()`` is the table behind ``portable``.  It is enough on its own for the ops that
mutate nothing; ``bin_coefficients`` and ``iebn_coefficients`` update the running statistics
and ``num_batches_tracked`` in place, and functionalization wraps such an op in
``auto_functionalized`` before any decomposition table is consulted, so
``ep.run_decompositions(decompositions())`` leaves those two inside the wrapper.  ``portable``
handles them (see ``_decomposing_mutating_ops``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from . import torch_backend

NAMESPACES = ("normfuse", "normfuse_triton")
_OP_NAMES = tuple(torch_backend.__all__)  # the ops every namespace holds
_CIA = torch._C.DispatchKey.CompositeImplicitAutograd


def _load_namespaces() -> None:
    """Register whatever normfuse ops can be registered here (importing registers them; no
    kernel runs and no GPU is needed)."""
    from .backends import _compiled, _triton  # noqa: PLC0415
    with contextlib.suppress(Exception):  # the extension may be missing: its ops are then too
        _compiled()
    _triton()


def _registered_ops():
    """``(OpOverload, name)`` for every normfuse op registered in this process."""
    _load_namespaces()
    for namespace in NAMESPACES:
        ops = getattr(torch.ops, namespace)
        for name in _OP_NAMES:
            try:
                packet = getattr(ops, name)
            except (AttributeError, RuntimeError):  # not registered (e.g. no _C)
                continue
            yield packet.default, name


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """``{op: implementation}`` for every normfuse component op (the ops of ``torch_backend``
    in ``torch.ops.normfuse`` and ``torch.ops.normfuse_triton``, those registered here), each
    mapped to the ``"torch"`` backend's function of the same name and signature.  They are the
    ops an exported program holds: under ``torch.export`` the layers call them, never the
    whole-layer, direction or step ops.

    Use it with ``portable``, which also decomposes the two ops that mutate their arguments;
    merged into a table by hand, ``ep.run_decompositions(table)`` decomposes only the others.
    """
    return {op: getattr(torch_backend, name) for op, name in _registered_ops()}


@contextlib.contextmanager
def _decomposing_mutating_ops(table):
    """Let functionalization decompose the ops of ``table`` that mutate their arguments.

    Functionalization (``FunctionalTensorMode``) decomposes a mutating op only through its
    ``CompositeImplicitAutograd`` kernel (``OpOverload.decompose``) and otherwise wraps it in
    ``auto_functionalized``.  For the duration, each such op gets a Python kernel for that key
    (``py_kernels``: consulted by ``decompose`` and by the Python dispatcher, never by eager
    calls, and the ops' backend kernels take precedence over it there); the in-place updates of
    the decomposition are then functionalized like any other, and the exported program gets
    them as buffer mutations.  ``torch.export`` overrides ``CompositeImplicitAutograd`` the same
    way for the ops it decomposes (``_override_composite_implicit_decomp``).
    """
    patched = {}
    try:
        for op, fn in table.items():
            if not op._schema.is_mutable:
                continue
            patched[op] = dict(op.py_kernels)
            op.py_kernels.pop(_CIA, None)
            op.py_impl(_CIA)(fn)
            op._dispatch_cache.clear()
        yield
    finally:
        for op, kernels in patched.items():
            op.py_kernels.clear()
            op.py_kernels.update(kernels)
            op._dispatch_cache.clear()


def _op_name(target) -> str | None:
    """``"namespace::name"`` of a normfuse op, else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace in NAMESPACES:
        return target.name()
    return None


def normfuse_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """Names of the normfuse ops that ``ep`` still calls (also inside higher-order ops such as
    ``auto_functionalized``, and in nested graphs), sorted; empty for a portable program."""
    found = set()
    for module in ep.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            for target in (node.target, *node.args):
                name = _op_name(target)
                if name is not None:
                    found.add(name)
    return sorted(found)


def portable(ep: torch.export.ExportedProgram,
             decomp_table: dict | None = None) -> torch.export.ExportedProgram:
    """``ep`` with every normfuse op decomposed into standard ATen ops.

    ``decomp_table``: the table for every other op, as in ``ep.run_decompositions``: None (the
    default) decomposes to the Core ATen opset (``torch.export.default_decompositions()``),
    ``{}`` leaves the other ops as they are.  Running statistics and ``num_batches_tracked``
    of a program exported in training mode stay buffer mutations.  Raises ``RuntimeError`` if
    a normfuse op is left (none should be).
    """
    ours = decompositions()
    table = torch.export.default_decompositions() if decomp_table is None else dict(decomp_table)
    table.update(ours)
    with _decomposing_mutating_ops(ours):
        out = ep.run_decompositions(table)
    left = normfuse_ops(out)
    if left:
        raise RuntimeError(f"normfuse.export.portable: the program still calls {left} after "
                           "decomposition")
    return out


__all__ = ["NAMESPACES", "decompositions", "normfuse_ops", "portable"]
