"""``moments``: per-plane mean and centred sum of squares, one pass over ``x``.

Reads ``x`` (any float dtype, contiguous or channels-last) once; writes ``mean`` and ``m2``
(``(N, C)``, acc dtype).  Numerics (design section 2): every plane is first shifted by its own
first element (so a 1e4 offset never enters the accumulators), then each lane of the tile runs
Welford on the shifted values and the lanes are merged with Chan's formula (in its all-at-once
form: count-weighted mean, then the lanes' m2 plus their count-weighted squared deviations).  ``mean = shift +
shifted mean`` is rounded once, which is as good as float32 gets.

Grid ``(plane blocks, splits)``.  With ``splits > 1`` each program covers ``chunk`` elements of
its planes and writes ``(shifted mean, m2)`` partials to ``part``; the last program of the plane
block to arrive (atomic ticket on ``counter``) merges all partials in split order and writes the
result, so a split reduction is still a single, deterministic launch.
"""
import triton
import triton.language as tl

from .common import (finite_or_zero, last_arrival, reset_counter, total, welford_combine,
                     welford_mean)


@triton.jit
def plane_block(pid, C, L, num_planes, c_blocks, CHANNELS_LAST: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """Planes of program ``pid`` (``BLOCK_P`` of them), the offset of their first element, and
    the distance between two consecutive elements of a plane.

    Contiguous: consecutive planes ``pid * BLOCK_P + i``, step 1.  Channels-last: ``BLOCK_P``
    consecutive channels of one sample, ``pid = n * c_blocks + channel block``, step ``C``.
    """
    if CHANNELS_LAST:
        n = pid // c_blocks
        c = (pid - n * c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = c < C
        plane = n * C + c
        base = n.to(tl.int64) * L * C + c
        step = C
    else:
        plane = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = plane < num_planes
        base = plane.to(tl.int64) * L
        step = 1
    return plane, pmask, base, step


@triton.jit
def split_slice(split, chunk_tiles, L, BLOCK_L: tl.constexpr):
    """Split ``split``'s slice ``[start, stop)`` of its planes and its number of full tiles.

    The chunk is a whole number of tiles, which keeps every tile 16-byte aligned.
    """
    chunk = chunk_tiles * BLOCK_L
    start = split * chunk
    stop = tl.minimum(start + chunk, L)
    return start, stop, (stop - start) // BLOCK_L


@triton.jit(do_not_specialize=["chunk_tiles", "splits"])
def moments_kernel(x_ptr, mean_ptr, m2_ptr, part_ptr, counter_ptr,
                   C, L, num_planes, c_blocks, chunk_tiles, splits,
                   CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = tl.program_id(1)
    plane, pmask, base, step = plane_block(pid, C, L, num_planes, c_blocks, CHANNELS_LAST, BLOCK_P)
    start, stop, n_full = split_slice(split, chunk_tiles, L, BLOCK_L)
    # 0 where the first element is not finite: a plane starting with -Inf has mean -Inf, not NaN
    shift = finite_or_zero(tl.load(x_ptr + base, mask=pmask, other=0.0).to(ACC))
    offs_l = start + tl.arange(0, BLOCK_L)
    ptrs = x_ptr + (base[:, None] + offs_l[None, :] * step)

    # full tiles: no mask along L (128-bit loads), every lane has seen i + 1 values
    mean = tl.full([BLOCK_P, BLOCK_L], 0.0, ACC)
    m2 = tl.full([BLOCK_P, BLOCK_L], 0.0, ACC)
    for i in range(n_full):
        v = tl.load(ptrs, mask=pmask[:, None], other=0.0).to(ACC) - shift[:, None]
        d = v - mean
        mean = welford_mean(mean, v, d, 1.0 / (i + 1.0))
        m2 += d * (v - mean)
        ptrs += BLOCK_L * step

    # ragged tail (at most one tile)
    lmask = (start + n_full * BLOCK_L + tl.arange(0, BLOCK_L)) < stop
    v = tl.load(ptrs, mask=pmask[:, None] & lmask[None, :], other=0.0).to(ACC) - shift[:, None]
    cnt = tl.where(lmask, n_full + 1.0, n_full + 0.0).to(ACC)
    d = v - mean
    mean = tl.where(lmask[None, :], welford_mean(mean, v, d, 1.0 / tl.maximum(cnt, 1.0)[None, :]),
                    mean)
    m2 = tl.where(lmask[None, :], m2 + d * (v - mean), m2)
    # Chan's merge of all lanes at once: n = sum n_l, mean = sum n_l mean_l / n,
    # m2 = sum m2_l + sum n_l (mean_l - mean)^2 (plain sums: fast, and exact as a merge)
    p_cnt = tl.maximum(total(cnt, 0), 1.0)
    p_mean = total(mean * cnt[None, :], 1) / p_cnt
    dev = mean - p_mean[:, None]
    p_m2 = total(m2 + dev * dev * cnt[None, :], 1)

    if splits == 1:
        tl.store(mean_ptr + plane, shift + p_mean, mask=pmask)
        tl.store(m2_ptr + plane, p_m2, mask=pmask)
    else:
        part = part_ptr + plane
        tl.store(part + split * num_planes, p_mean, mask=pmask)
        tl.store(part + (splits + split) * num_planes, p_m2, mask=pmask)
        if last_arrival(counter_ptr + pid, splits):
            acc_mean = tl.full([BLOCK_P], 0.0, ACC)
            acc_m2 = tl.full([BLOCK_P], 0.0, ACC)
            acc_n = tl.full([BLOCK_P], 0.0, ACC)
            for s in range(splits):
                s_mean = tl.load(part + s * num_planes, mask=pmask, other=0.0,
                                 cache_modifier=".cg")
                s_m2 = tl.load(part + (splits + s) * num_planes, mask=pmask, other=0.0,
                               cache_modifier=".cg")
                s_start, s_stop, _ = split_slice(s, chunk_tiles, L, BLOCK_L)
                s_n = tl.full([BLOCK_P], 0.0, ACC) + (s_stop - s_start)
                acc_mean, acc_m2, acc_n = welford_combine(acc_mean, acc_m2, acc_n,
                                                          s_mean, s_m2, s_n)
            tl.store(mean_ptr + plane, shift + acc_mean, mask=pmask)
            tl.store(m2_ptr + plane, acc_m2, mask=pmask)
            reset_counter(counter_ptr + pid)
