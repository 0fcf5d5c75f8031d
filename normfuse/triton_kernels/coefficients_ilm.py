"""ILM-Norm coefficient kernels (forward and backward), one launch each.

Formulas: ``normfuse/coefficients/ilm.py`` (the spec, forward and hand-written backward).  One
program per sample ``n``.  The sample's ``C`` channels are grouped twice, in groupings that do
not nest (C = 12, G = 4, key_group_size 4: a key group straddles two groups), so every pass over
the channels is laid out in one of two tiles:

* key tile ``[BLOCK_K, BLOCK_CK]`` (key group x channel within it): all ``K`` key groups at once
  (``K <= BLOCK_K``), looping over the key-group width ``C / K``.  The K-vectors of the meta
  network (key means ``kmu``, unbiased variances ``kvar``, decoder outputs) live along its rows;
* group tile ``[BLOCK_G, BLOCK_CG]``: ``BLOCK_G`` groups at a time (any ``G``: the groups are
  walked in blocks), looping over the group width ``C / G``.

Each grouping is merged per channel on its own (Chan, shifted by the group's first plane mean, 0
where not finite, as ``coefficients/_merge.py``), with the unbiased variances
``Q / (n L) * n L / (n L - 1)``.  A per-channel value one tile produces and the other consumes
(``omega``/``beta`` of the key groups in the forward; ``omega``, ``grad_omega`` and the group
part of ``c_x``/``c_0`` in the backward) goes through the sample's own row of an output (or of
the backward's workspace) and a ``tl.debug_barrier`` (``__syncthreads``: the block's global
stores are visible to all its threads after it) instead of a register gather.

The meta network ``D_w = sigmoid(W_w relu(W_e kvar))``, ``D_b = tanh(W_b relu(W_e kmu))``
(``W_e: (E, K)``, ``W_w, W_b: (K, E)``) walks the hidden units in chunks of ``E_CHUNK``, as the
AssocNorm kernels do, so ``E`` has no limit and adds no compiled variant: one
``[E_CHUNK, BLOCK_K]`` tile of each matrix is live at a time (``E_CHUNK`` from the heuristic,
smaller for a wider key tile, which bounds the backward's registers).

Backward parameter gradients (``weight``, ``bias``, ``encoder``, both decoders) are sums over
samples: each program writes its sample's contributions as one row of ``ws`` (``[d weight (C) |
d bias (C) | d W_e (E K) | d W_w (K E) | d W_b (K E)]``) and the rows are added in a fixed order
by the last-arriving programs (``coefficients_assoc.sum_over_samples``, the two-level tree of the
AssocNorm backward): deterministic, one launch.
"""
import triton
import triton.language as tl

from .coefficients_assoc import group_moments, sum_over_samples
from .coefficients_assoc import group_tile as tile
from .common import relu, sigmoid, tanh, total


