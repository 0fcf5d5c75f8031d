"""How every layer runs: moments -> coefficients -> affine map, and back.

Forward: ``moments``, the layer's coefficient op, ``affine_apply`` (3 launches on a GPU).
Backward: ``backward_sums``, the layer's coefficient backward op, ``backward_apply`` (3 launches).
Only the input and O(N*C) statistics are saved.  The ops come from the backend in use
(``normfuse.backends``); which layer runs is only which coefficient op is called.


Two carriers of that pipeline, with the same ops in the same order: ``NormFunction``, one
``torch.autograd.Function`` for every layer and backend; and, for BIN, IEBN, AssocNorm and
ILM-Norm on the compiled ``cpu`` and ``cuda`` backends (ILM-Norm on ``cpu`` only while its CUDA
coefficient kernels await a GPU run, ``_ILM_KERNELS``), the whole-layer ops
``torch.ops.normfuse.<layer>_layer`` (``csrc/layer_autograd.cpp``), whose autograd node is C++,
so that a layer step costs the host one op call instead of a Python autograd.Function (issue 13,
"host cost").
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _transforms, torch_backend
from ._checks import is_channels_last
from .backends import ops_for, resolve_backend
from .coefficients import (bin_coefficients, bin_coefficients_backward, iebn_coefficients,
                           iebn_coefficients_backward)

# Layers whose coefficient op takes batch/running statistics arguments (BIN, IEBN) vs. groups.
_BATCH_LAYERS = ("bin", "iebn")
# The backends whose ILM-Norm coefficient kernels the layers call. The CUDA and Triton ILM
# kernels (csrc/kernels/coefficients_ilm.cuh, triton_kernels/coefficients_ilm.py) have run only
# on the CPU shim and the Triton interpreter: until their GPU tests pass on a GPU
# (tests/csrc/test_ilm_coefficients.py, tests/triton_kernels/test_coefficients_ilm.py and
# test_gpu.py), the "cuda" and "triton" layers run this one step with the reference (the torch
# backend's op); add them here then. A wrong GPU kernel would be silently wrong gradients.
_ILM_KERNELS = ("torch", "cpu")


def ilm_devices(devices: int) -> int:
    """``devices`` (``backends.compiled_devices()``'s bits) less CUDA while its ILM kernels are
    not trusted: the one-C-call path must not run ILM-Norm's whole-layer op there."""
    return devices if "cuda" in _ILM_KERNELS else devices & 1


def _ilm_ops(ops, config):
    """``ops`` where its ILM kernels are trusted (``_ILM_KERNELS``), else the reference."""
    return ops if config.backend in _ILM_KERNELS else torch_backend
# The Triton AssocNorm coefficient kernels hold a sample's groups in one tile of at most this
# many (triton_kernels/heuristics.py, ASSOC_BLOCKS): a layer with more groups runs that one
# O(N * C) step with the reference (PyTorch ops), its full-size passes still Triton's.
TRITON_ASSOC_MAX_GROUPS = 64


def _assoc_ops(ops, config):
    """``ops``, or the reference where the Triton AssocNorm kernels do not reach."""
    if config.backend == "triton" and config.num_groups > TRITON_ASSOC_MAX_GROUPS:
        return torch_backend
    return ops


# Their PyTorch-ops coefficient steps, which take a ``merge`` (the synchronized layers').
_REFERENCE = {"bin": (bin_coefficients, bin_coefficients_backward),
              "iebn": (iebn_coefficients, iebn_coefficients_backward)}


def kernel_layout(x: Tensor) -> Tensor:
    """``x`` itself if the kernels can read it (contiguous or channels-last), else a copy: in
    channels-last where C is the innermost dimension (a channel slice of an NHWC tensor, as
    ShuffleNet's split makes: a contiguous copy would be a transpose, ~5x a plain copy on the
    CPU, and hand an NCHW output to a channels-last model), else contiguous."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    if x.dim() > 2 and x.stride(1) == 1 and x.shape[1] > 1:
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.contiguous()


def like_layout(t: Tensor, x: Tensor, channels_last: bool | None = None) -> Tensor:
    """``t`` (same shape as ``x``) in ``x``'s layout (``channels_last``: whether that is
    channels-last, when the caller knows).  While Dynamo traces a backward, no tensor's layout
    may be asked (a stride or ``is_contiguous`` query there makes Dynamo retrace the backward
    with every incoming gradient made contiguous: for a channels-last layer two input-sized
    copies in each compiled backward, the gradient made contiguous and then channels-last
    again), so ``NormFunction`` passes the layout its forward saw, and ``t`` is converted
    unconditionally: the conversion ops are no-ops on a tensor already in the layout, which the
    traced graph sees."""
    if channels_last is None:
        channels_last = is_channels_last(x)
    if channels_last:
        if not torch.compiler.is_compiling() and is_channels_last(t):
            return t
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


class LayerConfig(NamedTuple):
    """Everything of a layer call that is not a tensor: ``NormFunction``'s one non-tensor
    argument (a NamedTuple, so torch.compile traces it as constants)."""
    layer: str             # "bin", "iebn", "assoc" or "ilm"
    backend: str           # normfuse.backends name: whose ops run
    training: bool         # BIN / IEBN: batch statistics (and running-statistics update)
    momentum: float        # BIN / IEBN: factor of the running statistics' average
    eps: float
    num_groups: int = 0    # AssocNorm / ILM-Norm
    relu: bool = False     # fused activation: y = relu(norm(x))
    merge: Any = None      # synchronized BIN / IEBN: the SyncBatchMerge of this call
    who: str = ""          # the module or function called, for errors raised past the checks
    # BIN's one-sample view (_bin_as_one_sample) in eval mode with running statistics: no
    # moments pass; the running mean stands in as each sample's mean and m2 is the plane size
    # (a unit variance for the instance half, whose weight 1 - gate is 0), as in C++
    running_centre: bool = False


def _coefficients(ops, config, mean, m2, plane, params, running_mean, running_var,
                  num_batches_tracked=None):
    layer = config.layer
    if config.merge is not None:  # synchronized: the reference with the all-gathering merge
        op = _REFERENCE[layer][0]
        return op(mean, m2, plane, *params, running_mean, running_var, config.training,
                  config.momentum, config.eps, num_batches_tracked, merge=config.merge)
    if layer in _BATCH_LAYERS:
        op = getattr(ops, f"{layer}_coefficients")
        return op(mean, m2, plane, *params, running_mean, running_var, config.training,
                  config.momentum, config.eps, num_batches_tracked)
    op = (_ilm_ops(ops, config).ilm_coefficients if layer == "ilm"
          else _assoc_ops(ops, config).assoc_coefficients)
    return op(mean, m2, plane, config.num_groups, *params, config.eps)


def _coefficients_backward(ops, config, g1, g2, mean, m2, plane, params, running_mean,
                           running_var):
    layer = config.layer
    if config.merge is not None:  # holds the all-reduce of the batch statistics' gradients
        op = _REFERENCE[layer][1]
        return op(g1, g2, mean, m2, plane, *params, running_mean, running_var, config.training,
                  config.eps, merge=config.merge)
    if layer in _BATCH_LAYERS:
        op = getattr(ops, f"{layer}_coefficients_backward")
        return op(g1, g2, mean, m2, plane, *params, running_mean, running_var, config.training,
                  config.eps)
    op = (_ilm_ops(ops, config).ilm_coefficients_backward if layer == "ilm"
          else _assoc_ops(ops, config).assoc_coefficients_backward)
    return op(g1, g2, mean, m2, plane, config.num_groups, *params, config.eps)


def _traced_forward(config, x, running_mean, running_var, num_batches_tracked, params):
    """``NormFunction``'s forward with the "torch" backend, outside the autograd.Function:
    what ``torch.export`` traces (``run_layer``).  Its ops are differentiable, so the exported
    program's gradients are autograd's; running statistics and ``num_batches_tracked`` are
    updated in place as in eager training."""
    mean, m2 = torch_backend.moments(x)
    scale, shift = _coefficients(torch_backend, config, mean, m2, math.prod(x.shape[2:]), params,
                                 running_mean, running_var, num_batches_tracked)
    return torch_backend.affine_apply(x, mean, scale, shift, config.relu)


def _forward(config: LayerConfig, x: Tensor, running_mean, running_var, num_batches_tracked,
             params):
    """moments -> coefficients -> affine_apply with ``config.backend``'s ops:
    ``(y, mean, m2, scale, shift)``."""
    ops = ops_for(config.backend)
    plane = math.prod(x.shape[2:])
    samples = x.numel() > 0  # False only on a synchronized rank without values
    if samples and config.running_centre:  # (see LayerConfig)
        mean = running_mean.unsqueeze(0).expand(x.shape[0], -1).contiguous()
        m2 = torch.full_like(mean, plane)
    elif samples:
        mean, m2 = ops.moments(x)
    else:
        mean = m2 = x.new_zeros((0, x.shape[1]), dtype=torch_backend.acc_dtype(x.dtype))
    # BIN / IEBN: the coefficient op also updates the running statistics and counts the
    # batch (num_batches_tracked += 1) in training, in its one launch.
    scale, shift = _coefficients(ops, config, mean, m2, plane, params, running_mean,
                                 running_var, num_batches_tracked)
    y = (ops.affine_apply(x, mean, scale, shift, config.relu) if samples
         else torch.empty_like(x))
    return y, mean, m2, scale, shift


def _kept_running(config, running_mean, running_var):
    """The running statistics a derivative reads: eval mode's (constants there), else None."""
    if config.training or running_mean is None:
        return None, None
    return running_mean, running_var


