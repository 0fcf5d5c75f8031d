"""What the Triton ops share: the lazily imported kernels, argument checks, the persistent
ticket counters of split reductions and the launch grids (streaming_ops.py, coefficient_ops.py).

Devices and dtypes: CUDA tensors in float32/float16/bfloat16 (statistics float32).  float64 is
rejected on the GPU (use the ``torch`` backend: the ``cuda`` kernels refuse it too); CPU tensors run only when the
kernels are interpreted (``TRITON_INTERPRET=1`` set before the first call), and there float64 is
accepted too (statistics float64), so gradcheck-style tests can use this backend.

Split reductions and the AssocNorm and ILM-Norm backwards finish inside their launch with
"last program" tickets (``common.last_arrival``).  The int32 ticket counters live in a
zero-initialised buffer cached per (device, stream) (in the CPU interpreter: per device and
thread) that every kernel leaves zeroed again (the last arriving program resets its ticket), so
no memset launch is needed; only while tracing (torch.compile) or capturing a CUDA graph is a
fresh ``torch.zeros`` buffer used instead (one extra fill, only where a kernel needs tickets).
"""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from .._checks import is_channels_last
from . import heuristics

NAMESPACE = "normfuse_triton"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OptTensor = Optional[Tensor]

_K = None  # the kernels, imported at the first call


def kernels() -> SimpleNamespace:
    """The ``@triton.jit`` kernels (imported, and so compiled or interpreted, on first use)."""
    global _K
    if _K is None:
        from . import (apply, backward, coefficients_assoc, coefficients_bin,  # noqa: PLC0415
                       coefficients_iebn, coefficients_ilm, moments)
        _K = SimpleNamespace(
            moments=moments.moments_kernel, backward_sums=backward.backward_sums_kernel,
            affine_apply=apply.affine_apply_kernel, backward_apply=apply.backward_apply_kernel,
            bin_forward=coefficients_bin.bin_forward_kernel,
            bin_backward=coefficients_bin.bin_backward_kernel,
            iebn_forward=coefficients_iebn.iebn_forward_kernel,
            iebn_backward=coefficients_iebn.iebn_backward_kernel,
            assoc_forward=coefficients_assoc.assoc_forward_kernel,
            assoc_backward=coefficients_assoc.assoc_backward_kernel,
            ilm_forward=coefficients_ilm.ilm_forward_kernel,
            ilm_backward=coefficients_ilm.ilm_backward_kernel,
            rows_per_group=coefficients_assoc.ROWS_PER_GROUP.value)
    return _K


def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
    return isinstance(kernels().moments, InterpretedFunction)


def launcher(kernel, like: Tensor):
    """``wrap_triton(kernel)`` (so torch.compile traces into it), or the kernel itself when it is
    interpreted: torch 2.11's ``wrap_triton`` refuses the interpreter's ``InterpretedFunction``
    (newer torch passes it through unchanged), and nothing traces an interpreted kernel.

    Triton launches on the *current* device and its current stream, not the tensors': for
    tensors (``like``) on another CUDA device (a model on cuda:1 without
    ``torch.cuda.set_device``) the launch is made with that device current (``_OnDevice``)."""
    if interpreted():
        return kernel
    wrapped = wrap_triton(kernel)
    device = like.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return _OnDevice(wrapped, device)
    return wrapped


class _OnDevice:
    """``kernel[grid](...)`` run with ``device`` current (see ``launcher``)."""

    __slots__ = ("kernel", "device")

    def __init__(self, kernel, device: torch.device):
        self.kernel, self.device = kernel, device

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def call(*args, **kwargs):
            with torch.cuda.device(self.device):
                return run(*args, **kwargs)
        return call


def absent(like: Tensor, traced: bool) -> Tensor:
    """The pointer argument of an absent tensor, which the kernel never reads or writes (a flag
    or the plan says so): ``like`` itself in eager mode (no allocation); while tracing, a
    1-element tensor of its own.  torch.compile's functionalization of a Triton kernel copies
    every pointer argument the kernel may write and replaces the tensor with the last copy, so
    two arguments that are one tensor returned memory the kernel never wrote (an unsplit
    reduction's partials passed as its output: a garbage mean under torch.compile)."""
    return like.new_empty(1) if traced else like


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_tensor(t, what: str, who: str = NAMESPACE) -> None:
    """A Tensor argument given as something else (None, a list): a clear error, before any
    attribute access fails with an AttributeError that names nothing.  ``who`` starts every
    message of these checks (the coefficient ops pass ``normfuse_triton.<op>``)."""
    if not isinstance(t, Tensor):
        raise RuntimeError(f"{who}: {what} must be a Tensor, got {type(t).__name__}")


def check_device(t: Tensor, what: str, who: str = NAMESPACE) -> None:
    if t.device.type == "cuda":
        if t.dtype == torch.float64:
            raise RuntimeError(f"{who}: {what} is float64; the Triton GPU kernels "
                               f"support float32, float16 and bfloat16 (use the 'torch' "
                               f"backend for float64)")
    elif t.device.type == "cpu":
        if not interpreted():
            raise RuntimeError(f"{who}: CPU tensors need the Triton interpreter "
                               "(set TRITON_INTERPRET=1 before the first normfuse_triton call)")
    else:
        raise RuntimeError(f"{who}: {what} is on unsupported device {t.device}")


