"""Merging per-plane moments into batch (over samples) or group (over channels) moments.

Every layer receives, per (n, c) plane of ``L`` elements, the plane mean ``m`` and the centred sum
of squares ``q`` (design section 2).  Chan's formula merges them exactly:

    mu = mean of m over the merged planes
    Q  = sum of q + L * sum of (m - mu)^2          var = Q / (count * L)

The backward of the merge maps gradients with respect to ``(mu, var)`` back to gradients with
respect to every ``(m, q)``.  Because ``sum(m - mu) == 0`` the mean's own dependence drops out:

    dm = dmu / count + 2 L dQ (m - mu)        dq = dQ,       dQ = dvar / (count L)

``BatchMerge`` is an object so that the distributed layers can swap in a version whose reductions
over samples span every process (design section 6) while the coefficient code stays one piece.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _shifted_mean(mean: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(mu, dev)``: the mean of ``mean`` over ``dim`` and every value's deviation from it.

    Both are formed relative to the first value along ``dim`` (a constant shift, 0 where that
    value is not finite): a plain float32 mean of plane means at an offset of 1e4 is off by an
    ulp of their sum (~1e-3), which ``r`` multiplies into every output; ``m - shift`` is exact
    and its mean is accurate.  ``dev`` never goes through the rounded ``mu``.  A non-finite
    shift would turn an Inf plane into NaN (Inf - Inf) instead of an Inf mean."""
    first = mean.narrow(dim, 0, 1).detach()
    shift = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    rel = mean - shift
    mu_rel = rel.mean(dim, keepdim=True)
    return (shift + mu_rel).squeeze(dim), rel - mu_rel


class BatchMerge:
    """Merge over the sample dimension of ``(N, C)`` moments, within this process."""

    def forward(self, mean: Tensor, m2: Tensor, plane_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(mu_B, Q_B, count)``: per-channel mean, centred sum of squares, samples."""
        mu, dev = _shifted_mean(mean, 0)
        q_total = m2.sum(0) + plane_size * (dev * dev).sum(0)
        return mu, q_total, mean.shape[0]

    def reduce(self, per_channel: Tensor) -> Tensor:
        """Sum of per-channel gradient contributions over all samples (local: nothing to do)."""
        return per_channel

    def count(self, mean: Tensor) -> int:
        """How many samples entered the merge (here: this process's batch)."""
        return mean.shape[0]

    def backward(self, grad_mu: Tensor, grad_var: Tensor, dev: Tensor, count: int,
                 plane_size: int) -> tuple[Tensor, Tensor]:
        """Gradients w.r.t. ``(mean, m2)`` of every plane, given those of ``(mu_B, var_B)``.

        ``grad_mu``/``grad_var`` must already be summed over every sample that entered the
        merge (``reduce``); ``dev`` is ``mean - mu_B``.
        """
        grad_q = grad_var / (count * plane_size)
        grad_mean = grad_mu / count + (2 * plane_size) * grad_q * dev
        return grad_mean, grad_q.expand_as(dev)


LOCAL_BATCH = BatchMerge()


def group_merge(mean: Tensor, m2: Tensor, plane_size: int, num_groups: int):
    """Merge the channels of each group, per sample: ``(N, C)`` -> ``(N, G)``.

    Returns ``(mu_G, var_G, dev)`` with ``dev = mean - mu_G`` shaped ``(N, G, C // G)``.
    """
    n, c = mean.shape
    per_group = c // num_groups
    mu, dev = _shifted_mean(mean.reshape(n, num_groups, per_group), 2)
    q_total = m2.reshape(n, num_groups, per_group).sum(2) + plane_size * (dev * dev).sum(2)
    return mu, q_total / (per_group * plane_size), dev


def group_merge_backward(grad_mu: Tensor, grad_var: Tensor, dev: Tensor, plane_size: int):
    """Gradients w.r.t. ``(mean, m2)`` (shaped ``(N, C)``) from those of ``(mu_G, var_G)``."""
    n, g, per_group = dev.shape
    grad_q = (grad_var / (per_group * plane_size)).unsqueeze(2)
    grad_mean = grad_mu.unsqueeze(2) / per_group + (2 * plane_size) * grad_q * dev
    return grad_mean.reshape(n, g * per_group), grad_q.expand_as(dev).reshape(n, g * per_group)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mu: Tensor, q_total: Tensor,
                         count: int, plane_size: int, momentum: float) -> None:
    """``nn.BatchNorm``'s exponential average, with the unbiased batch variance.  The batch
    statistics are detached rather than the update run under ``no_grad``: torch.export records
    a ``no_grad`` block as a ``wrap_with_set_grad_enabled`` node without outputs, which its
    loader refuses (a training-mode program would save and not load)."""
    unbiased = q_total.detach() / (count * plane_size - 1)
    running_mean.mul_(1 - momentum).add_(mu.detach().to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def count_batch(num_batches_tracked, training: bool) -> None:
    """``nn.BatchNorm``'s ``num_batches_tracked += 1``, done by the coefficient forward."""
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # an integer tensor: nothing to differentiate (no no_grad:
        # see update_running_stats)


def batch_statistics(mean: Tensor, m2: Tensor, plane_size: int, running_mean, running_var,
                     training: bool, momentum: float, eps: float, merge: BatchMerge):
    """The batch half of BIN and IEBN: ``(use_batch, mu, invstd)``, each ``(C,)``.

    Batch statistics are used in training or when there are no running statistics (like
    ``nn.BatchNorm``); the running statistics are updated in place iff training and present.
    """
    use_batch = training or running_mean is None
    if not use_batch:
        return False, running_mean, torch.rsqrt(running_var + eps)
    mu, q_total, count = merge.forward(mean, m2, plane_size)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mu, q_total, count, plane_size, momentum)
    return True, mu, torch.rsqrt(q_total / (count * plane_size) + eps)


def recompute_batch_statistics(mean, m2, plane_size, running_mean, running_var, training, eps,
                               merge):
    """``batch_statistics`` again for the backward, never touching the running statistics."""
    if training:
        running_mean = running_var = None
    return batch_statistics(mean, m2, plane_size, running_mean, running_var, training, 0.0, eps,
                            merge)


def batch_statistics_backward(grad_mu: Tensor, grad_invstd: Tensor, invstd: Tensor, dev: Tensor,
                              plane_size: int, merge: BatchMerge):
    """Per-plane ``(grad_mean, grad_m2)`` from the per-sample contributions ``(N, C)`` to the
    gradients of ``(mu_B, invstd_B)``; sums them over every sample (all processes) first."""
    # one reduction for both sums: a single all-reduce when the merge spans processes
    sums = merge.reduce(torch.stack((grad_mu.sum(0), grad_invstd.sum(0))))
    grad_mu, grad_var = sums[0], sums[1] * (-0.5) * invstd ** 3
    count = merge.count(dev)
    return merge.backward(grad_mu, grad_var, dev, count, plane_size)
