"""Cost of the layers under ``torch.func`` transforms, against torch's own layers.

What users run the layers under transforms for: ``grad`` (functional training loops),
``vmap(grad)`` (per-sample gradients, as Opacus and differential-privacy training compute them)
and ``grad`` of a loss after one inner SGD step (MAML: second derivatives through the layer).
Each contender is one layer on one ``(N, C, H, W)`` float32 input, timed interleaved with the
others (``timing.measure_many``): ``nn.GroupNorm`` against AssocNorm and ILM-Norm,
``nn.BatchNorm2d`` against BIN and IEBN (per-sample gradients in eval mode, where each output
is its sample's own; the others in training, buffers passed to ``functional_call`` so that
``nn.BatchNorm2d``'s in-place update is allowed under ``grad``). ``ratio_native``: time / the
native layer's under the same transform.

    python -m bench.transforms [--shape 32 64 16 16] [--backends cpu] [--threads 1]

Measured on the CPU by default (one thread); on a GPU with ``--device cuda``.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import host as H
from . import layers
from . import timing

SHAPE = (32, 64, 16, 16)
GROUPS = 8
TRANSFORMS = ("grad", "per-sample", "maml")


def contenders(channels: int, backends: Sequence[str]) -> List[dict]:
    """``bench/host.py``'s contenders for ``channels``: native layers first, then every normfuse
    layer per backend (ILM-Norm with one key group per group)."""
    return H.contenders(backends, channels, GROUPS, key_group_size=channels // GROUPS)


def make_call(module: nn.Module, transform: str, x: torch.Tensor) -> Callable[[int], object]:
    """One call of ``transform`` over ``module`` on ``x`` (a square-sum loss)."""
    if transform == "per-sample":
        module.eval()  # each output its sample's own (batch statistics would mix the samples)
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}

    def loss(p, b, t):
        return functional_call(module, (p, b), (t,)).square().sum()

    if transform == "grad":
        f = grad(loss, argnums=(0, 2))
        return lambda i: f(params, buffers, x)
    if transform == "per-sample":
        f = vmap(grad(lambda p, b, xi: loss(p, b, xi.unsqueeze(0))), in_dims=(None, None, 0))
        return lambda i: f(params, buffers, x)

    def maml(p, b):  # one inner SGD step, the loss at the adapted parameters
        inner = grad(loss)(p, b, x)
        return loss({k: p[k] - 0.1 * inner[k] for k in p}, b, x)

    f = grad(maml)  # buffers an argument, not captured: nn.BatchNorm2d updates them in place
    return lambda i: f(params, buffers)


def run_transforms(shape: Sequence[int] = SHAPE, backends: Sequence[str] = ("cpu",),
                   transforms: Sequence[str] = TRANSFORMS, device: str = "cpu",
                   threads: int = 1, target_s: float = 1.0, min_reps: int = 5,
                   max_reps: int = 200) -> List[dict]:
    """Median milliseconds per call of every (transform, contender); one row each."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for transform in transforms:
            cases = []
            for spec in contenders(shape[1], backends):
                row = dict(transform=transform, name=spec["name"],
                           native=H.native_of(spec["layer"]), backend=spec.get("backend"),
                           shape="x".join(map(str, shape)), dtype="float32", device=device,
                           threads=threads)

                def make(spec=spec, transform=transform):
                    x = torch.randn(*shape, device=device) + 0.5  # never all-zero inputs
                    return make_call(spec["build"]().to(device), transform, x)
                cases.append((row, H.context(spec), make))
            rows += timing.time_contenders(cases, torch.device(device), target_s=target_s,
                                           min_reps=min_reps, max_reps=max_reps)
        return rows
    finally:
        torch.set_num_threads(previous)


def markdown(rows: List[dict]) -> str:
    from .report import md_table
    return md_table(rows, ["transform", "name", "ms", "ratio_native", "native"],
                    {"ms": "{:.2f}", "ratio_native": "{:.2f}x"})


def main(argv=None) -> int:
    """``python -m bench.transforms``: the rows as a markdown table (and JSON with --json)."""
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m bench.transforms",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=4, default=list(SHAPE))
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every compiled backend available for --device "
                        "(cpu; cuda and triton)")
    p.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target-s", type=float, default=1.0, help="timing per contender")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    # (a fixed default of "cpu" made every normfuse row of --device cuda fail)
    backends = layers.backends_for(args.device, args.backends)
    if args.backends is None:
        backends = layers.kernel_backends(backends)
    rows = run_transforms(args.shape, backends, args.transforms, args.device,
                          args.threads, args.target_s)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
