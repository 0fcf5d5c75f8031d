"""``torch.func.vmap`` over the layers: the batching rules of ``NormFunctionTransforms`` (the
forward, ``rule``) and ``NormBackward`` (first derivatives, ``backward_rule``).

What vmap is used for with normalization layers: per-sample gradients (``vmap(grad(loss))``,
as Opacus and differential-privacy training do with GroupNorm-style layers) and model ensembles
(``torch.func.stack_module_state`` + ``vmap`` over the stacked parameters). Two ways to run B
mapped instances:

* **Folded into the batch** (one call on ``B * N`` samples): where every sample's output
  depends on that sample alone, which is true of AssocNorm and ILM-Norm (per-sample group
  statistics) and of BIN / IEBN using running statistics (eval mode), and where only ``x`` is
  mapped (the parameters and statistics are shared by every instance).
* **Folded into the channels** (one call on ``B * C`` channels), BIN / IEBN otherwise: their
  statistics and coefficients are per channel (batch statistics over the instance's own ``N``
  samples), so instance b's channel c is channel ``b * C + c`` of one layer, its parameters
  and running statistics the mapped ones laid end to end (shared ones repeated). Ensembles
  (mapped parameters and buffers, shared or mapped input) and batch statistics per mapped batch.
* **One call per instance** otherwise (AssocNorm / ILM-Norm with mapped parameters; buffers
  mapped on a dimension that cannot be laid end to end in place): correct, and B calls.

The backward (``NormBackward``, the first derivatives under ``vmap(grad(...))``: per-sample
gradients) folds the same way (``backward_rule``): into the batch for AssocNorm / ILM-Norm with
shared parameters, then each instance's parameter gradients from its own samples (a
coefficient-backward call per instance, or the reference batched over more than
``_autograd.INSTANCE_CALLS_MAX`` of them); into the channels for BIN / IEBN, where a
folded channel's parameter gradient is its instance's; a call per instance otherwise.

Refused: BIN / IEBN updating running statistics that the instances share (training mode, a
running statistic or ``num_batches_tracked`` not mapped): B batches cannot update one running
mean, as ``nn.BatchNorm2d`` refuses too. Mapped buffers (an ensemble's own statistics, all three
mapped) are updated instance by instance.
"""
from __future__ import annotations

import torch

from . import _autograd  # (kernel_layout; _autograd imports this module first: used at call time)


def _per_sample(config, running_mean) -> bool:
    """Whether each sample's output depends on that sample alone (then B instances of N samples
    are one batch of B * N)."""
    if config.layer in ("assoc", "ilm"):
        return True
    return not config.training and running_mean is not None  # BIN / IEBN in eval mode


def _instance(value, dim, i):
    return value if dim is None or value is None else value.select(dim, i)


def _mapped(t, dim, size):
    """``t`` with the instances on dim 0 (an unmapped one expanded to them)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _into_batch(t, dim, size):
    """``(N, C, ...)`` per instance as ``(B * N, C, ...)``: instance b's samples at b * N."""
    return _mapped(t, dim, size).flatten(0, 1)


def _into_channels(t, dim, size):
    """``(N, C, ...)`` per instance as ``(N, B * C, ...)``: instance b's channel c at b * C + c."""
    return _mapped(t, dim, size).movedim(0, 1).flatten(1, 2)


class _CountBatch(torch.autograd.Function):
    """``num_batches_tracked += 1`` below every transform, as the coefficient op counts inside
    the layer's Function: an in-place add in the vmap rule would run under an outer grad / jvp
    level, which refuses writes to captured tensors (``grad(vmap(ensemble))`` in training)."""

    @staticmethod
    def forward(counter):
        counter.add_(1)
        return counter.new_zeros(())

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, counter):  # a mapped counter: every instance counts the batch
        counter.add_(1)
        return counter.new_zeros(()), None