def _save(ctx, config: LayerConfig, x: Tensor, running_mean, running_var, statistics, params):
    """What the backward reads. Running statistics matter to it only in eval mode, where they
    are constants; scale and shift only to the fused ReLU, whose mask they recompute."""
    mean, m2, scale, shift = statistics
    relu = config.relu
    ctx.save_for_backward(x, mean, m2, *_kept_running(config, running_mean, running_var),
                          scale if relu else None, shift if relu else None, *params)
    ctx.config = config
    ctx.channels_last = is_channels_last(x)  # (the backward may not ask: see like_layout)


def _backward(ctx, grad_output, every_input: bool = False):
    """The gradients of ``(config, x, running_mean, running_var, num_batches_tracked,
    *params)`` from y's gradient (None: zeros).  ``every_input``: compute them for ``x`` and
    every parameter, whatever ``ctx.needs_input_grad`` says."""
    config = ctx.config
    x, mean, m2, running_mean, running_var, scale, shift, *params = ctx.saved_tensors
    _, needs_x, _, _, _, *needs_params = ctx.needs_input_grad  # forward's arguments
    needs = [True] * (1 + len(params)) if every_input else [needs_x, *needs_params]
    no_grads = (None, None, None)  # running_mean, running_var, num_batches_tracked
    dy = (like_layout(grad_output, x, ctx.channels_last) if grad_output is not None
          else torch.zeros_like(x))
    if not torch.is_grad_enabled():
        grads = kernel_grads(config, x, dy, params, running_mean, running_var, needs,
                             (mean, m2, scale, shift))
    elif config.merge is not None:
        raise RuntimeError("normfuse synchronized layers do not support double backward "
                           "(create_graph=True); use the plain modules for that")
    elif _transforms.first_derivatives_only(x):
        grads = _transforms.NormBackward.apply(config, tuple(needs), None, x, dy, mean, m2,
                                               scale, shift, running_mean, running_var, *params)
    else:  # create_graph=True: a differentiable recomputation
        grads = graph_grads(config, x, dy, params, running_mean, running_var, needs)
    dx, *param_grads = grads
    return (None, dx, *no_grads, *param_grads)


