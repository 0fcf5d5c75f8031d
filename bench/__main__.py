"""``python -m bench``: normfuse against the bandwidth floor, the native layers and the
compositions.  Progress goes to stderr, the summary table to stdout, every number to --out."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import e2e, host, layers, machine, report, shapes, step50, suite, timing

SMOKE = dict(timing=(0.002, 2, 3, 1), batch=4, e2e=(0.01, 1, 1), blocks=1,
             step50=(2, 32, ("fp32",), (0.01, 1, 1)))
# The ResNet-50 step (bench/step50.py) on a GPU: batch 64 at 224x224 as issue 13 specifies.
_STEP50_GPU = (64, 224, step50.PRECISIONS)
PRESETS = {
    # (device, preset): timing = (target_s, min_reps, max_reps, warmup) per contender;
    # e2e: batch, (target_s, min_reps, max_reps), blocks per ResNet stage (3 = ResNet-20);
    # step50: batch, resolution, precisions, (target_s, min_reps, max_reps), or None (CPU:
    # seconds a step; --step50 runs it anyway, at the smoke size)
    ("cpu", "smoke"): SMOKE,
    ("cpu", "quick"): dict(timing=(0.15, 5, 40, 2), batch=32, e2e=(0.6, 3, 8), step50=None),
    ("cpu", "full"): dict(timing=(0.5, 10, 200, 3), batch=64, e2e=(2.0, 5, 20), step50=None),
    ("cuda", "smoke"): SMOKE,
    ("cuda", "quick"): dict(timing=(0.05, 10, 100, 5), batch=128, e2e=(0.5, 10, 50),
                            step50=_STEP50_GPU + ((0.5, 5, 20),)),
    ("cuda", "full"): dict(timing=(0.2, 25, 1000, 10), batch=128, e2e=(2.0, 20, 200),
                           step50=_STEP50_GPU + ((2.0, 10, 50),)),
}
# (target_s, min_reps, max_reps) of the host-cost rows (bench/host.py), by preset alone: they
# time a tiny CPU input whatever the device
HOST_PRESETS = {"smoke": (0.01, 2, 3), "quick": (0.5, 10, 400), "full": (2.0, 20, 2000)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (minutes)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, seconds (for tests)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is present, else cpu")
    p.add_argument("--out", default=None, help="default: bench/results/<device name>/")
    p.add_argument("--backends", nargs="+", default=None,
                   help="normfuse backends (default: every available one for the device)")
    p.add_argument("--layers", nargs="+", choices=layers.LAYERS, default=list(layers.LAYERS),
                   help="layers measured: their rows and their ResNet-20 steps (the ResNet-50 "
                        "step has BIN, IEBN and AssocNorm)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="default: float32 on the CPU; float32 float16 bfloat16 on a GPU")
    p.add_argument("--formats", nargs="+", choices=list(suite.FORMATS),
                   default=list(suite.FORMATS))
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile of the compositions")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-e2e", action="store_true", help="skip the ResNet-20 training step")
    p.add_argument("--compiled-steps", action="store_true",
                   help="also time the ResNet-20 step under torch.compile (the baselines and the "
                        "compiled-kernel backends; each variant compiles for ~10-20 s on a CPU)")
    p.add_argument("--no-step50", action="store_true",
                   help="skip the ResNet-50 training step (run by default on a GPU)")
    p.add_argument("--step50", action="store_true",
                   help="run the ResNet-50 training step on the CPU too (smoke size; "
                        "--smoke runs it anyway)")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-cost rows (a layer step on a tiny CPU input)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on the CPU (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    device = torch.device(dev_type)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    conf = PRESETS[(dev_type, preset)]
    notes = []

    backends = layers.backends_for(dev_type, args.backends)
    if layers.normfuse() is None:
        notes.append(f"normfuse not importable ({layers.NORMFUSE_ERROR}): baselines only")
    else:  # its compiled kernels missing is a run without them, not a footnote-free one
        nf = layers.normfuse()
        why = nf.backends._unavailable_reason(dev_type)
        if why is not None:
            notes.append(f"normfuse's {dev_type!r} backend is unavailable, not measured "
                         f"(normfuse from {Path(nf.__file__).parent}): {why}")
    dtypes = [DTYPES[d] for d in (args.dtypes or (
        ["float32"] if dev_type == "cpu" else ["float32", "float16", "bfloat16"]))]
    use_compile = args.compile
    if use_compile is None:
        use_compile = not (dev_type == "cpu" and preset != "full")
        if not use_compile:
            notes.append("torch.compile of the compositions skipped by default on the CPU with "
                         f"--{preset} (each case compiles for 5-25 s); pass --compile to include")
    compile_formats = list(args.formats)
    if use_compile and args.compile is None:
        compile_formats = ["contiguous"]
        notes.append("torch.compile timed on contiguous inputs only (one static compilation "
                     "per case); pass --compile to time it on every layout")

    cfg = suite.Config(device=device, shapes=shapes.shapes_for(dev_type, preset), dtypes=dtypes,
                       formats=list(args.formats), layers=list(args.layers), backends=backends,
                       compile=use_compile, compile_formats=compile_formats)
    cfg.target_s, cfg.min_reps, cfg.max_reps, cfg.warmup = conf["timing"]
    info = machine.info(device)
    load = info.get("load_average_1min")
    if dev_type == "cpu" and load is not None and load > 1.5 * info["cpu_count"]:
        notes.append(f"the machine was busy (load average {load:.1f} on {info['cpu_count']} "
                     "cores): CPU timings are noisy, ratios measured in the same interleaved "
                     "rounds are the numbers to read" + (
                         "; --threads 1 suffers less from it" if torch.get_num_threads() > 1
                         else ""))
    out_dir = args.out or str(Path(__file__).resolve().parent / "results" / (
        machine.slug(("cpu " if dev_type == "cpu" else "") + info["device_name"])))

    e2e_vars = 0 if args.no_e2e else len(e2e.variants(backends, layers=args.layers,
                                                      compiled=args.compiled_steps))
    step50_conf = None if args.no_step50 else (
        conf["step50"] or (SMOKE["step50"] if args.step50 else None))
    step50_backends = layers.kernel_backends(backends)
    step50_vars = 0 if step50_conf is None else len(step50_conf[2]) * len(
        step50.variants(step50_backends))
    if step50_conf is None and not args.no_step50:
        notes.append("ResNet-50 training step skipped on the CPU (seconds a step); --step50 runs "
                     "it at the smoke size")
    # Host cost is measured on every machine (CPU input, the compiled "cpu" ops when built).
    host_backends = [b for b in ("cpu",) if layers.normfuse() is not None
                     and b in layers.normfuse().available_backends()]
    host_rows = 0 if args.no_host else len(host.contenders(host_backends))
    progress = suite.Progress(suite.count_cases(cfg) + host_rows + e2e_vars + step50_vars)
    print(f"bench: {info['device_name']} ({dev_type}), torch {info['torch']}, "
          f"normfuse backends {backends or 'none'}, preset {preset}, "
          f"compile {'on' if use_compile else 'off'}, {len(cfg.shapes)} shapes, "
          f"{progress.total} steps -> {out_dir}", file=sys.stderr, flush=True)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)

    # SIGTERM (the GPU script's per-step time limit) ends the measuring, not the run: what was
    # measured so far is still derived and written, with a note, before the limit's SIGKILL.
    results = {k: [] for k in ("kernels", "copy", "memory", "checks", "host", "e2e", "step50")}
    part = "layer rows"
    try:
        with timing.sigterm_raises():
            suite.run_kernels(cfg, progress, out=results)
            if not args.no_host:
                part = "host-cost rows"
                results["host"] = host.run_host(host_backends, *HOST_PRESETS[preset], threads=1,
                                                progress=progress)
            if not args.no_e2e:
                part = "ResNet-20 step (its variants are timed interleaved: no rows until all are)"
                results["e2e"] = e2e.run_e2e(device, backends, conf["batch"], *conf["e2e"],
                                             progress, blocks=conf.get("blocks", 3),
                                             layers=args.layers, compiled=args.compiled_steps)
            if step50_conf is not None:
                part = "ResNet-50 step"
                step50.run_step50(device, step50_backends, *step50_conf[:3], *step50_conf[3],
                                  progress, out=results["step50"])
    except timing.Stopped:
        notes.append(f"stopped by SIGTERM in the {part}, after {progress.done} of "
                     f"{progress.total} progress steps: the results hold what was measured "
                     "before; that part and the ones after it are incomplete or empty")
        print(f"note: {notes[-1]}", file=sys.stderr, flush=True)
    report.derive(results["kernels"])
    summary = report.summary_rows(results["kernels"], results["memory"])
    tg = (report.targets(results["kernels"], dev_type, results["checks"], results["host"])
          + step50.targets(results["step50"]) + report.e2e_targets(results["e2e"], dev_type))
    summary_md = report.summary_markdown(summary, tg, results["e2e"], results["host"],
                                         results["step50"], results["checks"])
    runtime = time.perf_counter() - t_start
    data = dict(results, machine=info, notes=notes, summary=summary, targets=tg,
                runtime_s=runtime, preset=preset,
                command="python -m bench " + " ".join(shlex.quote(a) for a in argv),
                config=dict(device=dev_type, shapes=[str(s) for s in cfg.shapes],
                            dtypes=[suite.dtype_name(d) for d in dtypes], formats=cfg.formats,
                            layers=cfg.layers, backends=backends, compile=use_compile,
                            compile_formats=compile_formats, target_s=cfg.target_s,
                            min_reps=cfg.min_reps, max_reps=cfg.max_reps))
    paths = report.write_all(out_dir, data, summary_md)
    _check_warnings(results["checks"])
    print(f"\n## normfuse bench: {info['device_name']} ({dev_type}, torch {info['torch']}, "
          f"{preset}, {runtime:.0f} s)\n")
    print(summary_md)
    for n in notes:
        print(f"Note: {n}")
    print(f"\nWritten to {out_dir}: " + ", ".join(os.path.basename(p) for p in paths))
    # A contender that computes something else makes the run a failure, not a footnote.
    return 1 if report.failed_checks(results["checks"]) else 0


def _check_warnings(checks):
    for c in report.failed_checks(checks):
        print(f"CHECK FAILED: {c['impl']} disagrees with the composition on {c['layer']} "
              f"{c['shape']} {c['dtype']} {c['format']} ({c['check']}): "
              f"{c.get('max_abs_diff') if c.get('error') is None else c['error']}"
              + ("" if c.get("tol") is None else f" (tol {c['tol']:.3g})"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