def _channels(t, dim, size):
    """A per-channel vector (C,), or its mapped form, as (B * C,): instance b's at b * C."""
    if dim is None:
        return t.repeat(size)
    return t.movedim(dim, 0).reshape(-1)


def _channel_fold(function, size, config, x, x_dim, running, running_dims,
                  num_batches_tracked, nbt_dim, params, param_dims):
    """BIN / IEBN over B instances as one layer of B * C channels; None where a mapped running
    statistic that training updates is not laid out end to end (the loop then runs)."""
    rm, rv = running
    updates = config.training and rm is not None
    if updates:  # written in place: the (B, C) views must be one (B * C) vector of the buffer
        stacked = [t.movedim(d, 0) for t, d in zip(running, running_dims)]
        if not all(t.is_contiguous() for t in stacked):
            return None
        rm, rv = (t.view(-1) for t in stacked)
    elif rm is not None:  # read only
        rm, rv = (_channels(t, d, size) for t, d in zip(running, running_dims))
    folded = _autograd.kernel_layout(_into_channels(x, x_dim, size))
    params = [None if p is None else _channels(p, d, size) for p, d in zip(params, param_dims)]
    # num_batches_tracked: mapped (B,) here, counted below (the op takes one 0-dim counter)
    outputs = function.apply(config, folded, rm, rv, None, *params)
    if updates and num_batches_tracked is not None:
        _CountBatch.apply(num_batches_tracked)
    return _unfold(outputs, 1, size)


def _unfold(outputs, dim, size):
    """A folded call's outputs with the instances' dim split back out at ``dim`` (None stays
    None: a statistic not computed), and their mapped dims."""
    return (tuple(None if t is None else t.unflatten(dim, (size, -1)) for t in outputs),
            tuple(None if t is None else dim for t in outputs))


def _stack(outputs):
    """The instances' outputs stacked on dim 0 (None stays None: a statistic not computed)."""
    stacked = []
    for parts in zip(*outputs):
        stacked.append(None if parts[0] is None else torch.stack(parts))
    return tuple(stacked), tuple(None if s is None else 0 for s in stacked)


def rule(function, info, in_dims, config, x, running_mean, running_var, num_batches_tracked,
         *params):
    """``function``'s vmap staticmethod (``in_dims``: one entry per ``forward`` argument, None
    where unmapped). Returns the outputs ``(y, mean, m2, scale, shift)`` and their mapped dims."""
    _, x_dim, rm_dim, rv_dim, nbt_dim, *param_dims = in_dims
    size = info.batch_size
    updates = config.training and running_mean is not None and config.layer in ("bin", "iebn")
    buffers_mapped = rm_dim is not None or rv_dim is not None or nbt_dim is not None
    if updates and (rm_dim is None or rv_dim is None
                    or (num_batches_tracked is not None and nbt_dim is None)):
        raise RuntimeError(
            f"{config.who or 'normfuse'}: under torch.func.vmap, training mode cannot "
            "update running statistics that the mapped instances share (each instance is a "
            "batch of its own, and one running mean cannot average them), as nn.BatchNorm2d "
            "refuses; use eval mode, track_running_stats=False, or map running_mean, "
            "running_var and num_batches_tracked all three (an ensemble's "
            "torch.func.stack_module_state buffers)")
    if (x_dim is not None and not buffers_mapped and all(d is None for d in param_dims)
            and _per_sample(config, running_mean)):
        folded = _autograd.kernel_layout(_into_batch(x, x_dim, size))
        outputs = function.apply(config, folded, running_mean, running_var,
                                 num_batches_tracked, *params)  # (B * N, C, ...) in
        return _unfold(outputs, 0, size)
    if config.layer in ("bin", "iebn"):
        folded = _channel_fold(function, size, config, x, x_dim, (running_mean, running_var),
                               (rm_dim, rv_dim), num_batches_tracked, nbt_dim, params,
                               param_dims)
        if folded is not None:
            return folded
    outputs = []
    for i in range(size):
        xi = _autograd.kernel_layout(_instance(x, x_dim, i))
        # An instance's buffers are written in place (training), which the kernels do on dense
        # vectors only: a strided instance (mapped on a dim other than 0) runs on a copy.
        buffers = [_instance(b, d, i) for b, d in ((running_mean, rm_dim), (running_var, rv_dim),
                                                   (num_batches_tracked, nbt_dim))]
        dense = [b if b is None or b.is_contiguous() else b.contiguous() for b in buffers]
        outputs.append(function.apply(config, xi, *dense,
                                      *(_instance(p, d, i) for p, d in zip(params, param_dims))))
        with torch.no_grad():
            for b, d in zip(buffers, dense):
                if d is not b:
                    b.copy_(d)
    return _stack(outputs)