# More instances than this (``kernel_grads``): their parameter gradients from the "torch"
# reference under torch.vmap, flat in B (~0.6-0.9 ms on the CPU), not a coefficient-backward call
# per instance (~11 us each on the CPU, a launch each on a GPU).
INSTANCE_CALLS_MAX = 32


def _per_instance(parts, concatenated: int):
    """The instances' results (one tuple each) as one: the first ``concatenated`` entries
    (per-sample tensors) concatenated along the batch, the others (parameter gradients) stacked
    on a new leading instance dim; None stays None."""
    return [None if part[0] is None else torch.cat(part) if i < concatenated else torch.stack(part)
            for i, part in enumerate(zip(*parts))]


def kernel_grads(config, x, dy, params, running_mean, running_var, needs, statistics,
                 instances=None):
    """``[dx, *parameter gradients]`` (None where ``needs`` says no) with ``config.backend``'s
    ops: the first derivatives ``graph_grads`` computes, not differentiable. ``statistics``: the
    forward's ``(mean, m2, scale, shift)``. ``instances``: None, or the number B of instances
    folded into the batch by ``torch.func.vmap`` (normfuse/_vmap.py); then each parameter
    gradient sums over one instance's samples only, and the B of them are stacked on a leading
    dim (also when B is 1)."""
    mean, m2, scale, shift = statistics
    ops = ops_for(config.backend)
    plane = math.prod(x.shape[2:])
    samples = x.numel() > 0
    if samples and scale is not None and ops is torch_backend:
        # The torch backend's ops have no fused mask: each would recompute it (five passes
        # over x), so mask dy once here and hand both ops the masked gradient.
        dy, scale, shift = torch_backend.relu_masked(dy, x, mean, scale, shift), None, None
    if samples:
        g1, g2 = ops.backward_sums(dy, x, mean, scale, shift)
    else:
        g1, g2 = torch.zeros_like(mean), torch.zeros_like(mean)

    def coefficient_step(with_ops, g1, g2, mean, m2):  # -> (c_dy, c_x, c_0, *param grads)
        return _coefficients_backward(with_ops, config, g1, g2, mean, m2, plane, params,
                                      running_mean, running_var)

    if instances is None:
        c_dy, c_x, c_0, *grads = coefficient_step(ops, g1, g2, mean, m2)
    elif instances <= INSTANCE_CALLS_MAX:  # a call per instance: its samples' statistics
        c_dy, c_x, c_0, *grads = _per_instance(
            [coefficient_step(ops, *chunk)
             for chunk in zip(*(t.chunk(instances) for t in (g1, g2, mean, m2)))],
            concatenated=3)
    else:  # many instances: the reference (PyTorch ops) batched over them, not a call each
        c_dy, c_x, c_0, *grads = torch.vmap(functools.partial(coefficient_step, torch_backend))(
            *(t.unflatten(0, (instances, -1)) for t in (g1, g2, mean, m2)))
        c_dy, c_x, c_0 = (t.flatten(0, 1) for t in (c_dy, c_x, c_0))
    dx = None
    if needs[0]:
        dx = (ops.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift) if samples
              else torch.zeros_like(x))
    return [dx, *(g if p is not None and need else None
                  for g, p, need in zip(grads, params, needs[1:]))]


