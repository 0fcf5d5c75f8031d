"""Derived numbers (bandwidth, ratios, targets) and the outputs: markdown, CSV, JSON, PNG."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

from .layers import LAYER_LABEL, LAYERS, NATIVE_LABEL, kernel_backends

# The layers the issues set targets for (issues 5, 13 and 14).  ILM-Norm is measured and
# summarised like them but judged on none: no issue sets it a target.
TARGET_LAYERS = ("bin", "iebn", "assoc")


def _geomean(values: Iterable[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def _case(r) -> tuple:
    return (r["layer"], r["shape"], r["dtype"], r["format"], r["direction"])


def derive(kernels: List[dict]) -> None:
    """Adds bandwidth, copy fractions and ratios to every timed record (in place).
    ratio_native = t / t_baseline (lower is better); speedup_* = t_other / t (higher is better)."""
    by_case: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for r in kernels:
        if r["ok"]:
            by_case[_case(r)][r["kind"]] = r  # one record per kind and case, "native" and
            # "native_relu" (the baseline of the +ReLU contenders) included
    for r in kernels:
        for k in ("bw_GBps", "frac_copy", "model_frac_copy", "ratio_native",
                  "speedup_composition", "speedup_compiled"):
            r.setdefault(k, None)
        if not r["ok"]:
            continue
        t = r["median_s"]
        r["bw_GBps"] = r["min_bytes"] / t / 1e9
        r["frac_copy"] = r["bw_GBps"] / r["copy_GBps"]
        r["model_frac_copy"] = r["model_bytes"] / t / 1e9 / r["copy_GBps"]
        base = by_case[_case(r)]
        native = "native_relu" if r.get("relu") else "native"
        if native in base:
            r["ratio_native"] = t / base[native]["median_s"]
        if "composition" in base:
            r["speedup_composition"] = base["composition"]["median_s"] / t
        if "compiled" in base:
            r["speedup_compiled"] = base["compiled"]["median_s"] / t


# ----------------------------------------------------------------------------- summaries
def _select(kernels, **match):
    """The timed records matching ``match``; without a ``relu`` key, only those without the
    following ReLU (the +ReLU contenders are selected explicitly)."""
    match.setdefault("relu", False)
    return [r for r in kernels
            if r["ok"] and all(r.get(k, False if k == "relu" else None) == v
                               for k, v in match.items())]


def _saved_over_x(memory, layer, impl):
    vals = [m["saved_over_x"] for m in memory
            if m["layer"] == layer and m["impl"] == impl and "saved_over_x" in m]
    return sum(vals) / len(vals) if vals else None


def summary_rows(kernels: List[dict], memory: List[dict]) -> List[dict]:
    """One row per layer x contender: geometric means over shapes, dtypes and layouts."""
    rows = []
    for layer in LAYERS:
        names = []
        for r in kernels:
            named = (r["impl"], bool(r.get("relu")))
            if (r["layer"] == layer and r["kind"] not in ("native", "native_relu")
                    and named not in names):
                names.append(named)
        for impl, relu in names:
            base = NATIVE_LABEL[layer] + ("+ReLU" if relu else "")
            row = {"layer": LAYER_LABEL[layer], "impl": impl, "baseline": base}
            for d in ("fwd", "fwd+bwd"):
                sel = _select(kernels, layer=layer, impl=impl, direction=d, relu=relu)
                row[f"{d} time / baseline"] = _geomean(r["ratio_native"] for r in sel)
                row[f"{d} model %copy"] = _pct(_geomean(r["model_frac_copy"] for r in sel))
            sel = _select(kernels, layer=layer, impl=impl, direction="fwd+bwd", relu=relu)
            row["fwd+bwd speedup vs composition"] = _geomean(
                r["speedup_composition"] for r in sel)
            row["fwd+bwd speedup vs compiled"] = _geomean(r["speedup_compiled"] for r in sel)
            row["saved for bwd (x input)"] = _saved_over_x(memory, layer, impl)
            rows.append(row)
    return rows


def _pct(v):
    return None if v is None else 100 * v


def fused_backend(kernels: List[dict], layer: str, device: str) -> Optional[str]:
    """The backend the targets are judged on: the fastest compiled-kernel backend (not "torch")
    by fwd+bwd geometric mean over the cases every candidate ran; "torch" only when there is no
    other.  Times are compared on shared cases only: a backend that skipped the large cases would
    otherwise win on smaller tensors, not on speed.  Without a shared case, each backend's
    geometric mean of its time / the native layer's decides."""
    backends = sorted({r["backend"] for r in kernels if r["kind"] == "normfuse"
                       and r["layer"] == layer and r["ok"]})
    if not backends:
        return None
    fused = kernel_backends(backends)
    rows = {b: {_case(r): r for r in _select(kernels, layer=layer, backend=b, direction="fwd+bwd")}
            for b in fused}
    shared = set.intersection(*(set(by_case) for by_case in rows.values()))
    if shared:
        return min(fused, key=lambda b: _geomean(rows[b][c]["median_s"] for c in shared) or math.inf)
    return min(fused, key=lambda b: _geomean(r["ratio_native"] for r in rows[b].values()) or math.inf)