def backward_rule(function, info, in_dims, config, needs, instances, x, dy, mean, m2, scale,
                  shift, running_mean, running_var, *params):
    """``NormBackward``'s vmap staticmethod (``function`` is NormBackward): the first
    derivatives of B mapped instances (the backward of ``vmap(grad(f))``: per-sample gradients;
    ``jacrev``'s cotangents) as one call where the forward's rule makes one. Returns ``(dx,
    *parameter gradients)`` and their mapped dims."""
    (_, _, _, x_dim, dy_dim, mean_dim, m2_dim, scale_dim, shift_dim, rm_dim, rv_dim,
     *param_dims) = in_dims
    size = info.batch_size
    planes = (x, x_dim), (dy, dy_dim)
    statistics = (mean, mean_dim), (m2, m2_dim), (scale, scale_dim), (shift, shift_dim)
    shared = rm_dim is None and rv_dim is None and all(d is None for d in param_dims)
    if instances is None and config.layer in ("assoc", "ilm") and shared:
        # per-sample: the instances laid end to end in the batch, parameter gradients each its
        # own instance's (an expanded statistic is copied: the kernels read dense ones)
        x, dy = (_into_batch(t, d, size) for t, d in planes)
        mean, m2, scale, shift = (None if t is None else _into_batch(t, d, size).contiguous()
                                  for t, d in statistics)
        dx, *grads = function.apply(config, needs, size, _autograd.kernel_layout(x), dy, mean,
                                    m2, scale, shift, running_mean, running_var, *params)
        return ((None if dx is None else dx.unflatten(0, (size, -1)), *grads),
                (None if dx is None else 0, *(None if g is None else 0 for g in grads)))
    if instances is None and config.layer in ("bin", "iebn"):
        # instance b's channel c is channel b * C + c (as the forward's channel fold)
        x, dy = (_into_channels(t, d, size) for t, d in planes)
        mean, m2, scale, shift = (None if t is None else _into_channels(t, d, size).contiguous()
                                  for t, d in statistics)
        running_mean, running_var, *folded_params = (
            None if t is None else _channels(t, d, size)
            for t, d in ((running_mean, rm_dim), (running_var, rv_dim), *zip(params, param_dims)))
        dx, *grads = function.apply(config, needs, None, _autograd.kernel_layout(x), dy, mean,
                                    m2, scale, shift, running_mean, running_var, *folded_params)
        return ((None if dx is None else dx.unflatten(1, (size, -1)),
                 *(None if g is None else g.unflatten(0, (size, -1)) for g in grads)),
                (None if dx is None else 1, *(None if g is None else 0 for g in grads)))
    # one call per instance (NormBackward puts dy in x's layout; statistics made dense)
    rest = (*statistics, (running_mean, rm_dim), (running_var, rv_dim), *zip(params, param_dims))
    outputs = []
    for i in range(size):
        xi, dyi = (_instance(t, d, i) for t, d in planes)
        dense = (None if t is None else _instance(t, d, i).contiguous() for t, d in rest)
        outputs.append(function.apply(config, needs, instances, _autograd.kernel_layout(xi), dyi,
                                      *dense))
    return _stack(outputs)
