"""Inputs of the BIN / IEBN layer-step and layer-direction op tests (tests/csrc): a layer's
activation, gradient, parameters, running statistics and batch counter, random and not all
zero, with per-channel offsets; `clones` copies what an op mutates, so two calls can be compared."""
from __future__ import annotations

import torch


def make(layer, N, C, spatial, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *spatial, generator=g) * 2 + torch.arange(C).view(1, C, *[1] * len(spatial)) * 0.25
    dy = torch.randn(x.shape, generator=g)
    x, dy = x.to(device, dtype), dy.to(device, dtype)
    if layout == "cl":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = lambda t: t.to(device, acc)  # noqa: E731
    t = {"x": x, "dy": dy, "weight": c(1 + 0.3 * torch.randn(C, generator=g)), "bias": c(torch.randn(C, generator=g)),
         "rm": c(torch.randn(C, generator=g)), "rv": c(1 + torch.rand(C, generator=g)),
         "nbt": torch.tensor(5, device=device)}
    if layer == "bin":
        t["gates"] = [c(torch.rand(C, generator=g))]
    else:
        t["gates"] = [c(torch.randn(C, generator=g)), c(torch.randn(C, generator=g))]
    return t


def clones(t):
    return {k: (v.clone() if k in ("rm", "rv", "nbt") else v) for k, v in t.items()}
