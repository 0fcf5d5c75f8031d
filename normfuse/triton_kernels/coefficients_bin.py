"""Batch-Instance Norm coefficient kernels (forward and backward), one launch each.

Formulas: ``normfuse/coefficients/bin.py`` (centred form of docs/architecture.md)::

    scale = gamma (rho r_B + (1 - rho) r_I)        shift = beta + gamma rho r_B (m - mu_B)

One program per ``BLOCK_C`` channels; it loops over the ``N`` samples in ``BLOCK_N`` rows of
the ``(N, C)`` statistics (channels contiguous, so loads are coalesced).  Per-channel parameter
gradients are therefore plain in-program sums over N: deterministic, no atomics.

``channel_statistics`` (shared with IEBN) yields the batch statistics as ``(ref, off, r_B)``:
``mu_B = ref + off`` with ``ref`` the first sample's plane mean, so that the deviation of every
plane mean, ``(m - ref) - off``, is formed from small numbers even with a 1e4 input offset.  The
batch merge is Chan's formula over blocks of samples.  In eval mode ``ref`` is the running mean.

The forward kernels also count the batch (``count_batch``): a module's ``num_batches_tracked``
is incremented by program 0 in training, so a layer forward stays 3 launches.
"""
import triton
import triton.language as tl

from .common import finite_or_zero, total, welford_combine


@triton.jit
def channel_tile(n0, c, cmask, N, C, BLOCK_N: tl.constexpr):
    rows = n0 + tl.arange(0, BLOCK_N)
    mask = (rows < N)[:, None] & cmask[None, :]
    return rows[:, None] * C + c[None, :], mask