class NormFunction(torch.autograd.Function):
    """Every layer on every backend: moments -> coefficients -> affine_apply, and back.

    Arguments: ``config`` (``LayerConfig``), ``x``, the running statistics and
    ``num_batches_tracked`` (updated in place, no gradient), then the layer's parameters.
    Under functorch transforms ``NormFunctionTransforms`` carries the call instead
    (normfuse/_transforms.py)."""

    @staticmethod
    def forward(ctx, config: LayerConfig, x: Tensor, running_mean, running_var,
                num_batches_tracked, *params):
        y, *statistics = _forward(config, x, running_mean, running_var, num_batches_tracked,
                                  params)
        _save(ctx, config, x, running_mean, running_var, statistics, params)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        return _backward(ctx, grad_output)


def graph_grads(config, x, dy, params, running_mean, running_var, needs):
    """First derivatives as a differentiable graph, so that second derivatives are correct.

    The "torch" backend's backward ops (PyTorch ops, differentiable) on the statistics
    recomputed from ``x`` with its ``moments``: autograd differentiates that graph again, through
    the statistics to ``x``.  No nested ``autograd.grad``: a functorch transform
    (``torch.func.vjp``, ``grad``) runs a backward with grad mode on and differentiates what it
    returns, which a nested call would cut at the saved tensors.  Running statistics and
    ``num_batches_tracked`` are never updated here.  ``needs[i]``: whether input i (``x``, then
    ``params``) wants a gradient; returns one gradient (or None) per input.
    """
    local = config._replace(momentum=0.0, merge=None)
    plane = math.prod(x.shape[2:])
    with torch.enable_grad():
        mean, m2 = torch_backend.moments(x)
        scale = shift = None
        if config.relu:  # the mask's coefficients (piecewise constant in everything: no gradient)
            scale, shift = _coefficients(torch_backend, local, mean, m2, plane, params,
                                         running_mean, running_var)
        g1, g2 = torch_backend.backward_sums(dy, x, mean, scale, shift)
        c_dy, c_x, c_0, *grads = _coefficients_backward(torch_backend, local, g1, g2, mean, m2,
                                                        plane, params, running_mean, running_var)
        dx = (torch_backend.backward_apply(dy, x, mean, c_dy, c_x, c_0, scale, shift)
              if needs[0] else None)
    return [dx, *(g if p is not None and need else None
                  for g, p, need in zip(grads, params, needs[1:]))]