def failed_checks(checks: List[dict]) -> List[dict]:
    """The agreement checks (bench/suite.py ``_check``) a contender failed."""
    return [c for c in checks if not c.get("agrees", False)]


def _failed_impls(checks: List[dict]) -> set:
    return {(c["layer"], c["impl"]) for c in failed_checks(checks)}


# Issues 13 and 14 set their per-layer GPU targets on the tensors of at least this many bytes
# ("for tensors of 25 MB or more"): below that, launches and host time dominate.
BIG_BYTES = 25e6


def targets(kernels: List[dict], device: str, checks: Optional[List[dict]] = None,
            host: Optional[List[dict]] = None) -> List[dict]:
    """The targets of issues 5, 13 and 14, measured on this run (reported, never asserted).
    A ratio target is judged on the geometric mean over shapes, dtypes and layouts (issue 5's),
    or, where the issue asks it of every case ("on every bench shape, dtype and layout": issues
    13 and 14's, their names say "every"), on the worst case; the geometric mean, the worst case
    and how many cases meet the limit on their own are shown either way.  A target whose
    contender failed an agreement check (``checks``) reads "check failed": its timings are of
    a layer that computes something else.  ``host``: the host-cost rows (issue 13: a layer
    step's host cost no more than the native layer's)."""
    out = []
    failed = _failed_impls(checks or [])

    def add(name, layer, values, limit, higher_is_better, fmt, relu=False, every=False):
        b = fused_backend(kernels, layer, device)
        vals = [v for v in values(b) if v is not None] if b else []
        g = _geomean(vals)
        worst = (min(vals) if higher_is_better else max(vals)) if vals else None
        judged = worst if every else g
        met = None if judged is None else (judged >= limit if higher_is_better else judged <= limit)
        meeting = sum(1 for v in vals if (v >= limit if higher_is_better else v <= limit))
        if b and (layer, f"normfuse[{b}]" + ("+ReLU" if relu else "")) in failed:
            met = "check failed"
        out.append({"target": name, "backend": b, "measured": g, "worst": worst,
                    "cases": len(vals), "cases_met": meeting, "met": met, "fmt": fmt,
                    "judged_on": "worst case" if every else "geomean"})

    def sel(layer, d, key, min_bytes=0, scale=1, **match):
        # the values of `key` (times `scale`) over the cases of tensors of at least `min_bytes`
        return lambda b: [r[key] * scale for r in _select(kernels, layer=layer, backend=b,
                                                          direction=d, **match)
                          if r["bytes_tensor"] >= min_bytes]

    def add_relu(limit, min_bytes=0, every=False):
        # Issue 14: the layer with its ReLU fused against the native layer + nn.ReLU (shapes
        # of at least ``min_bytes`` per tensor: below that, launches and host time dominate).
        for layer in TARGET_LAYERS:
            big = (f", {'every tensor' if every else 'tensors'} >= {min_bytes / 1e6:.0f} MB"
                   if min_bytes else "")
            add(f"{LAYER_LABEL[layer]} + ReLU fwd+bwd at most {limit}x {NATIVE_LABEL[layer]} "
                f"+ nn.ReLU{big}", layer, sel(layer, "fwd+bwd", "ratio_native", min_bytes, relu=True),
                limit, False, "{:.2f}x", relu=True, every=every)

    if device == "cpu":
        for layer in TARGET_LAYERS:
            add(f"{LAYER_LABEL[layer]} fwd+bwd within 1.5x of {NATIVE_LABEL[layer]}", layer,
                sel(layer, "fwd+bwd", "ratio_native"), 1.5, False, "{:.2f}x")
        add("BIN fwd+bwd at least 3x faster than the composition", "bin",
            sel("bin", "fwd+bwd", "speedup_composition"), 3.0, True, "{:.2f}x")
        add_relu(1.0)
    else:
        for layer in TARGET_LAYERS:
            for d, passes in (("fwd", "3-pass"), ("fwd+bwd", "3+5-pass")):
                add(f"{LAYER_LABEL[layer]} {d} >= 85% of copy bandwidth ({passes} model)",
                    layer, sel(layer, d, "model_frac_copy", scale=100), 85.0, True, "{:.0f}%")
        for layer in ("bin", "iebn"):
            add(f"{LAYER_LABEL[layer]} fwd+bwd within 1.15x of cuDNN batch norm", layer,
                sel(layer, "fwd+bwd", "ratio_native"), 1.15, False, "{:.2f}x")
        # Issue 13, "every layer": each case, not their mean, and AssocNorm against GroupNorm
        for layer in TARGET_LAYERS:
            add(f"{LAYER_LABEL[layer]} fwd+bwd at most 1.15x {NATIVE_LABEL[layer]} on every "
                "shape, dtype and layout", layer, sel(layer, "fwd+bwd", "ratio_native"), 1.15,
                False, "{:.2f}x", every=True)
            add(f"{LAYER_LABEL[layer]} fwd+bwd >= 85% of copy bandwidth (3+5-pass model) on "
                f"every tensor >= {BIG_BYTES / 1e6:.0f} MB", layer,
                sel(layer, "fwd+bwd", "model_frac_copy", BIG_BYTES, scale=100), 85.0, True,
                "{:.0f}%", every=True)
        add_relu(0.75, BIG_BYTES, every=True)
    for row in host or []:  # issue 13: measured on every machine, on a CPU input
        if row.get("kind") != "normfuse" or row.get("layer") not in TARGET_LAYERS:
            continue
        v = row.get("ratio_native") if row.get("ok") else None
        out.append({"target": f"{LAYER_LABEL[row['layer']]} host cost of a layer step at most "
                              f"1.0x {row['native']} (tiny CPU input)",
                    "backend": row.get("backend"), "measured": v, "worst": v,
                    "cases": int(v is not None), "cases_met": int(v is not None and v <= 1.0),
                    "met": None if v is None else v <= 1.0, "fmt": "{:.2f}x"})
    return out


