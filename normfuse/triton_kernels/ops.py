"""``torch.ops.normfuse_triton.*``: the twelve ops of docs/architecture.md as ``triton_op``s, and
ILM-Norm's two coefficient ops (docs/architecture.md, "ILM-Norm").

Importing this module registers them (no GPU needed): ``streaming_ops.py`` (the four full-size
passes) and ``coefficient_ops.py`` (the eight per-layer coefficient steps), over what they share in
``runtime.py`` (lazy kernel import, checks, counters, grids).  The kernel modules are imported at
the first call, so ``TRITON_INTERPRET`` only has to be set before then.

Schemas are inferred from the functions' type annotations (no ``schema=`` string): torch 2.11
ignores ``triton_op(..., schema=...)`` and infers anyway, so the annotations are the one source
on every supported torch.  They match the C++ ops' schemas in docs/architecture.md
(``int`` is inferred as ``SymInt``; tests/triton_kernels/test_schemas.py checks the rest).
"""
from __future__ import annotations

from .coefficient_ops import (assoc_coefficients, assoc_coefficients_backward,
                              bin_coefficients, bin_coefficients_backward, iebn_coefficients,
                              iebn_coefficients_backward, ilm_coefficients,
                              ilm_coefficients_backward)
from .runtime import NAMESPACE, interpreted, kernels
from .streaming_ops import affine_apply, backward_apply, backward_sums, moments

__all__ = ["NAMESPACE", "affine_apply", "assoc_coefficients", "assoc_coefficients_backward",
           "backward_apply", "backward_sums", "bin_coefficients", "bin_coefficients_backward",
           "iebn_coefficients", "iebn_coefficients_backward", "ilm_coefficients",
           "ilm_coefficients_backward", "interpreted", "kernels", "moments"]
