#!/usr/bin/env python3
"""Resource check of the CUDA kernels without a GPU.

Compiles every csrc/cuda/*.cu with the flags setup.py uses, for sm_80 and sm_90, with
`-Xptxas -v`, then checks:
  1. each object holds sm_80 and sm_90 cubins (cuobjdump --list-elf; the toolkit's cuobjdump, or
     the one bundled with triton), and so does the built extension normfuse/_C*.so when it has
     CUDA code (--extension);
  2. the bandwidth kernels (the generic contig/cl reduce/apply kernels) have no spill stores or
     loads and no stack frame (local memory) on either arch; the fused layer steps
     (contig/cl_step_kernel: a reduction with the coefficient epilogue) at most STEP_SPILL_BYTES
     (on sm_80 ptxas keeps two or three 64-bit values of a few instantiations in local memory
     around the coefficient epilogue, after the streaming loop: a store or two and a load or
     three per thread, none inside the loop; the SASS check below fails on any STL / LDL inside a
     16-byte streaming loop, so the byte allowance cannot hide a spill moving into the loop);
  3. their 16-byte-vector instantiations really use 128-bit global loads (LDG.E.128) in the SASS;
  4. the single-read kernels (kernels/single_read.cuh, all 16-byte vectors) keep within 128
     registers without any spill or stack (their tile lives in registers), and load with LDG.E.128.
Prints a table of registers / spills / stack per kernel and arch. Exit status 1 on a failure.

    python .ci/check_cuda_build.py [--json out.json] [--extension]

Objects are cached under build/cuda_check/<hash of sources, flags, nvcc version>/.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")
BANDWIDTH_KERNELS = re.compile(r"(contig|cl)_(reduce|apply)_kernel")
STEP_KERNELS = re.compile(r"(contig|cl)_step_kernel")  # kernels/layer_steps.cuh
STEP_SPILL_BYTES = 24  # per kind: spill stores, spill loads, stack (see 2. above)
# kernels/single_read.cuh: hold their tile in registers across grid barriers; a spill would put it
# in local memory, so none at all, within the 128 registers of two resident 256-thread blocks.
SINGLE_READ_KERNELS = re.compile(r"single_read_(forward|backward)_kernel")
SINGLE_READ_MAX_REGISTERS = 128
VECTOR_INSTANCE = re.compile(r"Li(4|8)E")  # template VEC = 4 (float) or 8 (half/bf16)


def find_cuda_home() -> Path | None:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return Path(c)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def find_cuobjdump(cuda_home: Path | None) -> Path | None:
    if cuda_home and (cuda_home / "bin" / "cuobjdump").is_file():
        return cuda_home / "bin" / "cuobjdump"
    try:
        import triton  # the wheel bundles cuobjdump / nvdisasm

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return p if p.is_file() else None
    except ImportError:
        return None


def nvcc_flags() -> list[str]:
    # The flags torch's CUDAExtension and setup.py pass (see the build log), minus -Xptxas -v,
    # which is added separately.
    flags = [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-DNORMFUSE_WITH_CUDA", "-std=c++17",
        "-I", str(ROOT / "csrc"), "-Xcompiler", "-fPIC",
    ]
    for a in ARCHS:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def _hash_inputs(cu: Path, nvcc: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    deps = [cu]
    for d in ("kernels", "common", "cuda"):
        deps += sorted(p for p in (ROOT / "csrc" / d).glob("*") if p.suffix in (".h", ".cuh"))
    for p in deps:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def compile_cu(cu: Path, nvcc: Path, cache: Path) -> tuple[Path, str]:
    """Object file and ptxas log for one .cu (cached)."""
    flags = nvcc_flags()
    out_dir = cache / _hash_inputs(cu, nvcc, flags)
    obj, log = out_dir / (cu.stem + ".o"), out_dir / (cu.stem + ".ptxas.txt")
    if obj.exists() and log.exists():
        return obj, log.read_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(nvcc), *flags, "-Xptxas", "-v", "-c", str(cu), "-o", str(obj) + ".tmp"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {cu}:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    log.write_text(res.stderr)
    os.replace(str(obj) + ".tmp", obj)
    return obj, res.stderr


def parse_ptxas(log: str, source: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "source": source, "registers": None,
                   "stack": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes lmem", line)
        if m:
            cur["stack"] = max(cur["stack"], int(m.group(1)))
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for n, d in zip(names, out):
        d = re.sub(r"\(.*\)$", "", d).replace("nf::", "").replace("__nv_bfloat16", "bf16").replace("__half", "f16")
        short[n] = d
    return short


def elf_archs(path: Path, cuobjdump: Path) -> set[str]:
    res = subprocess.run([str(cuobjdump), "--list-elf", str(path)], capture_output=True, text=True)
    return set(re.findall(r"sm_(\d+)", res.stdout))


def ptx_archs(path: Path, cuobjdump: Path) -> set[str]:
    res = subprocess.run([str(cuobjdump), "--list-ptx", str(path)], capture_output=True, text=True)
    return set(re.findall(r"sm_(\d+)", res.stdout)) | set(re.findall(r"compute_(\d+)", res.stdout))


def sass_functions(obj: Path, cuobjdump: Path, arch: str) -> dict[str, str]:
    res = subprocess.run([str(cuobjdump), "-sass", "-arch", f"sm_{arch}", str(obj)], capture_output=True, text=True)
    funcs, cur, buf = {}, None, []
    for line in res.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if cur:
                funcs[cur] = "\n".join(buf)
            cur, buf = m.group(1), []
        elif cur:
            buf.append(line)
    if cur:
        funcs[cur] = "\n".join(buf)
    return funcs


def built_extension() -> Path | None:
    found = sorted((ROOT / "normfuse").glob("_C*.so"))
    return found[0] if found else None


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def local_memory_in_loops(sass: str) -> list[str]:
    """The local-memory accesses (STL / LDL: spills) inside a streaming loop of a SASS body: the
    span from a backward branch's target to the branch that holds a 16-byte global load (LDG.E.128)
    and no barrier (which leaves out the block reductions and the out-of-line BRA.DIV paths that
    branch back). The step kernels may spill a few epilogue values (STEP_SPILL_BYTES), never there."""
    ins = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    addrs = [a for a, _ in ins]  # ascending: the body of a loop is a slice, found by bisection
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            body = [t for _, t in ins[bisect.bisect_left(addrs, target):i + 1]]
            if any("LDG.E.128" in t for t in body) and not any("BAR." in t for t in body):
                loops.append((target, addr))
    return [f"{text.strip()} at {addr:#x}" for addr, text in ins
            if re.search(r"\b(STL|LDL)\b", text) and any(t <= addr <= b for t, b in loops)]


def run(check_extension: bool = False, verbose: bool = True) -> dict:
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return {"skipped": "no CUDA toolkit (nvcc) found"}
    nvcc = cuda_home / "bin" / "nvcc"
    cuobjdump = find_cuobjdump(cuda_home)
    cache = ROOT / "build" / "cuda_check"
    failures, rows, objects = [], [], {}
    vector_checked = step_vector_checked = single_read_checked = 0
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        obj, log = compile_cu(cu, nvcc, cache)
        objects[cu.name] = obj
        rows += parse_ptxas(log, cu.name)
    names = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["name"] = names[r["kernel"]]
        r["bandwidth"] = bool(BANDWIDTH_KERNELS.search(r["kernel"]))
        r["step"] = bool(STEP_KERNELS.search(r["kernel"]))
        r["single_read"] = bool(SINGLE_READ_KERNELS.search(r["kernel"]))
        if r["single_read"] and r["registers"] > SINGLE_READ_MAX_REGISTERS:
            failures.append(f"{r['name']} sm_{r['arch']}: {r['registers']} registers > {SINGLE_READ_MAX_REGISTERS}")
        limit = STEP_SPILL_BYTES if r["step"] else 0
        checked = r["bandwidth"] or r["step"] or r["single_read"]
        if checked and max(r["spill_stores"], r["spill_loads"], r["stack"]) > limit:
            failures.append(f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B spill stores, "
                            f"{r['spill_loads']} B spill loads, {r['stack']} B stack")
    archs_seen = {}
    if cuobjdump is None:
        failures.append("no cuobjdump (toolkit or triton) to inspect the cubins")
    else:
        for name, obj in objects.items():
            archs_seen[name] = sorted(elf_archs(obj, cuobjdump))
            missing = set(ARCHS) - set(archs_seen[name])
            if missing:
                failures.append(f"{name}: no cubin for sm_{', sm_'.join(sorted(missing))}")
            for arch in ARCHS:
                for fn, sass in sass_functions(obj, cuobjdump, arch).items():
                    step = bool(STEP_KERNELS.search(fn))
                    single = bool(SINGLE_READ_KERNELS.search(fn))
                    if step:
                        inside = local_memory_in_loops(sass)
                        if inside:
                            failures.append(f"{names.get(fn, fn)} sm_{arch}: local memory in the streaming loop "
                                            f"({'; '.join(inside[:3])})")
                    if not ((BANDWIDTH_KERNELS.search(fn) or step or single) and VECTOR_INSTANCE.search(fn)):
                        continue
                    if single:
                        single_read_checked += 1
                    elif step:
                        step_vector_checked += 1
                    else:
                        vector_checked += 1
                    if "LDG.E.128" not in sass:
                        failures.append(f"{names.get(fn, fn)} sm_{arch}: no 128-bit global load (LDG.E.128)")
        if check_extension:
            ext = built_extension()
            if ext is not None:
                archs_seen[ext.name] = sorted(elf_archs(ext, cuobjdump))
                if archs_seen[ext.name]:  # a CPU-only build has no cubins at all: nothing to check
                    missing = set(ARCHS) - set(archs_seen[ext.name])
                    if missing and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                        failures.append(f"{ext.name}: no cubin for sm_{', sm_'.join(sorted(missing))}")
                    # setup.py's default also embeds PTX of the newest arch, which newer GPUs
                    # (Blackwell) JIT-compile instead of failing with "no kernel image"
                    ptx = ptx_archs(ext, cuobjdump)
                    archs_seen[ext.name + " (ptx)"] = sorted(ptx)
                    if ARCHS[-1] not in ptx and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                        failures.append(f"{ext.name}: no compute_{ARCHS[-1]} PTX for newer GPUs")
    summary = {"rows": rows, "archs": archs_seen, "failures": failures, "vector_kernels_checked": vector_checked,
               "step_vector_kernels_checked": step_vector_checked,
               "single_read_kernels_checked": single_read_checked}
    if verbose:
        print(f"{'kernel':<70} {'arch':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6}")
        for r in sorted(rows, key=lambda r: (not r["bandwidth"], r["name"], r["arch"])):
            print(f"{r['name'][:70]:<70} {'sm_' + r['arch']:>5} {r['registers']:>5} {r['spill_stores']:>9} "
                  f"{r['spill_loads']:>9} {r['stack']:>6}")
        for name, a in archs_seen.items():
            print(f"{name}: cubins for sm_{', sm_'.join(a) if a else '(none)'}")
        bw = [r for r in rows if r["bandwidth"]]
        if bw:
            print(f"bandwidth kernels: {len(bw)} (kernel, arch) pairs, max {max(r['registers'] for r in bw)} registers, "
                  f"{sum(r['spill_stores'] + r['spill_loads'] for r in bw)} B spilled, "
                  f"{max(r['stack'] for r in bw)} B max stack")
        st = [r for r in rows if r["step"]]
        if st:
            print(f"fused layer-step kernels: {len(st)} (kernel, arch) pairs, max {max(r['registers'] for r in st)} "
                  f"registers, {sum(r['spill_stores'] + r['spill_loads'] for r in st)} B spilled")
        print(f"128-bit loads checked in {vector_checked} + {step_vector_checked} (layer steps) vectorised "
              "(kernel, arch) SASS bodies")
        print("FAIL:\n  " + "\n  ".join(failures) if failures else "OK")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--extension", action="store_true", help="also check the built normfuse/_C*.so")
    args = ap.parse_args()
    summary = run(check_extension=args.extension)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if "skipped" in summary:
        print("skipped:", summary["skipped"])
        return 0
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
