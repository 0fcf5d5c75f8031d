"""The implementations compared for each layer, and how each is built on the same tensors.

For a layer ("bin", "iebn", "assoc", "ilm") the contenders are:

* ``normfuse[<backend>]`` for every normfuse backend that runs on the device;
* the native baseline, ``nn.BatchNorm2d`` (BIN, IEBN) or ``nn.GroupNorm`` (AssocNorm, ILM-Norm);
* ``composition``: the straightforward PyTorch version in ``bench/compositions.py``;
* ``compiled``: ``torch.compile`` of that composition (where it compiles);
* with the following ReLU (issue 14): ``normfuse[<backend>]+ReLU`` (``activation="relu"``, the
  ReLU fused into the layer; compiled-kernel backends only, "torch" when it is the only one)
  against ``<native>+ReLU`` (the native layer and an ``nn.ReLU``, as a ResNet block has them).

All of them get the same parameter values (copied from a randomized normfuse module, or from a
randomized composition when normfuse cannot be imported).  ILMNorm's arguments on a shape:
``num_groups`` as AssocNorm's, ``shapes.ilm_key_group_size_for(C)`` and ``shapes.ILM_REDUCTION``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import compositions as comp
from .shapes import ILM_REDUCTION, ilm_key_group_size_for

LAYERS = ("bin", "iebn", "assoc", "ilm")
LAYER_LABEL = {"bin": "BIN", "iebn": "IEBN", "assoc": "AssocNorm", "ilm": "ILMNorm"}
NATIVE_LABEL = {"bin": "nn.BatchNorm2d", "iebn": "nn.BatchNorm2d", "assoc": "nn.GroupNorm",
                "ilm": "nn.GroupNorm"}
GROUP_LAYERS = ("assoc", "ilm")  # nn.GroupNorm's successors (the rest: nn.BatchNorm2d's)
DEVICE_BACKENDS = {"cpu": ("torch", "cpu"), "cuda": ("torch", "cuda", "triton")}

_NORMFUSE = None
NORMFUSE_ERROR: Optional[str] = None


def normfuse():
    """The normfuse package, or None (with ``NORMFUSE_ERROR`` set) if it does not import."""
    global _NORMFUSE, NORMFUSE_ERROR
    if _NORMFUSE is None and NORMFUSE_ERROR is None:
        try:
            import normfuse as nf
            _NORMFUSE = nf
        except Exception as exc:  # report, do not crash: baselines still run
            NORMFUSE_ERROR = f"{type(exc).__name__}: {exc}"
    return _NORMFUSE


def kernel_backends(backends: List[str]) -> List[str]:
    """``backends`` without the "torch" reference (or all of them when it is the only one): the
    rows timed on the compiled-kernel backends alone (the fused ReLU, ILM-Norm, the ResNet-50
    step, the heads and transforms by default, the report's best backend)."""
    return [b for b in backends if b != "torch"] or backends


def backends_for(device: str, requested: Optional[List[str]] = None) -> List[str]:
    """normfuse backends to measure: the requested ones, or every available one that targets
    ``device`` ("triton" only on CUDA: on the CPU it would run in the slow interpreter)."""
    nf = normfuse()
    if nf is None:
        return []
    available = [b for b in nf.available_backends() if b != "auto"]
    if requested:
        missing = [b for b in requested if b not in available]
        if missing:
            raise SystemExit(f"backend(s) {missing} not available; available: {available}")
        return list(requested)
    known = set(DEVICE_BACKENDS["cpu"] + DEVICE_BACKENDS["cuda"])
    return [b for b in available if b in DEVICE_BACKENDS[device] or b not in known]


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "normfuse" | "native" | "composition" | "compiled" | "native_relu"
    backend: Optional[str] = None
    relu: bool = False  # followed by a ReLU: fused (normfuse) or an nn.ReLU (native_relu)

    def context(self):
        if self.kind == "normfuse":
            return normfuse().use_backend(self.backend)
        return contextlib.nullcontext()


def impls_for(backends: List[str], layer: str, with_compile: bool) -> List[Impl]:
    out = [Impl(f"normfuse[{b}]", "normfuse", b) for b in backends]
    out.append(Impl(NATIVE_LABEL[layer], "native"))
    out.append(Impl("composition", "composition"))
    if with_compile:
        out.append(Impl("compiled", "compiled"))
    fused = kernel_backends(backends)
    out += [Impl(f"normfuse[{b}]+ReLU", "normfuse", b, relu=True) for b in fused]
    out.append(Impl(f"{NATIVE_LABEL[layer]}+ReLU", "native_relu", relu=True))
    return out


def _normfuse_module(layer: str, c: int, g: int) -> nn.Module:
    nf = normfuse()
    if layer == "bin":
        return nf.BatchInstanceNorm2d(c)
    if layer == "iebn":
        return nf.InstanceEnhancementBatchNorm2d(c)
    if layer == "ilm":
        return nf.ILMNorm(c, g, ilm_key_group_size_for(c), ILM_REDUCTION)
    return nf.AssocNorm(g, c)


def _composition(layer: str, c: int, g: int, embed_dim: Optional[int] = None) -> nn.Module:
    if layer == "bin":
        return comp.BatchInstanceNormComposition(c)
    if layer == "iebn":
        return comp.InstanceEnhancementBatchNormComposition(c)
    if layer == "ilm":
        return comp.ILMNormComposition(c, g, ilm_key_group_size_for(c), ILM_REDUCTION)
    return comp.AssocNormComposition(g, c, embed_dim)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameter values (gates inside (0, 1)), the same for every contender."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name == "gate":
            p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.2)
        else:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def reference(layer: str, c: int, g: int) -> nn.Module:
    """The randomized module whose values every contender copies (on the CPU, float32)."""
    src = _normfuse_module(layer, c, g) if normfuse() is not None else _composition(layer, c, g)
    return randomize_(src).train()


