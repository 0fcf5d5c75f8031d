"""Per-op CPU timings of normfuse's compiled kernels (torch.ops.normfuse.*), single thread.

    python -m bench.cpu_ops                      # default shapes, both layouts, ops + layers
    python -m bench.cpu_ops --shapes 32x64x16x16 256x1024 --no-layers
    python -m bench.cpu_ops --hot                # one input set (cache-resident) instead of a pool
    python -m bench.cpu_ops --json out.json      # also write every measurement

Two tables:

* **ops**: every generic op (moments, affine_apply, backward_sums, backward_apply) and the
  coefficient ops of BIN, IEBN and AssocNorm, next to a same-size copy (``dst.copy_(x)``) and
  torch's native forward kernels (``F.batch_norm`` in training mode, ``F.group_norm``).
  ``x copy`` = time / copy time.  The floors: moments reads x once (about half a copy, which
  reads and writes), affine_apply and backward_apply are about one copy (backward_apply reads
  one more tensor), backward_sums reads x and dy (about one copy); the coefficient ops touch
  only O(N*C) values.
* **layers**: one whole training step of the layer (forward + ``autograd.grad`` w.r.t. the
  input and the parameters) with the "cpu" backend, against ``nn.BatchNorm{1,2}d`` (BIN, IEBN)
  and ``nn.GroupNorm`` (AssocNorm) doing the same; ``ratio`` = normfuse / native.

Everything runs with ``torch.set_num_threads(1)`` (``--threads`` to change).  The contenders of a
table row group run interleaved, round by round, so load from other processes on a shared
machine hits them alike: read the ratios.  Times are medians of the calling thread's CPU time
(``time.thread_time``: time the process spends descheduled on a busy machine is not counted;
``--wall`` for ``time.perf_counter``).  By default every callable rotates through a pool of input
sets larger than twice the last-level cache (at most 8 sets).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .timing import measure_many, pool_size

DEFAULT_SHAPES = ["32x64x16x16", "32x512x4x4", "256x1024", "128x16x32x32", "128x64x8x8",
                  "32x256x14x14", "32x512x7x7"]
OPS = ["copy", "moments", "affine_apply", "backward_sums", "backward_apply", "bin_coef",
       "bin_coef_bwd", "iebn_coef", "iebn_coef_bwd", "assoc_coef", "assoc_coef_bwd",
       "F.batch_norm", "F.group_norm"]


def num_groups_for(channels: int) -> int:
    """As bench/shapes.py: 32 groups, fewer for narrow layers (at least 2 channels a group)."""
    g = 32
    while g > 1 and (channels % g or g > channels // 2):
        g //= 2
    return g


def pool_count(bytes_per_set: int, hot: bool) -> int:
    """Input sets to rotate through: one when ``hot``, else as the main bench (2 to 8 sets,
    twice the last-level cache)."""
    return 1 if hot else pool_size(bytes_per_set, torch.device("cpu"))


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` contiguous ("contig") or with C innermost ("cl"): channels_last for rank 4,
    channels_last_3d for rank 5, (N, L, C) for rank 3; rank 2 is both already."""
    if layout == "contig":
        return x.contiguous()
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


CLOCK = time.thread_time


