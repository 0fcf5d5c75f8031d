"""Activation shapes taken from real networks, at the places a normalization layer sits.

CIFAR ResNets (ResNet-20/56/110, He et al. 2016): three stages of 16, 32, 64 channels at
32x32, 16x16, 8x8.  ImageNet ResNet-50: the stem (64 @ 112x112) and, per stage, the bottleneck's
inner width and its expanded output (64/256 @ 56, 128/512 @ 28, 256/1024 @ 14, 512/2048 @ 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class Shape:
    name: str
    dims: Tuple[int, ...]  # (N, C, H, W)

    @property
    def channels(self) -> int:
        return self.dims[1]

    @property
    def numel(self) -> int:
        out = 1
        for d in self.dims:
            out *= d
        return out

    def __str__(self) -> str:
        return "x".join(str(d) for d in self.dims)


CIFAR_STAGES = [(16, 32), (32, 16), (64, 8)]  # (channels, spatial)
RESNET50_STAGES = [
    ("stem", 64, 112),
    ("s1", 64, 56), ("s1-out", 256, 56),
    ("s2", 128, 28), ("s2-out", 512, 28),
    ("s3", 256, 14), ("s3-out", 1024, 14),
    ("s4", 512, 7), ("s4-out", 2048, 7),
]


def cifar(batch: int, stages=(1, 2, 3)) -> List[Shape]:
    return [Shape(f"cifar-s{i}-b{batch}", (batch, c, s, s))
            for i, (c, s) in enumerate(CIFAR_STAGES, 1) if i in stages]


def resnet50(batch: int, names=None) -> List[Shape]:
    return [Shape(f"rn50-{n}-b{batch}", (batch, c, s, s))
            for n, c, s in RESNET50_STAGES if names is None or n in names]


def shapes_for(device: str, preset: str) -> List[Shape]:
    """The shape set of a run.  ``preset``: "smoke", "quick" or "full"."""
    if preset == "smoke":
        return [Shape("tiny", (4, 8, 8, 8))]
    if device == "cpu":
        if preset == "quick":
            return cifar(32, stages=(1, 3)) + resnet50(8, names=("s2",))
        return cifar(128) + resnet50(8, names=("s1", "s1-out", "s2-out", "s3-out", "s4-out"))
    if preset == "quick":
        return cifar(128, stages=(1,)) + resnet50(32, names=("s1-out", "s3-out"))
    return (cifar(128) + resnet50(32)
            + resnet50(128, names=("s1", "s1-out", "s2-out", "s3-out", "s4-out")))


def num_groups_for(channels: int) -> int:
    """Groups for GroupNorm / AssocNorm: 32 as in the GroupNorm paper, fewer for narrow layers
    so that every group holds at least two channels."""
    g = 32
    while g > 1 and (channels % g or g > channels // 2):
        g //= 2
    return g


# ILM-Norm (normfuse.ILMNorm, the authors' ilm_gn) on the bench shapes: num_groups as AssocNorm's
# (num_groups_for), reduction the authors' default 16 (always valid: the meta network's hidden
# size is K // 16 key groups, or 2 when K < 16, i.e. 2 for C <= 256, 4 at C = 1024, 8 at 2048).
ILM_REDUCTION = 16


def ilm_key_group_size_for(channels: int) -> int:
    """Channels per ILM-Norm key group: the authors' default 16 wherever 16 divides C (every
    ResNet shape, C = 16 included: one key group, as ilm_gn(16) has; what ``normfuse.convert(...,
    "ilm")`` builds by default), else the largest power of two that divides C (the smoke shape's
    C = 8: one key group of 8 channels)."""
    k = 16
    while k > 1 and channels % k:
        k //= 2
    return k
