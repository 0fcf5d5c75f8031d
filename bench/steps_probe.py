"""Where does computing a layer's coefficients in the reduction's own launch pay?  (issue 13)

On CUDA a BIN / IEBN layer step either runs the reduction (``moments`` / ``backward_sums``) and
the coefficient kernel as two launches, or, for a small layer, one launch whose last block
computes the coefficients (csrc/kernels/layer_steps.cuh).  The threshold that chooses
(``kFusedStepMaxTiles``, ``kFusedStepMaxPlanes``) was set without a GPU; this probe times a
layer's forward + backward both ways, interleaved, over small and mid-sized layers, and says for
each whether the threshold fused it (``auto_fuses``) and what fusing gains (``fused / unfused``
below 1: fusing pays).  ``normfuse._C.fused_steps(mode)`` switches the path at run time.

``python -m bench.steps_probe [--out DIR]`` on a GPU (``--smoke``: the code path on the CPU,
where both paths are the same composition).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List

import torch

from . import timing

CHANNELS = (8, 16, 32, 64, 128, 256)
BATCHES = (8, 64, 256)  # 256 x C = 32 crosses kFusedStepMaxPlanes (4096): both limits decide
SIDES = (7, 28)
DTYPES = (("float32", torch.float32, False), ("bfloat16-cl", torch.bfloat16, True))


def _mode(c, mode):
    @contextlib.contextmanager
    def ctx():
        previous = c.fused_steps(mode)
        try:
            yield
        finally:
            c.fused_steps(previous)
    return ctx


def _fuses(c, step, device) -> bool:
    """Whether the threshold ("auto") fuses this layer: a fused step kernel (``*_step_kernel``)
    among the GPU kernels of one step."""
    if device.type != "cuda":
        return False
    from torch.profiler import ProfilerActivity, profile
    with _mode(c, "auto")(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(0)
        torch.cuda.synchronize(device)
    return any("step_kernel" in e.name for e in prof.events())


def run(device: torch.device, channels=CHANNELS, batches=BATCHES, sides=SIDES, target_s=0.05,
        progress=print) -> List[dict]:
    import normfuse
    from normfuse import _extension
    c = _extension._C
    if c is None or not hasattr(c, "fused_steps"):
        raise RuntimeError("bench.steps_probe: normfuse._C has no CUDA layer steps "
                           f"({_extension.CUDA_REASON or _extension.REASON})")
    backend = "cuda" if device.type == "cuda" else "cpu"
    rows = []
    for name, dtype, cl in DTYPES:
        for n in batches:
            for ch in channels:
                for side in sides:
                    torch.manual_seed(0)
                    layer = normfuse.BatchInstanceNorm2d(ch).to(device)
                    x = (torch.randn(n, ch, side, side, device=device) * 1.3 + 0.2).to(dtype)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    dy = torch.randn_like(x)
                    wrt = [x] + list(layer.parameters())

                    def step(i, layer=layer, x=x, dy=dy, wrt=wrt):
                        return torch.autograd.grad(layer(x), wrt, dy)

                    with normfuse.use_backend(backend):
                        res = timing.measure_many(
                            [step, step, step], device,
                            contexts=[_mode(c, "0"), _mode(c, "1"), _mode(c, "auto")],
                            flush=False, target_s=target_s, min_reps=10, max_reps=200)
                        auto_fuses = _fuses(c, step, device)
                    if not all(r["ok"] for r in res):
                        raise RuntimeError(f"steps_probe: {[r.get('error') for r in res]}")
                    unfused, fused, auto = (r["median_s"] * 1e6 for r in res)
                    row = dict(layer="bin", case=name, shape=f"{n}x{ch}x{side}x{side}",
                               unfused_us=unfused, fused_us=fused,
                               fused_vs_unfused=fused / unfused, auto_fuses=auto_fuses,
                               auto_us=auto)
                    rows.append(row)
                    progress(f"steps_probe {name:12s} {row['shape']:14s} unfused "
                             f"{unfused:8.1f} us  fused {fused:8.1f} us  "
                             f"({row['fused_vs_unfused']:.2f}x)  auto fuses: {row['auto_fuses']}")
    return rows


def write(rows: List[dict], out: str) -> None:
    from .report import write_csv
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "steps_probe.csv"), rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steps_probe",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write steps_probe.csv there")
    p.add_argument("--smoke", action="store_true", help="one tiny case on the CPU: code path only")
    args = p.parse_args(argv)
    if args.smoke:
        rows = run(torch.device("cpu"), channels=(8,), batches=(2,), sides=(3,), target_s=0.01)
    elif not torch.cuda.is_available():
        print("bench.steps_probe: needs a GPU (use --smoke to check the code path on the CPU)")
        return 2
    else:
        rows = run(torch.device("cuda"))
    if args.out:
        write(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