# ----------------------------------------------------------------------------- markdown
def _fmt(v, spec="{:.3g}"):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def md_table(rows: List[dict], columns: Optional[List[str]] = None, specs=None) -> str:
    if not rows:
        return "(none)\n"
    columns = columns or list(rows[0])
    specs = specs or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), specs.get(c, "{:.3g}"))
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def targets_table(tg: List[dict]) -> str:
    rows = [{"target": t["target"], "judged on": f"normfuse[{t['backend']}]" if t["backend"]
             else "n/a", "measured (geomean)": t["fmt"].format(t["measured"])
             if t["measured"] is not None else "n/a",
             "worst case": t["fmt"].format(t["worst"]) if t["worst"] is not None else "n/a",
             "cases": t["cases"], "cases met": t.get("cases_met", "n/a"),
             "verdict from": ("n/a" if not t["cases"] else "the case" if t["cases"] == 1
                              else t.get("judged_on", "geomean")),
             "met": {True: "met", False: "NOT met", None: "n/a"}.get(t["met"], t["met"])}
            for t in tg]
    return md_table(rows)


def e2e_targets(e2e: List[dict], device: str) -> List[dict]:
    """Issue 14, on the CPU only (the issue sets it there): the ResNet-20 training step with BIN
    and its ReLUs fused (``convert(..., fuse_relu=True)``) below the nn.BatchNorm2d step timed in
    the same run, per compiled-kernel backend, eager (a compiled row is against the compiled
    BatchNorm step, which the issue does not ask of it). A fused step that failed reads "step
    failed"; a run with ResNet-20 rows but no fused BIN row, "n/a"."""
    if device != "cpu" or not e2e:
        return []
    from .e2e import baseline_steps  # noqa: PLC0415  (torch only where a report has e2e rows)
    bn = baseline_steps(e2e, "batchnorm").get(False)
    name = "ResNet-20 step: {} below the nn.BatchNorm2d step"
    out = []
    for r in e2e:
        if (r["layer"] != "bin" or not r.get("fused_relu") or r.get("compiled")
                or r.get("backend") in (None, "", "torch")):
            continue
        ratio = r["median_s"] / bn if r.get("ok") and bn else None
        met = None if ratio is None else ratio < 1.0
        out.append({"target": name.format(r["name"]), "backend": r["backend"], "measured": ratio,
                    "worst": ratio, "cases": int(ratio is not None), "cases_met": int(met is True),
                    "met": "step failed" if not r.get("ok") else met, "fmt": "{:.2f}x"})
    if not out:
        out.append({"target": name.format("BIN + ReLU fused"), "backend": None, "measured": None,
                    "worst": None, "cases": 0, "cases_met": 0, "met": None, "fmt": "{:.2f}x"})
    return out


