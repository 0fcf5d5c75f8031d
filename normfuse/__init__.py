"""normfuse: Batch-Instance Normalization, Instance Enhancement Batch Normalization,
Associate Normalization and Instance-Level Meta Normalization at the cost of plain batch norm.

Every layer is, per (sample, channel) plane, one affine map whose coefficients come from the
plane's moments; one pass computes the moments, a small coefficient step turns them into the
map, one pass applies it (docs/architecture.md).
"""
from . import _extension  # noqa: F401  (see below)
from . import export, functional, info
from ._autograd import _fused_ops
from .backends import (available_backends, get_backend, resolve_backend, set_backend,
                       use_backend)
from .convert import convert
from .distributed import (SyncBatchInstanceNorm, SyncIEBN, SyncInstanceEnhancementBatchNorm,
                          convert_sync)
from .modules import (IEBN1d, IEBN2d, IEBN3d, AssocNorm, BatchInstanceNorm1d,
                      BatchInstanceNorm2d, BatchInstanceNorm3d, ILMNorm,
                      InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                      InstanceEnhancementBatchNorm3d)
from .norm_act import (AssocNormAct, BatchInstanceNormAct2d, ILMNormAct,
                       InstanceEnhancementBatchNormAct2d, SyncBatchInstanceNormAct,
                       SyncInstanceEnhancementBatchNormAct)
from .training import attach_gate_clipping, clip_gates_, param_groups, update_bn

__version__ = "0.1.0"

# The compiled ops (torch.ops.normfuse.*, and the op the whole-layer ops' double backward calls)
# register with the dispatcher at import, not at the first layer call: a saved program or trace
# that calls them (torch.export.load, torch.jit.load, an AOTInductor package) then loads after
# `import normfuse`.  ~35 ms; the Triton ops (normfuse_triton.*) register when
# normfuse.triton_kernels is imported (Triton itself takes seconds to import).
_fused_ops()

__all__ = [
    "AssocNorm", "AssocNormAct", "BatchInstanceNorm1d", "BatchInstanceNorm2d",
    "BatchInstanceNorm3d", "BatchInstanceNormAct2d", "IEBN1d", "IEBN2d", "IEBN3d", "ILMNorm",
    "ILMNormAct", "InstanceEnhancementBatchNorm1d", "InstanceEnhancementBatchNorm2d",
    "InstanceEnhancementBatchNorm3d", "InstanceEnhancementBatchNormAct2d",
    "SyncBatchInstanceNorm", "SyncBatchInstanceNormAct", "SyncIEBN",
    "SyncInstanceEnhancementBatchNorm", "SyncInstanceEnhancementBatchNormAct", "convert_sync",
    "attach_gate_clipping", "available_backends", "clip_gates_", "convert", "export",
    "functional", "info",
    "get_backend", "param_groups", "resolve_backend", "set_backend", "update_bn", "use_backend",
]
