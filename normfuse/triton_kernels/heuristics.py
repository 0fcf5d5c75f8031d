"""Launch heuristics of the Triton backend: every tile size, split and warp count comes from here.

Streaming kernels (moments, backward_sums, affine_apply, backward_apply) work on 2-d tiles
``[BLOCK_P, BLOCK_L]`` of ``TILE = 4096`` elements (16 per thread at 8 warps, i.e. two to four
128-bit loads per thread and iteration):

* contiguous layout ("rows"): ``BLOCK_P`` planes x ``BLOCK_L`` consecutive elements of each plane;
  ``BLOCK_L`` is the largest of ``ROWS_BLOCK_L`` that keeps >= 75 % of the lanes busy for this
  ``L`` (49 -> 16, 196 -> 128, 784 -> 1024, 3136 -> 4096), ``BLOCK_P = TILE // BLOCK_L``.
* channels-last layout ("cols", and every input with ``L == 1``, where both layouts coincide):
  ``BLOCK_P`` channels (the contiguous dimension) x ``BLOCK_L`` spatial rows, ``BLOCK_P`` from
  ``COLS_BLOCK_C`` by the same 75 % rule on ``C``.

Reductions (moments, backward_sums) give each program ``BLOCK_P`` planes and loop over ``L``.
When that yields fewer than ``4 * num_sms`` programs, several programs share a plane ("splits",
up to ``MAX_SPLITS``, each at least ``MIN_TILES_PER_SPLIT`` tiles long); the last program of a
plane block to finish merges the partials in a fixed order (same launch, deterministic).  The
split count and chunk length are runtime arguments, so they add no compiled variants.

Coefficient kernels: BIN/IEBN use one program per ``block_c`` channels looping over ``N`` in
``block_n`` rows (``COEFF_CONFIGS``, picked by ``N``); AssocNorm one program per sample with
a group tile of 16 or 64 (so ``num_groups`` must be <= 64); the kernels walk the hidden units in
chunks, so the hidden size adds no compiled variant and has no limit.  ILM-Norm: one program
per sample with two tiles of ``ILM_TILE`` elements, a key tile holding all K key groups
(``block_k`` of 16, 64 or 256, so K = C / key_group_size must be <= 256) and a group tile of 32
or 64 groups that the kernels walk over any number of groups; the hidden units in chunks as
AssocNorm's.

``all_stream_configs``, ``all_coeff_configs``, ``all_assoc_configs`` and ``all_ilm_configs``
enumerate every configuration these functions can return; the AOT tests compile each of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

TILE = 4096
STREAM_WARPS = 8
ROWS_BLOCK_L = (4096, 1024, 128, 16)
COLS_BLOCK_C = (256, 64, 16)
MIN_UTILIZATION = 0.75
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 4
PROGRAMS_PER_SM = 4
INTERPRETER_NUM_SMS = 4  # CPU tensors under TRITON_INTERPRET (tests may change it)

COEFF_CONFIGS = ((4, 64), (32, 32), (256, 8))  # (block_n, block_c), by increasing N
COEFF_WARPS = 4
ASSOC_BLOCKS = (16, 64)  # block sizes for the groups
ASSOC_TILE = 512
ASSOC_WARPS = 8
ILM_KEY_BLOCKS = (16, 64, 256)  # block sizes for the key groups (all in one tile)
ILM_GROUP_BLOCKS = (32, 64)     # block sizes for the groups (walked in blocks)
ILM_TILE = 512
ILM_E_CHUNK = 8   # hidden units per step of the meta network, at most: [e_chunk, block_k] tiles
ILM_WARPS = 8


@dataclass(frozen=True)
class StreamConfig:
    channels_last: bool
    block_p: int
    block_l: int
    num_warps: int = STREAM_WARPS


@dataclass(frozen=True)
class CoeffConfig:
    block_n: int
    block_c: int
    num_warps: int = COEFF_WARPS


@dataclass(frozen=True)
class AssocConfig:
    block_g: int
    block_cg: int
    num_warps: int = ASSOC_WARPS


@dataclass(frozen=True)
class ILMConfig:
    block_k: int
    block_ck: int
    block_g: int
    block_cg: int
    e_chunk: int
    num_warps: int = ILM_WARPS


def _pick(extent: int, choices) -> int:
    """Largest block (``choices`` descending) with enough busy lanes for ``extent`` elements."""
    for block in choices:
        used = extent / (-(-extent // block) * block)
        if used >= MIN_UTILIZATION:
            return block
    return choices[-1]


def stream_config(channels: int, plane_size: int, channels_last: bool) -> StreamConfig:
    """Tile of the four streaming kernels for ``(N, C, L)`` in the given layout."""
    if channels_last:
        block_c = _pick(channels, COLS_BLOCK_C)
        return StreamConfig(True, block_c, TILE // block_c)
    block_l = _pick(plane_size, ROWS_BLOCK_L)
    return StreamConfig(False, TILE // block_l, block_l)


def split_plan(cfg: StreamConfig, keep_blocks: int, plane_size: int, num_sms: int):
    """``(splits, chunk)``: programs per plane block and elements of L per program (a multiple
    of ``cfg.block_l``) for the reductions."""
    tiles = max(1, -(-plane_size // cfg.block_l))
    want = -(-PROGRAMS_PER_SM * num_sms // max(1, keep_blocks))
    splits = min(want, MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT)
    if splits <= 1:
        return 1, tiles * cfg.block_l
    chunk_tiles = -(-tiles // splits)
    return -(-tiles // chunk_tiles), chunk_tiles * cfg.block_l


def coeff_config(batch: int) -> CoeffConfig:
    """BIN/IEBN coefficient kernels: one program per ``block_c`` channels, ``block_n`` samples
    per loop step (a single step up to N = 256)."""
    for block_n, block_c in COEFF_CONFIGS:
        if batch <= block_n:
            return CoeffConfig(block_n, block_c)
    return CoeffConfig(*COEFF_CONFIGS[-1])


def assoc_config(num_groups: int, who: str = "normfuse_triton") -> AssocConfig:
    """``who``: the refusal's prefix (the ops pass ``normfuse_triton.<op>``)."""
    if num_groups > ASSOC_BLOCKS[-1]:
        raise RuntimeError(f"{who}: AssocNorm kernels support num_groups <= "
                           f"{ASSOC_BLOCKS[-1]}, got {num_groups}")
    block_g = next(b for b in ASSOC_BLOCKS if num_groups <= b)
    return AssocConfig(block_g, ASSOC_TILE // block_g)


def ilm_config(num_groups: int, key_groups: int, who: str = "normfuse_triton") -> ILMConfig:
    """ILM-Norm kernels: the smallest key tile holding all ``key_groups`` (the meta network
    needs every key group's statistics at once), and a group tile of 32 groups up to 32 (the
    layer's default num_groups), else 64 (more groups are walked 64 at a time); each tile
    ``ILM_TILE`` elements, and so are the meta network's ``[e_chunk, block_k]`` tiles (up to
    ``ILM_E_CHUNK`` hidden units a step).  (A group tile of 16 x 32 made ptxas spill two
    registers in the backward at block_k = 16 on sm_80, Triton 3.8; 32 x 16 does not.)
    ``who``: the refusal's prefix, as ``assoc_config``'s."""
    if key_groups > ILM_KEY_BLOCKS[-1]:
        raise RuntimeError(f"{who}: ILM-Norm kernels support C / key_group_size <= "
                           f"{ILM_KEY_BLOCKS[-1]} key groups, got {key_groups}; use the cuda "
                           f"or torch backend")
    block_k = next(b for b in ILM_KEY_BLOCKS if key_groups <= b)
    block_g = ILM_GROUP_BLOCKS[0] if num_groups <= ILM_GROUP_BLOCKS[0] else ILM_GROUP_BLOCKS[-1]
    return _ilm(block_k, block_g)


def _ilm(block_k: int, block_g: int) -> ILMConfig:
    return ILMConfig(block_k, ILM_TILE // block_k, block_g, ILM_TILE // block_g,
                     max(1, min(ILM_E_CHUNK, ILM_TILE // block_k)))


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_NUM_SMS


def all_stream_configs():
    return ([StreamConfig(False, TILE // b, b) for b in ROWS_BLOCK_L]
            + [StreamConfig(True, b, TILE // b) for b in COLS_BLOCK_C])


def all_coeff_configs():
    return [CoeffConfig(n, c) for n, c in COEFF_CONFIGS]


def all_assoc_configs():
    return [AssocConfig(g, ASSOC_TILE // g) for g in ASSOC_BLOCKS]


def all_ilm_configs():
    return [_ilm(k, g) for k in ILM_KEY_BLOCKS for g in ILM_GROUP_BLOCKS]
