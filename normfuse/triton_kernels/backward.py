"""``backward_sums``: per-plane ``sum_dy = sum dy`` and ``sum_dy_xmu = sum dy * (x - mean)``.

Reads ``dy`` and ``x`` once (same layout) and ``mean`` (``(N, C)``); writes the two ``(N, C)``
sums in the acc dtype.  Same tiling, split plan and last-program merge as ``moments`` (plain
sums here: ``x - mean`` is already centred, so no shift is needed).  Deterministic: lanes are
reduced by a fixed tree, split partials in split order.

``MASK`` (the fused ReLU's backward): every ``dy`` is first replaced by ``v > 0 ? dy : 0``, ``v``
recomputed from ``x``, ``mean`` and the forward's per-plane ``scale``/``shift`` by apply.py's
``pre_activation`` (the forward's very arithmetic, so the forward's sign bit for bit).
"""
import triton
import triton.language as tl

from .apply import pre_activation, relu_mask
from .common import last_arrival, reset_counter, total
from .moments import plane_block, split_slice


@triton.jit(do_not_specialize=["chunk_tiles", "splits"])
def backward_sums_kernel(dy_ptr, x_ptr, mean_ptr, scale_ptr, shift_ptr, g1_ptr, g2_ptr, part_ptr,
                         counter_ptr, C, L, num_planes, c_blocks, chunk_tiles, splits,
                         MASK: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = tl.program_id(1)
    plane, pmask, base, step = plane_block(pid, C, L, num_planes, c_blocks, CHANNELS_LAST, BLOCK_P)
    start, stop, n_full = split_slice(split, chunk_tiles, L, BLOCK_L)
    mean = tl.load(mean_ptr + plane, mask=pmask, other=0.0)[:, None]
    if MASK:
        scale = tl.load(scale_ptr + plane, mask=pmask, other=0.0)[:, None]
        shift = tl.load(shift_ptr + plane, mask=pmask, other=0.0)[:, None]
    offs = base[:, None] + (start + tl.arange(0, BLOCK_L))[None, :] * step
    dy_ptrs = dy_ptr + offs
    x_ptrs = x_ptr + offs

    s1 = tl.full([BLOCK_P, BLOCK_L], 0.0, ACC)
    s2 = tl.full([BLOCK_P, BLOCK_L], 0.0, ACC)
    for _ in range(n_full):
        dy = tl.load(dy_ptrs, mask=pmask[:, None], other=0.0).to(ACC)
        x = tl.load(x_ptrs, mask=pmask[:, None], other=0.0).to(ACC)
        if MASK:
            dy = relu_mask(dy, pre_activation(x, mean, scale, shift))
        s1 += dy
        s2 += dy * (x - mean)
        dy_ptrs += BLOCK_L * step
        x_ptrs += BLOCK_L * step
    lmask = (start + n_full * BLOCK_L + tl.arange(0, BLOCK_L)) < stop
    mask = pmask[:, None] & lmask[None, :]
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    if MASK:
        dy = relu_mask(dy, pre_activation(x, mean, scale, shift))
    s1 += dy
    s2 += dy * (x - mean)
    p1 = total(s1, 1)
    p2 = total(s2, 1)

    if splits == 1:
        tl.store(g1_ptr + plane, p1, mask=pmask)
        tl.store(g2_ptr + plane, p2, mask=pmask)
    else:
        part = part_ptr + plane
        tl.store(part + split * num_planes, p1, mask=pmask)
        tl.store(part + (splits + split) * num_planes, p2, mask=pmask)
        if last_arrival(counter_ptr + pid, splits):
            acc1 = tl.full([BLOCK_P], 0.0, ACC)
            acc2 = tl.full([BLOCK_P], 0.0, ACC)
            for s in range(splits):
                acc1 += tl.load(part + s * num_planes, mask=pmask, other=0.0,
                                cache_modifier=".cg")
                acc2 += tl.load(part + (splits + s) * num_planes, mask=pmask, other=0.0,
                                cache_modifier=".cg")
            tl.store(g1_ptr + plane, acc1, mask=pmask)
            tl.store(g2_ptr + plane, acc2, mask=pmask)
            reset_counter(counter_ptr + pid)
