"""How every layer runs: moments -> coefficients -> affine map, and back.

Forward: ``moments``, the layer's coefficient op, ``affine_apply`` (3 launches on a GPU).
Backward: ``backward_sums``, the layer's coefficient backward op, ``backward_apply`` (3 launches).
Only the input and O(N*C) statistics are saved.  The ops come from the backend in use
(``normfuse.backends``); which layer runs is only which coefficient op is called.

ILM-Norm's coefficient step has no kernel yet on any backend: every backend runs the four
generic kernels and, between them, the PyTorch-ops reference ``coefficients.ilm`` (forward and
hand-written backward) on the O(N*C) statistics (docs/architecture.md, "ILM-Norm").

Two carriers of that pipeline, with the same ops in the same order: ``NormFunction``, one
``torch.autograd.Function`` for every layer and backend; and, for BIN, IEBN and AssocNorm on the
compiled ``cpu`` and ``cuda`` backends, the whole-layer ops ``torch.ops.normfuse.<layer>_layer``
(``csrc/layer_autograd.cpp``), whose autograd node is C++, so that a layer step costs the host
one op call instead of a Python autograd.Function (issue 13, "host cost").
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import torch_backend
from .backends import ops_for, resolve_backend
from .coefficients.ilm import ilm_coefficients, ilm_coefficients_backward

# Layers whose coefficient op takes batch/running statistics arguments (BIN, IEBN) vs. groups.
_BATCH_LAYERS = ("bin", "iebn")


def is_channels_last(x: Tensor) -> bool:
    """True when C is the innermost dense dimension (NHWC and its 1-d/3-d analogues)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def kernel_layout(x: Tensor) -> Tensor:
    """``x`` itself if the kernels can read it (contiguous or channels-last), else a copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (same shape as ``x``) in ``x``'s layout."""
    if is_channels_last(x):
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _coefficients(ops, layer, mean, m2, plane, params, running_mean, running_var, training,
                  momentum, eps, num_groups, num_batches_tracked=None):
    if layer in _BATCH_LAYERS:
        op = getattr(ops, f"{layer}_coefficients")
        return op(mean, m2, plane, *params, running_mean, running_var, training, momentum, eps,
                  num_batches_tracked)
    if layer == "ilm":  # the PyTorch-ops reference on every backend (no kernel yet)
        return ilm_coefficients(mean, m2, plane, num_groups, *params, eps)
    return ops.assoc_coefficients(mean, m2, plane, num_groups, *params, eps)


def _coefficients_backward(ops, layer, g1, g2, mean, m2, plane, params, running_mean,
                           running_var, training, eps, num_groups):
    if layer in _BATCH_LAYERS:
        op = getattr(ops, f"{layer}_coefficients_backward")
        return op(g1, g2, mean, m2, plane, *params, running_mean, running_var, training, eps)
    if layer == "ilm":
        return ilm_coefficients_backward(g1, g2, mean, m2, plane, num_groups, *params, eps)
    return ops.assoc_coefficients_backward(g1, g2, mean, m2, plane, num_groups, *params, eps)


def _traced_forward(layer, x, running_mean, running_var, num_batches_tracked, training,
                    momentum, eps, num_groups, params):
    """``NormFunction``'s forward with the "torch" backend, outside the autograd.Function:
    what ``torch.export`` traces (``run_layer``).  Its ops are differentiable, so the exported
    program's gradients are autograd's; running statistics and ``num_batches_tracked`` are
    updated in place as in eager training."""
    mean, m2 = torch_backend.moments(x)
    scale, shift = _coefficients(torch_backend, layer, mean, m2, math.prod(x.shape[2:]), params,
                                 running_mean, running_var, training, momentum, eps, num_groups,
                                 num_batches_tracked)
    return torch_backend.affine_apply(x, mean, scale, shift)


