"""Instance Enhancement Batch Norm coefficient kernels (forward and backward), one launch each.

Formulas: ``normfuse/coefficients/iebn.py``::

    delta = sigmoid(m * gate_weight + gate_bias)
    scale = gamma * delta * r_B          shift = beta + scale * (m - mu_B)

Same program layout as BIN (``coefficients_bin.py``): one program per ``BLOCK_C`` channels
looping over N, batch statistics from ``channel_statistics``, parameter gradients summed over N
inside the program (deterministic); program 0 counts the batch (``count_batch``).
"""
import triton
import triton.language as tl

from .coefficients_bin import (channel_statistics, channel_tile, count_batch, gradient_tile,
                               load_affine)
from .common import sigmoid, total


@triton.jit(do_not_specialize=["has_weight", "has_bias", "use_batch", "update_running",
                               "count"])
def iebn_forward_kernel(mean_ptr, m2_ptr, gw_ptr, gb_ptr, weight_ptr, bias_ptr, rmean_ptr,
                        rvar_ptr, scale_ptr, shift_ptr, nbt_ptr, N, C, L, momentum, eps,
                        has_weight, has_bias, use_batch, update_running, count,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    count_batch(nbt_ptr, count)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    gw = tl.load(gw_ptr + c, mask=cmask, other=0.0)[None, :]
    gb = tl.load(gb_ptr + c, mask=cmask, other=0.0)[None, :]
    gamma, beta = load_affine(weight_ptr, bias_ptr, c, cmask, has_weight, has_bias)
    ref, off, r_b = channel_statistics(mean_ptr, m2_ptr, rmean_ptr, rvar_ptr, c, cmask, N, C, L,
                                       momentum, eps, use_batch, update_running, BLOCK_N,
                                       BLOCK_C, ACC)
    gain = (gamma * r_b)[None, :]
    for n0 in range(0, N, BLOCK_N):
        idx, mask = channel_tile(n0, c, cmask, N, C, BLOCK_N)
        m = tl.load(mean_ptr + idx, mask=mask, other=0.0)
        scale = gain * sigmoid(m * gw + gb)
        tl.store(scale_ptr + idx, scale, mask=mask)
        tl.store(shift_ptr + idx, beta[None, :] + scale * ((m - ref[None, :]) - off[None, :]),
                 mask=mask)


@triton.jit
def gate_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, gw, gb, gain, n0, c, cmask, N, C,
              BLOCK_N: tl.constexpr):
    """``gradient_tile`` and the gate terms of both backward passes (recomputed, not kept):
    ``(idx, mask, g1, m, dev, h, delta, z)`` with ``h = g2 + g1 dev`` and ``z`` the gradient of
    the gate logit."""
    idx, mask, g1, g2, m, dev = gradient_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, n0, c, cmask,
                                              N, C, BLOCK_N)
    delta = sigmoid(m * gw + gb)
    h = g2 + g1 * dev
    return idx, mask, g1, m, dev, h, delta, h * gain * delta * (1.0 - delta)


@triton.jit(do_not_specialize=["has_weight", "use_batch"])
def iebn_backward_kernel(g1_ptr, g2_ptr, mean_ptr, m2_ptr, gw_ptr, gb_ptr, weight_ptr,
                         rmean_ptr, rvar_ptr, cdy_ptr, cx_ptr, c0_ptr, dgw_ptr, dgb_ptr,
                         dweight_ptr, dbias_ptr, N, C, L, eps, has_weight, use_batch,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per plane ``h = g2 + g1 (m - mu_B)`` and ``z = h gamma r_B delta (1 - delta)`` (gradient
    of the gate logit); per channel::

        d gamma = r_B sum h delta    d gate_weight = sum z m    d gate_bias = sum z
        dL/dmu_B = -gamma r_B sum delta g1      dL/dQ_B = gamma sum h delta (-1/2) r_B^3 / (N L)
        dL/dq = dL/dQ_B        dL/dm = z gate_weight + dL/dmu_B / N + 2 L dL/dQ_B (m - mu_B)
    (the batch terms vanish in eval mode).
    """
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    gw = tl.load(gw_ptr + c, mask=cmask, other=0.0)[None, :]
    gb = tl.load(gb_ptr + c, mask=cmask, other=0.0)[None, :]
    gamma = tl.load(weight_ptr + c, mask=cmask & (has_weight != 0), other=1.0)
    ref, off, r_b = channel_statistics(mean_ptr, m2_ptr, rmean_ptr, rvar_ptr, c, cmask, N, C, L,
                                       0.0, eps, use_batch, 0, BLOCK_N, BLOCK_C, ACC)
    gain = (gamma * r_b)[None, :]
    sum_hd = tl.full([BLOCK_C], 0.0, ACC)
    sum_dg1 = tl.full([BLOCK_C], 0.0, ACC)
    sum_g1 = tl.full([BLOCK_C], 0.0, ACC)
    sum_z = tl.full([BLOCK_C], 0.0, ACC)
    sum_zm = tl.full([BLOCK_C], 0.0, ACC)
    for n0 in range(0, N, BLOCK_N):
        idx, mask, g1, m, _, h, delta, z = gate_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, gw, gb,
                                                     gain, n0, c, cmask, N, C, BLOCK_N)
        sum_hd += total(h * delta, 0)
        sum_dg1 += total(delta * g1, 0)
        sum_g1 += total(g1, 0)
        sum_z += total(z, 0)
        sum_zm += total(z * m, 0)
    tl.store(dweight_ptr + c, r_b * sum_hd, mask=cmask)
    tl.store(dgw_ptr + c, sum_zm, mask=cmask)
    tl.store(dgb_ptr + c, sum_z, mask=cmask)
    tl.store(dbias_ptr + c, sum_g1, mask=cmask)

    l_acc = tl.full([], 0.0, ACC) + L  # counts in ACC: int * float literal would be float32
    count = (tl.full([], 0.0, ACC) + N) * L
    batch = use_batch != 0
    d_mu = tl.where(batch, -gamma * r_b * sum_dg1 / N, 0.0)[None, :]
    d_q = tl.where(batch, gamma * sum_hd * (-0.5) * r_b * r_b * r_b / count, 0.0)[None, :]
    for n0 in range(0, N, BLOCK_N):
        idx, mask, _, _, dev, _, delta, z = gate_tile(g1_ptr, g2_ptr, mean_ptr, ref, off, gw, gb,
                                                      gain, n0, c, cmask, N, C, BLOCK_N)
        dm = z * gw + d_mu + (2.0 * l_acc) * d_q * dev
        tl.store(cdy_ptr + idx, gain * delta, mask=mask)
        tl.store(cx_ptr + idx, 2.0 * d_q + tl.full([BLOCK_N, BLOCK_C], 0.0, ACC), mask=mask)
        tl.store(c0_ptr + idx, dm / L, mask=mask)