def e2e_rows(e2e: List[dict]) -> List[dict]:
    """The report's rows of the ResNet-20 step; a compiled variant's ratio is to the compiled
    BatchNorm step."""
    from .e2e import baseline_steps  # noqa: PLC0415  (torch only where a report has e2e rows)
    bns = baseline_steps(e2e, "batchnorm")
    rows = []
    for r in e2e:
        ok = r.get("ok")
        bn = bns.get(r.get("compiled", False))
        share = r.get("norm_share")
        rows.append({"training step": r["name"],
                     "ms/step": r["median_s"] * 1e3 if ok else None,
                     "step / BatchNorm step": r["median_s"] / bn if ok and bn else None,
                     "normalization share": "n/a" if share is None else f"{100 * share:.0f}%"})
    return rows


def host_markdown(host: List[dict]) -> str:
    from .host import markdown
    return ("\nHost cost of one layer step (forward + backward) on a tiny (2, 8, 4, 4) float32 "
            "CPU input, one thread: microseconds per step (median), the ratio to the native "
            "layer (nn.GroupNorm for AssocNorm) and to nn.BatchNorm2d, and the operator calls "
            "the dispatcher ran (bench/host.py):\n\n" + markdown(host))


def checks_markdown(checks: List[dict]) -> str:
    """One line when every contender agrees with the composition; otherwise the failures,
    loudly (their timings are of a different function)."""
    bad = failed_checks(checks)
    if not bad:
        return (f"\nAgreement with the composition: all {len(checks)} checks pass (forward and "
                "input gradient in every dtype and layout, float16 / bfloat16 against the "
                "composition in float32, float32 against it in float64; parameter gradients "
                "in float32; checks.csv).\n")
    cols = ["layer", "shape", "dtype", "format", "impl", "check", "max_abs_diff", "tol",
            "error"]
    return (f"\n**CHECKS FAILED: {len(bad)} of {len(checks)}** agreement checks with the "
            "composition; these contenders compute something else, so their timings and the "
            "targets judged on them mean nothing (checks.csv):\n\n" + md_table(bad, cols))


def summary_markdown(summary: List[dict], tg: List[dict], e2e: List[dict],
                     host: Optional[List[dict]] = None,
                     step50: Optional[List[dict]] = None,
                     checks: Optional[List[dict]] = None) -> str:
    text = ("Geometric means over shapes, dtypes and layouts. `time / baseline`: time "
            "relative to the native baseline (lower is better); speedups: baseline time / "
            "our time; `model %copy`: 3-pass forward / 5-pass backward bytes per second as a "
            "share of the copy bandwidth measured at the same size.\n\n"
            + md_table(summary) + (checks_markdown(checks) if checks is not None else "")
            + "\nTargets (reported, not asserted; `cases met`: cases within the limit on their "
            "own; `verdict from`: the geometric mean, or the worst case where the target asks "
            "it of every case):\n\n" + targets_table(tg))
    if e2e:
        depth, batch = e2e[0].get("depth", 20), e2e[0].get("batch")
        text += (f"\nOne training step of a CIFAR ResNet-{depth} (batch {batch}); "
                 "normalization share = 1 - (step with nn.Identity instead) / step; a "
                 "`(compiled)` row is the model under torch.compile, against the compiled "
                 "BatchNorm and no-norm steps:\n\n"
                 + md_table(e2e_rows(e2e)))
    if step50:
        from .step50 import rows  # noqa: PLC0415
        first = step50[0]
        text += (f"\nOne training step of ResNet-50 (batch {first['batch']}, "
                 f"{first['resolution']}x{first['resolution']}, SGD with momentum; bf16-cl: "
                 "bfloat16 autocast, channels-last; fp32: float32, contiguous), against the "
                 "native model's step in the same rounds (bench/step50.py):\n\n"
                 + md_table(rows(step50)))
    if host:
        text += host_markdown(host)
    return text


