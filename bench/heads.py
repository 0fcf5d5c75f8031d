"""BIN and IEBN on 2-d ``(N, C)`` inputs against ``nn.BatchNorm1d``: the classifier and
projection heads that ``normfuse.convert`` makes of ``nn.BatchNorm1d`` (a SimCLR projection head
at batch 256 is ``(256, 2048)``).

Every plane holds one value there, so BIN runs as batch norm with weight ``gamma * rho`` on the
input viewed as one sample (docs/performance.md, "BIN on 2-d inputs"); IEBN's gate reads each
value itself and takes the general path.  Per shape and contender: a training step (forward and
backward of a square-sum loss) and an eval forward, eager and, with ``--compile``, through
``torch.compile``; all contenders of a row timed interleaved (``timing.measure_many``), never on
all-zero inputs.  ``ratio_native``: time / ``nn.BatchNorm1d``'s in the same mode.

    python -m bench.heads [--shapes 256x2048 1024x256 64x512] [--compile] [--threads 1]

One CPU thread by default; on a GPU with ``--device cuda``.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from . import host as H
from . import layers
from . import timing

SHAPES = ((256, 2048), (1024, 256), (64, 512))
MODES = ("train", "eval")


def contenders(channels: int, backends: Sequence[str]) -> List[dict]:
    """``nn.BatchNorm1d`` first (the baseline), then BIN and IEBN on every backend."""
    nf = layers.normfuse()
    out = [dict(name="nn.BatchNorm1d", build=lambda: nn.BatchNorm1d(channels), backend=None)]
    if nf is None:
        return out
    for backend in backends:
        out.append(dict(name=f"BIN normfuse[{backend}]", backend=backend,
                        build=lambda: layers.randomize_(nf.BatchInstanceNorm1d(channels))))
        out.append(dict(name=f"IEBN normfuse[{backend}]", backend=backend,
                        build=lambda: layers.randomize_(
                            nf.InstanceEnhancementBatchNorm1d(channels))))
    return out


def make_call(module: nn.Module, mode: str, x: torch.Tensor,
              compiled: bool) -> Callable[[int], object]:
    """One training step (``mode`` "train") or eval forward of ``module`` on ``x``."""
    module.train(mode == "train")
    run = torch.compile(module) if compiled else module
    if mode == "train":
        def step(i):
            run(x).square().sum().backward()
        return step

    def forward(i):
        with torch.no_grad():
            return run(x)
    return forward


def run_heads(shapes: Sequence[Tuple[int, int]] = SHAPES, backends: Sequence[str] = ("cpu",),
              device: str = "cpu", threads: int = 1, compiled: bool = False,
              target_s: float = 0.5, min_reps: int = 5, max_reps: int = 200) -> List[dict]:
    """Median milliseconds of every (shape, mode, contender); one row each."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for shape in shapes:
            for mode in MODES:
                cases = []
                for spec in contenders(shape[1], backends):
                    row = dict(name=spec["name"], native="nn.BatchNorm1d",
                               backend=spec["backend"], mode=mode, compiled=compiled,
                               shape="x".join(map(str, shape)), dtype="float32",
                               device=device, threads=threads)

                    def make(spec=spec, shape=shape, mode=mode):
                        x = (torch.randn(*shape, device=device) + 0.5).requires_grad_()
                        return make_call(spec["build"]().to(device), mode, x, compiled)
                    cases.append((row, H.context(spec), make))
                rows += timing.time_contenders(cases, torch.device(device), target_s=target_s,
                                               min_reps=min_reps, max_reps=max_reps)
        return rows
    finally:
        torch.set_num_threads(previous)


def markdown(rows: List[dict]) -> str:
    from .report import md_table
    return md_table(rows, ["shape", "mode", "name", "ms", "ratio_native"],
                    {"ms": "{:.3f}", "ratio_native": "{:.2f}x"})


def _shape(text: str) -> Tuple[int, int]:
    n, c = (int(v) for v in text.lower().split("x"))
    return n, c


def main(argv=None) -> int:
    """``python -m bench.heads``: the rows as a markdown table (and JSON with --json)."""
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m bench.heads",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_shape, nargs="+", default=list(SHAPES),
                   help="N x C, e.g. 256x2048")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every compiled backend available for --device "
                        "(cpu; cuda and triton)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="time torch.compile of each layer")
    p.add_argument("--target-s", type=float, default=0.5, help="timing per contender")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    backends = layers.backends_for(args.device, args.backends)
    if args.backends is None:
        backends = layers.kernel_backends(backends)
    rows = run_heads(args.shapes, backends, args.device, args.threads, args.compile,
                     args.target_s)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
