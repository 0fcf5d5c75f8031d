"""Synchronized BIN and IEBN: batch statistics over every process of a ``torch.distributed`` group.

``SyncBatchInstanceNorm`` and ``SyncInstanceEnhancementBatchNorm`` are the plain modules
(``normfuse.modules``) whose *batch* statistics, in training, span all processes of a process group,
like ``nn.SyncBatchNorm``; ``convert_sync`` swaps them into a model.  See docs/distributed.md.

How it runs (design section 6): through the plain layers' pipeline (``normfuse._autograd``,
``NormFunction``): the full-size passes (``moments``, ``affine_apply``, ``backward_sums``,
``backward_apply``) are the backend's own ops; only the O(C) batch merge of the coefficient step
(``normfuse.coefficients._merge``, run as its PyTorch-ops reference) is swapped for
``SyncBatchMerge``, whose

* forward all-gathers every rank's per-channel ``(element count, mean, centred sum of squares)``
  and merges them (Chan's formula, same arithmetic on every rank: bit-identical results), and
* ``reduce`` all-reduces the per-channel gradient sums of the batch statistics in the backward.

Instance statistics (the per-sample part of BIN, IEBN's gate) stay local, and so do parameter
gradients (``DistributedDataParallel`` averages them as usual).  Outside a process group, with a
group of one process, or in eval mode, the modules run the plain modules' code unchanged.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from ._autograd import run_layer
from . import functional as F
from .backends import resolve_backend
from .coefficients._merge import BatchMerge
from .modules import (BatchInstanceNorm1d, BatchInstanceNorm2d, BatchInstanceNorm3d,
                      InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                      InstanceEnhancementBatchNorm3d, _BatchInstanceNorm, _fx_leaf,
                      _InstanceEnhancementBatchNorm)

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None

__all__ = ["SyncBatchInstanceNorm", "SyncInstanceEnhancementBatchNorm", "SyncIEBN",
           "SyncBatchMerge", "convert_sync"]

# layer -> its code in the handshake.
_LAYER_CODES = {"bin": 1, "iebn": 2}


def _distributed_ready() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def _all_gather_rows(row: Tensor, group, size: int) -> Tensor:
    """``(size, *row.shape)``: every rank's ``row``, in the group's rank order."""
    table = row.new_empty((size,) + tuple(row.shape))
    dist.all_gather(list(table.unbind(0)), row.contiguous(), group=group)
    return table


class _ElementCount(float):
    """The merged sample count as ``BatchMerge`` reports it: ``elements / plane_size``.

    ``normfuse.coefficients._merge`` only ever uses it as ``count * plane_size`` (the number of
    values per channel); ranks may hold planes of different sizes, so that product is returned
    exactly (an int) instead of through a rounded quotient.
    """

    def __new__(cls, elements: int, plane_size: int):
        # (a rank whose samples have no values has plane_size 0: its quotient is never used)
        self = super().__new__(cls, elements / plane_size if plane_size else 0.0)
        self.elements, self.plane_size = int(elements), int(plane_size)
        return self

    def __mul__(self, other):
        if isinstance(other, int) and other == self.plane_size:
            return self.elements
        return float(self) * other

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"_ElementCount(elements={self.elements}, plane_size={self.plane_size})"


class SyncBatchMerge(BatchMerge):
    """``BatchMerge`` whose merge over samples spans every process of ``group``.

    One object serves one forward/backward pair: the first ``forward`` exchanges the statistics
    (one all-gather of ``2 C + 1`` values per rank); later calls (the backward's recomputation)
    return the same result without communicating.  ``reduce`` is one all-reduce per call.
    Ranks with no samples take part with a count of 0.
    """

    def __init__(self, group, num_channels: int, who: str = "SyncBatchMerge"):
        self.group = group
        self.size = dist.get_world_size(group)
        self.num_channels = int(num_channels)
        self.who = who
        self._result = None
        self._elements = None

    # -- forward ------------------------------------------------------------------------
    def _exchange(self, row: Tensor) -> Tensor:
        return _all_gather_rows(row, self.group, self.size)

    def abort(self, device) -> None:
        """Take part in the exchange with a "failed" marker (a local check raised): the other
        ranks then raise too instead of waiting for this one."""
        row = torch.zeros(2 * self.num_channels + 1, dtype=torch.float64, device=device)
        row[0] = -1
        self._exchange(row)

    def forward(self, mean: Tensor, m2: Tensor, plane_size: int):
        if self._result is None:
            self._result = self._merge(mean, m2, plane_size)
        return self._result

    def _merge(self, mean: Tensor, m2: Tensor, plane_size: int):
        n, c = mean.shape
        if c != self.num_channels:
            raise ValueError(f"{self.who}: expected statistics of {self.num_channels} channels, "
                             f"got {c}")
        # This rank's merge, in float64 so that float32 statistics lose nothing in the exchange.
        row = torch.zeros(2 * c + 1, dtype=torch.float64, device=mean.device)
        if n:
            m = mean.to(torch.float64)
            mu = m.mean(0)
            dev = m - mu
            row[0] = n * plane_size
            row[1:c + 1] = mu
            row[c + 1:] = m2.to(torch.float64).sum(0) + plane_size * (dev * dev).sum(0)
        table = self._exchange(row)
        counts = [round(v) for v in table[:, 0].tolist()]  # one device-to-host copy
        failed = [r for r, v in enumerate(counts) if v < 0]
        if failed:
            raise RuntimeError(
                f"{self.who}: the synchronized batch statistics could not be formed: the input "
                f"checks failed on rank(s) {failed} of the process group (see the error raised "
                f"there)")
        total = sum(counts)
        if total <= 1:
            raise ValueError(
                f"{self.who}: expected more than 1 value per channel when using batch statistics "
                f"(training), got {total} across the {self.size} processes of the process group "
                f"(per-rank values per channel: {counts})")
        # Chan's merge of the per-rank (count, mean, Q), the same float64 ops on every rank.
        weights = table[:, :1]
        means = table[:, 1:c + 1]
        mu = (weights * means).sum(0) / total
        spread = means - mu
        q_total = table[:, c + 1:].sum(0) + (weights * spread * spread).sum(0)
        self._elements = total
        return mu.to(mean.dtype), q_total.to(mean.dtype), _ElementCount(total, plane_size)

    def count(self, mean: Tensor):
        return self._result[2]

    # -- backward -----------------------------------------------------------------------
    def reduce(self, per_channel: Tensor) -> Tensor:
        # float64 on every rank, as the forward exchange: ranks whose inputs differ in dtype
        # (a float64 batch on one, float32 on another) work in different dtypes, and an
        # all_reduce of unequal sizes aborts the process (gloo) or mixes bytes (NCCL)
        summed = per_channel.to(torch.float64, copy=True).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
        return summed.to(per_channel.dtype)

    def backward(self, grad_mu: Tensor, grad_var: Tensor, dev: Tensor, count,
                 plane_size: int) -> tuple[Tensor, Tensor]:
        # mu = sum_r sum_n L m[n] / T and Q = sum q + sum L (m - mu)^2 over all ranks' planes,
        # var = Q / T with T the number of values per channel across every rank.
        total = self._elements
        grad_q = grad_var / total
        grad_mean = grad_mu * (plane_size / total) + (2 * plane_size) * grad_q * dev
        return grad_mean, grad_q.expand_as(dev)


class _SyncMixin:
    """What the synchronized modules add to the plain ones (which come after it in the MRO)."""

    _ranks = (2, 3, 4, 5)  # higher ranks are flattened to (N, C, L) in ``forward``

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.process_group is None else text + ", process_group=<given>"

    def _sync_group(self):
        """The process group to synchronize over, or None to run as the plain module."""
        if not self.training:
            return None  # running statistics (or local batch statistics), like nn.SyncBatchNorm
        who = type(self).__name__
        if not _distributed_ready():
            if self.process_group is not None:
                raise RuntimeError(
                    f"{who}: a process_group was given but torch.distributed is not initialized "
                    f"(was the process group destroyed?); call torch.distributed."
                    f"init_process_group first, or use process_group=None to run unsynchronized")
            world = os.environ.get("WORLD_SIZE", "1").strip()
            if world.isdigit() and int(world) > 1:
                raise RuntimeError(
                    f"{who}: WORLD_SIZE={world} says this process is one of several, but "
                    f"torch.distributed is not initialized, so the batch statistics would not be "
                    f"synchronized; call torch.distributed.init_process_group before training "
                    f"(or use the plain modules for independent training)")
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        if size < 0:
            raise RuntimeError(f"{who}: this process (global rank {dist.get_rank()}) is not a "
                               f"member of the process_group given to the layer")
        return group if size > 1 else None

    def _handshake(self, group, device) -> None:
        """Once per module and group: every rank must hold the same layer with the same number
        of channels (else the exchanged statistics would not line up)."""
        key = (id(group), self.num_features)
        if self.__dict__.get("_sync_checked") == key:
            return
        mine = torch.tensor([_LAYER_CODES[self._layer], self.num_features], dtype=torch.int64,
                            device=device)
        table = _all_gather_rows(mine, group, dist.get_world_size(group)).tolist()
        if any(row != table[0] for row in table):
            names = {code: name for name, code in _LAYER_CODES.items()}
            seen = [f"{names.get(code, '?')}({channels})" for code, channels in table]
            raise RuntimeError(
                f"{type(self).__name__}: the processes of the process group disagree on the "
                f"synchronized layer: layer(num_features) per rank = {seen}; every rank must "
                f"build the same model (same num_features) and call its layers in the same order")
        self.__dict__["_sync_checked"] = key

    def _check_sync_input(self, input, running_mean, running_var, momentum) -> None:
        """The plain layers' training checks but the one-value-per-channel one (a rank's input
        may be empty or hold one value, as the plain layers' and nn.SyncBatchNorm's: the
        exchanged statistics are what must have more)."""
        F.check_batch_layer(type(self).__name__, input, running_mean, running_var,
                            self._named_params(), True, momentum, self.eps, self._counter(),
                            self._ranks, self.num_features, values=False)

    def forward(self, input):
        if isinstance(input, Proxy):  # torch.fx tracing: a leaf, with or without a process group
            return _fx_leaf(self, input)
        # any rank, as nn.SyncBatchNorm (a nested tensor goes on to the checks, which refuse it)
        if isinstance(input, Tensor) and input.dim() > 5 and not input.is_nested:
            flat = input.reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))
            # this forward, not the module's: a norm + act subclass applies its act once, after
            return _SyncMixin.forward(self, flat).reshape(input.shape)
        group = self._sync_group()
        if group is None:
            return super().forward(input)  # the plain module, unchanged
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # a trace / export records ops, not the collectives' meaning: it would hold the
            # local batch statistics (checked before any collective: no rank waits on this one)
            raise RuntimeError(
                f"{type(self).__name__}: torch.jit.trace / torch.export of a layer that "
                f"synchronizes (training in a process group) would record local batch "
                f"statistics; trace or export it in eval mode, or the plain layer "
                f"(convert_sync's inverse: normfuse.convert(model, ...) of the original model)")
        device = next(self.parameters()).device
        self._handshake(group, device)
        merge = SyncBatchMerge(group, self.num_features, type(self).__name__)
        running_mean, running_var, _, momentum = self._batch_arguments()
        try:
            self._check_sync_input(input, running_mean, running_var, momentum)
            factor = self._factor()  # (momentum=None reads the counter: after its check)
            resolve_backend(input)  # a requested backend that cannot run raises here, on time
        except Exception:
            merge.abort(device)
            raise
        params = tuple(tensor for _, tensor, _ in self._named_params())
        # The plain layers' pipeline (normfuse/_autograd.py, NormFunction) with this merge.
        return run_layer(self._layer, input, running_mean, running_var, True, factor, self.eps,
                         0, params, self._counter(), self._relu(), merge)


class SyncBatchInstanceNorm(_SyncMixin, _BatchInstanceNorm):
    """Batch-Instance Normalization whose batch statistics span a process group in training.

    Same arguments, parameters (``weight``, ``bias``, ``gate``), buffers and state dict as
    ``normfuse.BatchInstanceNorm2d``, plus ``process_group`` (default: the whole world);
    input ``(N, C, *)`` of any rank >= 2, like ``nn.SyncBatchNorm``.  Batch statistics are merged
    across the group (ranks may hold different batch sizes, zero included); the instance part
    stays per sample.  Outside a process group, with one process, or in eval mode it is exactly
    the plain module.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None,
                 *, bias: bool = True, activation: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation)
        self.process_group = process_group


