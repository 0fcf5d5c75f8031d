"""The benchmark's main entry runs end to end on a tiny config and writes every output.

Runs ``python -m bench --smoke --device cpu`` (one tiny shape, a few repetitions, a batch-4
ResNet-8 step: seconds) in a subprocess from the repository root, then checks the files and
that every number it reports is positive and finite.  Speed itself is never asserted here.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ["results.json", "report.md", "kernels.csv", "copy.csv", "memory.csv", "e2e.csv",
           "checks.csv", "host.csv", "bandwidth_float32.png", "step_breakdown.png"]


# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share one smoke run of the benchmark, which a second worker
# would redo.
pytestmark = pytest.mark.xdist_group("test_bench_smoke")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --threads 1: on a busy shared machine two OpenMP threads can be 10x slower than one
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--device", "cpu",
                           "--threads", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_outputs_exist(run):
    out, proc = run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| layer |" in proc.stdout and "Targets" in proc.stdout  # the summary table
    assert "[" in proc.stderr  # progress lines
    assert "| target |" in (out / "report.md").read_text()


def test_numbers_positive_and_finite(run):
    out, _ = run
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cpu"] and data["machine"]["torch"]
    for c in data["copy"]:
        assert _positive(c["median_s"]) and _positive(c["copy_GBps"])
    kernels = data["kernels"]
    kinds = {r["kind"] for r in kernels if r["ok"]}
    assert {"native", "composition"} <= kinds
    if "not importable" not in str(data["machine"].get("normfuse")):
        assert "normfuse" in kinds
    for r in kernels:
        if r["ok"]:
            for key in ("median_s", "bw_GBps", "frac_copy", "model_frac_copy", "min_bytes"):
                assert _positive(r[key]), (key, r)
        elif r["kind"] != "compiled":
            pytest.fail(f"{r['impl']} failed: {r.get('error') or r.get('note')}")
    for m in data["memory"]:
        assert _positive(m.get("saved_bytes")), m
    steps = data["e2e"]
    assert steps and all(e["ok"] and _positive(e["median_s"]) for e in steps), steps
    assert all(math.isfinite(e["norm_share"]) for e in steps if "norm_share" in e)
    host = data["host"]
    assert {"nn.BatchNorm2d", "nn.GroupNorm"} <= {h["name"] for h in host if h["ok"]}, host
    for h in host:
        assert h["ok"], h
        assert _positive(h["us"]) and _positive(h["ratio_native"]) and h["op_calls"] > 0, h
    for c in data["checks"]:
        assert c["max_abs_diff"] is not None and c["max_abs_diff"] < c["tol"] == 1e-3, c


def test_every_layer_has_its_rows(run):
    """Each layer of the bench (ILM-Norm included) is timed against its native layer, its
    composition, and with the ReLU fused against the native layer + nn.ReLU, in both directions
    and layouts; its outputs are checked against the composition and it has a summary row."""
    from bench import layers as L
    out, proc = run
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["layers"] == list(L.LAYERS)
    nf = "not importable" not in str(data["machine"].get("normfuse"))
    for layer in L.LAYERS:
        rows = [r for r in data["kernels"] if r["layer"] == layer and r["ok"]]
        kinds = {(r["kind"], r["relu"]) for r in rows}
        want = {("native", False), ("composition", False), ("native_relu", True)}
        if nf:
            want |= {("normfuse", False), ("normfuse", True)}
        assert want <= kinds, (layer, kinds)
        natives = {r["impl"] for r in rows if r["kind"] == "native"}
        assert natives == {L.NATIVE_LABEL[layer]}, (layer, natives)
        assert {(r["direction"], r["format"]) for r in rows} == {
            (d, f) for d in ("fwd", "fwd+bwd") for f in ("contiguous", "channels_last")}
        if nf:
            checks = [c for c in data["checks"] if c["layer"] == layer]
            assert {c["impl"] for c in checks} >= {
                r["impl"] for r in rows if r["kind"] == "normfuse"}, (layer, checks)
            assert all(r["ratio_native"] and r["speedup_composition"] for r in rows
                       if r["kind"] == "normfuse"), layer
        assert any(s["layer"] == L.LAYER_LABEL[layer] for s in data["summary"]), layer
        assert f"| {L.LAYER_LABEL[layer]} |" in proc.stdout


@pytest.mark.parametrize("layer", ["bin", "iebn", "assoc", "ilm"])
@pytest.mark.parametrize("dims", [(4, 8, 8, 8), (3, 16, 4, 5), (2, 48, 3, 4), (2, 1024, 2, 2)],
                         ids=lambda d: "x".join(map(str, d)))
def test_composition_computes_the_layer(layer, dims):
    """The baseline computes the layer it is compared with: a composition built as the bench
    builds it (``load_params_from`` a randomized normfuse module) gives normfuse's output and
    input gradient in float64, on a random non-zero input.  For ILM-Norm the shapes cover one key
    group (C = 8, 16), three key groups straddling the 16 groups (C = 48) and the meta network's
    K // reduction branch (C = 1024: 64 key groups, embedding 4); its parameter gradients are
    compared too, through the authors' names."""
    from bench import layers as L
    from bench.shapes import num_groups_for
    if L.normfuse() is None:
        pytest.skip(f"normfuse not importable: {L.NORMFUSE_ERROR}")
    c, g = dims[1], num_groups_for(dims[1])
    source = L.reference(layer, c, g)
    dev = torch.device("cpu")
    comp = L.build(L.Impl("composition", "composition"), layer, c, g, source, dev).double()
    ours = L.build(L.Impl("normfuse[cpu]", "normfuse"), layer, c, g, source, dev).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(dims, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(dims, generator=gen, dtype=torch.float64)
    results = []
    for mod in (comp, ours):
        leaf = x.clone().requires_grad_(True)
        y = mod(leaf)
        y.backward(dy)
        results.append((y.detach(), leaf.grad, dict(mod.named_parameters())))
    (y_c, dx_c, p_c), (y_n, dx_n, p_n) = results
    assert y_n.abs().max() > 0.1  # not a degenerate (all-zero) output
    torch.testing.assert_close(y_n, y_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx_n, dx_c, rtol=1e-9, atol=1e-10)
    if layer == "ilm":
        renames = type(comp).RENAMES
        assert set(renames) == set(p_n)
        for name, p in p_n.items():
            q = p_c[renames[name]]  # the shared embedding: one parameter, named fc_embed.0
            torch.testing.assert_close(p.grad, q.grad.reshape(p.shape), rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name: f"grad of {n}: {m}")


def test_csv_matches_json(run):
    out, _ = run
    data = json.loads((out / "results.json").read_text())
    with open(out / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["kernels"])
    assert all(float(r["median_s"]) > 0 for r in rows if r["ok"] == "True")


def test_l2probe_reduction_verdict():
    """Issue 13's reductions-at-copy-speed verdict: every bfloat16 channels-last first pass of
    25 MB or more at 80% of a copy; smaller and float32 cases do not count."""
    from bench import l2probe

    def row(case, mb, frac, direction="forward"):
        return {"case": case, "bytes": mb * 2**20, "direction": direction, "first_frac_copy": frac}

    rows = [row("bfloat16-cl", 32, 0.9), row("bfloat16-cl", 64, 0.85, "backward"),
            row("bfloat16-cl", 16, 0.2), row("float32", 64, 0.1),
            row("bfloat16-cl", 23.8, 0.1)]  # 24.96e6 bytes: below 25 MB
    assert l2probe.reduction_verdict(rows).endswith(": met")
    rows.append(row("bfloat16-cl", 96, 0.6, "backward"))
    line = l2probe.reduction_verdict(rows)
    assert line.endswith("NOT met") and "2 of 3 cases" in line and "60%" in line
    assert "n/a" in l2probe.reduction_verdict(rows[2:4])


def test_single_read_verdict():
    """Issue 14's single-read verdict: floor / time at least 0.8 wherever the path ran both
    directions; a case it did not take does not count."""
    from bench import steps_probe

    def row(shape, vs_floor, taken=2):
        return {"case": "bfloat16", "shape": shape, "taken": taken, "single_vs_floor": vs_floor}

    rows = [row("a", 1.1), row("b", 1.2), row("c", 3.0, taken=0)]
    assert steps_probe.single_read_verdict(rows).endswith(": met")
    rows.append(row("d", 2.0))
    line = steps_probe.single_read_verdict(rows)
    assert line.endswith("NOT met") and "2 of 3 cases" in line and "50%" in line and "d" in line
    assert "n/a" in steps_probe.single_read_verdict([row("c", 3.0, taken=1)])


def test_l2probe_smoke(tmp_path):
    """bench/l2probe.py (a GPU probe for the single-read decision, issue 14) runs its code path
    on the CPU and writes one finite row per case and direction."""
    from bench import l2probe
    assert l2probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "l2probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(l2probe.CASES)
    for r in rows:
        for key in ("cold_ms", "warm_ms", "pair_ms", "floor_ms", "l2_gain", "pair_vs_floor",
                    "first_cold_ms", "first_frac_copy", "second_frac_copy"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, r


def test_kernel_times_smoke(tmp_path):
    """bench/kernel_times.py (where a layer's share of the ResNet-50 step goes on a GPU, issue 13)
    runs its code path on the CPU: a row per layer with its ratio to the native layer, and a
    breakdown row per operator it ran."""
    from bench import kernel_times
    assert kernel_times.main(["--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "kernel_times.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == list(kernel_times.LAYERS)
    for r in rows:
        assert float(r["step_us"]) > 0 and float(r["kernels_us"]) > 0, r
        assert float(r["launches"]) >= 1 and r["top"], r
        assert (r["step_vs_native"] == "") == (r["layer"] not in kernel_times.NATIVE), r
    with open(tmp_path / "kernel_breakdown.csv") as f:
        kernels = list(csv.DictReader(f))
    names = {(k["layer"], k["kernel"]) for k in kernels}
    assert ("batchnorm", "aten::native_batch_norm") in names, names
    import normfuse
    if "cpu" in normfuse.available_backends():  # the compiled ops (else the torch backend's)
        assert ("bin", "normfuse::bin_layer") in names and ("assoc", "normfuse::assoc_layer") in names


def test_steps_probe_smoke(tmp_path):
    """bench/steps_probe.py (a GPU probe for the fused layer steps' threshold, issue 13) runs
    its code path on the CPU (both modes are the composition there) and writes its row."""
    from normfuse import _extension
    if _extension._C is None or not hasattr(_extension._C, "fused_steps"):
        pytest.skip("normfuse._C built without CUDA: no fused_steps switch")
    from bench import steps_probe
    assert steps_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "steps_probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(steps_probe.DTYPES)  # one grid case, one ResNet-50-step case
    assert sorted(r["set"] for r in rows) == sorted(["grid", "rn50"] * len(steps_probe.DTYPES))
    for r in rows:
        assert float(r["unfused_us"]) > 0 and float(r["fused_us"]) > 0, r


def test_a_probe_stopped_by_sigterm_writes_what_it_measured(tmp_path, monkeypatch):
    """The GPU script ends a step at its time limit with SIGTERM: a probe then writes the rows
    it measured before (they wrote their CSV only at the end, and lost everything), and puts
    the previous SIGTERM handler back."""
    import os
    import signal

    from normfuse import _extension
    if _extension._C is None or not hasattr(_extension._C, "fused_steps"):
        pytest.skip("normfuse._C built without CUDA: no fused_steps switch")
    from bench import steps_probe
    real, calls = steps_probe._layer_step, []

    def layer_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first row
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps_probe, "_layer_step", layer_step)
    previous = signal.getsignal(signal.SIGTERM)
    assert steps_probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert signal.getsignal(signal.SIGTERM) is previous
    with open(tmp_path / "steps_probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["unfused_us"]) > 0


def test_single_read_probe_smoke(tmp_path):
    """bench/steps_probe.py --single-read (issue 14: one cooperative launch per direction vs the
    generic launches) runs its code path on the CPU, where both modes are the composition and the
    single read is never taken, and writes its row."""
    from normfuse import _extension
    if _extension._C is None or not hasattr(_extension._C, "single_read"):
        pytest.skip("normfuse._C built without CUDA: no single_read switch")
    from bench import steps_probe
    assert steps_probe.main(["--single-read", "--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "single_read_probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps_probe.SINGLE_READ_DTYPES)
    for r in rows:
        assert int(r["taken"]) == 0 and float(r["generic_us"]) > 0 and float(r["single_us"]) > 0, r
        assert float(r["floor_us"]) > 0, r


def test_ncu_target_smoke():
    """bench/ncu_target.py (the kernels the GPU script profiles with ncu, issue 13) runs its
    code path on the CPU: every generic op of both cases once, and BIN's coefficient ops."""
    from bench import ncu_target
    assert ncu_target.run(torch.device("cpu"), shape=(2, 8, 4, 4)) == (
        4 * len(ncu_target.CASES) + 2 * len(ncu_target.COEF_CASES))


def test_every_check_agrees_in_every_dtype_and_layout(run):
    """The smoke run checks each contender in every layout, the input gradient in float32."""
    out, proc = run
    checks = list(csv.DictReader((out / "checks.csv").open()))
    assert checks and all(c["agrees"] == "True" for c in checks), checks
    assert {c["format"] for c in checks} == {"contiguous", "channels_last"}
    assert {c["check"] for c in checks} >= {"fwd", "bwd dx", "bwd gate", "bwd weight"}
    assert {c["check"] for c in checks if c["dtype"] != "float32"} <= {"fwd", "bwd dx"}
    assert "all" in proc.stdout and "checks pass" in proc.stdout


def test_measure_many_hands_every_call_its_own_index():
    """Consecutive calls, of whichever contender, get consecutive indices: the pool slot a
    call reads was last read the same number of calls before, for every contender (a shared
    index per round let all but the first find their inputs in cache)."""
    from bench import timing
    seen = {k: [] for k in range(3)}
    fns = [lambda i, k=k: seen[k].append(i) for k in range(3)]
    timing.measure_many(fns, torch.device("cpu"), min_reps=4, max_reps=4, warmup=1)
    calls = sorted(i for v in seen.values() for i in v)
    assert calls == list(range(len(calls)))  # every index once
    timed = [v[-4:] for v in seen.values()]
    first = min(v[0] for v in timed)
    for r in range(4):  # round r: the next 3 indices, one per contender, in its own order
        assert sorted(v[r] for v in timed) == [first + 3 * r + k for k in range(3)]


def test_measure_many_varies_each_contenders_predecessor():
    """Each round runs the contenders in an order of its own (seeded): a call's time depends on
    the call before it, and a fixed order gave each contender one predecessor throughout."""
    from bench import timing
    seq = []
    fns = [lambda i, k=k: seq.append(k) for k in range(4)]
    timing.measure_many(fns, torch.device("cpu"), min_reps=40, max_reps=40, warmup=0)
    timed = seq[-160:]
    preds = {k: {p for p, c in zip(timed, timed[1:]) if c == k} for k in range(4)}
    assert all(len(v) >= 2 for v in preds.values()), preds


def _bin_smoke_run(prelude: str, out) -> subprocess.CompletedProcess:
    """``python -m bench --smoke`` on the CPU, BIN only, no end-to-end or host rows, writing to
    ``out``, in a subprocess that first runs ``prelude`` (a patch to test the run against)."""
    script = (prelude + "import sys\nfrom bench.__main__ import main\n"
              "sys.exit(main(['--smoke', '--device', 'cpu', '--threads', '1', '--layers', "
              f"'bin', '--no-e2e', '--no-host', '--out', {str(out)!r}]))\n")
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_a_contender_computing_another_layer_fails_the_run(tmp_path):
    """A normfuse layer whose output (or input gradient) is off makes the run exit 1, with the
    failed checks in the summary and "check failed" on the targets judged on it."""
    proc = _bin_smoke_run(
        "import normfuse\n"
        "orig = normfuse.BatchInstanceNorm2d.forward\n"
        "normfuse.BatchInstanceNorm2d.forward = "
        "lambda self, x: orig(self, x) + (x - x.detach()) * 0.1\n",  # same output, wrong dx
        tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CHECKS FAILED" in proc.stdout and "check failed" in proc.stdout
    assert "CHECK FAILED: normfuse[cpu] disagrees" in proc.stderr
    failed = [c for c in csv.DictReader((tmp_path / "checks.csv").open())
              if c["agrees"] == "False"]
    assert failed and {c["check"] for c in failed} == {"bwd dx"}


def test_report_without_matplotlib(tmp_path):
    """matplotlib is a test extra: without it the run still writes its numbers and report."""
    proc = _bin_smoke_run("import sys\nsys.modules['matplotlib'] = None\n",  # -> ImportError
                          tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))
    assert "no plots" in (tmp_path / "report.md").read_text()
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert any("no plots" in n for n in notes)  # (the JSON was written before the note)


def test_cpu_ops_smoke(tmp_path):
    """``python -m bench.cpu_ops`` (the per-op breakdown the README points to) runs on a tiny
    shape and reports a positive, finite time for every op and layer row."""
    out = tmp_path / "cpu_ops.json"
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_ops", "--shapes", "2x8x3x3",
                           "--target-s", "0.002", "--min-reps", "3", "--max-reps", "5",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    ops = {r["op"] for r in rows if r["table"] == "ops"}
    layers = {r["layer"] for r in rows if r["table"] == "layers"}
    assert {"copy", "moments", "assoc_coef_bwd", "F.group_norm"} <= ops, ops
    assert {"bin", "iebn", "assoc"} <= layers, layers
    for r in rows:
        for key in ("ms", "native_ms"):
            if key in r:
                assert math.isfinite(r[key]) and r[key] > 0, r


def test_cpu_ops_measure_names_a_failing_callable():
    from bench import cpu_ops

    def broken(i):
        raise ValueError("planted")

    with pytest.raises(RuntimeError, match="broken: ValueError: planted"):
        cpu_ops.measure({"fine": lambda i: i + 1, "broken": broken}, 0.001, 2, 3)
    t = cpu_ops.measure({"a": lambda i: sum(range(100)), "b": lambda i: i}, 0.001, 2, 3)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


def test_fused_backend_compares_backends_on_shared_cases():
    """The backend targets are judged on is chosen on the cases both backends ran: "cuda" here is
    faster on every shared case, while "triton" also ran a tiny case that would win it a plain
    geometric mean over each backend's own rows; without shared cases the ratio to the native
    layer decides."""
    from bench import report

    def row(backend, shape, t, ratio):
        return {"kind": "normfuse", "layer": "bin", "backend": backend, "ok": True, "shape": shape,
                "dtype": "float32", "format": "contiguous", "direction": "fwd+bwd", "relu": False,
                "median_s": t, "ratio_native": ratio}

    kernels = [row("cuda", "big", 1.0, 0.9), row("cuda", "mid", 0.1, 0.9),
               row("triton", "big", 1.2, 1.1), row("triton", "mid", 0.12, 1.1),
               row("triton", "tiny", 1e-6, 1.1), row("torch", "tiny", 1e-9, 0.1)]
    assert report.fused_backend(kernels, "bin", "cuda") == "cuda"
    disjoint = [row("cuda", "big", 1.0, 0.9), row("triton", "tiny", 1e-6, 1.1)]
    assert report.fused_backend(disjoint, "bin", "cuda") == "cuda"
    assert report.fused_backend([row("torch", "tiny", 1.0, 2.0)], "bin", "cpu") == "torch"
    assert report.fused_backend(kernels, "iebn", "cuda") is None


def test_gpu_targets_judge_every_case_where_the_issue_asks_it():
    """Issues 13 and 14 ask their per-layer GPU targets of every case (every shape, dtype and
    layout; every tensor of 25 MB or more), issue 5 of the mean: one slow case fails the former
    and not the latter; cases below 25 MB do not count for the 85% and fused-ReLU targets; and
    AssocNorm is judged against nn.GroupNorm too. The ResNet-20 step target of issue 14 reads
    the eager fused BIN step against the eager BatchNorm step."""
    from bench import report

    def row(layer, shape, nbytes, ratio, frac, relu=False):
        return {"kind": "normfuse", "layer": layer, "backend": "cuda", "ok": True, "shape": shape,
                "dtype": "bfloat16", "format": "channels_last", "direction": "fwd+bwd",
                "relu": relu, "median_s": 1e-3 * ratio, "ratio_native": ratio,
                "model_frac_copy": frac, "bytes_tensor": nbytes}

    kernels = []
    for layer in ("bin", "iebn", "assoc"):
        kernels += [row(layer, "big", 100e6, 1.0, 0.95), row(layer, "big2", 50e6, 1.0, 0.95),
                    row(layer, "small", 1e6, 1.4, 0.30),  # one slow case, below 25 MB
                    row(layer, "big", 100e6, 0.70, None, relu=True),
                    row(layer, "small", 1e6, 0.95, None, relu=True)]
    kernels.append(row("bin", "big3", 30e6, 0.9, 0.80))  # one big case below 85%
    by_name = {t["target"]: t for t in report.targets(kernels, "cuda")}

    def find(*words):
        hits = [t for name, t in by_name.items() if all(w in name for w in words)]
        assert len(hits) == 1, (words, list(by_name))
        return hits[0]

    for layer, native in (("BIN", "nn.BatchNorm2d"), ("IEBN", "nn.BatchNorm2d"),
                          ("AssocNorm", "nn.GroupNorm")):
        every = find(f"{layer} fwd+bwd at most 1.15x {native} on every")
        assert every["met"] is False and every["worst"] == 1.4
        assert every["cases_met"] == every["cases"] - 1
        assert every["measured"] < 1.15  # (the mean alone would have passed)
        relu = find(f"{layer} + ReLU", "every tensor >= 25 MB")
        assert relu["met"] is True and relu["cases"] == 1  # the 1 MB case left out
    assert find("BIN fwd+bwd within 1.15x of cuDNN")["met"] is True  # issue 5: the mean
    big = find("BIN fwd+bwd >= 85%", "every tensor >= 25 MB")
    assert big["cases"] == 3 and big["met"] is False and big["worst"] == 80.0
    assert find("IEBN fwd+bwd >= 85%", "every tensor")["met"] is True
    table = report.targets_table(list(by_name.values()))
    assert "worst case |" in table and "| geomean |" in table

    e2e = [{"name": "nn.BatchNorm2d", "layer": "batchnorm", "ok": True, "median_s": 0.010},
           {"name": "BIN + ReLU fused normfuse[cpu]", "layer": "bin", "backend": "cpu",
            "fused_relu": True, "ok": True, "median_s": 0.009},
           {"name": "BIN + ReLU fused normfuse[torch]", "layer": "bin", "backend": "torch",
            "fused_relu": True, "ok": True, "median_s": 0.020},
           {"name": "BIN normfuse[cpu]", "layer": "bin", "backend": "cpu", "fused_relu": False,
            "ok": True, "median_s": 0.011}]
    (step,) = report.e2e_targets(e2e, "cpu")
    assert step["backend"] == "cpu" and step["met"] is True and abs(step["measured"] - 0.9) < 1e-9
    e2e[1]["median_s"] = 0.0105
    assert report.e2e_targets(e2e, "cpu")[0]["met"] is False
    assert report.e2e_targets(e2e, "cuda") == []  # the issue sets it on the CPU only
    e2e[1]["ok"] = False
    assert report.e2e_targets(e2e, "cpu")[0]["met"] == "step failed"
    (missing,) = report.e2e_targets([e2e[0], e2e[3]], "cpu")
    assert missing["met"] is None and missing["cases"] == 0
    assert "| n/a | n/a |" in report.targets_table([missing])


def test_transforms_rows(capsys):
    """``python -m bench.transforms`` on a tiny input: every transform times every layer (none
    fails), each normfuse row with its ratio to the native layer timed in the same run."""
    from bench import transforms

    assert transforms.main(["--shape", "4", "16", "3", "3", "--target-s", "0.01"]) == 0
    rows = transforms.run_transforms((4, 16, 3, 3), target_s=0.01, min_reps=2, max_reps=3)
    assert {r["transform"] for r in rows} == set(transforms.TRANSFORMS)
    for r in rows:
        assert r["ok"], r
        assert r["ms"] > 0 and math.isfinite(r["ratio_native"]), r
    assert "per-sample" in capsys.readouterr().out


def test_heads_rows(capsys):
    """``python -m bench.heads`` on a tiny head: BIN and IEBN in training and eval mode against
    nn.BatchNorm1d timed in the same run (no row fails), one row per (shape, mode, contender)."""
    from bench import heads

    assert heads.main(["--shapes", "6x8", "--target-s", "0.01"]) == 0
    rows = heads.run_heads(((6, 8), (5, 3)), target_s=0.01, min_reps=2, max_reps=3)
    assert {(r["shape"], r["mode"]) for r in rows} == {
        (s, m) for s in ("6x8", "5x3") for m in heads.MODES}
    assert len(rows) == 2 * len(heads.MODES) * 3  # nn.BatchNorm1d, BIN[cpu], IEBN[cpu]
    for r in rows:
        assert r["ok"], r
        assert r["ms"] > 0 and math.isfinite(r["ratio_native"]), r
    assert "BIN normfuse[cpu]" in capsys.readouterr().out


@pytest.mark.parametrize("device, expected", [("cpu", ["cpu"]), ("cuda", ["cuda", "triton"])])
def test_transforms_default_backends_follow_the_device(monkeypatch, device, expected):
    """``python -m bench.transforms --device cuda`` without ``--backends`` times the GPU
    backends (its default was "cpu" whatever the device: every normfuse row failed on a GPU)."""
    from bench import layers, transforms

    nf = layers.normfuse()
    monkeypatch.setattr(nf, "available_backends", lambda: ["cuda", "triton", "cpu", "torch"])
    seen = []
    monkeypatch.setattr(transforms, "run_transforms",
                        lambda shape, backends, *rest: seen.append(list(backends)) or [])
    monkeypatch.setattr(transforms, "markdown", lambda rows: "")
    assert transforms.main(["--device", device]) == 0
    assert seen == [expected]


def test_compiled_step_rows():
    """--compiled-steps: the ResNet step under torch.compile, for the baselines and the
    compiled-kernel backends (unfused and fused ReLU), each timed against the compiled
    BatchNorm step and sharing the compiled no-norm step; the eager rows are unchanged."""
    from bench import e2e, report
    from normfuse import _extension
    if not _extension.HAS_CPU_KERNELS:
        pytest.skip("normfuse._C not built: no cpu backend")

    rows = e2e.run_e2e(torch.device("cpu"), ["torch", "cpu"], batch=2, target_s=0.01, min_reps=1,
                       max_reps=2, progress=lambda *_: None, blocks=1, layers=["bin"],
                       compiled=True)
    compiled = [r for r in rows if r["compiled"]]
    assert {r["name"] for r in compiled} == {
        "nn.BatchNorm2d (compiled)", "nn.GroupNorm (compiled)", "identity (no norm) (compiled)",
        "BIN normfuse[cpu] (compiled)", "BIN + ReLU fused normfuse[cpu] (compiled)"}
    assert all(r["ok"] and _positive(r["median_s"]) for r in rows), rows
    eager = [r for r in rows if not r["compiled"]]
    assert len(eager) == len(e2e.variants(["torch", "cpu"], blocks=1, layers=["bin"]))
    table = {r["training step"]: r for r in report.e2e_rows(rows)}
    bn = next(r["median_s"] for r in compiled if r["layer"] == "batchnorm")
    assert table["BIN normfuse[cpu] (compiled)"]["step / BatchNorm step"] == pytest.approx(
        next(r["median_s"] for r in compiled if r["name"] == "BIN normfuse[cpu] (compiled)") / bn)


def test_normalization_share_of_a_step_faster_than_the_no_norm_step_is_na(capsys):
    """A busy machine can time a normalized step below the no-norm network's: that is noise,
    reported n/a (it read 0% before), not a share of zero."""
    from bench import e2e, report

    rows = [dict(name="identity (no norm)", layer="identity", ok=True, median_s=0.10),
            dict(name="nn.BatchNorm2d", layer="batchnorm", ok=True, median_s=0.125),
            dict(name="BIN normfuse[cpu]", layer="bin", ok=True, median_s=0.09),
            dict(name="broken", layer="iebn", ok=False, median_s=None)]
    e2e.norm_shares(rows)
    assert rows[1]["norm_share"] == pytest.approx(0.2) and rows[1]["norm_s"] == pytest.approx(0.025)
    assert "norm_share" not in rows[2] and "faster than the no-norm step" in capsys.readouterr().err
    shares = [r["normalization share"] for r in report.e2e_rows(rows)]
    assert shares == ["n/a", "20%", "n/a", "n/a"]