def build(impl: Impl, layer: str, c: int, g: int, source: nn.Module,
          device: torch.device) -> nn.Module:
    """A fresh module for ``impl`` in training mode, on ``device``, with ``source``'s values."""
    if impl.kind == "normfuse":
        mod = _normfuse_module(layer, c, g)
        mod.load_state_dict(source.state_dict())
        mod.activation = "relu" if impl.relu else None
    elif impl.kind in ("native", "native_relu"):
        mod = nn.GroupNorm(g, c) if layer in GROUP_LAYERS else nn.BatchNorm2d(c)
        with torch.no_grad():
            # an ILM composition (the source when normfuse does not import) has the authors'
            # (1, C, 1, 1) weight_bias / bias_bias
            for name in ("weight", "bias"):
                value = getattr(source, name, None)
                if value is None:
                    value = getattr(source, f"{name}_bias")
                getattr(mod, name).copy_(value.reshape(-1))
        if impl.relu:  # the pair a ResNet has (torchvision's ReLUs are in place)
            mod = nn.Sequential(mod, nn.ReLU(inplace=True))
    else:
        embed = source.encoder.shape[0] if layer == "assoc" else None
        mod = comp.load_params_from(_composition(layer, c, g, embed), source)
    mod = mod.to(device).train()
    if impl.kind == "compiled":
        torch._dynamo.reset()  # one static compilation per case, no stale recompile budget
        mod = torch.compile(mod, dynamic=False)
    return mod


def fit_dtype(mod: nn.Module, impl: Impl, x: torch.Tensor) -> Tuple[nn.Module, str]:
    """Run one forward.  A baseline whose float32 parameters give an error or promote a
    low-precision input to float32 is moved to the input's dtype (as ``model.half()`` would);
    normfuse modules keep float32 parameters, as their API specifies."""
    note = ""
    try:
        with impl.context():
            ok = mod(x).dtype == x.dtype
    except Exception as exc:
        if impl.kind == "normfuse" or x.dtype == torch.float32:
            raise
        ok, note = False, f"float32 params failed ({type(exc).__name__})"
    if not ok:
        if impl.kind == "normfuse":
            raise RuntimeError(f"output dtype differs from input dtype {x.dtype}")
        mod = mod.to(x.dtype)
        note = (note + "; " if note else "") + f"params in {str(x.dtype).replace('torch.', '')}"
        with impl.context():
            mod(x)
    return mod, note