@triton.jit
def merge(mean_ptr, m2_ptr, row, grp, gmask, width, L, BLOCK: tl.constexpr,
          BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """``(ref, off, var, bessel)`` per group of ``width`` channels: AssocNorm's group merge
    (mu = ref + off, ``Q / (width L)``) made unbiased, ``var = Q / (width L) * bessel``,
    ``bessel = n / (n - 1)`` with ``n = width L`` (the layers refuse ``n = 1``).  Rows past the
    groups (``gmask`` False) give 0."""
    ref, off, var = group_moments(mean_ptr, m2_ptr, row, grp, gmask, width, L, BLOCK, BLOCK_W,
                                  ACC)
    count = (tl.full([], 0.0, ACC) + width) * L  # no int32 product; Bessel in ACC precision
    bessel = count / (count - 1.0)
    return ref, off, var * bessel, bessel


@triton.jit
def encoder_chunk(enc_ptr, kmu, kvar, e0, k, kmask, K, E, E_CHUNK: tl.constexpr):
    """Hidden units ``e = e0 .. e0 + E_CHUNK``: ``e``, the ``[E_CHUNK, BLOCK_K]`` mask and tile
    of ``W_e`` (zero-padded), and the encoder activations ``W_e kvar``, ``W_e kmu`` before the
    relu (the weight and the bias branch), 0 past ``E`` (a padded row times an Inf statistic
    would be NaN, and would leak into every key group through the decoders)."""
    e = e0 + tl.arange(0, E_CHUNK)
    emask = e < E
    ek_mask = emask[:, None] & kmask[None, :]
    w = tl.load(enc_ptr + e[:, None] * K + k[None, :], mask=ek_mask, other=0.0)
    return (e, emask, ek_mask, w, tl.where(emask, total(w * kvar[None, :], 1), 0.0),
            tl.where(emask, total(w * kmu[None, :], 1), 0.0))


@triton.jit
def decoder_outputs(enc_ptr, dw_ptr, db_ptr, kmu, kvar, k, kmask, K, E,
                    E_CHUNK: tl.constexpr):
    """``D_w = sigmoid(W_w relu(W_e kvar))`` and ``D_b = tanh(W_b relu(W_e kmu))`` (length K);
    the decoders ``(K, E)`` are read transposed so every tile shares the encoder's layout."""
    acc_w = tl.zeros_like(kvar)
    acc_b = tl.zeros_like(kmu)
    for e0 in range(0, E, E_CHUNK):
        e, _, ek_mask, _, h_w, h_b = encoder_chunk(enc_ptr, kmu, kvar, e0, k, kmask, K, E,
                                                   E_CHUNK)
        dec = k[None, :] * E + e[:, None]  # W[k, e] at tile position [e, k]
        acc_w += total(tl.load(dw_ptr + dec, mask=ek_mask, other=0.0) * relu(h_w)[:, None], 0)
        acc_b += total(tl.load(db_ptr + dec, mask=ek_mask, other=0.0) * relu(h_b)[:, None], 0)
    return sigmoid(acc_w), tanh(acc_b)


@triton.jit
def ilm_forward_kernel(mean_ptr, m2_ptr, enc_ptr, dw_ptr, db_ptr, weight_ptr, bias_ptr,
                       scale_ptr, shift_ptr, C, L, G, K, E, Cg, Ck, eps,
                       BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_CG: tl.constexpr, E_CHUNK: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0) * C
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    kref, koff, kvar, _ = merge(mean_ptr, m2_ptr, row, k, kmask, Ck, L, BLOCK_K, BLOCK_CK, ACC)
    d_w, d_b = decoder_outputs(enc_ptr, dw_ptr, db_ptr, kref + koff, kvar, k, kmask, K, E,
                               E_CHUNK)
    # omega and beta per channel (key tile), kept in the sample's scale / shift rows
    for j0 in range(0, Ck, BLOCK_CK):
        ch, mask = tile(j0, k, kmask, Ck, BLOCK_CK)
        tl.store(scale_ptr + row + ch, d_w[:, None] + tl.load(weight_ptr + ch, mask=mask),
                 mask=mask)
        tl.store(shift_ptr + row + ch, d_b[:, None] + tl.load(bias_ptr + ch, mask=mask),
                 mask=mask)
    tl.debug_barrier()
    # groups, BLOCK_G at a time: scale = omega r_G, shift = beta + scale (m - mu_G)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gmask = g < G
        ref, off, var, _ = merge(mean_ptr, m2_ptr, row, g, gmask, Cg, L, BLOCK_G, BLOCK_CG, ACC)
        r = tl.where(gmask, tl.rsqrt(var + eps), 0.0)[:, None]  # (padding groups: see assoc)
        for j0 in range(0, Cg, BLOCK_CG):
            ch, mask = tile(j0, g, gmask, Cg, BLOCK_CG)
            m = tl.load(mean_ptr + row + ch, mask=mask, other=0.0)
            scale = tl.load(scale_ptr + row + ch, mask=mask, other=0.0) * r
            shift = (tl.load(shift_ptr + row + ch, mask=mask, other=0.0)
                     + scale * ((m - ref[:, None]) - off[:, None]))
            tl.store(scale_ptr + row + ch, scale, mask=mask)
            tl.store(shift_ptr + row + ch, shift, mask=mask)


@triton.jit
def ilm_backward_kernel(g1_ptr, g2_ptr, mean_ptr, m2_ptr, enc_ptr, dw_ptr, db_ptr, weight_ptr,
                        cdy_ptr, cx_ptr, c0_ptr, ws_ptr, ws2_ptr, counter_ptr,
                        denc_ptr, ddw_ptr, ddb_ptr, dweight_ptr, dbias_ptr,
                        N, C, L, G, K, E, Cg, Ck, eps,
                        BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_CG: tl.constexpr, E_CHUNK: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    l_acc = tl.full([], 0.0, ACC) + L  # counts in ACC: int * float literal would be float32
    n = tl.program_id(0)
    row = n * C
    width = 2 * C + 3 * K * E
    wrow = ws_ptr + n.to(tl.int64) * width
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    kref, koff, kvar, bessel_k = merge(mean_ptr, m2_ptr, row, k, kmask, Ck, L, BLOCK_K, BLOCK_CK,
                                       ACC)
    kmu = kref + koff
    d_w, d_b = decoder_outputs(enc_ptr, dw_ptr, db_ptr, kmu, kvar, k, kmask, K, E, E_CHUNK)

    # pass 1 (key tile): omega into the c_dy row; the key sums of g1 (-> d D_b)
    sum_g1 = tl.full([BLOCK_K], 0.0, ACC)
    for j0 in range(0, Ck, BLOCK_CK):
        ch, mask = tile(j0, k, kmask, Ck, BLOCK_CK)
        tl.store(cdy_ptr + row + ch, d_w[:, None] + tl.load(weight_ptr + ch, mask=mask),
                 mask=mask)
        sum_g1 += total(tl.load(g1_ptr + row + ch, mask=mask, other=0.0), 1)
    tl.debug_barrier()

    # pass 2 (group tile): grad_omega = (g2 + g1 dev) r (the weight's gradient, kept in the
    # workspace row), g1 (the bias's), c_dy = omega r, and the group part of c_x / c_0
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gmask = g < G
        ref, off, var, bessel_g = merge(mean_ptr, m2_ptr, row, g, gmask, Cg, L, BLOCK_G,
                                        BLOCK_CG, ACC)
        r = tl.rsqrt(var + eps)
        sum_g1w = tl.full([BLOCK_G], 0.0, ACC)   # sum g1 omega          -> d mu_G (explicit)
        sum_hw = tl.full([BLOCK_G], 0.0, ACC)    # sum grad_scale omega  -> d var_G
        for j0 in range(0, Cg, BLOCK_CG):
            ch, mask = tile(j0, g, gmask, Cg, BLOCK_CG)
            g1 = tl.load(g1_ptr + row + ch, mask=mask, other=0.0)
            g2 = tl.load(g2_ptr + row + ch, mask=mask, other=0.0)
            dev = (tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - ref[:, None]) \
                - off[:, None]
            omega = tl.load(cdy_ptr + row + ch, mask=mask, other=0.0)
            h = g2 + g1 * dev
            sum_g1w += total(g1 * omega, 1)
            sum_hw += total(h * omega, 1)
            tl.store(wrow + ch, h * r[:, None], mask=mask)
            tl.store(wrow + C + ch, g1, mask=mask)
            tl.store(cdy_ptr + row + ch, omega * r[:, None], mask=mask)
        d_q = ((sum_hw * (-0.5 * bessel_g) * r * r * r) / (l_acc * Cg))[:, None]
        d_m = (-(sum_g1w * r) / Cg)[:, None]
        for j0 in range(0, Cg, BLOCK_CG):
            ch, mask = tile(j0, g, gmask, Cg, BLOCK_CG)
            dev = (tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - ref[:, None]) \
                - off[:, None]
            tl.store(cx_ptr + row + ch, d_q + tl.full([BLOCK_G, BLOCK_CG], 0.0, ACC), mask=mask)
            tl.store(c0_ptr + row + ch, d_m + (2.0 * l_acc) * d_q * dev, mask=mask)
    tl.debug_barrier()

    # pass 3 (key tile): the key sums of grad_omega (-> d D_w)
    sum_go = tl.full([BLOCK_K], 0.0, ACC)
    for j0 in range(0, Ck, BLOCK_CK):
        ch, mask = tile(j0, k, kmask, Ck, BLOCK_CK)
        sum_go += total(tl.load(wrow + ch, mask=mask, other=0.0), 1)

    # meta network backward (decoders, then the shared encoder), E_CHUNK hidden units a step;
    # relu's mask multiplies (as the spec's ``* (h > 0)``: a NaN gradient stays NaN).  Padded
    # key groups and hidden units are 0, not NaN (a non-finite statistic would make them so
    # through the zero-padded tiles, and they are summed over)
    z_w = tl.where(kmask, sum_go * d_w * (1.0 - d_w), 0.0)
    z_b = tl.where(kmask, sum_g1 * (1.0 - d_b * d_b), 0.0)
    grad_kvar = tl.full([BLOCK_K], 0.0, ACC)
    grad_kmu = tl.full([BLOCK_K], 0.0, ACC)
    for e0 in range(0, E, E_CHUNK):
        e, emask, ek_mask, w, h_w, h_b = encoder_chunk(enc_ptr, kmu, kvar, e0, k, kmask, K,
                                                       E, E_CHUNK)
        dec = k[None, :] * E + e[:, None]
        tl.store(wrow + 2 * C + K * E + dec, relu(h_w)[:, None] * z_w[None, :], mask=ek_mask)
        tl.store(wrow + 2 * C + 2 * K * E + dec, relu(h_b)[:, None] * z_b[None, :],
                 mask=ek_mask)
        gh_w = total(tl.load(dw_ptr + dec, mask=ek_mask, other=0.0) * z_w[None, :], 1) \
            * tl.where(emask & (h_w > 0), 1.0, 0.0)
        gh_b = total(tl.load(db_ptr + dec, mask=ek_mask, other=0.0) * z_b[None, :], 1) \
            * tl.where(emask & (h_b > 0), 1.0, 0.0)
        tl.store(wrow + 2 * C + e[:, None] * K + k[None, :],
                 gh_w[:, None] * kvar[None, :] + gh_b[:, None] * kmu[None, :], mask=ek_mask)
        grad_kvar += total(w * gh_w[:, None], 0)
        grad_kmu += total(w * gh_b[:, None], 0)
    kd_q = (grad_kvar * bessel_k / (l_acc * Ck))[:, None]
    kd_m = (grad_kmu / Ck)[:, None]

    # pass 4 (key tile): add the key part to c_x / c_0 (2 dQ, (dm + 2 L dQ dev) / L)
    for j0 in range(0, Ck, BLOCK_CK):
        ch, mask = tile(j0, k, kmask, Ck, BLOCK_CK)
        kdev = (tl.load(mean_ptr + row + ch, mask=mask, other=0.0) - kref[:, None]) \
            - koff[:, None]
        cx = tl.load(cx_ptr + row + ch, mask=mask, other=0.0) + kd_q
        c0 = tl.load(c0_ptr + row + ch, mask=mask, other=0.0) + (kd_m + (2.0 * l_acc) * kd_q * kdev)
        tl.store(cx_ptr + row + ch, 2.0 * cx, mask=mask)
        tl.store(c0_ptr + row + ch, c0 / L, mask=mask)

    sum_over_samples(ws_ptr, ws2_ptr, counter_ptr, n, N, C, K * E, dweight_ptr, dbias_ptr,
                     denc_ptr, ddw_ptr, ddb_ptr)