# NormFunction.forward's arguments: layer, backend, x, then _NO_GRAD_ARGS arguments that get no
# gradient (running_mean, running_var, num_batches_tracked, training, momentum, eps, num_groups),
# then the parameters.
_NO_GRAD_ARGS = 7
_FIRST_PARAM = 3 + _NO_GRAD_ARGS


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: str, backend: str, x: Tensor, running_mean, running_var,
                num_batches_tracked, training: bool, momentum: float, eps: float,
                num_groups: int, *params):
        ops = ops_for(backend)
        plane = math.prod(x.shape[2:])
        mean, m2 = ops.moments(x)
        # BIN / IEBN: the coefficient op also updates the running statistics and counts the
        # batch (num_batches_tracked += 1) in training, in its one launch.
        scale, shift = _coefficients(ops, layer, mean, m2, plane, params, running_mean,
                                     running_var, training, momentum, eps, num_groups,
                                     num_batches_tracked)
        y = ops.affine_apply(x, mean, scale, shift)
        # Running statistics matter to the backward only in eval mode, where they are constants.
        keep_running = not training and running_mean is not None
        ctx.save_for_backward(x, mean, m2, running_mean if keep_running else None,
                              running_var if keep_running else None, *params)
        ctx.config = (layer, backend, plane, training, eps, num_groups)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        layer, backend, plane, training, eps, num_groups = ctx.config
        x, mean, m2, running_mean, running_var, *params = ctx.saved_tensors
        dy = like_layout(grad_output, x)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
            needs = ctx.needs_input_grad[2:3] + ctx.needs_input_grad[_FIRST_PARAM:]
            dx, *grads = graph_grads(layer, x, dy, params, running_mean, running_var, training,
                                     eps, num_groups, needs)
            return (None, None, dx) + (None,) * _NO_GRAD_ARGS + tuple(grads)
        ops = ops_for(backend)
        g1, g2 = ops.backward_sums(dy, x, mean)
        c_dy, c_x, c_0, *grads = _coefficients_backward(
            ops, layer, g1, g2, mean, m2, plane, params, running_mean, running_var, training,
            eps, num_groups)
        dx = ops.backward_apply(dy, x, mean, c_dy, c_x, c_0) if ctx.needs_input_grad[2] else None
        grads = [g if p is not None and need else None
                 for g, p, need in zip(grads, params, ctx.needs_input_grad[_FIRST_PARAM:])]
        return (None, None, dx) + (None,) * _NO_GRAD_ARGS + tuple(grads)


def graph_grads(layer, x, dy, params, running_mean, running_var, training, eps, num_groups,
                needs):
    """First derivatives as a differentiable graph, so that second derivatives are correct.

    Recomputes the layer from ``x`` with the "torch" backend's differentiable ops (running
    statistics and ``num_batches_tracked`` are never updated here) and differentiates it with
    ``create_graph=True``.  ``needs[i]``: whether input i (``x``, then ``params``) wants a
    gradient; returns one gradient (or None) per input.
    """
    candidates = [x, *params]
    wanted = [t for t, need in zip(candidates, needs) if t is not None and need]
    with torch.enable_grad():
        mean, m2 = torch_backend.moments(x)
        scale, shift = _coefficients(torch_backend, layer, mean, m2, math.prod(x.shape[2:]),
                                     params, running_mean, running_var, training, 0.0, eps,
                                     num_groups)
        y = torch_backend.affine_apply(x, mean, scale, shift)
        found = torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True)
    by_id = {id(t): g for t, g in zip(wanted, found)}
    return [by_id.get(id(t)) if t is not None and need else None
            for t, need in zip(candidates, needs)]


# ---- the whole layer as one op per direction (csrc/layer_autograd.cpp) -------------------------
# For the "cpu" and "cuda" backends a layer is one call of torch.ops.normfuse.<layer>_layer,
# whose Autograd kernel is a C++ node running the same three backward ops as NormFunction.
# Double backward comes back to Python through normfuse::_layer_backward_graph (defined below:
# graph_grads, as NormFunction does).  NormFunction still carries the layer where the C++ node
# would behave differently: while torch.compile traces (NormFunction's ops have fake
# implementations and are traced one by one), under forward-mode AD (a dual level is open) and
# under functorch transforms (vmap, grad, ...), which refuse NormFunction with their own
# messages; and wherever normfuse._C was built without these ops.
_functorch_active = torch._C._are_functorch_transforms_active
_LAYER_CODES = ("bin", "iebn", "assoc")  # the layer numbers of csrc/layer_autograd.cpp
_FUSED = None  # {"bin": op, "iebn": op, "assoc": op} once looked up; {} when _C lacks them
_GRAPH_LIB = None


def _layer_backward_graph(layer, input, grad_output, params, running_mean, running_var,
                          training, eps, num_groups, needs):
    """``graph_grads`` for the C++ node's double backward.  ``needs``: bit i set when input i
    (``input``, then ``params``) wants a gradient.  A None gradient comes back as an empty (0,)
    tensor (a list of tensors holds no None; no real gradient is empty, since inputs and
    parameters never are), which the node turns back into None."""
    wants = [bool(needs >> i & 1) for i in range(1 + len(params))]
    grads = graph_grads(_LAYER_CODES[layer], input, grad_output, list(params), running_mean,
                        running_var, training, eps, num_groups, wants)
    return [g if g is not None else input.new_empty((0,)) for g in grads]