def int32_indexable(n: int, c: int, plane: int, channels_last: bool) -> bool:
    """Whether the kernels' int32 index arithmetic covers an (N, C, plane) input: they index
    planes (n * C + c), channels-last rows (n * L + l) and the elements of a sample
    (channels-last) or of a plane's split in int32; past these sizes the indices would wrap and
    read and write out of bounds.  (The CUDA ops' limit on the plane, 2**30, is the same.)"""
    return (n * c < 2**31 and plane <= 2**30
            and not (channels_last and (plane * c >= 2**31 or n * plane >= 2**31)))


def check_input(x: Tensor, what: str = "input"):
    """``(N, C, L, channels_last)`` of a layer input (or gradient) the kernels can read."""
    require_tensor(x, what)
    if not 2 <= x.dim() <= 5:
        raise RuntimeError(f"normfuse_triton: {what} must have 2 to 5 dimensions, got {x.dim()}")
    if x.dtype not in GPU_DTYPES + (torch.float64,):
        raise RuntimeError(f"normfuse_triton: unsupported dtype {x.dtype} for {what}")
    check_device(x, what)
    n, c = x.shape[:2]
    plane = math.prod(x.shape[2:])
    if x.is_contiguous():
        channels_last = plane == 1  # (N, C) planes of one element: both layouts coincide
    elif is_channels_last(x):
        channels_last = True
    else:
        raise RuntimeError(f"normfuse_triton: {what} must be contiguous or channels-last, got "
                           f"strides {x.stride()} for shape {tuple(x.shape)}")
    if not int32_indexable(n, c, plane, channels_last):
        raise RuntimeError(
            f"normfuse_triton: {what} of shape {tuple(x.shape)} is past the Triton kernels' "
            f"32-bit indexing (they need N*C < 2**31 and H*W <= 2**30, and channels-last "
            f"C*H*W < 2**31 and N*H*W < 2**31); use the cuda or torch backend")
    return n, c, plane, channels_last


def check_pair(dy: Tensor, x: Tensor):
    layout = check_input(x)
    require_tensor(dy, "grad_output")
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise RuntimeError(f"normfuse_triton: grad_output {tuple(dy.shape)} {dy.dtype} does not "
                           f"match input {tuple(x.shape)} {x.dtype}")
    if check_input(dy, "grad_output")[3] != layout[3]:
        raise RuntimeError("normfuse_triton: grad_output must have the memory format of input")
    return layout


def check_tensor(t: Tensor, shape, dtype, what: str, device: torch.device,
                 who: str = NAMESPACE) -> None:
    """``t`` (statistics, coefficients or a parameter) checked to be a ``shape`` ``dtype`` tensor
    on ``device`` (the input's or the statistics')."""
    require_tensor(t, what, who)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise RuntimeError(f"{who}: {what} must be {tuple(shape)} {dtype}, got "
                           f"{tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"{who}: {what} is on {t.device}, expected {device}")


def stats_tensor(t: Tensor, shape, dtype, what: str, device: torch.device,
                 who: str = NAMESPACE) -> Tensor:
    """``t`` checked (``check_tensor``), contiguous (a strided one is copied)."""
    check_tensor(t, shape, dtype, what, device, who)
    return t.contiguous()


def tracing(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415
    if torch.compiler.is_compiling() or is_fake(t):
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_COUNTERS: dict = {}  # (device, stream) -> buffer, CUDA
_CPU_COUNTERS = threading.local()  # .buffers: device -> buffer, the interpreter (per thread)


def counters(like: Tensor, n: int, needed: bool = True) -> Tensor:
    """``n`` zeroed int32 ticket counters that the kernel leaves zeroed (see module doc).

    Kernels on one CUDA stream run one after the other, so they can share the stream's buffer;
    interpreted kernels run in the calling thread, so there the buffer is per thread."""
    if not needed:
        return torch.empty(1, dtype=torch.int32, device=like.device)
    if tracing(like):
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


def reduction_plan(n: int, c: int, plane: int, channels_last: bool, device):
    cfg = heuristics.stream_config(c, plane, channels_last)
    c_blocks = cdiv(c, cfg.block_p)
    keep = n * c_blocks if channels_last else cdiv(n * c, cfg.block_p)
    splits, chunk = heuristics.split_plan(cfg, keep, plane, heuristics.num_sms(device))
    return cfg, c_blocks, keep, splits, chunk


def split_reduction(x: Tensor, n: int, c: int, plane: int, channels_last: bool, out: Tensor):
    """The launch plan of a reduction over the planes of ``x`` (moments, backward sums) and its
    workspace: ``(cfg, c_blocks, keep, splits, chunk, partials, counters)``.  Split planes get
    two partials per plane and split in ``out``'s dtype; unsplit ones pass ``absent(out)``."""
    cfg, c_blocks, keep, splits, chunk = reduction_plan(n, c, plane, channels_last, x.device)
    part = out.new_empty(2 * splits * n * c) if splits > 1 else absent(out, tracing(x))
    return cfg, c_blocks, keep, splits, chunk, part, counters(x, keep, splits > 1)


def stream_grid(n: int, c: int, plane: int, cfg):
    if cfg.channels_last:
        rows = n * plane
        l_blocks = cdiv(rows, cfg.block_l)
        return rows, l_blocks, (cdiv(c, cfg.block_p) * l_blocks,)
    l_blocks = cdiv(plane, cfg.block_l)
    return 0, l_blocks, (cdiv(n * c, cfg.block_p) * l_blocks,)


def stream_meta(cfg) -> dict:
    return dict(CHANNELS_LAST=cfg.channels_last, BLOCK_P=cfg.block_p, BLOCK_L=cfg.block_l,
                num_warps=cfg.num_warps)

