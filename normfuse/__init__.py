"""normfuse: Batch-Instance Normalization, Instance Enhancement Batch Normalization,
Associate Normalization and Instance-Level Meta Normalization at the cost of plain batch norm.

Every layer is, per (sample, channel) plane, one affine map whose coefficients come from the
plane's moments; one pass computes the moments, a small coefficient step turns them into the
map, one pass applies it (docs/architecture.md).
"""
from . import export, functional, info
from .backends import (available_backends, get_backend, resolve_backend, set_backend,
                       use_backend)
from .convert import convert
from .distributed import (SyncBatchInstanceNorm, SyncIEBN, SyncInstanceEnhancementBatchNorm,
                          convert_sync)
from .modules import (IEBN1d, IEBN2d, IEBN3d, AssocNorm, BatchInstanceNorm1d,
                      BatchInstanceNorm2d, BatchInstanceNorm3d, ILMNorm,
                      InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                      InstanceEnhancementBatchNorm3d)
from .training import attach_gate_clipping, clip_gates_, param_groups, update_bn

__version__ = "0.1.0"

__all__ = [
    "AssocNorm", "BatchInstanceNorm1d", "BatchInstanceNorm2d", "BatchInstanceNorm3d",
    "IEBN1d", "IEBN2d", "IEBN3d", "ILMNorm", "InstanceEnhancementBatchNorm1d",
    "InstanceEnhancementBatchNorm2d", "InstanceEnhancementBatchNorm3d",
    "SyncBatchInstanceNorm", "SyncIEBN", "SyncInstanceEnhancementBatchNorm", "convert_sync",
    "attach_gate_clipping", "available_backends", "clip_gates_", "convert", "export",
    "functional", "info",
    "get_backend", "param_groups", "resolve_backend", "set_backend", "update_bn", "use_backend",
]
