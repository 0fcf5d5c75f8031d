"""Triton backend of normfuse: ``torch.ops.normfuse_triton.*`` (docs/architecture.md).

Importing this package registers the twelve ops, ILM-Norm's two coefficient ops included (no GPU
needed); the kernels themselves are imported on the first call (``ops.kernels()``), compiled for
CUDA tensors or interpreted for CPU tensors when ``TRITON_INTERPRET=1`` was set before that.
Files:

* ``moments.py``, ``backward.py`` (backward_sums), ``apply.py`` (affine_apply, backward_apply):
  the generic full-size passes, contiguous and channels-last;
* ``coefficients_{bin,iebn,assoc,ilm}.py``: one fused coefficient kernel per layer and
  direction;
* ``heuristics.py``: every launch choice, and the enumeration of all of them;
* ``ops.py``: registers the twelve ops: ``streaming_ops.py`` and ``coefficient_ops.py`` (validation,
  allocation, one launch each) over ``runtime.py`` (lazy kernel import, checks, counters, grids);
  ``aot.py``: compile every configuration for sm_80/sm_90 without a GPU and report registers,
  spills and 128-bit loads.
"""
from . import heuristics, ops
from .ops import NAMESPACE, interpreted, kernels

__all__ = ["NAMESPACE", "heuristics", "interpreted", "kernels", "ops"]