# ---- the whole layer as one op per direction (csrc/layer_autograd.cpp) -------------------------
# For the "cpu" and "cuda" backends a layer is one call of torch.ops.normfuse.<layer>_layer,
# whose Autograd kernel is a C++ node running the same three backward ops as NormFunction.
# Double backward comes back to Python through normfuse::_layer_backward_graph (defined below:
# graph_grads, as NormFunction does).  NormFunction still carries the layer where the C++ node
# would behave differently: while torch.compile traces (NormFunction's ops have fake
# implementations and are traced one by one), under forward-mode AD (a dual level is open) and
# under functorch transforms (grad, vjp, jacrev and vmap run NormFunctionTransforms, forward
# mode NormFunctionForwardMode: normfuse/_transforms.py), which refuse the C++ node; and wherever
# normfuse._C was built without these ops.
_functorch_active = torch._C._are_functorch_transforms_active
_LAYER_CODES = ("bin", "iebn", "assoc", "ilm")  # the layer numbers of csrc/layer_directions.h
_FUSED = None  # {"bin": op, "iebn": op, "assoc": op} once looked up; {} when _C lacks them
_GRAPH_LIB = None


def _layer_backward_graph(layer, input, grad_output, params, running_mean, running_var,
                          training, eps, num_groups, relu, needs):
    """``graph_grads`` for the C++ node's double backward.  ``needs``: bit i set when input i
    (``input``, then ``params``) wants a gradient.  A None gradient comes back as an empty (0,)
    tensor (a list of tensors holds no None; no real gradient is empty, since inputs and
    parameters never are), which the node turns back into None."""
    wants = [bool(needs >> i & 1) for i in range(1 + len(params))]
    config = LayerConfig(_LAYER_CODES[layer], "torch", training, 0.0, eps, num_groups, relu)
    grads = graph_grads(config, input, grad_output, list(params), running_mean, running_var,
                        wants)
    return [g if g is not None else input.new_empty((0,)) for g in grads]


_STEPS = None  # (batch_layer_step, assoc_layer_step, ilm_layer_step) of normfuse._C, or Nones
_exporting_or_compiling = torch.compiler.is_compiling


