"""The four generic CUDA kernels, one launch each, for an Nsight Compute profile (issue 13).

    ncu --kernel-name regex:'(cl|contig)_(reduce|apply)_kernel' --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --csv python -m bench.ncu_target

``scripts/run_gpu_suite.sh`` runs that (``ncu.csv``): per kernel, DRAM throughput as a share of
peak, achieved occupancy, and where warps stall (``long_scoreboard``: waiting on global loads,
a latency bound that more loads in flight relieve; ``barrier`` / ``membar``: the block
reductions and the split merges). It says *why* a pass runs below a copy's bandwidth, where the
timings (``l2probe.csv``: ``first_frac_copy``, ``second_frac_copy``) say only *that* it does.

Shapes: ResNet-50's first stage at batch 256 (256x64x56x56) in bf16 channels-last (103 MB, the
training layout) and float32 contiguous (206 MB), the first GPU run's ncu case
(docs/performance.md). Every op runs once per shape: ncu replays each launch for its metrics, so
no warm-up is needed. Random inputs, never all-zero. ``ncu.csv`` also holds ncu's own ``==PROF==``
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
