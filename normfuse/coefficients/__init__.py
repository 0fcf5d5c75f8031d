"""Per-layer coefficient functions ``(mean, m2, params) -> (scale, shift)`` and their backward,
in PyTorch ops.  They are the "torch" backend's coefficient step and the reference that the C++,
CUDA and Triton coefficient kernels are tested against (docs/architecture.md)."""
from .assoc import assoc_coefficients, assoc_coefficients_backward
from .bin import bin_coefficients, bin_coefficients_backward
from .iebn import iebn_coefficients, iebn_coefficients_backward
from .ilm import ilm_coefficients, ilm_coefficients_backward

__all__ = [
    "assoc_coefficients", "assoc_coefficients_backward",
    "bin_coefficients", "bin_coefficients_backward",
    "iebn_coefficients", "iebn_coefficients_backward",
    "ilm_coefficients", "ilm_coefficients_backward",
]
