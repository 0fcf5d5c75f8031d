"""The layers under ``torch.func`` transforms: the autograd.Functions functorch runs.

``NormFunctionTransforms`` carries a layer call under grad / vjp / jacrev / vmap (the
``setup_context`` form functorch requires, the statistics as outputs), ``NormFunctionForwardMode``
while a forward-mode level is open (its ``jvp``: ``forward_tangent``), and ``NormBackward`` the
first derivatives functorch asks for with grad mode on: the backend's kernels
(``_autograd.kernel_grads``), differentiated through ``_autograd.graph_grads`` only where
something differentiates them. Their vmap rules: normfuse/_vmap.py. The pipeline itself
(forward, backward, the recomputation) is normfuse/_autograd.py's, read at call time
(``_autograd`` imports this module first).
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _autograd, _vmap

try:  # private functorch API (torch 2.11-2.14 have it); without it, _differentiated_again is True
    from torch._C._functorch import TransformType as _TransformType
    from torch._C._functorch import maybe_get_level as _functorch_level
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _interpreters
except ImportError:
    _functorch_level = None
_DEAD_LEVEL = -2  # maybe_get_level of a wrapper whose transform has exited (a vjp's vjp_fn)


def first_derivatives_only(x: Tensor) -> bool:
    """Whether a backward running with grad mode on takes the backend's kernels
    (``NormBackward``, differentiable still): a functorch transform's (a level active, or the
    vjp_fn of a ``torch.func.vjp`` that has returned: ``x`` a dead wrapper), which functorch runs
    with grad mode on whether or not anything differentiates the result. Not while a
    forward-mode level is open (``jvp``, ``hessian``: NormBackward has no jvp) or torch.compile
    traces (Dynamo traces ``graph_grads``), nor where a level below will differentiate it."""
    level = None if _functorch_level is None else _functorch_level(x)
    functorch = _autograd._functorch_active() or level == _DEAD_LEVEL
    return (functorch and _forward_ad._current_level < 0
            and not torch.compiler.is_compiling() and not _differentiated_again(level))


def _differentiated_again(level) -> bool:
    """Whether a grad / vjp level below the one running this backward (``level``: the saved
    input's, None without functorch's private API) will differentiate what the backward returns (grad of grad, MAML's inner step, a
    penalty on per-sample gradients): there ``graph_grads`` costs less than NormBackward's
    kernels followed by its recomputation. A ``vjp`` whose level has exited (``jacrev``: its
    vjp_fn runs after; ``x`` a dead wrapper, level -2) counts every grad level that is open.
    Regular autograd over a transform cannot be seen here: NormBackward's backward serves it.
    Without functorch's private API: True (the recomputation, always correct)."""
    if level is None:
        return True
    if level == _DEAD_LEVEL:
        level = math.inf
    return any(i.key() == _TransformType.Grad and i.level() < level for i in _interpreters())


class NormBackward(torch.autograd.Function):
    """A layer's first derivatives ``(dx, *parameter gradients)`` as a differentiable function
    of ``(x, dy, *params)``, for functorch transforms. Forward: the backend's kernels
    (``kernel_grads``). Backward, run only for a second derivative: the vjp of
    ``graph_grads``, the same derivatives as a graph of PyTorch ops (``torch.func.vjp``, which
    differentiates to any order). Arguments: ``config``, ``needs`` (x's, then each parameter's),
    ``instances`` (see ``kernel_grads``), ``x``, ``dy``, the forward's statistics ``mean, m2,
    scale, shift``, the running statistics a derivative reads (eval mode's), the parameters."""

    @staticmethod
    def forward(config, needs, instances, x, dy, mean, m2, scale, shift, running_mean,
                running_var, *params):
        dy = _autograd.like_layout(dy, x)  # (a vmapped cotangent may come in another layout)
        return tuple(_autograd.kernel_grads(config, x, dy, params, running_mean, running_var,
                                            needs, (mean, m2, scale, shift), instances))

    @staticmethod
    def setup_context(ctx, inputs, output):
        config, needs, instances, x, dy, _, _, _, _, running_mean, running_var, *params = inputs
        ctx.config, ctx.needs, ctx.instances = config, needs, instances
        ctx.save_for_backward(x, dy, running_mean, running_var, *params)

    @staticmethod
    def backward(ctx, *cotangents):
        x, dy, running_mean, running_var, *params = ctx.saved_tensors
        config, needs, instances = ctx.config, ctx.needs, ctx.instances
        present = [i for i, p in enumerate(params) if p is not None]
        returned = [i for i, need in enumerate(needs) if need]  # outputs: dx, then params'

        def derivatives(x, dy, *present_params):
            full = list(params)
            for i, p in zip(present, present_params):
                full[i] = p
            if instances is None:
                grads = _autograd.graph_grads(config, x, dy, full, running_mean, running_var,
                                              needs)
            else:  # per instance, as kernel_grads
                grads = _autograd._per_instance(
                    [_autograd.graph_grads(config, xi, dyi, full, running_mean, running_var,
                                           needs)
                     for xi, dyi in zip(x.chunk(instances), dy.chunk(instances))],
                    concatenated=1)
            return tuple(grads[i] for i in returned)

        _, vjp = torch.func.vjp(derivatives, x, dy, *(params[i] for i in present))
        d_x, d_dy, *d_present = vjp(tuple(cotangents[i] for i in returned))
        d_params = [None] * len(params)
        for i, g in zip(present, d_present):
            d_params[i] = g
        no_grads = (None,) * 6  # mean, m2, scale, shift, running_mean, running_var
        return (None, None, None, d_x, d_dy, *no_grads, *d_params)  # (config, needs, instances)

    @staticmethod
    def vmap(info, in_dims, *args):
        """``torch.func.vmap``'s batching rule: normfuse/_vmap.py."""
        return _vmap.backward_rule(NormBackward, info, in_dims, *args)


