"""Associate Normalization coefficient kernels (forward and backward), one launch each.

Formulas: ``normfuse/coefficients/assoc.py``.  One program per sample ``n``: it merges the plane
moments of each group (Chan, shifted by the group's first plane mean), runs the auto-encoder
(``W1: (M, G)``, ``W2, W3: (G, M)``; G <= 64, any M: both directions in chunks of ``M_CHUNK``
hidden units to bound register use) and writes the per-plane
``scale``/``shift`` (forward) or ``c_dy``/``c_x``/``c_0`` (backward).  ``r_G`` is 0 for
one-element groups, as in normfuse.coefficients.assoc.  Channel tiles are
``[BLOCK_G, BLOCK_CG]`` (group x channel within the group), looping over the group width.

Backward parameter gradients are sums over samples.  Each program writes its sample's
contributions as one row of ``ws`` (``[d weight (C) | d bias (C) | d W1 (M G) | d W2 (G M) |
d W3 (G M)]``); the last program of each group of ``ROWS_PER_GROUP`` samples adds that group's
rows in order into ``ws2``, and the last of those adds the ``ws2`` rows in order into the
gradients: a deterministic two-level tree inside the same launch (``common.last_arrival``).
"""
import triton
import triton.language as tl

from .common import (finite_or_zero, last_arrival, relu, reset_counter, sigmoid, tanh, total,
                     welford_combine)

ROWS_PER_GROUP = tl.constexpr(8)
BLOCK_W = tl.constexpr(512)
UNROLL = tl.constexpr(4)
# Hidden units per step of the auto-encoder loops. At 16 the backward at G = 64 needs 128
# registers a thread (no headroom: the whole-tile version before it, at the same count, spilled
# on sm_90 under Triton 3.6, the GPU image's); at 8 it takes 64-80 under Triton 3.6 and 3.8.
# tests/triton_kernels/test_aot.py fails on any spill.
M_CHUNK = tl.constexpr(8)


@triton.jit
def group_tile(j0, g, gmask, Cg, BLOCK_CG: tl.constexpr):
    """Channel index (within the sample) and mask of a ``[BLOCK_G, BLOCK_CG]`` tile."""
    j = j0 + tl.arange(0, BLOCK_CG)
    return g[:, None] * Cg + j[None, :], gmask[:, None] & (j < Cg)[None, :]


@triton.jit
def group_moments(mean_ptr, m2_ptr, row, g, gmask, Cg, L, BLOCK_G: tl.constexpr,
                  BLOCK_CG: tl.constexpr, ACC: tl.constexpr):
    """``(ref, off, var)`` per group: mu_G = ref + off, var_G = Q_G / (Cg L)."""
    ref = finite_or_zero(tl.load(mean_ptr + row + g * Cg, mask=gmask, other=0.0))
    off = tl.full([BLOCK_G], 0.0, ACC)
    dev2 = tl.full([BLOCK_G], 0.0, ACC)
    cnt = tl.full([BLOCK_G], 0.0, ACC)
    qsum = tl.full([BLOCK_G], 0.0, ACC)
    for j0 in range(0, Cg, BLOCK_CG):
        ch, mask = group_tile(j0, g, gmask, Cg, BLOCK_CG)
        dm = tl.where(mask, tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - ref[:, None],
                      0.0)
        qsum += total(tl.load(m2_ptr + row + ch, mask=mask, other=0.0), 1)
        nb = tl.full([BLOCK_G], 0.0, ACC) + tl.minimum(Cg - j0, BLOCK_CG)
        bmean = total(dm, 1) / nb
        dev = tl.where(mask, dm - bmean[:, None], 0.0)
        off, dev2, cnt = welford_combine(off, dev2, cnt, bmean, total(dev * dev, 1), nb)
    count = (tl.full([], 0.0, ACC) + Cg) * L  # in ACC: int * float literal would be float32
    return ref, off, (qsum + L * dev2) / count