class SyncInstanceEnhancementBatchNorm(_SyncMixin, _InstanceEnhancementBatchNorm):
    """Instance Enhancement Batch Normalization whose batch statistics span a process group in
    training.

    Same arguments, parameters (``weight``, ``bias``, ``gate_weight``, ``gate_bias``), buffers
    and state dict as ``normfuse.InstanceEnhancementBatchNorm2d``, plus ``process_group``;
    input ``(N, C, *)`` of any rank >= 2.  The gate ``sigmoid(mean_hw(x) * gate_weight +
    gate_bias)`` stays per sample.  Outside a process group, with one process, or in eval mode
    it is exactly the plain module.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None,
                 *, affine: bool = True, bias: bool = True, activation: str | None = None):
        super().__init__(num_features, eps, momentum, track_running_stats, device, dtype,
                         affine=affine, bias=bias, activation=activation)
        self.process_group = process_group


SyncIEBN = SyncInstanceEnhancementBatchNorm
# The classes convert_sync replaces (their norm + act layers too: normfuse.norm_act.SYNC_OF).
_PLAIN_LAYERS = (BatchInstanceNorm1d, BatchInstanceNorm2d, BatchInstanceNorm3d,
                 InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                 InstanceEnhancementBatchNorm3d)


def _to_sync(module: nn.Module, process_group, skipped: list, path: str):
    """The synchronized replacement of ``module``, or None (not a layer convert_sync takes:
    an already synchronized one gets ``process_group``, as nn.SyncBatchNorm's conversion gives
    its own; a subclass of a plain layer, which may compute something else, goes to
    ``skipped``)."""
    if isinstance(module, _SyncMixin):
        module.process_group = process_group  # (its handshake is per group: it runs again)
        return None
    from .norm_act import SYNC_OF  # noqa: PLC0415  (norm_act builds on this module)
    # A norm + act module (normfuse.norm_act, or a subclass) keeps its drop and act modules.
    act_cls = next((SYNC_OF[c] for c in type(module).__mro__ if c in SYNC_OF), None)
    post = {} if act_cls is None else {"drop": module.drop, "act": module.act}
    if (act_cls is None and type(module) not in _PLAIN_LAYERS
            and isinstance(module, (_BatchInstanceNorm, _InstanceEnhancementBatchNorm))):
        skipped.append(f"{path or 'the module itself'} ({type(module).__name__})")
        return None
    if isinstance(module, _BatchInstanceNorm):
        new = (act_cls or SyncBatchInstanceNorm)(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group, device="meta",
            activation=module.activation, **post)
    elif isinstance(module, _InstanceEnhancementBatchNorm):
        new = (act_cls or SyncInstanceEnhancementBatchNorm)(
            module.num_features, module.eps, module.momentum, module.track_running_stats,
            process_group, device="meta", affine=module.affine, activation=module.activation,
            **post)
    else:
        return None
    # The very same Parameter and buffer objects (optimizers keep working), as
    # nn.SyncBatchNorm.convert_sync_batchnorm does; device and dtype come with them.
    for name, _ in list(new.named_parameters(recurse=False)):
        setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = module._buffers.get(name)
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every normfuse BIN and IEBN layer (1d/2d/3d) in ``module`` by its synchronized
    version, in place, and return ``module`` (or the converted layer if ``module`` is one).

    The new layers share the old ones' parameters and buffers (so an optimizer built before
    the conversion keeps working), device, dtype and train/eval mode; ``process_group``
    (default: the whole world) is what their batch statistics span.  A norm + act module
    (``BatchInstanceNormAct2d``, ``InstanceEnhancementBatchNormAct2d``: converted timm layers)
    becomes ``SyncBatchInstanceNormAct`` / ``SyncInstanceEnhancementBatchNormAct`` with the
    same ``drop`` and ``act``.  AssocNorm has no batch statistics and is left as it is.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync: module must be an nn.Module, got "
                        f"{type(module).__name__}")
    skipped = []
    new = _to_sync(module, process_group, skipped, "")
    if new is None:
        _convert_children_sync(module, process_group, {}, skipped, "")
    if skipped:
        warnings.warn(f"convert_sync left {len(skipped)} normalization layer(s) as they are: "
                      f"{', '.join(skipped)}. convert_sync takes normfuse's BIN and IEBN "
                      "classes (exactly these) and their norm + act layers: a subclass may "
                      "compute something else, which the synchronized layer would silently "
                      "drop.", stacklevel=2)
    return module if new is None else new


def _convert_children_sync(module: nn.Module, process_group, memo: dict, skipped: list,
                           prefix: str) -> None:
    # ``_modules``, not ``named_children()`` (which skips a module's second name within one
    # parent); ``memo`` (id -> replacement or None) gives a layer registered at several places
    # one synchronized replacement, installed at each, so it stays one module.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if id(child) not in memo:
            memo[id(child)] = _to_sync(child, process_group, skipped, path)
            if memo[id(child)] is None:
                _convert_children_sync(child, process_group, memo, skipped, path)
        if memo[id(child)] is not None:
            setattr(module, name, memo[id(child)])