def _callable(overload):
    return getattr(overload, "_op", overload)


def _fused_ops() -> dict:
    """The whole-layer ops by layer name, when normfuse._C has them ({} otherwise)."""
    global _FUSED, _GRAPH_LIB
    if _FUSED is None:
        from . import _extension  # noqa: PLC0415
        found = {}
        if _extension.HAS_CPU_KERNELS and hasattr(torch.ops.normfuse, "bin_layer"):
            lib = torch.library.Library("normfuse", "FRAGMENT")
            lib.define("_layer_backward_graph(int layer, Tensor input, Tensor grad_output, "
                       "Tensor?[] params, Tensor? running_mean, Tensor? running_var, "
                       "bool training, float eps, int num_groups, int needs) -> Tensor[]")
            lib.impl("_layer_backward_graph", _layer_backward_graph, "CompositeImplicitAutograd")
            _GRAPH_LIB = lib  # the registration lives as long as this object
            # The overload's C++ callable (OpOverload.__call__ is a Python frame around it).
            found = {name: _callable(getattr(torch.ops.normfuse, f"{name}_layer").default)
                     for name in _LAYER_CODES}
        _FUSED = found
    return _FUSED


def _dense(t, dtype):
    """``t`` as a contiguous ``dtype`` tensor (itself when it already is: no dispatcher calls on
    the common path, where they are a measurable share of a small layer's cost)."""
    if t is None or (t.dtype is dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def run_layer(layer: str, input: Tensor, running_mean, running_var, training: bool,
              momentum: float, eps: float, num_groups: int, params,
              num_batches_tracked=None) -> Tensor:
    """Validated inputs in, output out: picks the backend, layouts and dtypes, then runs.

    ``num_batches_tracked`` (BIN / IEBN modules in training): incremented in place by the
    layer's coefficient op, so the module's counter costs no launch of its own."""
    backend = resolve_backend(input)
    acc = torch.float64 if input.dtype is torch.float64 else torch.float32
    x = input if input.is_contiguous() else kernel_layout(input)
    # The kernels read parameters and statistics as dense vectors in the acc dtype: a strided
    # view or another dtype is converted (running statistics then get written back below).
    params = [p if p is None or (p.dtype is acc and p.is_contiguous()) else _dense(p, acc)
              for p in params]
    rm, rv = _dense(running_mean, acc), _dense(running_var, acc)
    training, momentum, eps, num_groups = bool(training), float(momentum), float(eps), \
        int(num_groups)
    if backend == "torch" and torch.compiler.is_exporting():
        # torch.export records an autograd.Function's forward under no_grad and drops its
        # backward: the program would have no gradients.  The "torch" backend's ops are
        # differentiable, so trace them directly (normfuse/export.py).
        y = _traced_forward(layer, x, rm, rv, num_batches_tracked, training, momentum, eps,
                            num_groups, params)
    else:
        fused = _FUSED if _FUSED is not None else _fused_ops()
        op = fused.get(layer)  # None for ILM-Norm (no kernel for its coefficient step yet)
        if (op is not None and (backend == "cpu" or backend == "cuda")
                and not torch.compiler.is_compiling() and _forward_ad._current_level < 0
                and not _functorch_active()):
            y = run_fused(op, layer, x, rm, rv, num_batches_tracked, training, momentum, eps,
                          num_groups, params)
        else:
            y = NormFunction.apply(layer, backend, x, rm, rv, num_batches_tracked, training,
                                   momentum, eps, num_groups, *params)
    if training and running_mean is not None and (rm is not running_mean
                                                  or rv is not running_var):
        with torch.no_grad():  # buffers of another dtype or strided: updated on a copy
            if rm is not running_mean:
                running_mean.copy_(rm)
            if rv is not running_var:
                running_var.copy_(rv)
    return y


def run_fused(op, layer, x, rm, rv, nbt, training, momentum, eps, num_groups, params):
    """One call of the layer's whole-layer op (the coefficient op's arguments, plus ``x``)."""
    if layer == "assoc":
        return op(x, num_groups, *params, eps)
    return op(x, *params, rm, rv, training, momentum, eps, nbt)