def one_call_step(kind: int):
    """``normfuse._C.batch_layer_step`` (``kind`` 0), ``assoc_layer_step`` (1) or
    ``ilm_layer_step`` (2), from csrc/python_layer_step.cpp: a module call's common path on the
    compiled backends as one C call, which returns the output or NotImplemented (then the
    module runs its Python path).
    None where it must not run, tested as ``run_layer`` tests it before the whole-layer op:
    while torch.compile / torch.export trace (Dynamo cannot trace a C function; they get
    NormFunction), under a forward-mode AD level or a functorch transform; or when the
    extension lacks it."""
    global _STEPS
    if _exporting_or_compiling() or _forward_ad._current_level >= 0 or _functorch_active():
        return None
    if _STEPS is None:
        from . import _extension  # noqa: PLC0415
        c = _extension._C if _extension.HAS_CPU_KERNELS and _fused_ops() else None
        _STEPS = tuple(getattr(c, name, None) for name in (
            "batch_layer_step", "assoc_layer_step", "ilm_layer_step"))
    return _STEPS[kind]


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
                       "bool training, float eps, int num_groups, bool relu, int needs) -> Tensor[]")
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
              num_batches_tracked=None, relu: bool = False, merge=None, who: str = "") -> Tensor:
    """Validated inputs in, output out: picks the backend, layouts and dtypes, then runs.

    ``num_batches_tracked`` (BIN / IEBN modules in training): incremented in place by the
    layer's coefficient op, so the module's counter costs no launch of its own.  ``relu``: the
    fused activation.  ``merge``: the synchronized layers' ``SyncBatchMerge`` (the batch
    statistics then span a process group; ``NormFunction`` carries the call).  ``who``: the
    module or function called, named by errors only a transform raises (normfuse/_vmap.py)."""
    backend = resolve_backend(input)  # first: a backend that cannot run raises for any input
    if merge is not None and (_functorch_active() or (
            _forward_ad._current_level >= 0 and _has_tangent(input, params))):
        # functorch runs every backward with grad mode on, which the synchronized layers' backward
        # (its all-reduce) does not support: refused here, not as "double backward" later; and a
        # forward-mode tangent would be this rank's alone (the jvp has no all-reduce).
        who = getattr(merge, "who", "normfuse")
        abort = getattr(merge, "abort", None)
        if abort is not None:  # the other ranks wait in the exchange: they raise too
            abort(input.device)
        raise RuntimeError(f"{who}: the synchronized layers do not support torch.func transforms "
                           "(grad, vjp, jacrev, vmap, ...) or forward-mode AD (jvp, "
                           "torch.autograd.forward_ad); use the plain module (no process group) "
                           "there")
    if merge is None and input.numel() == 0:
        return _empty_output(input, params, num_batches_tracked)
    acc = torch.float64 if input.dtype is torch.float64 else torch.float32
    x = input if input.is_contiguous() else kernel_layout(input)
    # The kernels read parameters and statistics as dense vectors in the acc dtype: a strided
    # view or another dtype is converted (running statistics then get written back below).
    params = [p if p is None or (p.dtype is acc and p.is_contiguous()) else _dense(p, acc)
              for p in params]
    rm, rv = _dense(running_mean, acc), _dense(running_var, acc)
    training, momentum, eps, num_groups = bool(training), float(momentum), float(eps), \
        int(num_groups)
    tracing = torch.jit.is_tracing()
    if tracing and backend == "triton" and training and (
            running_mean is not None or num_batches_tracked is not None):
        raise RuntimeError(
            f"{who or 'normfuse'}: torch.jit.trace of a training-mode layer that updates running "
            "statistics cannot run on the 'triton' backend (the trace would record the "
            "update twice: inside the layer's autograd.Function and again as its own ops); "
            "use backend 'cpu', 'cuda' or 'torch', eval mode, or torch.export")
    if backend == "torch" and (tracing or torch.compiler.is_exporting()):
        # torch.export records an autograd.Function's forward under no_grad and drops its
        # backward: the program would have no gradients; torch.jit.trace records both the
        # Function and the running-statistics update inside it (applied twice when run).  The
        # "torch" backend's ops are differentiable, so trace them directly (normfuse/export.py).
        config = LayerConfig(layer, backend, training, momentum, eps, num_groups, relu, who=who)
        y = _traced_forward(config, x, rm, rv, num_batches_tracked, params)
    else:
        op = None
        # is_compiling() first: _fused_ops() registers a torch.library fragment at its first
        # call, which Dynamo refuses to trace (torch.compile before any eager call).
        if (merge is None and (backend == "cpu" or backend == "cuda")
                and not torch.compiler.is_compiling() and _forward_ad._current_level < 0
                and not _functorch_active()):
            fused = _FUSED if _FUSED is not None else _fused_ops()
            # ILM-Norm's whole-layer op calls the backend's ILM kernels: only where trusted
            op = fused.get(layer) if layer != "ilm" or backend in _ILM_KERNELS else None
        if op is not None:
            y = run_fused(op, layer, x, rm, rv, num_batches_tracked, training, momentum, eps,
                          num_groups, params, relu)
        else:
            # (eval with running statistics and eps = 0 keeps the general path: forward mode and
            # second derivatives recompute the view's moments with the torch backend, and a
            # column constant across the batch would meet 0 * rsqrt(0 + eps) = NaN there)
            one_sample = (layer == "bin" and merge is None and backend != "torch"
                          and x.dim() == 2 and x.shape[0] >= (2 if training else 1)
                          and (training or rm is None or eps > 0))
            if one_sample:
                x, params = _bin_as_one_sample(x, params)
            config = LayerConfig(layer, backend, training, momentum, eps, num_groups, relu, merge,
                                 who, running_centre=one_sample and not training and rm is not None)
            if _forward_ad._current_level >= 0:
                y = _transforms.NormFunctionForwardMode.apply(config, x, rm, rv,
                                                              num_batches_tracked, *params)[0]
            elif _functorch_active():
                y = _transforms.NormFunctionTransforms.apply(config, x, rm, rv,
                                                             num_batches_tracked, *params)[0]
            else:
                y = NormFunction.apply(config, x, rm, rv, num_batches_tracked, *params)
            if one_sample:
                y = y.squeeze(0).t()
    if training and running_mean is not None and (rm is not running_mean
                                                  or rv is not running_var):
        # buffers of another dtype or strided: updated on a copy (detached, not under no_grad:
        # see coefficients/_merge.update_running_stats)
        if rm is not running_mean:
            running_mean.copy_(rm.detach())
        if rv is not running_var:
            running_var.copy_(rv.detach())
    return y


