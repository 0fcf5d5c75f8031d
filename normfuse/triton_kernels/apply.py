"""The two elementwise passes: ``affine_apply`` (forward) and ``backward_apply``.

    affine_apply:   y  = scale * (x - mean) + shift                       reads x,     writes y
                    (RELU: y = relu(v), v the same expression, NaN kept)
    backward_apply: dx = c_dy * dy + c_x * (x - mean) + c_0               reads dy, x, writes dx
                    (MASK: dy -> v > 0 ? dy : 0 in the first term only, the fused ReLU's
                    derivative; c_x and c_0 carry the statistics' gradient to every element)

Per-plane coefficients are ``(N, C)`` acc-dtype tensors (tiny, served from L1/L2).  Math in the
acc dtype, result cast to the input dtype.  One program per ``[BLOCK_P, BLOCK_L]`` tile:

* contiguous: ``BLOCK_P`` planes x ``BLOCK_L`` elements, coefficients loaded once per row;
* channels-last: ``BLOCK_P`` channels x ``BLOCK_L`` rows of the ``(N * L, C)`` matrix, the
  coefficient of element ``(row, c)`` is at ``(row // L) * C + c`` (one division per row).

The fused ReLU's pre-activation ``v`` is computed by one helper, ``pre_activation``, in the
forward and in both backward kernels (backward.py), so the backward's mask is the forward's sign
bit for bit (same operations, same order, same fma contraction).  ``RELU``/``MASK`` are
constexprs: the unfused variants compile to exactly the code they had before.

No mask varies along the contiguous dimension unless ``L`` (resp. ``C``) is ragged, so aligned
float32/16/bf16 inputs get 128-bit loads and stores (checked by the AOT tests).
"""
import triton
import triton.language as tl

from .common import relu


@triton.jit
def stream_tile(pid, C, L, num_planes, num_rows, l_blocks, CHANNELS_LAST: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    """Element offsets and mask of the tile of program ``pid``, and where its per-plane
    coefficients live (index tile and mask, broadcastable against the element tile)."""
    pb = pid // l_blocks
    lb = pid - pb * l_blocks
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    r = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    if CHANNELS_LAST:
        pmask = p < C
        rmask = r < num_rows
        offs = r.to(tl.int64)[None, :] * C + p[:, None]
        coef = (r // L)[None, :] * C + p[:, None]
        mask = pmask[:, None] & rmask[None, :]
        cmask = mask
    else:
        pmask = p < num_planes
        rmask = r < L
        offs = p.to(tl.int64)[:, None] * L + r[None, :]
        coef = p[:, None]
        mask = pmask[:, None] & rmask[None, :]
        cmask = pmask[:, None]
    return offs, mask, coef, cmask


@triton.jit
def pre_activation(x, mean, scale, shift):
    """``scale * (x - mean) + shift`` in the acc dtype: the affine map, and the value whose sign
    the fused ReLU's backward recomputes.  Every kernel computes it through this helper only."""
    return scale * (x - mean) + shift


@triton.jit
def relu_mask(dy, v):
    """``dy`` where ``v > 0``, else 0 (ReLU's derivative, 0 at 0 as torch's; 0 for a NaN ``v``
    too, where torch passes ``dy``: a NaN pre-activation comes from a non-finite plane mean,
    whose plane's gradient is NaN either way)."""
    return tl.where(v > 0, dy, 0.0)


@triton.jit
def affine_apply_kernel(x_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr,
                        C, L, num_planes, num_rows, l_blocks,
                        RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    offs, mask, coef, cmask = stream_tile(tl.program_id(0), C, L, num_planes, num_rows, l_blocks,
                                          CHANNELS_LAST, BLOCK_P, BLOCK_L)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + coef, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + coef, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + coef, mask=cmask, other=0.0)
    y = pre_activation(x, mean, scale, shift)
    if RELU:
        y = relu(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_apply_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, cdy_ptr, cx_ptr, c0_ptr,
                          scale_ptr, shift_ptr, C, L, num_planes, num_rows, l_blocks,
                          MASK: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_L: tl.constexpr):
    """``MASK``: ``scale_ptr``/``shift_ptr`` are the forward's coefficients (else unused, any
    pointer) and only the ``c_dy`` term sees the masked ``dy``."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    offs, mask, coef, cmask = stream_tile(tl.program_id(0), C, L, num_planes, num_rows, l_blocks,
                                          CHANNELS_LAST, BLOCK_P, BLOCK_L)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + coef, mask=cmask, other=0.0)
    c_dy = tl.load(cdy_ptr + coef, mask=cmask, other=0.0)
    c_x = tl.load(cx_ptr + coef, mask=cmask, other=0.0)
    c_0 = tl.load(c0_ptr + coef, mask=cmask, other=0.0)
    if MASK:
        scale = tl.load(scale_ptr + coef, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + coef, mask=cmask, other=0.0)
        dy = relu_mask(dy, pre_activation(x, mean, scale, shift))
    dx = c_dy * dy + c_x * (x - mean) + c_0
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