@triton.jit
def batch_moments(mean_ptr, m2_ptr, c, cmask, N, C, L, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """``(ref, off, q_total)`` per channel: mu_B = ref + off, Q_B = sum q + L sum (m - mu_B)^2."""
    ref = finite_or_zero(tl.load(mean_ptr + c, mask=cmask, other=0.0))
    off = tl.full([BLOCK_C], 0.0, ACC)
    dev2 = tl.full([BLOCK_C], 0.0, ACC)
    cnt = tl.full([BLOCK_C], 0.0, ACC)
    qsum = tl.full([BLOCK_C], 0.0, ACC)
    for n0 in range(0, N, BLOCK_N):
        idx, mask = channel_tile(n0, c, cmask, N, C, BLOCK_N)
        dm = tl.where(mask, tl.load(mean_ptr + idx, mask=mask, other=0.0) - ref[None, :], 0.0)
        qsum += total(tl.load(m2_ptr + idx, mask=mask, other=0.0), 0)
        nb = tl.full([BLOCK_C], 0.0, ACC) + tl.minimum(N - n0, BLOCK_N)
        bmean = total(dm, 0) / nb
        dev = tl.where(mask, dm - bmean[None, :], 0.0)
        off, dev2, cnt = welford_combine(off, dev2, cnt, bmean, total(dev * dev, 0), nb)
    return ref, off, qsum + L * dev2


@triton.jit
def channel_statistics(mean_ptr, m2_ptr, rmean_ptr, rvar_ptr, c, cmask, N, C, L, momentum, eps,
                       use_batch, update_running, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
    """``(ref, off, r_B)``; updates the running statistics in place when ``update_running``."""
    if use_batch != 0:
        ref, off, q_total = batch_moments(mean_ptr, m2_ptr, c, cmask, N, C, L, BLOCK_N,
                                          BLOCK_C, ACC)
        count = (tl.full([], 0.0, ACC) + N) * L  # in ACC: int * float literal would be float32
        var = q_total / count
        if update_running != 0:
            rm = tl.load(rmean_ptr + c, mask=cmask, other=0.0)
            rv = tl.load(rvar_ptr + c, mask=cmask, other=0.0)
            tl.store(rmean_ptr + c, (1.0 - momentum) * rm + momentum * (ref + off), mask=cmask)
            tl.store(rvar_ptr + c, (1.0 - momentum) * rv + momentum * (q_total / (count - 1.0)),
                     mask=cmask)
    else:
        ref = tl.load(rmean_ptr + c, mask=cmask, other=0.0)
        off = tl.full([BLOCK_C], 0.0, ACC)
        var = tl.load(rvar_ptr + c, mask=cmask, other=1.0)
    return ref, off, tl.rsqrt(var + eps)


@triton.jit
def count_batch(nbt_ptr, count):
    """``num_batches_tracked += 1`` (one int64) when ``count`` != 0, in program 0 only: a single
    masked scalar atomic (one thread issues it), read by nothing else in the launch."""
    first = (tl.program_id(0) == 0) & (count != 0)
    tl.atomic_add(nbt_ptr, 1, mask=first, sem="relaxed")


@triton.jit
def instance_invstd(m2, L, eps):
    """``r_I``, but 0 for one-element planes (as normfuse.coefficients.bin): there ``x - m`` is
    exactly 0, and a zero factor keeps 1/sqrt(eps) out of c_dy and c_0, where it would only
    cancel (and amplify float32 rounding in dx ~300 times).  Callers load ``m2`` with
    ``other=1.0``: a masked lane's 0 would give Inf with eps = 0, and Inf * 0 a NaN in the
    sums over samples."""
    return tl.where(L == 1, 0.0, tl.rsqrt(m2 / L + eps))


@triton.jit
def gradient_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, n0, c, cmask, N, C, BLOCK_N: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_C]`` tile of a backward pass (BIN and IEBN, both passes): plane
    index and mask, ``g1``, ``g2``, the plane means ``m`` and their deviation ``m - mu_B`` (formed
    from ``(ref, off)`` as in the forward)."""
    idx, mask = channel_tile(n0, c, cmask, N, C, BLOCK_N)
    g1 = tl.load(g1_ptr + idx, mask=mask, other=0.0)
    g2 = tl.load(g2_ptr + idx, mask=mask, other=0.0)
    m = tl.load(mean_ptr + idx, mask=mask, other=0.0)
    return idx, mask, g1, g2, m, (m - ref[None, :]) - off[None, :]


@triton.jit
def load_affine(weight_ptr, bias_ptr, c, cmask, has_weight, has_bias):
    """gamma (1 where there is no weight) and beta (0 where there is no bias)."""
    gamma = tl.load(weight_ptr + c, mask=cmask & (has_weight != 0), other=1.0)
    beta = tl.load(bias_ptr + c, mask=cmask & (has_bias != 0), other=0.0)
    return gamma, beta


@triton.jit(do_not_specialize=["has_weight", "has_bias", "use_batch", "update_running",
                               "count"])
def bin_forward_kernel(mean_ptr, m2_ptr, gate_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                       scale_ptr, shift_ptr, nbt_ptr, N, C, L, momentum, eps, has_weight,
                       has_bias, use_batch, update_running, count, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    count_batch(nbt_ptr, count)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rho = tl.load(gate_ptr + c, mask=cmask, other=0.0)[None, :]
    gamma, beta = load_affine(weight_ptr, bias_ptr, c, cmask, has_weight, has_bias)
    ref, off, r_b = channel_statistics(mean_ptr, m2_ptr, rmean_ptr, rvar_ptr, c, cmask, N, C, L,
                                       momentum, eps, use_batch, update_running, BLOCK_N,
                                       BLOCK_C, ACC)
    gamma = gamma[None, :]
    batch_gain = gamma * rho * r_b[None, :]
    for n0 in range(0, N, BLOCK_N):
        idx, mask = channel_tile(n0, c, cmask, N, C, BLOCK_N)
        m = tl.load(mean_ptr + idx, mask=mask, other=0.0)
        r_i = instance_invstd(tl.load(m2_ptr + idx, mask=mask, other=1.0), L, eps)
        dev = (m - ref[None, :]) - off[None, :]
        tl.store(scale_ptr + idx, batch_gain + gamma * (1.0 - rho) * r_i, mask=mask)
        tl.store(shift_ptr + idx, beta[None, :] + batch_gain * dev, mask=mask)


@triton.jit(do_not_specialize=["has_weight", "use_batch"])
def bin_backward_kernel(g1_ptr, g2_ptr, mean_ptr, m2_ptr, gate_ptr, weight_ptr, rmean_ptr,
                        rvar_ptr, cdy_ptr, cx_ptr, c0_ptr, dgate_ptr, dweight_ptr, dbias_ptr,
                        N, C, L, eps, has_weight, use_batch,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes ``c_dy, c_x, c_0`` per plane and the ``(C,)`` gradients of gate, weight, bias.

    With ``h = g2 + g1 (m - mu_B)`` (gradient of the plane's scale, directly and through the
    shift), per channel ``A = sum h``, ``B = sum g2 r_I``, ``G1 = sum g1``::

        d gamma = rho r_B A + (1 - rho) B      d rho = gamma (r_B A - B)      d beta = G1
        dL/dmu_B = -gamma rho r_B G1           dL/dQ_B = gamma rho A (-1/2) r_B^3 / (N L)
        dL/dq = dL/dQ_B - gamma (1 - rho) g2 r_I^3 / (2 L)
        dL/dm = -gamma (1 - rho) r_I g1 + dL/dmu_B / N + 2 L dL/dQ_B (m - mu_B)
    (the batch terms vanish in eval mode).
    """
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rho = tl.load(gate_ptr + c, mask=cmask, other=0.0)
    gamma = tl.load(weight_ptr + c, mask=cmask & (has_weight != 0), other=1.0)
    ref, off, r_b = channel_statistics(mean_ptr, m2_ptr, rmean_ptr, rvar_ptr, c, cmask, N, C, L,
                                       0.0, eps, use_batch, 0, BLOCK_N, BLOCK_C, ACC)
    sum_h = tl.full([BLOCK_C], 0.0, ACC)
    sum_g2ri = tl.full([BLOCK_C], 0.0, ACC)
    sum_g1 = tl.full([BLOCK_C], 0.0, ACC)
    for n0 in range(0, N, BLOCK_N):
        idx, mask, g1, g2, _, dev = gradient_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, n0, c,
                                                  cmask, N, C, BLOCK_N)
        r_i = instance_invstd(tl.load(m2_ptr + idx, mask=mask, other=1.0), L, eps)
        sum_h += total(g2 + g1 * dev, 0)
        sum_g2ri += total(g2 * r_i, 0)
        sum_g1 += total(g1, 0)
    tl.store(dweight_ptr + c, rho * r_b * sum_h + (1.0 - rho) * sum_g2ri, mask=cmask)
    tl.store(dgate_ptr + c, gamma * (r_b * sum_h - sum_g2ri), mask=cmask)
    tl.store(dbias_ptr + c, sum_g1, mask=cmask)

    l_acc = tl.full([], 0.0, ACC) + L  # counts in ACC: int * float literal would be float32
    count = (tl.full([], 0.0, ACC) + N) * L
    batch = use_batch != 0
    d_mu = tl.where(batch, -gamma * rho * r_b * sum_g1 / N, 0.0)[None, :]
    d_q = tl.where(batch, gamma * rho * sum_h * (-0.5) * r_b * r_b * r_b / count, 0.0)[None, :]
    inst = (gamma * (1.0 - rho))[None, :]
    mix = (gamma * rho * r_b)[None, :]
    for n0 in range(0, N, BLOCK_N):
        idx, mask, g1, g2, _, dev = gradient_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, n0, c,
                                                  cmask, N, C, BLOCK_N)
        r_i = instance_invstd(tl.load(m2_ptr + idx, mask=mask, other=1.0), L, eps)
        dq = d_q - 0.5 * inst * g2 * r_i * r_i * r_i / L
        dm = -inst * r_i * g1 + d_mu + (2.0 * l_acc) * d_q * dev
        tl.store(cdy_ptr + idx, mix + inst * r_i, mask=mask)
        tl.store(cx_ptr + idx, 2.0 * dq, mask=mask)
        tl.store(c0_ptr + idx, dm / L, mask=mask)
