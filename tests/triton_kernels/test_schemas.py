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


# The ILM-Norm coefficient ops (docs/architecture.md, "ILM-Norm"): the contract both namespaces
# implement.  The Triton ops and the C++ ones were written on separate branches, so the Triton
# ones are checked against this text too, and against the C++ build where it has them.
ILM_CONTRACT = {
    "ilm_coefficients":
        "ilm_coefficients(Tensor mean, Tensor m2, SymInt plane_size, int num_groups, "
        "Tensor encoder, Tensor decoder_weight, Tensor decoder_bias, Tensor weight, "
        "Tensor bias, float eps) -> (Tensor scale, Tensor shift)",
    "ilm_coefficients_backward":
        "ilm_coefficients_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor mean, Tensor m2, "
        "SymInt plane_size, int num_groups, Tensor encoder, Tensor decoder_weight, "
        "Tensor decoder_bias, Tensor weight, Tensor bias, float eps) -> (Tensor c_dy, "
        "Tensor c_x, Tensor c_0, Tensor grad_encoder, Tensor grad_decoder_weight, "
        "Tensor grad_decoder_bias, Tensor grad_weight, Tensor grad_bias)",
}
NAMES = list(OP_NAMES) + [n for n in ILM_CONTRACT if n not in OP_NAMES]


@pytest.mark.skipif(not _extension.HAS_CPU_KERNELS, reason="normfuse._C was not built")
@pytest.mark.parametrize("name", NAMES)
def test_triton_schema_matches_cpp(name):
    import normfuse.triton_kernels  # noqa: F401  (registers normfuse_triton::*)
    try:
        cpp = getattr(torch.ops.normfuse, name).default._schema
    except (AttributeError, RuntimeError):
        if name not in ILM_CONTRACT:
            raise
        pytest.skip(f"this normfuse._C build has no {name} (test_ilm_schema_is_the_contract "
                    f"checks the Triton op)")
    tri = getattr(torch.ops.normfuse_triton, name).default._schema
    assert _normalised(tri) == _normalised(cpp), f"\ntriton: {tri}\nC++:    {cpp}"


@pytest.mark.parametrize("name", ILM_CONTRACT)
def test_ilm_schema_is_the_contract(name):
    import normfuse.triton_kernels  # noqa: F401  (registers normfuse_triton::*)
    tri = getattr(torch.ops.normfuse_triton, name).default._schema
    want = torch._C.parse_schema(f"normfuse_triton::{ILM_CONTRACT[name]}")
    assert _normalised(tri) == _normalised(want), f"\ntriton:   {tri}\ncontract: {want}"


def test_triton_registers():
    """The regression of the first GPU run: on torch 2.11 the ops failed to register (schema
    inference without annotations), and 'triton' silently left available_backends()."""
    import normfuse.triton_kernels  # noqa: F401  (raises if registration fails)
    assert "triton" in normfuse.available_backends()