def _bin_as_one_sample(x: Tensor, params):
    """BIN on a 2-d (N, C) input (one value per plane) as batch norm with weight gamma * rho:
    BIN of one sample whose plane is the batch, ``x`` viewed as (1, C, N) with C innermost
    (channels-last, no copy), gate 1, weight ``gamma * rho`` (autograd takes the gate's and
    weight's gradients through the product).  Exact: at L = 1 the instance half is 0.  No
    intermediate is then input-sized.  The whole-layer op does the same in C++
    (csrc/layer_directions.cpp, ``bin_as_one_sample``); this serves ``NormFunction``'s callers
    (torch.compile, the triton backend, transforms); in eval mode with running statistics
    with ``LayerConfig.running_centre`` (no moments pass).  Returns ``(x, params)`` of that
    call."""
    gate, weight, bias = params
    return x.t().unsqueeze(0), [torch.ones_like(gate), gate if weight is None else weight * gate,
                                bias]


def _has_tangent(input: Tensor, params) -> bool:
    """Whether the input or a parameter is a dual tensor of the open forward-mode level."""
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
               for t in (input, *params))


def _empty_output(input: Tensor, params, num_batches_tracked) -> Tensor:
    """The output for an input without elements, as ``nn.BatchNorm`` / ``nn.GroupNorm`` give it
    (an empty batch reaches a detection model's heads): an empty tensor like ``input``, in the
    autograd graph of the input and of every parameter (whose gradients are then zeros, not
    None: DistributedDataParallel expects one for every parameter).  The running statistics
    are left alone, and a counting module counts the batch, as ``nn.BatchNorm`` does."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # (an integer tensor: no graph, no no_grad needed)
    y = input.clone()
    for p in params:
        if p is not None:
            y = y + p.reshape(-1)[:0].sum()  # a 0-dim zero: keeps y's dtype, shape and layout
    return y


def run_fused(op, layer, x, rm, rv, nbt, training, momentum, eps, num_groups, params, relu):
    """One call of the layer's whole-layer op (the coefficient op's arguments, plus ``x``)."""
    if layer in ("assoc", "ilm"):
        return op(x, num_groups, *params, eps, relu)
    return op(x, *params, rm, rv, training, momentum, eps, nbt, relu)