def full_markdown(data: dict, summary_md: str) -> str:
    m = data["machine"]
    machine = ", ".join(f"{k}: {v}" for k, v in m.items())
    detail_cols = ["layer", "shape", "dtype", "format", "direction", "impl", "median_s",
                   "bw_GBps", "frac_copy", "model_frac_copy", "ratio_native",
                   "speedup_composition", "speedup_compiled", "note"]
    mem_cols = ["layer", "shape", "impl", "saved_tensors", "saved_bytes", "saved_over_x",
                "peak_bytes"]
    e2e_cols = ["name", "batch", "median_s", "norm_s", "norm_share", "peak_bytes", "error"]
    check_cols = ["layer", "shape", "dtype", "format", "impl", "check", "max_abs_diff", "tol",
                  "agrees", "error"]
    parts = [
        "# normfuse benchmark\n",
        f"Machine: {machine}\n",
        f"Command: `{data['command']}` ({data['runtime_s']:.0f} s)\n",
        "".join(f"Note: {n}\n\n" for n in data["notes"]),
        "## Summary\n", summary_md,
        f"\n## End to end: one training step of a CIFAR ResNet-"
        f"{(data['e2e'] or [{}])[0].get('depth', 20)}\n",
        "Normalization share = (step time - step time with every norm layer replaced by "
        "`nn.Identity`) / step time, measured in the same run.\n\n",
        md_table(data["e2e"], e2e_cols),
        "\n## Memory saved for backward (unique storages packed by autograd)\n",
        md_table(data["memory"], mem_cols, {"saved_bytes": "{:.0f}", "peak_bytes": "{:.0f}"}),
        "\n## Agreement with the composition (same parameters; forward and input gradient in "
        "every dtype and layout, parameter gradients in float32 / float64; the reference "
        "runs in float64 for a float32 case, float32 for float16 / bfloat16; tol: the largest "
        "difference allowed, bench/suite.py check_tolerance and LOW_PRECISION_UNITS)\n",
        md_table(data["checks"], check_cols),
        "\n## Copy bandwidth (x.copy_ into a preallocated tensor of the same size)\n",
        md_table(data["copy"]),
        "\n## Every measurement\n",
        "Bytes: forward reads x and writes y (2 S), forward+backward adds reading x, dy and "
        "writing dx (5 S); the model moves 3 S / 8 S.  `bw_GBps` uses the minimum bytes.\n\n",
        md_table(data["kernels"], detail_cols),
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- files
def write_csv(path: str, rows: List[dict]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        if not cols:  # no rows (a part skipped): an empty file, not a blank line
            return
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                        for k, v in r.items()})


def write_all(out_dir: str, data: dict, summary_md: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    plots = None
    try:  # matplotlib is a test extra, not a dependency: the numbers do not need it
        from . import plots  # noqa: PLC0415
    except ImportError as exc:  # (noted before results.json is written, so it has the note)
        data["notes"].append(f"no plots: {exc} (pip install matplotlib)")
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    paths.append(path)
    for name in ("kernels", "copy", "memory", "e2e", "step50", "checks", "host"):
        if name not in data:
            continue
        path = os.path.join(out_dir, f"{name}.csv")
        write_csv(path, data[name])
        paths.append(path)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(full_markdown(data, summary_md))
    paths.append(path)
    if plots is not None:
        paths += plots.bandwidth(out_dir, data["kernels"], data["copy"])
        paths += plots.step_breakdown(out_dir, data["e2e"])
    return paths