@triton.jit
def encoder_chunk(enc_ptr, mu, var, k0, g, gmask, G, M):
    """Hidden units ``k = k0 .. k0 + M_CHUNK``: ``k``, the ``[M_CHUNK, BLOCK_G]`` mask and tile of
    ``W1`` (zero-padded), and the encoder activations ``W1 mu``, ``W1 var`` before the relu."""
    k = k0 + tl.arange(0, M_CHUNK)
    kg_mask = (k < M)[:, None] & gmask[None, :]
    w1 = tl.load(enc_ptr + k[:, None] * G + g[None, :], mask=kg_mask, other=0.0)
    return k, kg_mask, w1, total(w1 * mu[None, :], 1), total(w1 * var[None, :], 1)


@triton.jit
def decoder_outputs(enc_ptr, dmu_ptr, dvar_ptr, mu, var, g, gmask, G, M):
    """The decoder outputs ``d_mu = sigmoid(W2 relu(W1 mu))`` and ``d_var = tanh(W3 relu(W1
    var))`` (length G) for the group means and variances.  The hidden units are summed in chunks
    of ``M_CHUNK``: one ``[M_CHUNK, BLOCK_G]`` tile of each matrix (``W2``, ``W3`` read
    transposed, so every tile and the hidden vectors share one layout) is live at a time, not a
    whole ``[M, G]`` one (at G = M = 64 that spilled registers on sm_90 with Triton 3.6), and M
    needs no tile of its own.  The tiles are read where they are used (L2-resident)."""
    acc_mu = tl.zeros_like(mu)
    acc_var = tl.zeros_like(var)
    for k0 in range(0, M, M_CHUNK):
        k, kg_mask, _, h_mu, h_var = encoder_chunk(enc_ptr, mu, var, k0, g, gmask, G, M)
        dec = g[None, :] * M + k[:, None]  # W2 / W3 [g, k] at tile position [k, g]
        acc_mu += total(tl.load(dmu_ptr + dec, mask=kg_mask, other=0.0) * relu(h_mu)[:, None], 0)
        acc_var += total(tl.load(dvar_ptr + dec, mask=kg_mask, other=0.0) * relu(h_var)[:, None],
                         0)
    return sigmoid(acc_mu), tanh(acc_var)


@triton.jit
def assoc_forward_kernel(mean_ptr, m2_ptr, enc_ptr, dmu_ptr, dvar_ptr, weight_ptr, bias_ptr,
                         scale_ptr, shift_ptr, C, L, G, M, Cg, eps,
                         BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0) * C
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    ref, off, var = group_moments(mean_ptr, m2_ptr, row, g, gmask, Cg, L, BLOCK_G, BLOCK_CG, ACC)
    # 0: one-element groups, and the padding groups g >= G (var 0 there: with eps = 0 their
    # rsqrt would be Inf, and Inf * 0 a NaN in the sums over groups)
    r = tl.where((Cg * L == 1) | ~gmask, 0.0, tl.rsqrt(var + eps))[:, None]
    d_mu, d_var = decoder_outputs(enc_ptr, dmu_ptr, dvar_ptr, ref + off, var, g, gmask, G, M)
    for j0 in range(0, Cg, BLOCK_CG):
        ch, mask = group_tile(j0, g, gmask, Cg, BLOCK_CG)
        m = tl.load(mean_ptr + row + ch, mask=mask, other=0.0)
        scale = (d_mu[:, None] + tl.load(weight_ptr + ch, mask=mask, other=0.0)) * r
        shift = (d_var[:, None] + tl.load(bias_ptr + ch, mask=mask, other=0.0)
                 + scale * ((m - ref[:, None]) - off[:, None]))
        tl.store(scale_ptr + row + ch, scale, mask=mask)
        tl.store(shift_ptr + row + ch, shift, mask=mask)


