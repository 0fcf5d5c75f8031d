"""Does the second pass of a layer already read its activation from L2?  (issue 14, single read)

A layer reads x twice forward (``moments``, then ``affine_apply``) and x and dy twice backward
(``backward_sums``, then ``backward_apply``).  A path that reads them once ("single read") keeps
them on chip in between: in the registers and shared memory of a cooperative persistent kernel,
or in the L2 between two ordinary launches.  On an H200 (a 50-60 MB L2: the probe reads the
device's ``L2_cache_size``) the second may come free:
this probe measures, before anyone writes the first, how much of the second read L2 already
serves, for activations from a few MB to a few times the L2.

For each size (N=64, C=128, square planes; float32 contiguous and bfloat16 channels-last), with
the ``cuda`` backend's ops and CUDA events, medians over repetitions:

* ``cold_ms``: the second pass alone after the L2 was flushed (a 2x-L2 buffer rewritten);
* ``warm_ms``: the second pass right after the first on the same tensors (no flush): x (and dy)
  as the first pass left them in L2;
* ``pair_ms``: first + second pass from a flushed L2, what a layer direction costs now;
* ``floor_ms``: the single-read floor of the direction (forward: read x once, write y; backward:
  read x and dy once, write dx), at the copy bandwidth measured on the same tensor;
* ``l2_gain`` = cold / warm: 1 means L2 serves nothing of the second read; ``pair_vs_floor`` =
  pair / floor: what a single-read path could at most win;
* ``first_cold_ms``: the first pass alone (``moments``, ``backward_sums``) after a flush, and
  ``first_frac_copy`` / ``second_frac_copy``: each pass's own bandwidth (the bytes it reads and
  writes over its cold time) as a fraction of the copy's: issue 13's "reductions at copy speed"
  (bf16 channels-last reductions at >= 0.8 of a copy from 25 MB on).

Read it so: where ``l2_gain`` is well above 1 and ``pair_vs_floor`` near 1, L2 residency already
gives the single read and a persistent kernel has nothing to win; where the tensor is above the
L2 both stay high, and only a kernel that keeps the data in registers/shared memory (bounded by
the SMs' on-chip memory, which is below the L2 size) or a different blocking could help.
``python -m bench.l2probe [--out DIR]`` (a GPU; ``--smoke`` on the CPU checks the code path only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from statistics import median
from typing import Callable, List

import torch

from .timing import until_sigterm

SIZES_MB = (4, 8, 16, 24, 32, 48, 64, 96, 160)
CASES = (("float32", torch.float32, False), ("bfloat16-cl", torch.bfloat16, True))


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return cuda_time

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu_time


def _tensor(shape, dtype, channels_last, device, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(dtype)  # never all-zero
    t = t.to(device)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def probe_case(ops, name, dtype, channels_last, mb, device, reps, flush_bytes) -> List[dict]:
    n, c = 64, 128
    side = max(1, round((mb * 2**20 / (n * c * torch.finfo(dtype).bits // 8)) ** 0.5))
    shape = (n, c, side, side)
    x = _tensor(shape, dtype, channels_last, device, 0)
    dy = _tensor(shape, dtype, channels_last, device, 1)
    mean, m2 = ops.moments(x)
    scale = torch.rand_like(mean) + 0.5
    shift = torch.randn_like(mean)
    c_dy, c_x, c_0 = scale, torch.randn_like(mean) * 1e-3, torch.randn_like(mean) * 1e-3
    out = torch.empty_like(x)
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device)
    timer = _timer(device)
    nbytes = x.numel() * x.element_size()

    def flushed():  # evict by reading: the lines left behind are clean, so no timed pass pays
        flush.sum()   # for writing back the flush's own dirty lines

    directions = {
        "forward": (lambda: ops.moments(x), lambda: ops.affine_apply(x, mean, scale, shift), 2),
        "backward": (lambda: ops.backward_sums(dy, x, mean),
                     lambda: ops.backward_apply(dy, x, mean, c_dy, c_x, c_0), 3),
    }
    # Tensor passes of each op: (first, second) per direction (reads + writes of x-sized tensors).
    op_passes = {"forward": (1, 2), "backward": (2, 3)}
    copy_ms = []
    for _ in range(reps):
        flushed()
        copy_ms.append(timer(lambda: out.copy_(x)))
    copy_gbs = 2 * nbytes / (median(copy_ms) * 1e-3) / 1e9
    rows = []
    for direction, (first, second, passes) in directions.items():
        cold, warm, pair, first_cold = [], [], [], []
        for _ in range(reps):  # interleaved, so drifting clocks hit all four alike
            flushed()
            first_cold.append(timer(first))
            flushed()
            cold.append(timer(second))
            flushed()
            first()
            warm.append(timer(second))
            flushed()
            pair.append(timer(lambda: (first(), second())))
        floor = passes * nbytes / (copy_gbs * 1e9) * 1e3
        row = dict(case=name, direction=direction, mb=round(nbytes / 2**20, 1), bytes=nbytes,
                   shape="x".join(map(str, shape)), cold_ms=median(cold), warm_ms=median(warm),
                   pair_ms=median(pair), floor_ms=floor, copy_gbs=copy_gbs)
        row["l2_gain"] = row["cold_ms"] / row["warm_ms"]
        row["pair_vs_floor"] = row["pair_ms"] / floor
        row["first_cold_ms"] = median(first_cold)
        p1, p2 = op_passes[direction]
        row["first_frac_copy"] = p1 * nbytes / (row["first_cold_ms"] * 1e-3) / 1e9 / copy_gbs
        row["second_frac_copy"] = p2 * nbytes / (row["cold_ms"] * 1e-3) / 1e9 / copy_gbs
        rows.append(row)
    return rows


def run(device: torch.device, sizes=SIZES_MB, reps: int = 15, progress=print,
        rows=None) -> List[dict]:
    from normfuse import _extension  # loads normfuse._C, whose ops are probed
    if not _extension.HAS_CPU_KERNELS:
        raise RuntimeError(f"bench.l2probe: normfuse._C is not usable: {_extension.REASON}")
    ops = torch.ops.normfuse
    # the CPU (the smoke run: the code path only) flushes 1 MB, not its caches: seconds saved
    l2 = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
          if device.type == "cuda" else 1 << 19)
    rows = [] if rows is None else rows  # the caller's list: rows survive a SIGTERM
    for name, dtype, cl in CASES:
        for mb in sizes:
            for row in probe_case(ops, name, dtype, cl, mb, device, reps, 2 * l2):
                rows.append(row)
                progress(f"l2probe {row['case']:12s} {row['direction']:8s} {row['mb']:6.1f} MB  "
                         f"cold {row['cold_ms']:.3f} warm {row['warm_ms']:.3f} ms  "
                         f"L2 gain {row['l2_gain']:.2f}x  pair/floor {row['pair_vs_floor']:.2f}  "
                         f"copy fraction {row['first_frac_copy']:.2f} / {row['second_frac_copy']:.2f}")
    return rows


# Issue 13, "reductions at copy speed": the reduction passes (moments, backward_sums) of 16-bit
# channels-last tensors of at least 25 MB at no less than 80% of a copy's bandwidth.
REDUCTION_TARGET = 0.8
REDUCTION_MIN_BYTES = 25e6


def reduction_verdict(rows: List[dict]) -> str:
    """One line: issue 13's reductions-at-copy-speed target on these rows (the first pass of each
    direction, bfloat16 channels-last, tensors of 25 MB or more), judged on every such case."""
    cases = [r for r in rows if r["case"] == "bfloat16-cl" and r["bytes"] >= REDUCTION_MIN_BYTES]
    if not cases:
        return "reductions at copy speed (issue 13): n/a (no bfloat16 channels-last case of 25 MB or more)"
    worst = min(cases, key=lambda r: r["first_frac_copy"])
    met = sum(r["first_frac_copy"] >= REDUCTION_TARGET for r in cases)
    return (f"reductions at copy speed (issue 13, bfloat16 channels-last >= 25 MB, at least "
            f"{REDUCTION_TARGET:.0%} of a copy): {met} of {len(cases)} cases, worst "
            f"{worst['first_frac_copy']:.0%} ({worst['direction']}, {worst['bytes'] / 1e6:.0f} MB): "
            + ("met" if met == len(cases) else "NOT met"))


def write(rows: List[dict], out: str) -> None:
    from .report import write_csv
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "l2probe.csv"), rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.l2probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write l2probe.csv there")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the code path only")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.l2probe: needs a GPU (use --smoke to check the code path on the CPU)")
        return 2
    rows = []
    with until_sigterm("bench.l2probe"):
        if args.smoke:
            run(torch.device("cpu"), sizes=(1,), reps=2, rows=rows)
        else:
            run(torch.device("cuda"), reps=args.reps, rows=rows)
    if args.out:
        write(rows, args.out)
    print(reduction_verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
