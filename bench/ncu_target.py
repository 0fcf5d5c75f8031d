"""The four generic CUDA kernels and BIN's coefficient kernels, one launch each, for an Nsight
Compute profile (issue 13).

    ncu --kernel-name regex:'(cl|contig)_(reduce|apply)_kernel|batch_coef_' --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --csv python -m bench.ncu_target

``scripts/run_gpu_suite.sh`` runs that (``ncu.csv``): per kernel, DRAM throughput as a share of
peak, achieved occupancy, and where warps stall (``long_scoreboard``: waiting on global loads,
a latency bound that more loads in flight relieve; ``barrier`` / ``membar``: the block
reductions and the split merges). It says *why* a pass runs below a copy's bandwidth, where the
timings (``l2probe.csv``: ``first_frac_copy``, ``second_frac_copy``) say only *that* it does.

Shapes: ResNet-50's first stage at batch 256 (256x64x56x56) in bf16 channels-last (103 MB, the
training layout) and float32 contiguous (206 MB), the first GPU run's ncu case
(docs/performance.md). Every op runs once per shape: ncu replays each launch for its metrics, so
no warm-up is needed. Random inputs, never all-zero. The coefficient kernels (``COEF_CASES``) are
latency-bound, a few blocks each: their duration and stall reasons say what a layer pays per
direction besides its two streaming passes. ``ncu.csv`` also holds ncu's own ``==PROF==``
lines (skip lines starting with ``==`` when reading it); ``ncu.ncu-rep`` is the full report.
"""
from __future__ import annotations

import sys

import torch

SHAPE = (256, 64, 56, 56)
CASES = (("bf16-channels-last", torch.bfloat16, True), ("float32-contiguous", torch.float32, False))


def run(device: torch.device, shape=SHAPE) -> int:
    from normfuse import _extension
    if not _extension.HAS_CPU_KERNELS:
        raise RuntimeError(f"bench.ncu_target: normfuse._C is not usable: {_extension.REASON}")
    if device.type == "cuda" and not _extension.HAS_CUDA_KERNELS:
        raise RuntimeError(f"bench.ncu_target: no CUDA kernels: {_extension.CUDA_REASON}")
    ops = torch.ops.normfuse
    launches = 0
    for name, dtype, channels_last in CASES:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(device=device, dtype=dtype)
        dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        if channels_last:
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        mean, m2 = ops.moments(x)
        scale = torch.rand_like(mean) + 0.5
        shift = torch.randn_like(mean)
        ops.affine_apply(x, mean, scale, shift)
        ops.backward_sums(dy, x, mean)
        ops.backward_apply(dy, x, mean, scale, shift * 1e-3, shift * 1e-3)
        launches += 4
        print(f"bench.ncu_target: {name} {'x'.join(map(str, shape))}: 4 launches", file=sys.stderr)
    launches += coefficient_launches(ops, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches


# (N, C) of the coefficient kernels' cases: the first run's ncu case (8 blocks, 8 rows per thread
# and pass: 10 and 14 us there) and two layers of the ResNet-50 step at batch 64.
COEF_CASES = ((256, 64), (64, 256), (64, 2048))


def coefficient_launches(ops, device: torch.device, cases=COEF_CASES) -> int:
    """BIN's coefficient forward and backward once per (N, C): latency-bound kernels of a few
    blocks, whose row loops keep 4 rows per thread in flight (kernels/coefficients_batch.cuh)."""
    launches = 0
    for n, c in cases:
        g = torch.Generator().manual_seed(n + c)
        mean = torch.randn(n, c, generator=g).to(device)
        m2 = (torch.rand(n, c, generator=g) * 49 + 1).to(device)  # plane size 50: var ~ 0.02..1
        gate, weight, bias = (torch.rand(c, generator=g).to(device) for _ in range(3))
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        ops.bin_coefficients(mean, m2, 50, gate, weight, bias, rm, rv, True, 0.1, 1e-5)
        g1, g2 = (torch.randn(n, c, generator=g).to(device) for _ in range(2))
        ops.bin_coefficients_backward(g1, g2, mean, m2, 50, gate, weight, bias, rm, rv, True, 1e-5)
        launches += 2
        print(f"bench.ncu_target: BIN coefficients {n}x{c}: 2 launches", file=sys.stderr)
    return launches


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.ncu_target", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: the code path only")
    args = p.parse_args(argv)
    if args.smoke:
        run(torch.device("cpu"), shape=(2, 8, 4, 4))
        return 0
    if not torch.cuda.is_available():
        print("bench.ncu_target: needs a GPU (use --smoke to check the code path on the CPU)", file=sys.stderr)
        return 2
    run(torch.device("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
