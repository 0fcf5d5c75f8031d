"""Input validation shared by the functional API and the modules.

Every check runs before anything is computed or mutated, so a call that raises leaves running
statistics and ``num_batches_tracked`` as they were.  Messages name the argument and what was
expected.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RANK_SHAPES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def is_channels_last(x: Tensor) -> bool:
    """True when C is the innermost dense dimension (NHWC and its 1-d/3-d analogues): the one
    Python statement of the kernels' second layout (the C++ one is nf_glue::plane_shape)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _require_tensor(value, name: str, who: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_input(input, who: str, ranks=(2, 3, 4, 5), empty: str = "none") -> None:
    """A floating dense input of one of ``ranks``.  ``empty``: which inputs without elements
    pass (``run_layer`` gives them an empty output): ``"any"`` as ``nn.BatchNorm`` (an empty
    batch or spatial extent), ``"batch"`` as ``nn.GroupNorm`` (zero samples, each of which
    would have elements), ``"none"``."""
    _require_tensor(input, "input", who)
    if input.is_nested:  # its layout reads torch.strided, but it has no sizes to check
        raise ValueError(f"{who}: input must be a dense (strided) tensor, got a nested tensor")
    if input.layout != torch.strided:
        raise ValueError(f"{who}: input must be a dense (strided) tensor, got layout "
                         f"{input.layout}")
    if input.dtype not in FLOATING:
        raise ValueError(f"{who}: input must be float16, bfloat16, float32 or float64, got "
                         f"{input.dtype}")
    if input.dim() not in ranks:
        expected = " or ".join(f"{r}-d {_RANK_SHAPES[r]}" for r in ranks)
        raise ValueError(f"{who}: expected input of rank {expected}, got a {input.dim()}-d "
                         f"input of shape {tuple(input.shape)}")
    if input.numel() == 0 and empty != "any":
        if empty == "batch" and math.prod(input.shape[1:]) > 0:
            return
        what = ("have at least one element per sample (its group statistics need values)"
                if empty == "batch" else "not be empty")
        raise ValueError(f"{who}: input must {what}, got shape {tuple(input.shape)}")


def check_channels(input: Tensor, expected: int, who: str, what: str = "num_features") -> None:
    if input.shape[1] != expected:
        raise ValueError(f"{who}: expected input with {expected} channels ({what}) in dim 1, "
                         f"got {input.shape[1]} (input shape {tuple(input.shape)})")


def check_tensor(t, name: str, shape: tuple, input: Tensor, who: str,
                 optional: bool = False) -> None:
    """A parameter or buffer: a floating tensor of ``shape`` on the input's device."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{who}: {name} must be a tensor of shape {shape}, got None")
    _require_tensor(t, name, who)
    if t.layout != torch.strided:
        raise ValueError(f"{who}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device != input.device:
        raise ValueError(f"{who}: {name} must be on the input's device {input.device}, got "
                         f"{t.device}")
    if t.dtype not in FLOATING:
        raise ValueError(f"{who}: {name} must be a floating-point tensor (float16, bfloat16, "
                         f"float32 or float64), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {tuple(shape)}, got "
                         f"{tuple(t.shape)}")


def check_running_stats(running_mean, running_var, channels: int, input: Tensor,
                        who: str) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: running_mean and running_var must both be tensors or both be "
                         f"None")
    check_tensor(running_mean, "running_mean", (channels,), input, who, optional=True)
    check_tensor(running_var, "running_var", (channels,), input, who, optional=True)
    if running_mean is not None and torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.requires_grad:  # nn.BatchNorm refuses it too; a gradient would never reach it
                raise ValueError(f"{who}: {name} must not require grad (the layer is not "
                                 f"differentiable with respect to its running statistics)")


def _addressless(t: Tensor) -> bool:
    """A tensor without real addresses: meta, or fake (FakeTensorMode, export, AOT tracing),
    whose ``data_ptr()`` and storage ``data_ptr()`` answer 0 (with a deprecation warning), not
    an error, so that any two of them would seem to share memory."""
    if t.device.type == "meta":
        return True
    if type(t) is Tensor or type(t) is torch.nn.Parameter:  # the common case, no import
        return False
    from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415
    return is_fake(t)


def _vectors_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two 1-d tensors with the same element size and the same non-zero stride share a
    byte, in O(1): element i of ``a`` and j of ``b`` overlap iff |d - k s| < e, with d the
    distance of their first bytes, s the byte stride, e the element size and k = j - i, so
    only the two k nearest d / s (within the index range) need checking."""
    e, s = a.element_size(), a.stride(0) * a.element_size()
    d = a.data_ptr() - b.data_ptr()
    lo, hi = -(a.numel() - 1), b.numel() - 1
    k = d // s
    return any(abs(d - min(max(c, lo), hi) * s) < e for c in (k, k + 1))


def shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether the elements of ``a`` and ``b`` may overlap: the same storage and intersecting
    byte ranges, then, for two vectors of one dtype and stride (the layers' statistics and
    parameters), whether they share a byte (so interleaved views ``buf[0::2]``, ``buf[1::2]``
    do not conflict); conservative for other strided views."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if _addressless(a) or _addressless(b):  # not sure: nothing to compare
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except (RuntimeError, NotImplementedError):  # no data pointer (a fake tensor): not sure
        return False

    def extent(t):
        lo = t.data_ptr()
        span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return lo, lo + (span + 1) * t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    if not (a0 < b1 and b0 < a1):
        return False
    if (a.dim() == 1 and b.dim() == 1 and a.element_size() == b.element_size()
            and a.stride(0) == b.stride(0) > 0):
        return _vectors_overlap(a, b)
    return True


def running_update_conflict(running_mean: Tensor, running_var: Tensor, read,
                            share_advice: str = "") -> str | None:
    """Why a call cannot update these running statistics in place, or None: one stores an
    element twice (an expanded tensor: its write-back would fail after the other statistic was
    updated), or shares memory with the other statistic or a tensor of ``read`` ((name, tensor)
    pairs the call reads), which the update would overwrite (``share_advice`` is appended to
    that message).  Tensors with real addresses (callers skip fake ones)."""
    stats = (("running_mean", running_mean), ("running_var", running_var))
    for name, t in stats:
        if torch._debug_has_internal_overlap(t) == 1:
            return (f"{name} must not have overlapping elements (it is updated in place), got "
                    f"strides {tuple(t.stride())}")
    for i, (name, t) in enumerate(stats):
        for other_name, other in (*stats[i + 1:], *read):
            if isinstance(other, Tensor) and shares_memory(t, other):
                return (f"{name} must not share memory with {other_name} ({name} is updated "
                        f"in place){share_advice}")
    return None


def check_running_writable(running_mean, running_var, named_params, who: str,
                           input: Tensor | None = None) -> None:
    """Running statistics that a training call updates in place (checked after
    ``check_running_stats``): ``running_update_conflict`` against each other, the parameters
    and the input (a view of it would change the input under the call), as a ValueError."""
    if running_mean is None:
        return
    check_writable_outside_inference(
        (("running_mean", running_mean), ("running_var", running_var)), who)
    if _dynamo_compiling() or _addressless(running_mean) or _addressless(running_var):
        return
    try:  # fake (export) or functorch-wrapped tensors have no data pointers: nothing to check
        running_mean.untyped_storage().data_ptr()
        running_var.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return
    read = [(n, p) for n, p, _ in named_params]
    if input is not None:
        read.append(("input", input))
    why = running_update_conflict(running_mean, running_var, read)
    if why is not None:
        raise ValueError(f"{who}: {why}")


_INFERENCE = "an inference tensor (made under torch.inference_mode"


def check_writable_outside_inference(written, who: str) -> None:
    """Tensors a training call updates in place ((name, tensor) pairs: running statistics, the
    batch counter) must not be inference tensors outside inference mode: torch refuses their
    in-place update there (``nn.BatchNorm2d`` too), and it would come after the other tensors
    were updated (the compiled ops would write them regardless)."""
    if _dynamo_compiling() or torch.is_inference_mode_enabled():
        return
    for name, t in written:
        if isinstance(t, Tensor) and t.is_inference():
            raise ValueError(
                f"{who}: {name} is {_INFERENCE}, e.g. by a module built or loaded there), which "
                f"only inference mode may update in place, and a training call updates it; "
                f"replace it by a clone made outside inference mode")


