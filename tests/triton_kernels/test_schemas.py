"""The Triton ops' schemas equal the C++ ops' ones (docs/architecture.md), and they register on
every supported torch.

The two are typed in two places (C++ schema strings in csrc/ops.cpp, Python annotations in
normfuse/triton_kernels/streaming_ops.py and coefficient_ops.py, from which torch infers the schema), so they are compared here:
argument names, order, types, defaults and which arguments are written; return count and types.
``int`` arguments are inferred as ``SymInt`` from annotations, and inferred returns carry no names
nor do inferred alias sets carry the C++ letters: both are normalised away.
"""
from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse import _extension
from normfuse.torch_backend import __all__ as OP_NAMES


def _normalised(schema):
    args = [(a.name, str(a.type).replace("SymInt", "int"), a.default_value,
             bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    returns = [str(r.type) for r in schema.returns]
    return args, returns


@pytest.mark.skipif(not _extension.HAS_CPU_KERNELS, reason="normfuse._C was not built")
@pytest.mark.parametrize("name", OP_NAMES)
def test_triton_schema_matches_cpp(name):
    import normfuse.triton_kernels  # noqa: F401  (registers normfuse_triton::*)
    cpp = getattr(torch.ops.normfuse, name).default._schema
    tri = getattr(torch.ops.normfuse_triton, name).default._schema
    assert _normalised(tri) == _normalised(cpp), f"\ntriton: {tri}\nC++:    {cpp}"


def test_triton_registers():
    """The regression of the first GPU run: on torch 2.11 the ops failed to register (schema
    inference without annotations), and 'triton' silently left available_backends()."""
    import normfuse.triton_kernels  # noqa: F401  (raises if registration fails)
    assert "triton" in normfuse.available_backends()
