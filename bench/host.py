"""Host cost of one layer step: Python, autograd and dispatcher time around tiny kernels.

One training step (forward + ``autograd.grad`` w.r.t. the input and every parameter, a fixed
random ``dy``) of each layer on a tiny float32 CPU input, ``(2, 8, 4, 4)``, with one intra-op
thread: the kernels do almost nothing there, so what is measured is the cost around them
(module and argument checks, backend choice, ``autograd.Function``, dispatcher calls, the
autograd engine).  On a GPU the same host cost is paid per layer per step, hidden only while
the GPU has more queued work than that (issue 13, design section 3: host cost no more than
``nn.BatchNorm2d``'s, ``nn.GroupNorm``'s for AssocNorm).

Contenders, all run interleaved round by round (``timing.measure_many``): ``nn.BatchNorm2d``,
``nn.GroupNorm`` (4 groups), and ``normfuse[<backend>]`` BIN, IEBN, AssocNorm and ILMNorm
(no target in issue 13; its module step is AssocNorm's, one C call) for each requested
backend (default: ``cpu``, the compiled ops).  Each repetition times ``STEPS`` steps (one step
is ~50 us, short for one timer reading) and reports the mean per step; the row is the median
over repetitions.  ``ratio_native``: time / the native layer's (``nn.BatchNorm2d`` for BIN and
IEBN, ``nn.GroupNorm`` for AssocNorm and ILMNorm); ``ratio_bn``: time / ``nn.BatchNorm2d``'s.

Dispatcher calls per step (``count_ops``), from ``torch.profiler`` (CPU activity) around one
step: ``op_calls`` counts every operator the dispatcher ran, nested calls included
(``aten::batch_norm`` -> ``aten::_batch_norm_impl_index`` -> ``aten::native_batch_norm`` are
three), allocations (``aten::empty*``) left out and counted in ``allocations`` (only those
made through the dispatcher: normfuse's compiled CPU ops allocate straight from the allocator,
``nf_glue::empty_dense``, so they count 0 there although they allocate); and
``python_calls``, the Python functions entered during one step (``sys.setprofile``), the
other half of the host cost.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import layers as L
from . import timing

SHAPE = (2, 8, 4, 4)
GROUPS = 4
STEPS = 20  # layer steps per timed repetition
ALLOCATIONS = ("aten::empty", "aten::empty_like", "aten::empty_strided")


def contenders(backends: Sequence[str] = ("cpu",), channels: int = SHAPE[1],
               groups: int = GROUPS, key_group_size: int = 4) -> List[dict]:
    """(name, layer, kind, how to build, backend) of every timed module: the native layers,
    then BIN, IEBN, AssocNorm and ILMNorm per backend (bench/transforms.py's too)."""
    c, g = channels, groups
    out = [dict(name="nn.BatchNorm2d", layer="batchnorm", kind="native",
                build=lambda: nn.BatchNorm2d(c)),
           dict(name="nn.GroupNorm", layer="groupnorm", kind="native",
                build=lambda: nn.GroupNorm(g, c))]
    nf = L.normfuse()
    if nf is None:
        return out
    for b in backends:
        out += [dict(name=f"BIN normfuse[{b}]", layer="bin", kind="normfuse", backend=b,
                     build=lambda: nf.BatchInstanceNorm2d(c)),
                dict(name=f"IEBN normfuse[{b}]", layer="iebn", kind="normfuse", backend=b,
                     build=lambda: nf.InstanceEnhancementBatchNorm2d(c)),
                dict(name=f"AssocNorm normfuse[{b}]", layer="assoc", kind="normfuse", backend=b,
                     build=lambda: nf.AssocNorm(g, c)),
                # here two key groups of 4 channels (the default 16 does not divide C = 8)
                dict(name=f"ILMNorm normfuse[{b}]", layer="ilm", kind="normfuse", backend=b,
                     build=lambda: nf.ILMNorm(c, num_groups=g, key_group_size=key_group_size))]
    return out


def native_of(layer: str) -> str:
    return "nn.GroupNorm" if layer in ("assoc", "ilm", "groupnorm") else "nn.BatchNorm2d"


def context(spec: dict) -> Callable[[], contextlib.AbstractContextManager]:
    if spec.get("backend"):
        return lambda: L.normfuse().use_backend(spec["backend"])
    return contextlib.nullcontext


def make_step(module: nn.Module, seed: int = 0) -> Callable[[], object]:
    """One layer step on the tiny input: forward, then gradients of every parameter and x."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(SHAPE, generator=gen) + 0.5).requires_grad_(True)
    dy = torch.randn(SHAPE, generator=gen)
    wrt = [x] + [p for p in module.parameters() if p.requires_grad]

    def step():
        return torch.autograd.grad(module(x), wrt, dy)
    return step


def count_ops(step: Callable[[], object], ctx=contextlib.nullcontext) -> Dict[str, int]:
    """Operator calls of one step, from the profiler (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile
    with ctx():
        step()  # warm: first calls may initialise things
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    names = [e.name for e in prof.events()
             if e.name.startswith(("aten::", "normfuse::", "normfuse_triton::"))]
    allocs = sum(n in ALLOCATIONS for n in names)
    calls = []

    def count(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code)

    with ctx():
        sys.setprofile(count)
        try:
            step()
        finally:
            sys.setprofile(None)
    # the step closure itself is not the layer's
    return {"op_calls": len(names) - allocs, "allocations": allocs,
            "python_calls": max(len(calls) - 1, 0)}


def run_host(backends: Sequence[str] = ("cpu",), target_s: float = 0.5, min_reps: int = 10,
             max_reps: int = 400, threads: int = 1, progress: Optional[Callable] = None,
             steps: int = STEPS) -> List[dict]:
    """Median microseconds per layer step of every contender, interleaved; one row each."""
    specs = contenders(backends)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, fns, ctxs = [], [], []
        for spec in specs:
            row = dict(name=spec["name"], layer=spec["layer"], kind=spec["kind"],
                       backend=spec.get("backend"), shape="x".join(map(str, SHAPE)),
                       dtype="float32", threads=threads, native=native_of(spec["layer"]),
                       ok=True)
            try:
                torch.manual_seed(0)
                mod = spec["build"]().train()
                one = make_step(mod)
                with context(spec)():
                    one()
                row.update(count_ops(one, context(spec)))
                fns.append(lambda r, one=one: [one() for _ in range(steps)])
                ctxs.append(context(spec))
            except Exception as exc:  # reported as a failed row, the others still run
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
        live = [r for r in rows if r["ok"]]
        res = timing.measure_many(fns, torch.device("cpu"), contexts=ctxs, target_s=target_s,
                                  min_reps=min_reps, max_reps=max_reps, warmup=3)
        for row, r in zip(live, res):
            row["ok"] = r["ok"]
            if r["ok"]:
                row.update(us=r["median_s"] / steps * 1e6, min_us=r["min_s"] / steps * 1e6,
                           reps=r["reps"], steps_per_rep=steps)
            else:
                row["error"] = r.get("error")
        by_name = {r["name"]: r for r in rows if r["ok"]}
        for row in rows:
            for key, base in (("ratio_native", row["native"]), ("ratio_bn", "nn.BatchNorm2d")):
                b = by_name.get(base)
                row[key] = row["us"] / b["us"] if row["ok"] and b else None
            if progress is not None:
                progress(f"host  {row['name']:24s} " + (
                    f"{row['us']:6.1f} us/step ({row['ratio_native']:.2f}x {row['native']}), "
                    f"{row['op_calls']} op calls" if row["ok"] else f"n/a ({row.get('error')})"))
        return rows
    finally:
        torch.set_num_threads(previous)


def markdown(rows: List[dict]) -> str:
    from .report import md_table
    cols = ["name", "us", "ratio_native", "native", "ratio_bn", "op_calls", "allocations",
            "python_calls"]
    return md_table(rows, cols, {"us": "{:.1f}", "ratio_native": "{:.2f}x",
                                 "ratio_bn": "{:.2f}x"})


def main(argv=None) -> int:
    """``python -m bench.host``: the host-cost rows alone (seconds), as a markdown table."""
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=["cpu"])
    p.add_argument("--target-s", type=float, default=1.0, help="timing per contender")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = run_host(args.backends, target_s=args.target_s, threads=args.threads)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