def check_not_saved_inference(saved, recording, who: str) -> None:
    """Tensors a call saves for its backward ((name, tensor) pairs: the input, every parameter,
    the running statistics it reads) made under torch.inference_mode, outside it, in a call that
    records autograd (grad mode on and a tensor of ``recording`` requiring grad): autograd
    cannot save them, and would say so only after the call (and its running-statistics update)
    ran."""
    if _dynamo_compiling() or torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return
    bad = [(name, t) for name, t in saved if isinstance(t, Tensor) and t.is_inference()]
    if not bad or not any(isinstance(t, Tensor) and t.requires_grad for t in recording):
        return
    name = bad[0][0]
    if name == "input":
        raise ValueError(
            f"{who}: input is {_INFERENCE}), which autograd cannot save for the backward of "
            f"this call (its parameters require grad); call the layer under torch.no_grad() or "
            f"torch.inference_mode(), or pass input.clone() made outside inference mode")
    raise ValueError(
        f"{who}: {name} is {_INFERENCE}, e.g. loaded there), which autograd cannot save for the "
        f"backward of this call (it records gradients); replace it by a clone made outside "
        f"inference mode, or call the layer under torch.no_grad() or torch.inference_mode()")


def _no_inference(*tensors) -> bool:
    """None of ``tensors`` (None allowed) is an inference tensor, or inference mode is on: the
    predicates' cheap test; the checks above decide the rest."""
    for t in tensors:
        if t is not None and t.is_inference():
            return torch.is_inference_mode_enabled()
    return True


def check_batch_values(input: Tensor, who: str, training: bool = True) -> None:
    """Batch statistics need more than one value per channel (as ``nn.BatchNorm`` says; none,
    an empty input, is no statistic at all: it gets an empty output)."""
    per_channel = input.shape[0] * math.prod(input.shape[2:])
    if per_channel == 1:
        when = "training" if training else "eval mode without running statistics"
        raise ValueError(f"{who}: expected more than 1 value per channel when using batch "
                         f"statistics ({when}), got input of shape {tuple(input.shape)}")