def measure(fns: Dict[str, Callable[[int], object]], target_s: float, min_reps: int,
            max_reps: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds (CLOCK) of each fns[k](i), interleaved round by round: the bench's
    ``timing.measure_many`` (its index counts every call, so every call finds its inputs as
    long unused as every other's).  A callable that raises fails the whole measurement."""
    names = list(fns)
    res = measure_many([fns[k] for k in names], torch.device("cpu"), target_s=target_s,
                       min_reps=min_reps, max_reps=max_reps, warmup=warmup, clock=CLOCK)
    failed = [f"{k}: {r['error']}" for k, r in zip(names, res) if not r["ok"]]
    if failed:
        raise RuntimeError("bench.cpu_ops: " + "; ".join(failed))
    return {k: r["median_s"] for k, r in zip(names, res)}


def parse_shape(s: str):
    return tuple(int(v) for v in s.lower().split("x"))


def op_callables(shape, layout, dtype, hot):
    ops = torch.ops.normfuse
    N, C = shape[0], shape[1]
    L = math.prod(shape[2:])
    G = num_groups_for(C)
    M = max(1, G // 2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    numel = math.prod(shape)
    k = pool_count(3 * numel * torch.empty((), dtype=dtype).element_size(), hot)
    gen = torch.Generator().manual_seed(0)
    xs = [to_layout((torch.randn(shape, generator=gen) + 0.5).to(dtype), layout) for _ in range(k)]
    dys = [to_layout(torch.randn(shape, generator=gen).to(dtype), layout) for _ in range(k)]
    dst = [torch.empty_like(x) for x in xs]
    st = [ops.moments(x) for x in xs]
    stat = lambda: torch.randn(N, C, generator=gen).to(acc)  # noqa: E731
    a, b, c = stat(), stat(), stat()
    pc = lambda: (torch.rand(C, generator=gen) * 0.6 + 0.2).to(acc)  # noqa: E731
    gate, gb, w, bias, rm, rv = pc(), pc(), pc(), pc(), torch.zeros(C, dtype=acc), torch.ones(C, dtype=acc)
    enc = (torch.randn(M, G, generator=gen) * 0.3).to(acc)
    dm, dv = (torch.randn(G, M, generator=gen) * 0.3).to(acc), (torch.randn(G, M, generator=gen) * 0.3).to(acc)
    wb, bb = w.to(dtype), bias.to(dtype)
    rmn, rvn = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    g1g2 = [ops.backward_sums(dy, x, m) for dy, x, (m, _) in zip(dys, xs, st)]
    fns = {
        "copy": lambda i: dst[i % k].copy_(xs[i % k]),
        "moments": lambda i: ops.moments(xs[i % k]),
        "affine_apply": lambda i: ops.affine_apply(xs[i % k], st[i % k][0], a, b),
        "backward_sums": lambda i: ops.backward_sums(dys[i % k], xs[i % k], st[i % k][0]),
        "backward_apply": lambda i: ops.backward_apply(dys[i % k], xs[i % k], st[i % k][0], a, b, c),
        "bin_coef": lambda i: ops.bin_coefficients(st[i % k][0], st[i % k][1], L, gate, w, bias, rm, rv,
                                                   True, 0.1, 1e-5),
        "bin_coef_bwd": lambda i: ops.bin_coefficients_backward(*g1g2[i % k], *st[i % k], L, gate, w, bias,
                                                                rm, rv, True, 1e-5),
        "iebn_coef": lambda i: ops.iebn_coefficients(st[i % k][0], st[i % k][1], L, gate, gb, w, bias, rm, rv,
                                                     True, 0.1, 1e-5),
        "iebn_coef_bwd": lambda i: ops.iebn_coefficients_backward(*g1g2[i % k], *st[i % k], L, gate, gb, w,
                                                                  bias, rm, rv, True, 1e-5),
        "assoc_coef": lambda i: ops.assoc_coefficients(st[i % k][0], st[i % k][1], L, G, enc, dm, dv, w, bias,
                                                       1e-5),
        "assoc_coef_bwd": lambda i: ops.assoc_coefficients_backward(*g1g2[i % k], *st[i % k], L, G, enc, dm,
                                                                    dv, w, bias, 1e-5),
        "F.batch_norm": lambda i: F.batch_norm(xs[i % k], rmn, rvn, wb, bb, True, 0.1, 1e-5),
        "F.group_norm": lambda i: F.group_norm(xs[i % k], G, wb, bb, 1e-5),
    }
    return fns


def layer_modules(layer: str, shape):
    import normfuse as nf
    C, rank = shape[1], len(shape)
    G = num_groups_for(C)
    if layer == "assoc":
        return nf.AssocNorm(G, C), nn.GroupNorm(G, C)
    kind = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[rank]
    native = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind](C)
    mod = getattr(nf, ("BatchInstanceNorm" if layer == "bin" else "InstanceEnhancementBatchNorm") + kind)(C)
    return mod, native


def layer_callables(layer, shape, layout, dtype, hot):
    mod, native = layer_modules(layer, shape)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if hasattr(mod, "gate"):
            mod.gate.copy_(torch.rand(mod.gate.shape, generator=gen) * 0.6 + 0.2)
        native.weight.copy_(mod.weight)
        native.bias.copy_(mod.bias)
    mod, native = mod.train(), native.train()
    numel = math.prod(shape)
    k = pool_count(4 * numel * torch.empty((), dtype=dtype).element_size(), hot)
    xs = [to_layout((torch.randn(shape, generator=gen) + 0.5).to(dtype), layout).requires_grad_()
          for _ in range(k)]
    dys = [to_layout(torch.randn(shape, generator=gen).to(dtype), layout) for _ in range(k)]
    p_nf, p_nat = list(mod.parameters()), list(native.parameters())

    def run_nf(i):  # the "cpu" backend is set once, in main()
        y = mod(xs[i % k])
        return torch.autograd.grad(y, [xs[i % k], *p_nf], dys[i % k])

    def run_native(i):
        y = native(xs[i % k])
        return torch.autograd.grad(y, [xs[i % k], *p_nat], dys[i % k])

    return {"normfuse[cpu]": run_nf, "native": run_native}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--layouts", nargs="+", default=["contig", "cl"], choices=["contig", "cl"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--layers", nargs="*", default=["bin", "iebn", "assoc"], choices=["bin", "iebn", "assoc"])
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--hot", action="store_true", help="one input set (cache-resident)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of thread CPU time")
    ap.add_argument("--target-s", type=float, default=0.25, help="seconds per contender and row group")
    ap.add_argument("--min-reps", type=int, default=30)
    ap.add_argument("--max-reps", type=int, default=3000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    global CLOCK
    if args.wall or args.threads != 1:
        CLOCK = time.perf_counter  # CPU time of the calling thread misses the other threads' work
    torch.set_num_threads(args.threads)
    import normfuse  # (registers torch.ops.normfuse)
    from normfuse import _extension
    if not _extension.HAS_CPU_KERNELS:
        print(f"normfuse._C unavailable: {_extension.REASON}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    results = []
    cases = []
    for s in args.shapes:
        shape = parse_shape(s)
        for layout in args.layouts:
            if layout == "cl" and (len(shape) == 2 or math.prod(shape[2:]) == 1):
                continue  # the same memory as contiguous
            cases.append((shape, layout))
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, "
          f"{'hot (1 input set)' if args.hot else 'input pool > 2x LLC'}; "
          f"{'wall-clock' if CLOCK is time.perf_counter else 'thread CPU'} times in ms (median)")
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if tuned:
        print(f"# malloc settings from the environment: {tuned}")
    if not args.no_ops:
        hdr = f"{'shape':>14} {'layout':>6} " + " ".join(f"{o:>14}" for o in args.ops)
        print("\n## ops: ms (x copy)\n" + hdr)
        for shape, layout in cases:
            fns = op_callables(shape, layout, dtype, args.hot)
            fns = {k: fns[k] for k in args.ops}
            if "copy" not in fns:
                fns = {"copy": op_callables(shape, layout, dtype, args.hot)["copy"], **fns}
            t = measure(fns, args.target_s, args.min_reps, args.max_reps)
            row = f"{'x'.join(map(str, shape)):>14} {layout:>6} "
            cells = []
            for o in args.ops:
                cells.append(f"{t[o] * 1e3:7.3f}({t[o] / t['copy']:4.1f})")
                results.append({"table": "ops", "shape": shape, "layout": layout, "op": o, "ms": t[o] * 1e3,
                                "x_copy": t[o] / t["copy"]})
            print(row + " ".join(f"{c:>14}" for c in cells), flush=True)
    if not args.no_layers and args.layers:
        normfuse.set_backend("cpu")  # once, as a training script would (not a context per call)
        print("\n## layers: forward + backward (grad of input and parameters), ms; ratio = normfuse / native")
        print(f"{'shape':>14} {'layout':>6} " + " ".join(f"{l + ' nf':>10} {'native':>8} {'ratio':>6}"
                                                       for l in args.layers))
        for shape, layout in cases:
            cells = []
            for layer in args.layers:
                t = measure(layer_callables(layer, shape, layout, dtype, args.hot), args.target_s,
                            max(10, args.min_reps // 3), args.max_reps)
                r = t["normfuse[cpu]"] / t["native"]
                cells.append(f"{t['normfuse[cpu]'] * 1e3:10.3f} {t['native'] * 1e3:8.3f} {r:6.2f}")
                results.append({"table": "layers", "shape": shape, "layout": layout, "layer": layer,
                                "ms": t["normfuse[cpu]"] * 1e3, "native_ms": t["native"] * 1e3, "ratio": r})
            print(f"{'x'.join(map(str, shape)):>14} {layout:>6} " + " ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