@triton.jit
def sum_rows(src_ptr, row_stride, row0, nrows, dst_ptr, width):
    """``dst[w] = sum_{r < nrows} src[(row0 + r) * row_stride + w]``, rows added in order."""
    for w0 in range(0, width, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        wmask = w < width
        acc = tl.full([BLOCK_W], 0.0, dst_ptr.dtype.element_ty)
        for r0 in range(0, nrows, UNROLL):
            for k in tl.static_range(UNROLL):
                acc += tl.load(src_ptr + (row0 + r0 + k) * row_stride + w,
                               mask=wmask & (r0 + k < nrows), other=0.0, cache_modifier=".cg")
        tl.store(dst_ptr + w, acc, mask=wmask)


@triton.jit
def sum_over_samples(ws_ptr, ws2_ptr, counter_ptr, n, N, C, P, dweight_ptr, dbias_ptr, d0_ptr,
                     d1_ptr, d2_ptr):
    """The backwards' parameter gradients (AssocNorm's and ILM-Norm's), summed over the samples in
    a fixed order: sample n's row of ``ws`` (width 2C + 3P: weight, bias, then three P-element
    matrices) joins its group of ROWS_PER_GROUP rows, whose last arrival sums them into a row of
    ``ws2``; the last group's last arrival sums those rows into the five gradients."""
    width = 2 * C + 3 * P
    grp = n // ROWS_PER_GROUP
    num_grps = (N + ROWS_PER_GROUP - 1) // ROWS_PER_GROUP
    rows = tl.minimum(N - grp * ROWS_PER_GROUP, ROWS_PER_GROUP)
    if last_arrival(counter_ptr + grp, rows):
        sum_rows(ws_ptr, width, grp * ROWS_PER_GROUP, rows, ws2_ptr + grp.to(tl.int64) * width,
                 width)
        reset_counter(counter_ptr + grp)
        if last_arrival(counter_ptr + num_grps, num_grps):
            sum_rows(ws2_ptr, width, 0, num_grps, dweight_ptr, C)
            sum_rows(ws2_ptr + C, width, 0, num_grps, dbias_ptr, C)
            sum_rows(ws2_ptr + 2 * C, width, 0, num_grps, d0_ptr, P)
            sum_rows(ws2_ptr + 2 * C + P, width, 0, num_grps, d1_ptr, P)
            sum_rows(ws2_ptr + 2 * C + 2 * P, width, 0, num_grps, d2_ptr, P)
            reset_counter(counter_ptr + num_grps)


@triton.jit
def assoc_backward_kernel(g1_ptr, g2_ptr, mean_ptr, m2_ptr, enc_ptr, dmu_ptr, dvar_ptr,
                          weight_ptr, cdy_ptr, cx_ptr, c0_ptr, ws_ptr, ws2_ptr, counter_ptr,
                          denc_ptr, ddmu_ptr, ddvar_ptr, dweight_ptr, dbias_ptr,
                          N, C, L, G, M, Cg, eps,
                          BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    l_acc = tl.full([], 0.0, ACC) + L  # counts in ACC: int * float literal would be float32
    n = tl.program_id(0)
    row = n * C
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    ref, off, var = group_moments(mean_ptr, m2_ptr, row, g, gmask, Cg, L, BLOCK_G, BLOCK_CG, ACC)
    # 0 for one-element groups (as BIN's r_I) and the padding groups (see the forward)
    r = tl.where((Cg * L == 1) | ~gmask, 0.0, tl.rsqrt(var + eps))
    mu = ref + off
    d_mu, d_var = decoder_outputs(enc_ptr, dmu_ptr, dvar_ptr, mu, var, g, gmask, G, M)
    width = 2 * C + 3 * M * G
    wrow = ws_ptr + n.to(tl.int64) * width

    # pass 1: per-group sums; per-sample gradients of weight (h r) and bias (g1)
    sum_h = tl.full([BLOCK_G], 0.0, ACC)       # sum h            -> d D_mu = r sum h
    sum_hw = tl.full([BLOCK_G], 0.0, ACC)      # sum h omega      -> dL/dr
    sum_sg1 = tl.full([BLOCK_G], 0.0, ACC)     # sum scale g1     -> -dL/dmu_G (explicit)
    sum_g1 = tl.full([BLOCK_G], 0.0, ACC)      # sum g1           -> d D_var
    for j0 in range(0, Cg, BLOCK_CG):
        ch, mask = group_tile(j0, g, gmask, Cg, BLOCK_CG)
        g1 = tl.load(g1_ptr + row + ch, mask=mask, other=0.0)
        g2 = tl.load(g2_ptr + row + ch, mask=mask, other=0.0)
        dev = (tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - ref[:, None]) - off[:, None]
        omega = d_mu[:, None] + tl.load(weight_ptr + ch, mask=mask, other=0.0)
        h = g2 + g1 * dev
        sum_h += total(h, 1)
        sum_hw += total(h * omega, 1)
        sum_sg1 += total(omega * r[:, None] * g1, 1)
        sum_g1 += total(g1, 1)
        tl.store(wrow + ch, h * r[:, None], mask=mask)
        tl.store(wrow + C + ch, g1, mask=mask)

    # auto-encoder backward (decoders, then the shared encoder), in chunks of M_CHUNK hidden
    # units so that no [G, M] tile (nor its 64-bit address tile) is live whole; the encoder
    # activations of a chunk are recomputed rather than kept live through pass 1
    z_mu = r * sum_h * d_mu * (1.0 - d_mu)
    z_var = sum_g1 * (1.0 - d_var * d_var)
    grad_mu = -sum_sg1
    grad_var = -0.5 * r * r * r * sum_hw
    for k0 in range(0, M, M_CHUNK):
        k, kg_mask, w1, h_mu, h_var = encoder_chunk(enc_ptr, mu, var, k0, g, gmask, G, M)
        gk_mask = gmask[:, None] & (k < M)[None, :]
        dec = g[:, None] * M + k[None, :]
        tl.store(wrow + 2 * C + M * G + dec, z_mu[:, None] * relu(h_mu)[None, :],
                 mask=gk_mask)
        tl.store(wrow + 2 * C + 2 * M * G + dec, z_var[:, None] * relu(h_var)[None, :],
                 mask=gk_mask)
        # the relu mask multiplies (as assoc.py's): a NaN gradient stays NaN where h <= 0
        gh_mu = total(tl.load(dmu_ptr + dec, mask=gk_mask, other=0.0) * z_mu[:, None], 0) \
            * tl.where(h_mu > 0, 1.0, 0.0)
        gh_var = total(tl.load(dvar_ptr + dec, mask=gk_mask, other=0.0) * z_var[:, None], 0) \
            * tl.where(h_var > 0, 1.0, 0.0)
        tl.store(wrow + 2 * C + k[:, None] * G + g[None, :],
                 gh_mu[:, None] * mu[None, :] + gh_var[:, None] * var[None, :], mask=kg_mask)
        grad_mu += total(w1 * gh_mu[:, None], 0)
        grad_var += total(w1 * gh_var[:, None], 0)
    d_q = (grad_var / (l_acc * Cg))[:, None]
    d_m = (grad_mu / Cg)[:, None]

    # pass 2: per-plane backward coefficients
    for j0 in range(0, Cg, BLOCK_CG):
        ch, mask = group_tile(j0, g, gmask, Cg, BLOCK_CG)
        dev = (tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - ref[:, None]) - off[:, None]
        omega = d_mu[:, None] + tl.load(weight_ptr + ch, mask=mask, other=0.0)
        tl.store(cdy_ptr + row + ch, omega * r[:, None], mask=mask)
        tl.store(cx_ptr + row + ch, 2.0 * d_q + tl.full([BLOCK_G, BLOCK_CG], 0.0, ACC),
                 mask=mask)
        tl.store(c0_ptr + row + ch, (d_m + (2.0 * l_acc) * d_q * dev) / L, mask=mask)

    sum_over_samples(ws_ptr, ws2_ptr, counter_ptr, n, N, C, M * G, dweight_ptr, dbias_ptr,
                     denc_ptr, ddmu_ptr, ddvar_ptr)
