"""Compile every kernel in every configuration ``heuristics`` can choose, for real GPUs, without
one: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

For each compiled kernel it reports the registers, local memory / stack (spills) read with the
``cuobjdump`` shipped in the Triton wheel, and whether the SASS (``nvdisasm``) has 128-bit global
loads (``LDG.E.128``).  Pointer arguments are compiled 16-byte aligned and the sizes ``C``, ``L``
as multiples of 16: the specialisation Triton's JIT picks for aligned inputs.

Run as ``python -m normfuse.triton_kernels.aot [--arch 80 90] [--jobs 2] [--json FILE]`` in an
environment *without* ``TRITON_INTERPRET`` (the tests do that in a subprocess).  Results are
cached by Triton's own compilation cache, so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DATA_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
FLOAT_ARGS = {"momentum", "eps"}
ALIGNED_INTS = {"C", "L", "num_planes", "num_rows"}
STREAM_KERNELS = ("moments", "backward_sums", "affine_apply", "backward_apply")
COEFF_KERNELS = ("bin_forward", "bin_backward", "iebn_forward", "iebn_backward")
ASSOC_KERNELS = ("assoc_forward", "assoc_backward")
ILM_KERNELS = ("ilm_forward", "ilm_backward")
LDG128_REQUIRED = ("affine_apply", "backward_apply")
# constexpr flags of the fused ReLU (issue 14): both values of each are compiled
FLAGS = {"affine_apply": "RELU", "backward_sums": "MASK", "backward_apply": "MASK"}


def specs(quick: bool = False):
    """Every ``(kernel, dtype, constexprs, num_warps, aligned)`` to compile (dtype None:
    statistics only, float32).  Every configuration includes both values of the kernel's
    fused-ReLU flag (``FLAGS``).  The streaming kernels also compile unaligned (``aligned``
    False: no size is a multiple of 16, as Triton specializes a call where L or C is not, e.g.
    7x7 and 14x14 planes, or channels-last C = 24), in float32: the variant with the most
    registers, which must not spill either.  ``quick``: every kernel in every configuration,
    but the streaming kernels with float32 data only, except the two apply kernels (all dtypes:
    their 128-bit accesses are checked per dtype)."""
    from . import heuristics as h  # noqa: PLC0415
    out = []
    for cfg in h.all_stream_configs():
        meta = dict(CHANNELS_LAST=cfg.channels_last, BLOCK_P=cfg.block_p, BLOCK_L=cfg.block_l)
        for name in STREAM_KERNELS:
            flags = [{FLAGS[name]: f} for f in (False, True)] if name in FLAGS else [{}]
            for dtype in DTYPES:
                if quick and dtype != "float32" and name not in LDG128_REQUIRED:
                    continue
                for flag in flags:
                    out.append((name, dtype, {**flag, **meta}, cfg.num_warps, True))
                    if dtype == "float32":
                        out.append((name, dtype, {**flag, **meta}, cfg.num_warps, False))
    for cfg in h.all_coeff_configs():
        for name in COEFF_KERNELS:
            out.append((name, None, dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c),
                        cfg.num_warps, True))
    for cfg in h.all_assoc_configs():
        for name in ASSOC_KERNELS:
            out.append((name, None, dict(BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg),
                        cfg.num_warps, True))
    for cfg in h.all_ilm_configs():
        for name in ILM_KERNELS:
            out.append((name, None, dict(BLOCK_K=cfg.block_k, BLOCK_CK=cfg.block_ck,
                                         BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg,
                                         E_CHUNK=cfg.e_chunk),
                        cfg.num_warps, True))
    return out


def _tool(name: str) -> str:
    import triton  # noqa: PLC0415
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(name: str, dtype, constexprs: dict, num_warps: int, aligned: bool,
                arch: int) -> dict:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    from .ops import kernels  # noqa: PLC0415
    fn = getattr(kernels(), name)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = ("*i32" if arg == "counter_ptr" else
                              "*i64" if arg == "nbt_ptr" else  # num_batches_tracked
                              f"*{DTYPES[dtype]}" if arg in DATA_PTRS else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg in ALIGNED_INTS and aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(kernel=name, dtype=dtype, arch=arch, num_warps=num_warps, aligned=aligned,
                constexprs={k: v for k, v in constexprs.items()},
                regs=int(res["REG"]), stack=int(res["STACK"]), local=int(res["LOCAL"]),
                shared=int(res["SHARED"]), ldg128=sass.count("LDG.E.128"),
                stg128=sass.count("STG.E.128"), local_ops=len(re.findall(r"\b(LDL|STL)\b", sass)))


def _run(job):
    return compile_one(*job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--kernels", nargs="*", help="only these kernel names")
    parser.add_argument("--quick", action="store_true", help="see specs()")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    jobs = [(*spec, arch) for arch in args.arch for spec in specs(args.quick)
            if not args.kernels or spec[0] in args.kernels]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