def check_number(value, name: str, who: str, low: float = 0.0, allow_none: bool = False):
    """A finite real number: a Python int or float, or a NumPy scalar (``nn.BatchNorm`` takes
    ``np.float32`` hyperparameters, and ``convert`` copies them; ``run_layer`` makes them
    floats); not a bool, a tensor or a string."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):  # (np.bool_ is no numbers.Real)
        raise ValueError(f"{who}: {name} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{who}: {name} must be >= {low}, got {value!r}")


def check_batch_counter(t, input: Tensor, who: str) -> None:
    """A module's ``num_batches_tracked`` (None: not counted): the 0-dim int64 tensor that the
    layer's coefficient op increments in place, on the input's device."""
    if t is None:
        return
    _require_tensor(t, "num_batches_tracked", who)
    if t.dtype != torch.int64 or t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{who}: num_batches_tracked must be a 0-dim int64 tensor, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{who}: num_batches_tracked must be on the input's device "
                         f"{input.device}, got {t.device}")
    check_writable_outside_inference((("num_batches_tracked", t),), who)


def relu_flag(activation, who: str) -> bool:
    """The fused activation: None (none) or "relu" (``y = relu(norm(x))``, one kernel)."""
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f"{who}: activation must be None or 'relu', got {activation!r}")


def check_op_batch_counter(num_batches_tracked, mean: Tensor, op: str,
                           namespace: str = "normfuse", running=(), training: bool = False) -> None:
    """The coefficient ops' ``num_batches_tracked`` (the op-side twin of
    ``check_batch_counter``): None, or a 0-dim (or 1-element) int64 tensor on the statistics'
    device; in training (when it is incremented) not sharing memory with the running statistics
    updated beside it (``running``: ``(name, tensor or None)`` pairs).  The C++ ops' check, with
    the same messages (the Triton ops call it with their namespace); runs before anything is
    computed or mutated."""
    t = num_batches_tracked
    if t is None:
        return
    if not (isinstance(t, Tensor) and t.dtype == torch.int64 and t.numel() == 1 and t.dim() <= 1
            and t.device == mean.device):
        got = (f"a {t.dtype} tensor of shape {list(t.shape)} on {t.device}"
               if isinstance(t, Tensor) else f"{type(t).__name__}")
        raise RuntimeError(f"{namespace}.{op}: num_batches_tracked must be a 0-dim (or 1-element) "
                           f"int64 tensor on {mean.device} like the statistics, got {got}")
    # (not while Dynamo traces: its tensors have no data pointers; docs/errors.md)
    for name, r in running if training and not torch.compiler.is_compiling() else ():
        if isinstance(r, Tensor) and shares_memory(t, r):
            raise RuntimeError(f"{namespace}.{op}: num_batches_tracked must not share memory with "
                               f"{name} (num_batches_tracked is updated in place); pass separate "
                               f"tensors")


def _require_op_tensor(t, name: str, who: str) -> None:
    if not isinstance(t, Tensor):
        raise RuntimeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")


def check_op_statistics(op: str, mean, m2, plane_size: int, gradients=()) -> None:
    """The statistics of a coefficient op of the "torch" backend (``normfuse.coefficients``),
    checked as the C++ ops check them (``check_stats``, ``check_like_stats`` and
    ``check_plane_size`` in csrc/common/coefficients_glue.h), with their ``RuntimeError`` and
    ``normfuse.<op>:`` prefix: ``mean`` an ``(N, C)`` float32 or float64 tensor, ``m2`` and the
    backward's ``gradients`` ((name, tensor) pairs) of its shape, dtype and device, and
    ``plane_size >= 1`` (None: not checked).  Unchecked, a float32 statistic beside a float64 one was promoted or
    failed inside a matmul, naming nothing.  Strides are not checked: PyTorch ops read any."""
    who = f"normfuse.{op}"
    _require_op_tensor(mean, "mean", who)
    if mean.dim() != 2:
        raise RuntimeError(f"{who}: mean must be (N, C), got shape {list(mean.shape)}")
    if mean.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{who}: mean (the statistics) must be float32 or float64, got "
                           f"{mean.dtype}")
    for name, t in (("m2", m2), *gradients):
        _require_op_tensor(t, name, who)
        if t.shape != mean.shape or t.dtype != mean.dtype or t.device != mean.device:
            raise RuntimeError(f"{who}: {name} must be a {mean.dtype} tensor of shape "
                               f"{list(mean.shape)} on {mean.device} like mean, got {t.dtype} "
                               f"{list(t.shape)} on {t.device}")
    if plane_size is not None and plane_size < 1:
        raise RuntimeError(f"{who}: plane_size must be >= 1, got {plane_size}")


def check_op_groups(op: str, num_groups: int, channels: int) -> None:
    """``num_groups`` of an AssocNorm / ILM-Norm coefficient op (the C++ ops' check)."""
    if num_groups < 1 or channels % num_groups:
        raise RuntimeError(f"normfuse.{op}: num_groups ({num_groups}) must be >= 1 and divide "
                           f"the number of channels ({channels})")


def check_op_parameters(op: str, mean: Tensor, params) -> None:
    """The parameters of a coefficient op of the "torch" backend, ``(name, tensor, shape)``
    triples, as the C++ ops' ``param_ptr`` checks them (less contiguity): exactly ``shape``
    (a ``(C, 1)`` weight is not broadcast), the statistics' dtype (a float64 parameter would
    promote float32 coefficients) and device."""
    who = f"normfuse.{op}"
    for name, t, shape in params:
        _require_op_tensor(t, name, who)
        if t.shape != shape:
            raise RuntimeError(f"{who}: {name} must have shape {list(shape)}, got "
                               f"{list(t.shape)}")
        if t.dtype != mean.dtype:
            raise RuntimeError(f"{who}: {name} must be {mean.dtype} like the statistics "
                               f"(float32, float64 for a float64 input), got {t.dtype}")
        if t.device != mean.device:
            raise RuntimeError(f"{who}: {name} is on {t.device}, statistics on {mean.device}")


def check_group_values(input: Tensor, who: str, channels_per_group: int, group: str,
                       setting: str) -> None:
    """ILM-Norm's unbiased group variances need more than one value per group (the authors'
    layer returns NaN there).  ``group``: "group" or "key group"; ``setting``: what fixed the
    group's channel count, e.g. ``num_groups=4``."""
    per_group = channels_per_group * math.prod(input.shape[2:])
    if per_group <= 1:
        raise ValueError(f"{who}: expected more than 1 value per {group} for the unbiased "
                         f"variance, got input of shape {tuple(input.shape)} with {setting} "
                         f"(1 channel per {group}, 1 value per channel)")


# ---- the common path: one predicate instead of the checks above -------------------------------
# A layer call checks its input, every parameter and buffer, momentum and eps: a dozen Python
# function calls that cost several microseconds on every step, a visible share of a small
# layer's host cost (issue 13).  The predicates below test the same conditions inline and return
# True only when every check above would pass; when they return False the caller runs the
# checks above, in their documented order, which raise the documented error (or pass, when the
# predicate was merely conservative).  So they change no message and no order, only the cost.
_FLOATING_SET = frozenset(FLOATING)
_STRIDED = torch.strided
_PARAMETER = torch.nn.Parameter
_INF = math.inf


def _vectors_ok(tensors, input, shape, optional: bool) -> bool:
    """``check_tensor(t, ..., shape, input, ..., optional)`` would pass for every ``t``."""
    if input.is_cpu:  # the same device as a CPU input <=> a CPU tensor (no device objects)
        for t in tensors:
            if t is None:
                if optional:
                    continue
                return False
            kind = type(t)  # isinstance is ~0.1 us for a Parameter; these compare in ns
            if not ((kind is _PARAMETER or kind is Tensor or isinstance(t, Tensor)) and t.is_cpu
                    and t.layout is _STRIDED and t.dtype in _FLOATING_SET and t.shape == shape):
                return False
        return True
    device = input.device
    for t in tensors:
        if t is None:
            if optional:
                continue
            return False
        kind = type(t)
        if not ((kind is _PARAMETER or kind is Tensor or isinstance(t, Tensor))
                and t.layout is _STRIDED and t.dtype in _FLOATING_SET and t.shape == shape
                and t.device == device):
            return False
    return True


_dynamo_compiling = torch.compiler.is_dynamo_compiling
_C_TENSORS_OK = None  # normfuse._C.tensors_ok (csrc/python_checks.cpp) once looked up, or False


def _c_tensors_ok():
    """``_vectors_ok`` of one shape for a tuple of required and one of optional tensors, as one
    C call (~0.1 us instead of ~0.4 us a tensor), when normfuse._C has it; else False.  It
    answers False for tensor subclasses (the Python checks then decide)."""
    global _C_TENSORS_OK
    if _C_TENSORS_OK is None:
        try:
            from . import _extension  # noqa: PLC0415
            _C_TENSORS_OK = getattr(_extension._C, "tensors_ok", None) or False
        except Exception:  # noqa: BLE001  (no extension: the Python predicate)
            _C_TENSORS_OK = False
    return _C_TENSORS_OK


def _shaped_ok(input, shape, required, optional) -> bool:
    """Every tensor of ``required`` (not None) and ``optional`` (None allowed) passes
    ``check_tensor`` with ``shape``: in C on the eager path, in Python while torch.compile
    traces (it cannot trace into the C function)."""
    if not _dynamo_compiling():  # first: a trace that read the lazily set global would guard
        # on it and recompile once it is set. (Tensors traced otherwise, e.g. by export, are fake
        # subclasses, which the C function declines: the checks then decide.)
        fast = _C_TENSORS_OK if _C_TENSORS_OK is not None else _c_tensors_ok()
        if fast:
            return fast(input, shape, required, optional)
    return (_vectors_ok(required, input, shape, False)
            and _vectors_ok(optional, input, shape, True))


def _input_ok(input, ranks) -> bool:
    """``check_input`` would pass."""
    return (isinstance(input, Tensor) and input.layout is _STRIDED and not input.is_nested
            and input.dtype in _FLOATING_SET and input.dim() in ranks and input.numel() > 0)


def _numbers_ok(*values) -> bool:
    """``check_number(value, ..., low=0.0)`` would pass for every value."""
    for value in values:
        kind = type(value)
        if not ((kind is float or kind is int) and 0.0 <= value < _INF):
            return False
    return True


def _running_separate(running_mean, running_var, c, required, optional, input) -> bool:
    """``check_running_writable`` would pass for these (C,) running statistics: dense, and
    overlapping neither each other, nor a parameter, nor the input (dense (C,) vectors: byte
    ranges from one data pointer each, no storage objects; a parameter that is not dense: the
    checks decide; the input is contiguous or channels-last, a dense block)."""
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        return False
    if _dynamo_compiling():
        return running_mean is not running_var and all(  # (traced: no data pointers)
            running_mean is not p and running_var is not p for p in (*required, *optional))
    if _addressless(running_mean) or _addressless(running_var):
        return True  # fake: no data pointers; as before these checks
    try:
        m, v = running_mean.data_ptr(), running_var.data_ptr()
        m1, v1 = m + c * running_mean.element_size(), v + c * running_var.element_size()
        if m < v1 and v < m1:
            return False
        for p in (*required, *optional):  # also a view of a parameter, not only the object
            if p is None:
                continue
            if not p.is_contiguous():
                return False  # (the checks decide)
            q = p.data_ptr()
            q1 = q + c * p.element_size()
            if q < m1 and m < q1 or q < v1 and v < q1:
                return False
        if not (input.is_contiguous() or is_channels_last(input)):
            return False  # (a strided view: the checks decide)
        q = input.data_ptr()
        q1 = q + input.numel() * input.element_size()
        if q < m1 and m < q1 or q < v1 and v < q1:
            return False
    except RuntimeError:  # functorch-wrapped tensors have no data pointer
        return True
    return True


def batch_layer_ok(input, ranks, channels, use_batch, required, optional, running_mean,
                   running_var, num_batches_tracked, momentum, eps) -> bool:
    """BIN / IEBN: the module's checks (``channels`` given: ``num_features``) and the functional
    form's (``check_input``, ``check_tensor`` of every parameter, ``check_running_stats``,
    ``check_batch_counter``, ``check_number`` of momentum and eps, ``check_batch_values`` when
    ``use_batch``) would all pass."""
    if not _input_ok(input, ranks):
        return False
    c = input.shape[1]
    if (channels is not None and c != channels) or (use_batch and input.numel() <= c):
        return False  # wrong channel count; N * prod(spatial) <= 1 with batch statistics
    shape = (c,)
    if (running_mean is None) != (running_var is None):
        return False
    if not _shaped_ok(input, shape, required, (*optional, running_mean, running_var)):
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad) \
            and torch.is_grad_enabled():
        return False
    if running_mean is not None and use_batch and not _running_separate(
            running_mean, running_var, c, required, optional, input):
        return False  # updated in place: the checks look for overlaps (check_running_writable)
    t = num_batches_tracked
    if t is not None and not (isinstance(t, Tensor) and t.dtype is torch.int64
                              and t.dim() <= 1 and t.numel() == 1
                              and (t.is_cpu if input.is_cpu else t.device == input.device)):
        return False
    if not _dynamo_compiling() and not _no_inference(input, running_mean, running_var, t,
                                                     *required, *optional):
        return False  # (an inference tensor outside inference mode: the checks decide)
    return _numbers_ok(momentum, eps)


