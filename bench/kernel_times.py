"""Where one layer's share of the ResNet-50 step goes on a GPU: each kernel's device time, the
host's time, and the step's time, per layer and shape (issue 13).

The step that counts (bench/step50.py) is ResNet-50 at batch 64, bf16 autocast, channels-last,
and it says how much slower a network got, not why.  This probe takes its 53 normalization
layers apart: for each of the nine activation shapes they see (bench/shapes.py, batch 64) and
each layer, one training step of that layer alone, set up as in the network (float32
parameters, a bfloat16 channels-last input under ``torch.autocast``; ``--float32`` adds float32
contiguous), on the ``cuda`` backend:

* ``step_us``: the median CUDA-event time of a step, steps queued back to back (a host-bound step
  is charged the gaps the GPU waits through);
* ``host_us``: the host's time to queue one step on an idle GPU (bench/step50.py's host_time);
* ``kernels_us`` and ``launches``: the summed device time and the number of the kernels (memsets
  and copies included) one step runs, from ``torch.profiler`` (CUDA activity) over a few steps;
* ``busy`` = kernels / step: near 1 the step is its kernels; well below 1 the GPU waits on the
  host or on launch gaps, and only fewer or cheaper host calls help;
* ``top``: the kernels with the most device time, with their microseconds per step.

Layers: ``nn.BatchNorm2d``, BIN, IEBN against it, ``nn.GroupNorm(32)`` and AssocNorm(32) against
it, and (issue 14) ``nn.BatchNorm2d`` + ``nn.ReLU(inplace=True)`` against BIN with the ReLU
fused.  ``kernel_times.csv`` holds the rows, ``kernel_breakdown.csv`` every kernel of every row
(calls and microseconds per step).  Read the pair so: where a normfuse layer's ``step_us`` is
above the native layer's, ``busy`` says whether the host or the GPU pays, and the breakdown
names the kernel.  ``python -m bench.kernel_times [--out DIR] [--float32]`` on a GPU; ``--smoke``
runs the code path on the CPU (CPU operators in place of kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from .layers import randomize_
from .shapes import Shape, resnet50
from .timing import until_sigterm

GROUPS = 32  # the GroupNorm ResNet-50 of the step (bench/step50.py)
TOP = 3
LAYERS = ("batchnorm", "bin", "iebn", "groupnorm", "assoc", "batchnorm+relu", "bin-relu")
NATIVE = {"bin": "batchnorm", "iebn": "batchnorm", "assoc": "groupnorm",
          "bin-relu": "batchnorm+relu"}


def build(layer: str, channels: int) -> nn.Module:
    """The layer as the converted network holds it (float32 parameters, training mode)."""
    import normfuse
    mod = {"batchnorm": lambda: nn.BatchNorm2d(channels),
           "groupnorm": lambda: nn.GroupNorm(GROUPS, channels),
           "bin": lambda: normfuse.BatchInstanceNorm2d(channels),
           "iebn": lambda: normfuse.InstanceEnhancementBatchNorm2d(channels),
           "assoc": lambda: normfuse.AssocNorm(GROUPS, channels),
           # issue 14: the norm and its ReLU as the step runs them, and BIN with the ReLU fused
           "batchnorm+relu": lambda: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)),
           "bin-relu": lambda: normfuse.BatchInstanceNorm2d(channels, activation="relu")}[layer]()
    return randomize_(mod, seed=channels).train()  # away from the initial values


def layer_step(layer: str, shape: Shape, precision: str, device: torch.device
               ) -> Tuple[Callable[[int], object], Callable[[], contextlib.AbstractContextManager]]:
    """step(i) (forward, backward of a fixed random dy, gradients dropped) and its context."""
    mod = build(layer, shape.channels).to(device)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape.dims, generator=gen) * 1.3 + 0.2).to(device)
    dy = torch.randn(shape.dims, generator=gen).to(device)
    if precision == "bf16-cl":
        x = x.to(torch.bfloat16, memory_format=torch.channels_last)
        dy = dy.to(torch.bfloat16, memory_format=torch.channels_last)

        def context():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        context = contextlib.nullcontext
    x.requires_grad_(True)
    params = list(mod.parameters())
    with context():  # dy in the output's dtype and layout (nn.GroupNorm runs in float32 under
        y = mod(x)   # autocast), made once: a cast per step would be charged to the layer
    dy = torch.empty_like(y).copy_(dy)
    del y

    def step(i: int):
        y = mod(x)
        y.backward(dy)
        for p in params:  # zero_grad(set_to_none=True): every step starts without gradients
            p.grad = None
        x.grad = None
    return step, context


def _device_events(prof, device: torch.device) -> Dict[str, Tuple[int, float]]:
    """name -> (calls, total microseconds) of what ran on the device (on the CPU: the operators
    the layer called, by self time, so the smoke run has something to count).  A kernel's time
    is its own interval: the profiler's device-time properties answer 0 for events it counts
    as asynchronous, which a kernel may be."""
    out: Dict[str, Tuple[int, float]] = {}
    for evt in prof.events():
        if device.type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = float(evt.time_range.elapsed_us())
        else:
            if not (evt.name.startswith("aten::") or evt.name.startswith("normfuse::")):
                continue
            us = float(evt.self_cpu_time_total)
        calls, total = out.get(evt.name, (0, 0.0))
        out[evt.name] = (calls + 1, total + us)
    return out


def measure_case(layer: str, shape: Shape, precision: str, device: torch.device, *,
                 reps: int = 20, profiled: int = 5) -> Tuple[dict, List[dict]]:
    from torch.profiler import ProfilerActivity, profile

    from . import step50, timing
    step, context = layer_step(layer, shape, precision, device)
    # No L2 flush: in the network the convolution before the layer has just written its input.
    res = timing.measure(step, device, contexts=[context], flush=False, min_reps=reps,
                         max_reps=reps, warmup=3)
    host = step50.host_time(step, context, device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with context(), profile(activities=[activity]) as prof:
        for i in range(profiled):
            step(i)
        timing.synchronize(device)
    events = _device_events(prof, device)
    if not events:  # (CUPTI can come back empty): an error row, not a 0 us "measurement"
        raise RuntimeError("torch.profiler recorded no kernels for the step")
    kernels_us = sum(us for _, us in events.values()) / profiled
    step_us = res["median_s"] * 1e6
    row = dict(shape=str(shape), stage=shape.name, precision=precision, layer=layer,
               native=NATIVE.get(layer, ""), step_us=step_us,
               host_us=host * 1e6 if host is not None else None, kernels_us=kernels_us,
               launches=sum(n for n, _ in events.values()) / profiled,
               busy=kernels_us / step_us if step_us else None)
    ranked = sorted(events.items(), key=lambda kv: -kv[1][1])
    row["top"] = "; ".join(f"{name[:60]} {us / profiled:.1f}" for name, (_, us) in ranked[:TOP])
    breakdown = [dict(shape=str(shape), precision=precision, layer=layer, kernel=name,
                      calls_per_step=n / profiled, us_per_step=us / profiled,
                      share=us / profiled / kernels_us if kernels_us else None)
                 for name, (n, us) in ranked]
    return row, breakdown


def add_ratios(rows: List[dict]) -> None:
    """step / native step and kernels / native kernels, within a shape and precision."""
    index = {(r["shape"], r["precision"], r["layer"]): r for r in rows}
    for r in rows:
        base = index.get((r["shape"], r["precision"], r["native"]))
        r["step_vs_native"] = (r["step_us"] / base["step_us"]
                               if base and base["step_us"] else None)
        r["kernels_vs_native"] = (r["kernels_us"] / base["kernels_us"]
                                  if base and base["kernels_us"] else None)


def run(device: torch.device, shapes: List[Shape], precisions=("bf16-cl",), reps: int = 20,
        progress=print, rows=None, breakdown=None) -> Tuple[List[dict], List[dict]]:
    """``(rows, breakdown)`` of every case, appended to the caller's lists when given (they keep
    what was measured when a SIGTERM ends the run); ``add_ratios`` adds the ratios to the
    native layers."""
    import normfuse
    # cuda on a GPU (raises, naming the reason, when the CUDA kernels are missing); auto elsewhere
    backend = normfuse.use_backend("cuda") if device.type == "cuda" else contextlib.nullcontext()
    rows = [] if rows is None else rows
    breakdown = [] if breakdown is None else breakdown
    with backend:
        _run_cases(device, shapes, precisions, reps, progress, rows, breakdown)
    return rows, breakdown


def _run_cases(device, shapes, precisions, reps, progress, rows, breakdown):
    for precision in precisions:
        for shape in shapes:
            for layer in LAYERS:
                try:
                    row, kernels = measure_case(layer, shape, precision, device, reps=reps)
                except Exception as exc:  # a failing case is a row, not the end of the probe
                    row = dict(shape=str(shape), stage=shape.name, precision=precision,
                               layer=layer, native=NATIVE.get(layer, ""),
                               error=f"{type(exc).__name__}: {exc}"[:300])
                    kernels = []
                rows.append(row)
                breakdown.extend(kernels)
                if "error" in row:
                    progress(f"kernel_times {precision} {shape} {layer}: {row['error']}")
                else:
                    progress(f"kernel_times {precision:8s} {str(shape):14s} {layer:9s} step "
                             f"{row['step_us']:8.1f} us  host {row['host_us'] or 0:7.1f}  "
                             f"kernels {row['kernels_us']:8.1f} ({row['launches']:.0f})  "
                             f"busy {row['busy']:.2f}  {row['top']}")


def write(rows: List[dict], breakdown: List[dict], out: str) -> None:
    from .report import write_csv
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "kernel_times.csv"), rows)
    write_csv(os.path.join(out, "kernel_breakdown.csv"), breakdown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_times",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write kernel_times.csv, kernel_breakdown.csv there")
    p.add_argument("--float32", action="store_true", help="float32 contiguous too")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: the code path only")
    args = p.parse_args(argv)
    precisions = ("bf16-cl", "float32") if args.float32 else ("bf16-cl",)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.kernel_times: needs a GPU (use --smoke to check the code path on the CPU)")
        return 2
    rows, breakdown = [], []
    with until_sigterm("bench.kernel_times"):
        if args.smoke:
            run(torch.device("cpu"), [Shape("tiny", (2, 64, 4, 4))], precisions, reps=2,
                rows=rows, breakdown=breakdown)
        else:
            run(torch.device("cuda"), resnet50(64), precisions, reps=args.reps, rows=rows,
                breakdown=breakdown)
    add_ratios([r for r in rows if "error" not in r])
    if args.out:
        write(rows, breakdown, args.out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