class NormFunctionTransforms(torch.autograd.Function):
    """``NormFunction`` in the ``setup_context`` form that functorch transforms
    (``torch.func.grad``, ``vjp``, ``jacrev``, ``vmap``) require: the statistics are outputs
    (marked non-differentiable), so it returns ``(y, mean, m2, scale, shift)``.  Only used under a
    transform: ``Function.apply`` binds the arguments with ``inspect.signature`` on every call
    of this form (~60 us of host time a layer step, measured), which NormFunction does not pay."""

    @staticmethod
    def forward(config, x: Tensor, running_mean, running_var, num_batches_tracked,
                *params):
        return _autograd._forward(config, x, running_mean, running_var, num_batches_tracked,
                                  params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        config, x, running_mean, running_var, _, *params = inputs
        statistics = output[1:]
        ctx.mark_non_differentiable(*statistics)
        ctx.set_materialize_grads(False)  # no zeros made for the statistics' unused gradients
        _autograd._save(ctx, config, x, running_mean, running_var, statistics, params)

    @staticmethod
    def backward(ctx, grad_output, *_statistics):  # (the statistics have no gradient)
        # torch.compile of a transformed function (compile(grad(f))) hands this backward a
        # needs_input_grad that says False for x (PyTorch's, cf. pytorch/pytorch#159299): x's
        # gradient came back zero. There, compute them all (a gradient nobody asked for is
        # dropped by autograd).
        return _autograd._backward(ctx, grad_output, every_input=torch.compiler.is_compiling())

    @staticmethod
    def vmap(info, in_dims, *args):
        """``torch.func.vmap``'s batching rule: normfuse/_vmap.py."""
        return _vmap.rule(NormFunctionTransforms, info, in_dims, *args)


class NormFunctionForwardMode(NormFunctionTransforms):
    """``NormFunctionTransforms`` with forward mode: only while a forward-mode level is open
    (``torch.func.jvp``, ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``). A separate
    class because Dynamo fails to trace ``torch.compile(grad(f))`` through a Function that
    defines ``jvp`` ("AssertionError: False != True", torch 2.14)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        NormFunctionTransforms.setup_context(ctx, inputs, output)
        config, x, running_mean, running_var, _, *params = inputs
        ctx.save_for_forward(x, *_autograd._kept_running(config, running_mean, running_var),
                             *params)

    @staticmethod
    def jvp(ctx, _config, x_tangent, _rm, _rv, _nbt, *param_tangents):
        """Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``, ``forward_ad``): y's
        tangent is the ``torch`` backend's forward on dual numbers at the saved point (the
        statistics, non-differentiable outputs, have none)."""
        x, running_mean, running_var, *params = ctx.saved_tensors
        return (forward_tangent(ctx.config, x, running_mean, running_var, params, x_tangent,
                                param_tangents), None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap.rule(NormFunctionForwardMode, info, in_dims, *args)


def forward_tangent(config, x, running_mean, running_var, params, x_tangent, param_tangents):
    """y's tangent for the inputs' tangents (None: zero): the "torch" backend's forward, a
    function of ``x`` and the parameters, on dual numbers at the forward-mode level that is open
    (running statistics are read in eval mode, never updated). The open level, not a nested
    ``torch.func.jvp``: forward mode does not nest, and a user's ``forward_ad`` level may be
    open under ``torch.func.grad``."""
    local = config._replace(backend="torch", momentum=0.0, merge=None)
    present = [i for i, p in enumerate(params) if p is not None]
    full = list(params)
    # constants, as in reverse mode (which refuses running statistics that require grad)
    running_mean, running_var = (None if t is None else _forward_ad.unpack_dual(t).primal
                                 for t in (running_mean, running_var))
    # forward gradients are off while a Function's jvp runs: on again for these ops
    with _forward_ad._set_fwd_grad_enabled(True):
        def dual(p, t):  # the saved inputs may carry this level's tangent already
            primal = _forward_ad.unpack_dual(p).primal
            return _forward_ad.make_dual(primal, torch.zeros_like(primal) if t is None else t)

        x = dual(x, x_tangent)
        for i in present:
            full[i] = dual(params[i], param_tangents[i])
        y = _autograd._traced_forward(local, x, running_mean, running_var, None, full)
        return _forward_ad.unpack_dual(y).tangent