def _meta_network_ok(input, k, encoder, decoders, weight, bias, eps) -> bool:
    """``_check_meta_network`` (normfuse/functional.py) would pass: ``encoder (E, k)``, each
    decoder ``(k, E)``, ``weight`` and ``bias (C,)``, eps."""
    if not isinstance(encoder, Tensor) or encoder.dim() != 2:
        return False
    embed = encoder.shape[0]
    if embed == 0:
        return False
    return (_shaped_ok(input, (embed, k), (encoder,), ())
            and _shaped_ok(input, (k, embed), decoders, ())
            and _shaped_ok(input, (input.shape[1],), (weight, bias), ()) and _numbers_ok(eps))


def _divides(n, c) -> bool:
    """``n`` is a positive int (not a bool) dividing ``c``."""
    return type(n) is int and n > 0 and c % n == 0


def assoc_layer_ok(input, channels, num_groups, encoder, decoder_mean, decoder_var, weight,
                   bias, eps) -> bool:
    """AssocNorm: the module's checks (``channels`` given: ``num_channels``) and
    ``assoc_norm``'s would all pass."""
    if not _input_ok(input, (2, 3, 4, 5)):
        return False
    c = input.shape[1]
    if channels is not None and c != channels or not _divides(num_groups, c):
        return False
    if not _dynamo_compiling() and not _no_inference(input, encoder, decoder_mean, decoder_var,
                                                     weight, bias):
        return False  # (the checks decide)
    return _meta_network_ok(input, num_groups, encoder, (decoder_mean, decoder_var), weight,
                            bias, eps)


def ilm_layer_ok(input, channels, num_groups, key_group_size, encoder, decoder_weight,
                 decoder_bias, weight, bias, eps) -> bool:
    """ILMNorm: the module's checks (``channels`` given: ``num_channels``) and ``ilm_norm``'s
    would all pass (``check_ilm``: more than one value per group and per key group too)."""
    if not _input_ok(input, (2, 3, 4, 5)):
        return False
    c = input.shape[1]
    if (channels is not None and c != channels or not _divides(num_groups, c)
            or not _divides(key_group_size, c)):
        return False
    plane = math.prod(input.shape[2:])
    if c // num_groups * plane <= 1 or key_group_size * plane <= 1:
        return False
    if not _dynamo_compiling() and not _no_inference(input, encoder, decoder_weight,
                                                     decoder_bias, weight, bias):
        return False  # (the checks decide)
    return _meta_network_ok(input, c // key_group_size, encoder, (decoder_weight, decoder_bias),
                            weight, bias, eps)
