"""``torch.ops.normfuse_triton.*``: the ten ops of docs/architecture.md as ``triton_op``s.

Each op validates its inputs, allocates outputs (and O(N*C) workspaces), asks ``heuristics``
for a launch configuration and launches exactly one kernel through ``wrap_triton``, so that
``torch.compile`` traces into the kernels.  Registration needs no GPU; the kernel modules are
imported at the first call, so ``TRITON_INTERPRET`` only has to be set before then.

Devices and dtypes: CUDA tensors in float32/float16/bfloat16 (statistics float32).  float64 is
rejected on the GPU (use the ``cuda`` or ``torch`` backend); CPU tensors run only when the
kernels are interpreted (``TRITON_INTERPRET=1`` set before the first call), and there float64 is
accepted too (statistics float64), so gradcheck-style tests can use this backend.

Schemas are inferred from the functions' type annotations (no ``schema=`` string): torch 2.11
ignores ``triton_op(..., schema=...)`` and infers anyway, so the annotations are the one source
on every supported torch.  They match the C++ ops' schemas in docs/architecture.md
(``int`` is inferred as ``SymInt``; tests/triton_kernels/test_schemas.py checks the rest).

Split reductions and the AssocNorm backward finish inside their launch with "last program"
tickets (``common.last_arrival``).  The int32 ticket counters live in a zero-initialised buffer
cached per (device, stream) (in the CPU interpreter: per device and thread) that every kernel
leaves zeroed again (the last arriving program resets its ticket), so no memset launch is
needed; only while tracing (torch.compile) or capturing a CUDA graph is a fresh ``torch.zeros``
buffer used instead (one extra fill, only where a kernel needs tickets).
"""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..coefficients._merge import check_batch_counter
from . import heuristics

NAMESPACE = "normfuse_triton"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OptTensor = Optional[Tensor]

_K = None


def kernels() -> SimpleNamespace:
    """The ``@triton.jit`` kernels (imported, and so compiled or interpreted, on first use)."""
    global _K
    if _K is None:
        from . import (apply, backward, coefficients_assoc, coefficients_bin,  # noqa: PLC0415
                       coefficients_iebn, moments)
        _K = SimpleNamespace(
            moments=moments.moments_kernel, backward_sums=backward.backward_sums_kernel,
            affine_apply=apply.affine_apply_kernel, backward_apply=apply.backward_apply_kernel,
            bin_forward=coefficients_bin.bin_forward_kernel,
            bin_backward=coefficients_bin.bin_backward_kernel,
            iebn_forward=coefficients_iebn.iebn_forward_kernel,
            iebn_backward=coefficients_iebn.iebn_backward_kernel,
            assoc_forward=coefficients_assoc.assoc_forward_kernel,
            assoc_backward=coefficients_assoc.assoc_backward_kernel,
            rows_per_group=coefficients_assoc.ROWS_PER_GROUP.value)
    return _K


def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
    return isinstance(kernels().moments, InterpretedFunction)


