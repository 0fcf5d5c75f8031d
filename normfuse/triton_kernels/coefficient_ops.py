"""The per-layer coefficient steps as ``triton_op``s: ``torch.ops.normfuse_triton.
{bin,iebn,assoc,ilm}_coefficients[_backward]`` (docs/architecture.md), each one launch of its fused
kernel over O(N*C) statistics.  Schemas are inferred from the annotations (see ops.py)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .._checks import check_op_batch_counter, running_update_conflict
from . import heuristics
from . import runtime as rt
from .runtime import (NAMESPACE, OptTensor, check_device, check_tensor, kernels, launcher,
                      stats_tensor)

# Every refusal of these ops starts with ``normfuse_triton.<op>:`` (``who`` below), as the C++
# ops' messages start with ``normfuse.<op>:``: an error then says which op refused what.


def _who(op: str) -> str:
    return f"{NAMESPACE}.{op}"


def _moment_pair(mean: Tensor, m2: Tensor, plane_size: int, who: str):
    rt.require_tensor(mean, "mean", who)
    if plane_size < 1:  # as the C++ ops: a count of 0 or less gives NaN or garbage, no error
        raise RuntimeError(f"{who}: plane_size must be >= 1, got {plane_size}")
    if mean.dim() != 2 or mean.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{who}: mean must be (N, C) float32/float64, got "
                           f"{tuple(mean.shape)} {mean.dtype}")
    check_device(mean, "mean", who)
    if not rt.int32_indexable(*mean.shape, plane=1, channels_last=False):  # (n, c) in int32
        raise RuntimeError(f"{who}: mean of shape {tuple(mean.shape)} is past the "
                           f"Triton kernels' 32-bit indexing (N*C < 2**31); use the cuda or "
                           f"torch backend")
    return _require_contiguous(mean, "mean", who), _statistic(m2, mean, "m2", who)


def _require_contiguous(t: Tensor, what: str, who: str) -> Tensor:
    """``t``, (N, C) statistics, refused unless contiguous, as the C++ ops refuse them (the op
    contract, docs/architecture.md "Tensors"; the layers pass them so), rather than copied."""
    if not t.is_contiguous():
        raise RuntimeError(f"{who}: {what} must be contiguous ((N, C) statistics), got strides "
                           f"{t.stride()} for shape {tuple(t.shape)}")
    return t


def _statistic(t, mean: Tensor, what: str, who: str) -> Tensor:
    """``m2``, ``sum_dy`` or ``sum_dy_xmu``: the shape, dtype and device of ``mean``, contiguous."""
    check_tensor(t, mean.shape, mean.dtype, what, mean.device, who)
    return _require_contiguous(t, what, who)


def _param(t, mean: Tensor, what: str, who: str, optional: bool = True):
    """A parameter: None (where ``optional``), or a (C,) tensor of the statistics' dtype on their
    device (exactly (C,), as the C++ ops: a (2, C/2) or (C, 1) tensor is refused, not
    flattened)."""
    c = mean.shape[1]
    if t is None and optional:
        return None
    return stats_tensor(t, (c,), mean.dtype, what, mean.device, who)


def _coeff_meta(n: int):
    cfg = heuristics.coeff_config(n)
    return dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps), cfg


def _running(running_mean, running_var, mean: Tensor, who: str, written: bool = False,
             read=()):
    """Contiguous running statistics for the kernels (strided ones are copied, see
    ``_write_back``).  ``written`` (a training forward): they are updated in place, so they
    must not overlap themselves (an expanded tensor: the write-back would fail after the
    kernel ran, with the other statistic and the counter already updated), each other, or any
    tensor of ``read`` ((name, tensor) pairs the kernel reads), as the C++ ops check."""
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{who}: give both running_mean and running_var, or neither")
    if running_mean is None:
        return None, None
    c, dtype, device = mean.shape[1], mean.dtype, mean.device
    for t, what in ((running_mean, "running_mean"), (running_var, "running_var")):
        rt.require_tensor(t, what, who)
        if tuple(t.shape) != (c,) or t.dtype != dtype:
            raise RuntimeError(f"{who}: {what} must be a ({c},) {dtype} tensor, got "
                               f"{tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{who}: {what} is on {t.device}, expected {device}")
    if written and not rt.tracing(running_mean):  # (fake tensors have no data pointers)
        why = running_update_conflict(running_mean, running_var, read,
                                      share_advice="; pass separate tensors")
        if why is not None:
            raise RuntimeError(f"{who}: {why}")
    return running_mean.contiguous(), running_var.contiguous()


def _batch_counter(num_batches_tracked, mean: Tensor, training: bool, op: str, running):
    """``(pointer tensor, count)`` for the forward kernels' ``nbt_ptr`` / ``count``: the given
    ``num_batches_tracked`` (a 0-dim or 1-element int64 tensor on the statistics' device,
    checked before anything runs), or an unused int64 scalar (an allocation, not a launch) so
    that the kernel is compiled for one pointer type."""
    if num_batches_tracked is None:
        return torch.empty((), dtype=torch.int64, device=mean.device), 0
    check_op_batch_counter(num_batches_tracked, mean, op, NAMESPACE, running, bool(training))
    return num_batches_tracked, int(bool(training))


def _write_back(updated: bool, pairs) -> None:
    """Copy updated running statistics back where the kernel worked on a contiguous copy."""
    for original, used in pairs:
        if updated and original is not None and used is not original:
            original.copy_(used)


_MUTATED = ("running_mean", "running_var", "num_batches_tracked")


def _batch_forward(kernel, op: str, mean, m2, plane_size, gates, weight, bias, running_mean,
                   running_var, training, momentum, eps, num_batches_tracked):
    """BIN / IEBN forward; ``gates`` are the layer's per-channel gate parameters as (name,
    tensor) pairs (BIN: gate; IEBN: gate_weight, gate_bias), passed to the kernel in order."""
    who = _who(op)
    read = [("mean", mean), ("m2", m2), *gates, ("weight", weight), ("bias", bias)]
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    gates = [_param(t, mean, name, who, optional=False) for name, t in gates]
    weight, bias = _param(weight, mean, "weight", who), _param(bias, mean, "bias", who)
    rm, rv = _running(running_mean, running_var, mean, who, written=bool(training), read=read)
    nbt, count = _batch_counter(num_batches_tracked, mean, training, op,
                                (("running_mean", running_mean), ("running_var", running_var)))
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n * c == 0:
        if count:  # no kernel to count in (only direct op calls get here; layers refuse)
            nbt.add_(1)
        return scale, shift
    meta, cfg = _coeff_meta(n)
    use_batch = training or rm is None
    update = training and rm is not None
    traced = rt.tracing(mean)
    launcher(kernel, mean)[(rt.cdiv(c, cfg.block_c),)](  # absent tensors: never read or written
        mean, m2, *gates, rt.absent(gates[0], traced) if weight is None else weight,
        rt.absent(gates[0], traced) if bias is None else bias,
        rt.absent(scale, traced) if rm is None else rm,
        rt.absent(shift, traced) if rv is None else rv, scale, shift, nbt,
        n, c, plane_size, momentum, eps, int(weight is not None), int(bias is not None),
        int(use_batch), int(update), count, **meta)
    _write_back(update, ((running_mean, rm), (running_var, rv)))
    return scale, shift


def _batch_backward(kernel, op: str, sum_dy, sum_dy_xmu, mean, m2, plane_size, gates, weight,
                    bias, running_mean, running_var, training, eps):
    """BIN / IEBN backward: (c_dy, c_x, c_0, one gradient per gate, grad_weight, grad_bias).
    ``bias`` is not read (the gradients do not depend on it) but checked, as the C++ ops do."""
    who = _who(op)
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    g1 = _statistic(sum_dy, mean, "sum_dy", who)
    g2 = _statistic(sum_dy_xmu, mean, "sum_dy_xmu", who)
    gates = [_param(t, mean, name, who, optional=False) for name, t in gates]
    weight = _param(weight, mean, "weight", who)
    _param(bias, mean, "bias", who)
    running_mean, running_var = _running(running_mean, running_var, mean, who)
    c_dy, c_x, c_0 = (torch.empty_like(mean) for _ in range(3))
    grads = [mean.new_empty(c) for _ in range(len(gates) + 2)]
    if n * c == 0:
        return (c_dy, c_x, c_0, *(g.zero_() for g in grads))
    meta, cfg = _coeff_meta(n)
    use_batch = training or running_mean is None
    traced = rt.tracing(mean)
    launcher(kernel, mean)[(rt.cdiv(c, cfg.block_c),)](
        g1, g2, mean, m2, *gates, rt.absent(gates[0], traced) if weight is None else weight,
        rt.absent(mean, traced) if running_mean is None else running_mean,
        rt.absent(m2, traced) if running_var is None else running_var,
        c_dy, c_x, c_0, *grads, n, c, plane_size, eps, int(weight is not None), int(use_batch),
        **meta)
    return (c_dy, c_x, c_0, *grads)


@triton_op(f"{NAMESPACE}::bin_coefficients", mutates_args=_MUTATED)
def bin_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate: Tensor, weight: OptTensor,
                     bias: OptTensor, running_mean: OptTensor, running_var: OptTensor,
                     training: bool, momentum: float, eps: float,
                     num_batches_tracked: OptTensor = None) -> tuple[Tensor, Tensor]:
    return _batch_forward(kernels().bin_forward, "bin_coefficients", mean, m2, plane_size,
                          [("gate", gate)], weight, bias, running_mean, running_var, training,
                          momentum, eps, num_batches_tracked)


@triton_op(f"{NAMESPACE}::bin_coefficients_backward", mutates_args=())
def bin_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                              plane_size: int, gate: Tensor, weight: OptTensor, bias: OptTensor,
                              running_mean: OptTensor, running_var: OptTensor, training: bool,
                              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _batch_backward(kernels().bin_backward, "bin_coefficients_backward", sum_dy,
                           sum_dy_xmu, mean, m2, plane_size, [("gate", gate)], weight, bias,
                           running_mean, running_var, training, eps)


@triton_op(f"{NAMESPACE}::iebn_coefficients", mutates_args=_MUTATED)
def iebn_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate_weight: Tensor,
                      gate_bias: Tensor, weight: OptTensor, bias: OptTensor,
                      running_mean: OptTensor, running_var: OptTensor, training: bool,
                      momentum: float, eps: float,
                      num_batches_tracked: OptTensor = None) -> tuple[Tensor, Tensor]:
    return _batch_forward(kernels().iebn_forward, "iebn_coefficients", mean, m2, plane_size,
                          [("gate_weight", gate_weight), ("gate_bias", gate_bias)], weight, bias,
                          running_mean, running_var, training, momentum, eps, num_batches_tracked)


@triton_op(f"{NAMESPACE}::iebn_coefficients_backward", mutates_args=())
def iebn_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                               plane_size: int, gate_weight: Tensor, gate_bias: Tensor,
                               weight: OptTensor, bias: OptTensor, running_mean: OptTensor,
                               running_var: OptTensor, training: bool, eps: float
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _batch_backward(kernels().iebn_backward, "iebn_coefficients_backward", sum_dy,
                           sum_dy_xmu, mean, m2, plane_size,
                           [("gate_weight", gate_weight), ("gate_bias", gate_bias)], weight,
                           bias, running_mean, running_var, training, eps)


def _assoc_params(mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias, who):
    n, c = mean.shape
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(f"{who}: num_groups ({num_groups}) must be >= 1 and divide "
                           f"the number of channels ({c})")
    rt.require_tensor(encoder, "encoder", who)
    if encoder.dim() != 2 or encoder.shape[0] < 1:
        raise RuntimeError(f"{who}: encoder must be (M, num_groups) = (M, {num_groups}) "
                           f"with M >= 1, got {tuple(encoder.shape)}")
    hidden = encoder.shape[0]
    acc, dev = mean.dtype, mean.device
    enc = stats_tensor(encoder, (hidden, num_groups), acc, "encoder", dev, who)
    dec_mu = stats_tensor(decoder_mean, (num_groups, hidden), acc, "decoder_mean", dev, who)
    dec_var = stats_tensor(decoder_var, (num_groups, hidden), acc, "decoder_var", dev, who)
    cfg = heuristics.assoc_config(num_groups, who)
    meta = dict(BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg, num_warps=cfg.num_warps)
    return (enc, dec_mu, dec_var, _param(weight, mean, "weight", who, optional=False),
            _param(bias, mean, "bias", who, optional=False), hidden, meta)


def _meta_backward_outputs(mean, params, empty: bool):
    """The AssocNorm / ILM-Norm backward's outputs: ``c_dy, c_x, c_0`` like ``mean``, then a
    gradient like each of ``params`` (the three matrices, weight, bias), zeros when ``empty``
    (no sample or channel to sum over)."""
    coefficients = [torch.empty_like(mean) for _ in range(3)]
    grads = [torch.zeros_like(p) if empty else torch.empty_like(p) for p in params]
    return (*coefficients, *grads)


def _sum_tree_workspace(mean, width, who, formula):
    """The AssocNorm / ILM-Norm backward's workspace for its sum over samples
    (``coefficients_assoc.sum_over_samples``): a row of ``width`` parameter-gradient partials per
    sample, one per row group, and the groups' ticket counters.  ``formula``: ``width`` as the
    refusal names it (the rows are indexed in int32)."""
    n = mean.shape[0]
    if n * width >= 2**31:
        raise RuntimeError(f"{who}: the workspace needs N * ({formula}) < 2**31, got {n} * "
                           f"{width}; use the cuda or torch backend")
    groups = rt.cdiv(n, kernels().rows_per_group)
    return (mean.new_empty(n * width), mean.new_empty(groups * width),
            rt.counters(mean, groups + 1))


@triton_op(f"{NAMESPACE}::assoc_coefficients", mutates_args=())
def assoc_coefficients(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int,
                       encoder: Tensor, decoder_mean: Tensor, decoder_var: Tensor, weight: Tensor,
                       bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    who = _who("assoc_coefficients")
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    enc, dec_mu, dec_var, weight, bias, hidden, meta = _assoc_params(
        mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias, who)
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n * c == 0:
        return scale, shift
    launcher(kernels().assoc_forward, mean)[(n,)](
        mean, m2, enc, dec_mu, dec_var, weight, bias, scale, shift,
        c, plane_size, num_groups, hidden, c // num_groups, eps, **meta)
    return scale, shift


@triton_op(f"{NAMESPACE}::assoc_coefficients_backward", mutates_args=())
def assoc_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                                plane_size: int, num_groups: int, encoder: Tensor,
                                decoder_mean: Tensor, decoder_var: Tensor, weight: Tensor,
                                bias: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                           Tensor]:
    who = _who("assoc_coefficients_backward")
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    g1 = _statistic(sum_dy, mean, "sum_dy", who)
    g2 = _statistic(sum_dy_xmu, mean, "sum_dy_xmu", who)
    enc, dec_mu, dec_var, weight, bias, hidden, meta = _assoc_params(
        mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias, who)
    out = _meta_backward_outputs(mean, (enc, dec_mu, dec_var, weight, bias), n * c == 0)
    if n * c == 0:
        return out
    ws, ws2, counter = _sum_tree_workspace(mean, 2 * c + 3 * hidden * num_groups, who,
                                           "2C + 3 * embed_dim * num_groups")
    launcher(kernels().assoc_backward, mean)[(n,)](
        g1, g2, mean, m2, enc, dec_mu, dec_var, weight, *out[:3], ws, ws2, counter, *out[3:],
        n, c, plane_size, num_groups, hidden, c // num_groups, eps, **meta)
    return out


def _ilm_params(mean, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight,
                bias, who):
    """Checked ILM-Norm parameters: ``(enc, dec_w, dec_b, weight, bias, K, E, meta)``.  K is the
    encoder's column count (the key groups), E its row count (the hidden units).  Groups of one
    value are refused, as normfuse.coefficients.ilm does (their unbiased variance is 0 / 0)."""
    n, c = mean.shape
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(f"{who}: num_groups ({num_groups}) must be >= 1 and divide "
                           f"the number of channels ({c})")
    rt.require_tensor(encoder, "encoder", who)
    if encoder.dim() != 2 or min(encoder.shape) < 1 or c % encoder.shape[1]:
        raise RuntimeError(f"{who}: encoder must be (E, K) with E >= 1 and K key groups "
                           f"dividing the number of channels ({c}), got {tuple(encoder.shape)}")
    hidden, keys = encoder.shape
    for count, what in ((c // keys * plane_size, "key group"),
                        (c // num_groups * plane_size, "group")):
        if count <= 1:
            raise RuntimeError(f"{who}: the unbiased variance needs more than one "
                               f"value per {what}, got {count}")
    acc, dev = mean.dtype, mean.device
    enc = stats_tensor(encoder, (hidden, keys), acc, "encoder", dev, who)
    dec_w = stats_tensor(decoder_weight, (keys, hidden), acc, "decoder_weight", dev, who)
    dec_b = stats_tensor(decoder_bias, (keys, hidden), acc, "decoder_bias", dev, who)
    weight = _param(weight, mean, "weight", who, optional=False)
    bias = _param(bias, mean, "bias", who, optional=False)
    cfg = heuristics.ilm_config(num_groups, keys, who)
    meta = dict(BLOCK_K=cfg.block_k, BLOCK_CK=cfg.block_ck, BLOCK_G=cfg.block_g,
                BLOCK_CG=cfg.block_cg, E_CHUNK=cfg.e_chunk, num_warps=cfg.num_warps)
    return enc, dec_w, dec_b, weight, bias, keys, hidden, meta


@triton_op(f"{NAMESPACE}::ilm_coefficients", mutates_args=())
def ilm_coefficients(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int,
                     encoder: Tensor, decoder_weight: Tensor, decoder_bias: Tensor,
                     weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    who = _who("ilm_coefficients")
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    enc, dec_w, dec_b, weight, bias, keys, hidden, meta = _ilm_params(
        mean, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight, bias, who)
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n == 0:
        return scale, shift
    launcher(kernels().ilm_forward, mean)[(n,)](
        mean, m2, enc, dec_w, dec_b, weight, bias, scale, shift,
        c, plane_size, num_groups, keys, hidden, c // num_groups, c // keys, eps, **meta)
    return scale, shift


@triton_op(f"{NAMESPACE}::ilm_coefficients_backward", mutates_args=())
def ilm_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                              plane_size: int, num_groups: int, encoder: Tensor,
                              decoder_weight: Tensor, decoder_bias: Tensor, weight: Tensor,
                              bias: Tensor, eps: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """``bias`` is not read (the gradients do not depend on it) but checked, as the assoc op
    does."""
    who = _who("ilm_coefficients_backward")
    mean, m2 = _moment_pair(mean, m2, plane_size, who)
    n, c = mean.shape
    g1 = _statistic(sum_dy, mean, "sum_dy", who)
    g2 = _statistic(sum_dy_xmu, mean, "sum_dy_xmu", who)
    enc, dec_w, dec_b, weight, bias, keys, hidden, meta = _ilm_params(
        mean, plane_size, num_groups, encoder, decoder_weight, decoder_bias, weight, bias, who)
    out = _meta_backward_outputs(mean, (enc, dec_w, dec_b, weight, bias), n == 0)
    if n == 0:
        return out
    ws, ws2, counter = _sum_tree_workspace(mean, 2 * c + 3 * hidden * keys, who,
                                           "2C + 3 * E * K")
    launcher(kernels().ilm_backward, mean)[(n,)](
        g1, g2, mean, m2, enc, dec_w, dec_b, weight, *out[:3], ws, ws2, counter, *out[3:],
        n, c, plane_size, num_groups, keys, hidden, c // num_groups, c // keys, eps, **meta)
    return out


# ---------------------------------------------------------------------------------------------
# version counters of the running statistics

def _bump_running_versions_only_in_training(name: str) -> None:
    """A custom op bumps the version counter of every ``(a!)`` argument on every call, but these
    ops write the running statistics (and ``num_batches_tracked``) only when ``training``; in
    eval mode autograd saves the statistics for the backward and must find them unchanged (as
    with the C++ ops, whose ADInplaceOrView kernel is a fallthrough).  So replace the op's
    ADInplaceOrView kernel by one that bumps only when they are actually written."""
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    names = [a.name for a in op._schema.arguments]
    i_training, mutated = names.index("training"), [(names.index(a), a) for a in _MUTATED]
    after = torch._C._after_ADInplaceOrView_keyset

    def adinplaceorview(keyset, *args, **kwargs):
        if args[i_training]:
            for i, arg in mutated:  # num_batches_tracked may be left out, or given by name
                t = args[i] if i < len(args) else kwargs.get(arg)
                if t is not None:
                    torch.autograd.graph.increment_version(t)
        return op.redispatch(keyset & after, *args, **kwargs)

    # allow_override: torch 2.11 registers its own ADInplaceOrView kernel for mutable custom ops
    # (bumping on every call) from Python, which Library.impl would otherwise refuse to replace.
    _VERSION_LIB.impl(name, adinplaceorview, "ADInplaceOrView", with_keyset=True,
                      allow_override=True)


_VERSION_LIB = torch.library.Library(NAMESPACE, "IMPL")  # kept alive: owns the registrations
for _name in ("bin_coefficients", "iebn_coefficients"):
    _bump_running_versions_only_in_training(_name)