def _launcher(kernel):
    """``wrap_triton(kernel)`` (so torch.compile traces into it), or the kernel itself when it is
    interpreted: torch 2.11's ``wrap_triton`` refuses the interpreter's ``InterpretedFunction``
    (newer torch passes it through unchanged), and nothing traces an interpreted kernel."""
    return kernel if interpreted() else wrap_triton(kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(t: Tensor, what: str) -> None:
    if t.device.type == "cuda":
        if t.dtype == torch.float64:
            raise RuntimeError(f"normfuse_triton: {what} is float64; the Triton GPU kernels "
                               f"support float32, float16 and bfloat16 (use the 'cuda' or "
                               f"'torch' backend for float64)")
    elif t.device.type == "cpu":
        if not interpreted():
            raise RuntimeError("normfuse_triton: CPU tensors need the Triton interpreter "
                               "(set TRITON_INTERPRET=1 before the first normfuse_triton call)")
    else:
        raise RuntimeError(f"normfuse_triton: unsupported device {t.device}")


def _check_input(x: Tensor, what: str = "input"):
    """``(N, C, L, channels_last)`` of a layer input (or gradient) the kernels can read."""
    if not 2 <= x.dim() <= 5:
        raise RuntimeError(f"normfuse_triton: {what} must have 2 to 5 dimensions, got {x.dim()}")
    if x.dtype not in GPU_DTYPES + (torch.float64,):
        raise RuntimeError(f"normfuse_triton: unsupported dtype {x.dtype} for {what}")
    _check_device(x, what)
    n, c = x.shape[:2]
    plane = math.prod(x.shape[2:])
    if x.is_contiguous():
        channels_last = plane == 1  # (N, C) planes of one element: both layouts coincide
    elif x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        channels_last = True
    else:
        raise RuntimeError(f"normfuse_triton: {what} must be contiguous or channels-last, got "
                           f"strides {x.stride()} for shape {tuple(x.shape)}")
    if channels_last and plane * c >= 2**31:
        raise RuntimeError(f"normfuse_triton: one sample of {what} has >= 2**31 elements")
    return n, c, plane, channels_last


def _check_pair(dy: Tensor, x: Tensor):
    layout = _check_input(x)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise RuntimeError(f"normfuse_triton: grad_output {tuple(dy.shape)} {dy.dtype} does not "
                           f"match input {tuple(x.shape)} {x.dtype}")
    if _check_input(dy, "grad_output")[3] != layout[3]:
        raise RuntimeError("normfuse_triton: grad_output must have the memory format of input")
    return layout


def _stats(t: Tensor, shape, dtype, what: str) -> Tensor:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise RuntimeError(f"normfuse_triton: {what} must be {tuple(shape)} {dtype}, got "
                           f"{tuple(t.shape)} {t.dtype}")
    return t.contiguous()


def _tracing(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415
    if torch.compiler.is_compiling() or is_fake(t):
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_COUNTERS: dict = {}  # (device, stream) -> buffer, CUDA
_CPU_COUNTERS = threading.local()  # .buffers: device -> buffer, the interpreter (per thread)


def _counters(like: Tensor, n: int, needed: bool = True) -> Tensor:
    """``n`` zeroed int32 ticket counters that the kernel leaves zeroed (see module doc).

    Kernels on one CUDA stream run one after the other, so they can share the stream's buffer;
    interpreted kernels run in the calling thread, so there the buffer is per thread."""
    if not needed:
        return torch.empty(1, dtype=torch.int32, device=like.device)
    if _tracing(like):
        return torch.zeros(n, dtype=torch.int32, device=like.device)
    dev = like.device
    if dev.type == "cuda":
        cache, key = _COUNTERS, (str(dev), torch.cuda.current_stream(dev).cuda_stream)
    else:
        if not hasattr(_CPU_COUNTERS, "buffers"):
            _CPU_COUNTERS.buffers = {}
        cache, key = _CPU_COUNTERS.buffers, str(dev)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=dev)
        cache[key] = buf
    return buf


def _reduction_plan(n: int, c: int, plane: int, channels_last: bool, device):
    cfg = heuristics.stream_config(c, plane, channels_last)
    c_blocks = _cdiv(c, cfg.block_p)
    keep = n * c_blocks if channels_last else _cdiv(n * c, cfg.block_p)
    splits, chunk = heuristics.split_plan(cfg, keep, plane, heuristics.num_sms(device))
    return cfg, c_blocks, keep, splits, chunk


def _stream_grid(n: int, c: int, plane: int, cfg):
    if cfg.channels_last:
        rows = n * plane
        l_blocks = _cdiv(rows, cfg.block_l)
        return rows, l_blocks, (_cdiv(c, cfg.block_p) * l_blocks,)
    l_blocks = _cdiv(plane, cfg.block_l)
    return 0, l_blocks, (_cdiv(n * c, cfg.block_p) * l_blocks,)


def _meta(cfg) -> dict:
    return dict(CHANNELS_LAST=cfg.channels_last, BLOCK_P=cfg.block_p, BLOCK_L=cfg.block_l,
                num_warps=cfg.num_warps)


# ---------------------------------------------------------------------------------------------
# the four full-size passes


@triton_op(f"{NAMESPACE}::moments", mutates_args=())
def moments(input: Tensor) -> tuple[Tensor, Tensor]:
    n, c, plane, cl = _check_input(input)
    acc = _acc(input.dtype)
    mean = input.new_empty((n, c), dtype=acc)
    m2 = input.new_empty((n, c), dtype=acc)
    if n * c == 0 or plane == 0:
        return mean.fill_(float("nan")), m2.zero_()
    cfg, c_blocks, keep, splits, chunk = _reduction_plan(n, c, plane, cl, input.device)
    part = mean.new_empty(2 * splits * n * c) if splits > 1 else mean
    counter = _counters(input, keep, splits > 1)
    _launcher(kernels().moments)[(keep, splits)](
        input, mean, m2, part, counter, c, plane, n * c, c_blocks, chunk // cfg.block_l, splits,
        **_meta(cfg))
    return mean, m2


@triton_op(f"{NAMESPACE}::affine_apply", mutates_args=())
def affine_apply(input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    n, c, plane, cl = _check_input(input)
    acc = _acc(input.dtype)
    mean, scale, shift = (_stats(t, (n, c), acc, name) for t, name in
                          ((mean, "mean"), (scale, "scale"), (shift, "shift")))
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    cfg = heuristics.stream_config(c, plane, cl)
    rows, l_blocks, grid = _stream_grid(n, c, plane, cfg)
    _launcher(kernels().affine_apply)[grid](
        input, out, mean, scale, shift, c, plane, n * c, rows, l_blocks, **_meta(cfg))
    return out


@triton_op(f"{NAMESPACE}::backward_sums", mutates_args=())
def backward_sums(grad_output: Tensor, input: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    n, c, plane, cl = _check_pair(grad_output, input)
    acc = _acc(input.dtype)
    mean = _stats(mean, (n, c), acc, "mean")
    g1 = mean.new_empty((n, c))
    g2 = mean.new_empty((n, c))
    if n * c == 0 or plane == 0:
        return g1.zero_(), g2.zero_()
    cfg, c_blocks, keep, splits, chunk = _reduction_plan(n, c, plane, cl, input.device)
    part = mean.new_empty(2 * splits * n * c) if splits > 1 else g1
    counter = _counters(input, keep, splits > 1)
    _launcher(kernels().backward_sums)[(keep, splits)](
        grad_output, input, mean, g1, g2, part, counter, c, plane, n * c, c_blocks,
        chunk // cfg.block_l, splits, **_meta(cfg))
    return g1, g2


@triton_op(f"{NAMESPACE}::backward_apply", mutates_args=())
def backward_apply(grad_output: Tensor, input: Tensor, mean: Tensor, c_dy: Tensor, c_x: Tensor,
                   c_0: Tensor) -> Tensor:
    n, c, plane, cl = _check_pair(grad_output, input)
    acc = _acc(input.dtype)
    mean, c_dy, c_x, c_0 = (_stats(t, (n, c), acc, name) for t, name in
                            ((mean, "mean"), (c_dy, "c_dy"), (c_x, "c_x"), (c_0, "c_0")))
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    cfg = heuristics.stream_config(c, plane, cl)
    rows, l_blocks, grid = _stream_grid(n, c, plane, cfg)
    _launcher(kernels().backward_apply)[grid](
        grad_output, input, out, mean, c_dy, c_x, c_0, c, plane, n * c, rows, l_blocks,
        **_meta(cfg))
    return out


# ---------------------------------------------------------------------------------------------
# coefficient ops


def _moment_pair(mean: Tensor, m2: Tensor):
    if mean.dim() != 2 or mean.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"normfuse_triton: mean must be (N, C) float32/float64, got "
                           f"{tuple(mean.shape)} {mean.dtype}")
    _check_device(mean, "mean")
    return mean.contiguous(), _stats(m2, mean.shape, mean.dtype, "m2")


def _param(t, c: int, dtype, what: str):
    return None if t is None else _stats(t.reshape(-1), (c,), dtype, what)


def _coeff_meta(n: int):
    cfg = heuristics.coeff_config(n)
    return dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps), cfg


def _running(running_mean, running_var, c, dtype):
    """Contiguous running statistics for the kernels (strided ones are copied, see
    ``_write_back``)."""
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("normfuse_triton: give both running_mean and running_var, or neither")
    if running_mean is None:
        return None, None
    for t, what in ((running_mean, "running_mean"), (running_var, "running_var")):
        if tuple(t.shape) != (c,) or t.dtype != dtype:
            raise RuntimeError(f"normfuse_triton: {what} must be a ({c},) {dtype} tensor, got "
                               f"{tuple(t.shape)} {t.dtype}")
    return running_mean.contiguous(), running_var.contiguous()


def _batch_counter(num_batches_tracked, mean: Tensor, training: bool, op: str):
    """``(pointer tensor, count)`` for the forward kernels' ``nbt_ptr`` / ``count``: the given
    ``num_batches_tracked`` (a 0-dim or 1-element int64 tensor on the statistics' device,
    checked before anything runs), or an unused int64 scalar (an allocation, not a launch) so
    that the kernel is compiled for one pointer type."""
    if num_batches_tracked is None:
        return torch.empty((), dtype=torch.int64, device=mean.device), 0
    check_batch_counter(num_batches_tracked, mean, op, NAMESPACE)
    return num_batches_tracked, int(bool(training))


def _write_back(updated: bool, pairs) -> None:
    """Copy updated running statistics back where the kernel worked on a contiguous copy."""
    for original, used in pairs:
        if updated and original is not None and used is not original:
            original.copy_(used)


_MUTATED = ("running_mean", "running_var", "num_batches_tracked")


@triton_op(f"{NAMESPACE}::bin_coefficients", mutates_args=_MUTATED)
def bin_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate: Tensor, weight: OptTensor,
                     bias: OptTensor, running_mean: OptTensor, running_var: OptTensor,
                     training: bool, momentum: float, eps: float,
                     num_batches_tracked: OptTensor = None) -> tuple[Tensor, Tensor]:
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    gate = _param(gate, c, mean.dtype, "gate")
    weight, bias = _param(weight, c, mean.dtype, "weight"), _param(bias, c, mean.dtype, "bias")
    rm, rv = _running(running_mean, running_var, c, mean.dtype)
    nbt, count = _batch_counter(num_batches_tracked, mean, training, "bin_coefficients")
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n * c == 0:
        if count:  # no kernel to count in (only direct op calls get here; layers refuse)
            nbt.add_(1)
        return scale, shift
    meta, cfg = _coeff_meta(n)
    use_batch = training or rm is None
    update = training and rm is not None
    _launcher(kernels().bin_forward)[(_cdiv(c, cfg.block_c),)](
        mean, m2, gate, gate if weight is None else weight, gate if bias is None else bias,
        scale if rm is None else rm, shift if rv is None else rv, scale, shift, nbt,
        n, c, plane_size, momentum, eps, int(weight is not None), int(bias is not None),
        int(use_batch), int(update), count, **meta)
    _write_back(update, ((running_mean, rm), (running_var, rv)))
    return scale, shift


@triton_op(f"{NAMESPACE}::bin_coefficients_backward", mutates_args=())
def bin_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                              plane_size: int, gate: Tensor, weight: OptTensor, bias: OptTensor,
                              running_mean: OptTensor, running_var: OptTensor, training: bool,
                              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    g1 = _stats(sum_dy, (n, c), mean.dtype, "sum_dy")
    g2 = _stats(sum_dy_xmu, (n, c), mean.dtype, "sum_dy_xmu")
    gate = _param(gate, c, mean.dtype, "gate")
    weight = _param(weight, c, mean.dtype, "weight")
    running_mean, running_var = _running(running_mean, running_var, c, mean.dtype)
    c_dy, c_x, c_0 = (torch.empty_like(mean) for _ in range(3))
    d_gate, d_weight, d_bias = (mean.new_empty(c) for _ in range(3))
    if n * c == 0:
        return c_dy, c_x, c_0, d_gate.zero_(), d_weight.zero_(), d_bias.zero_()
    meta, cfg = _coeff_meta(n)
    use_batch = training or running_mean is None
    _launcher(kernels().bin_backward)[(_cdiv(c, cfg.block_c),)](
        g1, g2, mean, m2, gate, gate if weight is None else weight,
        mean if running_mean is None else running_mean,
        m2 if running_var is None else running_var,
        c_dy, c_x, c_0, d_gate, d_weight, d_bias, n, c, plane_size, eps,
        int(weight is not None), int(use_batch), **meta)
    return c_dy, c_x, c_0, d_gate, d_weight, d_bias


@triton_op(f"{NAMESPACE}::iebn_coefficients", mutates_args=_MUTATED)
def iebn_coefficients(mean: Tensor, m2: Tensor, plane_size: int, gate_weight: Tensor,
                      gate_bias: Tensor, weight: OptTensor, bias: OptTensor,
                      running_mean: OptTensor, running_var: OptTensor, training: bool,
                      momentum: float, eps: float,
                      num_batches_tracked: OptTensor = None) -> tuple[Tensor, Tensor]:
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    gate_weight = _param(gate_weight, c, mean.dtype, "gate_weight")
    gate_bias = _param(gate_bias, c, mean.dtype, "gate_bias")
    weight, bias = _param(weight, c, mean.dtype, "weight"), _param(bias, c, mean.dtype, "bias")
    rm, rv = _running(running_mean, running_var, c, mean.dtype)
    nbt, count = _batch_counter(num_batches_tracked, mean, training, "iebn_coefficients")
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n * c == 0:
        if count:  # no kernel to count in (only direct op calls get here; layers refuse)
            nbt.add_(1)
        return scale, shift
    meta, cfg = _coeff_meta(n)
    use_batch = training or rm is None
    update = training and rm is not None
    _launcher(kernels().iebn_forward)[(_cdiv(c, cfg.block_c),)](
        mean, m2, gate_weight, gate_bias, gate_weight if weight is None else weight,
        gate_weight if bias is None else bias,
        scale if rm is None else rm, shift if rv is None else rv, scale, shift, nbt,
        n, c, plane_size, momentum, eps, int(weight is not None), int(bias is not None),
        int(use_batch), int(update), count, **meta)
    _write_back(update, ((running_mean, rm), (running_var, rv)))
    return scale, shift


@triton_op(f"{NAMESPACE}::iebn_coefficients_backward", mutates_args=())
def iebn_coefficients_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, mean: Tensor, m2: Tensor,
                               plane_size: int, gate_weight: Tensor, gate_bias: Tensor,
                               weight: OptTensor, bias: OptTensor, running_mean: OptTensor,
                               running_var: OptTensor, training: bool, eps: float
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    g1 = _stats(sum_dy, (n, c), mean.dtype, "sum_dy")
    g2 = _stats(sum_dy_xmu, (n, c), mean.dtype, "sum_dy_xmu")
    gate_weight = _param(gate_weight, c, mean.dtype, "gate_weight")
    gate_bias = _param(gate_bias, c, mean.dtype, "gate_bias")
    weight = _param(weight, c, mean.dtype, "weight")
    running_mean, running_var = _running(running_mean, running_var, c, mean.dtype)
    c_dy, c_x, c_0 = (torch.empty_like(mean) for _ in range(3))
    grads = [mean.new_empty(c) for _ in range(4)]
    if n * c == 0:
        return (c_dy, c_x, c_0, *(g.zero_() for g in grads))
    meta, cfg = _coeff_meta(n)
    use_batch = training or running_mean is None
    _launcher(kernels().iebn_backward)[(_cdiv(c, cfg.block_c),)](
        g1, g2, mean, m2, gate_weight, gate_bias, gate_weight if weight is None else weight,
        mean if running_mean is None else running_mean,
        m2 if running_var is None else running_var,
        c_dy, c_x, c_0, *grads, n, c, plane_size, eps, int(weight is not None), int(use_batch),
        **meta)
    return (c_dy, c_x, c_0, *grads)


def _assoc_params(mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias):
    n, c = mean.shape
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(f"normfuse_triton: {c} channels do not split into {num_groups} groups")
    hidden = encoder.shape[0]
    enc = _stats(encoder, (hidden, num_groups), mean.dtype, "encoder")
    dec_mu = _stats(decoder_mean, (num_groups, hidden), mean.dtype, "decoder_mean")
    dec_var = _stats(decoder_var, (num_groups, hidden), mean.dtype, "decoder_var")
    cfg = heuristics.assoc_config(num_groups, hidden)
    meta = dict(BLOCK_G=cfg.block_g, BLOCK_M=cfg.block_m, BLOCK_CG=cfg.block_cg,
                num_warps=cfg.num_warps)
    return (enc, dec_mu, dec_var, _param(weight, c, mean.dtype, "weight"),
            _param(bias, c, mean.dtype, "bias"), hidden, meta)


@triton_op(f"{NAMESPACE}::assoc_coefficients", mutates_args=())
def assoc_coefficients(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int,
                       encoder: Tensor, decoder_mean: Tensor, decoder_var: Tensor, weight: Tensor,
                       bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    enc, dec_mu, dec_var, weight, bias, hidden, meta = _assoc_params(
        mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias)
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    if n * c == 0:
        return scale, shift
    _launcher(kernels().assoc_forward)[(n,)](
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
    mean, m2 = _moment_pair(mean, m2)
    n, c = mean.shape
    g1 = _stats(sum_dy, (n, c), mean.dtype, "sum_dy")
    g2 = _stats(sum_dy_xmu, (n, c), mean.dtype, "sum_dy_xmu")
    enc, dec_mu, dec_var, weight, bias, hidden, meta = _assoc_params(
        mean, num_groups, encoder, decoder_mean, decoder_var, weight, bias)
    c_dy, c_x, c_0 = (torch.empty_like(mean) for _ in range(3))
    d_enc, d_dec_mu, d_dec_var = (torch.empty_like(t) for t in (enc, dec_mu, dec_var))
    d_weight, d_bias = mean.new_empty(c), mean.new_empty(c)
    if n * c == 0:
        return (c_dy, c_x, c_0, d_enc.zero_(), d_dec_mu.zero_(), d_dec_var.zero_(),
                d_weight.zero_(), d_bias.zero_())
    width = 2 * c + 3 * hidden * num_groups
    groups = _cdiv(n, kernels().rows_per_group)
    ws = mean.new_empty(n * width)
    ws2 = mean.new_empty(groups * width)
    counter = _counters(mean, groups + 1)
    _launcher(kernels().assoc_backward)[(n,)](
        g1, g2, mean, m2, enc, dec_mu, dec_var, weight, c_dy, c_x, c_0, ws, ws2, counter,
        d_enc, d_dec_mu, d_dec_var, d_weight, d_bias,
        n, c, plane_size, num_groups, hidden, c // num_groups, eps, **meta)
    return (c_dy, c_x, c_0, d_enc, d_dec_mu, d_dec_var, d_weight, d_bias)


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
