"""The per-layer measurements: time, bytes, bandwidth, memory saved for backward.

Bytes each op must move at least (S = bytes of one activation tensor):
  forward  2 S (read x, write y);   forward+backward 5 S (+ read x, dy, write dx).
The copy bandwidth of a case is ``dst.copy_(x)`` on the same input pool (2 S per call), timed in
the same interleaved rounds as the contenders.
The 3-pass forward / 5-pass backward model of design section 3 (what a moments -> apply
forward and sums -> apply backward moves): forward 3 S, forward+backward 8 S.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Dict, List

import torch

from . import layers as L
from . import timing
from .shapes import Shape, num_groups_for

DIRECTIONS = ("fwd", "fwd+bwd")
MIN_PASSES = {"fwd": 2, "fwd+bwd": 5}
MODEL_PASSES = {"fwd": 3, "fwd+bwd": 8}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class Config:
    device: torch.device
    shapes: List[Shape]
    dtypes: List[torch.dtype]
    formats: List[str]
    layers: List[str]
    backends: List[str]
    compile: bool
    compile_formats: List[str] = field(default_factory=lambda: list(FORMATS))
    target_s: float = 0.2
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 3


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Progress:
    """One line per measured case on stderr, with the elapsed time."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        print(f"[{self.done:>4}/{self.total} {elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)


def _inputs(shape: Shape, dtype, fmt: str, device, n: int, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mf = FORMATS[fmt]
    dims = shape.dims
    per_channel = (1, dims[1]) + (1,) * (len(dims) - 2)
    per_sample = (dims[0],) + (1,) * (len(dims) - 1)

    def make(offset, spread):
        # never all-zero; per-channel and per-sample offsets (x), so that batch and instance
        # statistics differ and a check can tell BIN from BatchNorm (tests/oracles.py too)
        t = torch.randn(dims, generator=gen) + offset
        if spread:
            t = t + 0.8 * torch.randn(per_channel, generator=gen) \
                + 0.4 * torch.randn(per_sample, generator=gen)
        return t.to(device=device, dtype=dtype).contiguous(memory_format=mf)

    return [make(0.5, True) for _ in range(n)], [make(0.0, False) for _ in range(n)]


def _runner(mod, impl: L.Impl, direction: str, xs, dys) -> Callable[[int], object]:
    n = len(xs)
    params = [p for p in mod.parameters() if p.requires_grad]
    if direction == "fwd":
        def run(i):
            with torch.no_grad():
                return mod(xs[i % n])
    else:
        leaves = [x.detach().requires_grad_(True) for x in xs]

        def run(i):
            x = leaves[i % n]
            y = mod(x)
            return torch.autograd.grad(y, [x] + params, dys[i % n], allow_unused=True)
    return run


def _case_key(shape, dtype, fmt, layer):
    return {"shape": shape.name, "dims": list(shape.dims), "numel": shape.numel,
            "dtype": dtype_name(dtype), "format": fmt, "layer": layer}


def count_cases(cfg: Config) -> int:
    return len(cfg.shapes) * len(cfg.dtypes) * len(cfg.formats) * len(cfg.layers) * 2


def run_kernels(cfg: Config, progress: Progress, out=None) -> Dict[str, list]:
    """Returns {"kernels": [...], "copy": [...], "memory": [...], "checks": [...]}: ``out``
    filled as the cases are measured, when given (so a run stopped midway keeps what it has)."""
    out = {} if out is None else out
    for key in ("kernels", "copy", "memory", "checks"):
        out.setdefault(key, [])
    dev = cfg.device
    kw = dict(target_s=cfg.target_s, min_reps=cfg.min_reps, max_reps=cfg.max_reps,
              warmup=cfg.warmup)
    for si, shape in enumerate(cfg.shapes):
        c, g = shape.channels, num_groups_for(shape.channels)
        for dtype in cfg.dtypes:
            elem = torch.empty((), dtype=dtype).element_size()
            nbytes = shape.numel * elem
            npool = timing.pool_size(2 * nbytes, dev)
            copies = []
            for fmt in cfg.formats:
                xs, dys = _inputs(shape, dtype, fmt, dev, npool, seed=si)
                dst = torch.empty_like(xs[0])

                def copy(i, xs=xs, dst=dst):
                    return dst.copy_(xs[i % len(xs)])

                for layer in cfg.layers:
                    key = _case_key(shape, dtype, fmt, layer)
                    source = L.reference(layer, c, g)
                    impls = L.impls_for(cfg.backends, layer,
                                        cfg.compile and fmt in cfg.compile_formats)
                    mods, notes = {}, {}
                    for impl in impls:
                        try:
                            mod = L.build(impl, layer, c, g, source, dev)
                            mods[impl.name], notes[impl.name] = L.fit_dtype(mod, impl, xs[0])
                        except Exception as exc:
                            notes[impl.name] = _err(exc)
                    out["checks"] += _failed_builds(key, impls, mods, notes)
                    out["checks"] += _check(key, impls, mods, xs[0], dys[0],
                                            _wider_reference(impls, layer, c, g, source,
                                                             dev, dtype))
                    if fmt == cfg.formats[0] and dtype == cfg.dtypes[0]:
                        out["memory"] += _memory(key, impls, mods, xs[0], dys[0], dev)
                    for direction in DIRECTIONS:
                        timed, cp = _time_all(impls, mods, direction, xs, dys, copy, dev,
                                              npool * 2 * nbytes, kw)
                        copies.append(cp["median_s"])
                        copy_bw = 2 * nbytes / cp["median_s"]
                        parts = [f"copy {copy_bw / 1e9:.3g} GB/s"]
                        for impl, res in zip(impls, timed):
                            rec = dict(key, impl=impl.name, kind=impl.kind,
                                       backend=impl.backend, relu=impl.relu,
                                       direction=direction,
                                       bytes_tensor=nbytes,
                                       min_bytes=MIN_PASSES[direction] * nbytes,
                                       model_bytes=MODEL_PASSES[direction] * nbytes,
                                       copy_GBps=copy_bw / 1e9, note=notes.get(impl.name, ""))
                            rec.update(res)
                            out["kernels"].append(rec)
                            if impl.kind == "normfuse" and impl.name in mods and not res["ok"]:
                                # (its timing raised: the run must not pass as if it had agreed)
                                out["checks"].append(dict(key, impl=impl.name, check=direction,
                                                          max_abs_diff=None, tol=None,
                                                          agrees=False, error=res.get("error")))
                            why = (rec.get("error") or rec["note"] or "").split(":")[0]
                            parts.append(f"{impl.name} " + (
                                f"{rec['median_s'] * 1e3:.3g}ms" if rec["ok"]
                                else f"n/a ({why})"))
                        progress(f"{L.LAYER_LABEL[layer]:9s} {direction:7s} {shape} "
                                 f"{dtype_name(dtype)} {fmt}: " + " | ".join(parts))
                del xs, dys, dst
            t_copy = median(copies)
            out["copy"].append({"shape": shape.name, "numel": shape.numel,
                                "dtype": dtype_name(dtype), "bytes": nbytes,
                                "median_s": t_copy, "copy_GBps": 2 * nbytes / t_copy / 1e9,
                                "measurements": len(copies)})
    return out


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _time_all(impls, mods, direction, xs, dys, copy, dev, pool_bytes, kw):
    """Times every contender that was built and the copy, interleaved in the same rounds;
    contenders that could not be built are reported n/a.  Returns (results, copy result)."""
    live = [k for k, impl in enumerate(impls) if impl.name in mods]
    fns = [_runner(mods[impls[k].name], impls[k], direction, xs, dys) for k in live] + [copy]
    contexts = [impls[k].context for k in live] + [contextlib.nullcontext]
    res = timing.measure_many(fns, dev, contexts=contexts, pool_bytes=pool_bytes, **kw)
    if not res[-1]["ok"]:
        raise RuntimeError(f"copy failed: {res[-1].get('error')}")
    out = [{"ok": False, "median_s": None, "min_s": None, "reps": 0} for _ in impls]
    for k, r in zip(live, res):
        out[k] = r
    return out, res[-1]


def check_tolerance(ref: torch.Tensor) -> float:
    """The largest difference from the composition a contender computing the same layer may
    show in float32 / float64: 1e-3, or 1e-5 of the largest value where that is more (a
    parameter gradient sums N * H * W terms: large, and summed in another order).  In
    float16 / bfloat16 see ``LOW_PRECISION_UNITS``."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return max(1e-3, 1e-5 * scale)


# float16 / bfloat16: each element against the composition run in float32 on the same
# (upcast) input and dy, relative to its own magnitude (at least 1): at most this many units
# of the dtype's precision (eps).  normfuse computes in float32 and rounds once (half a unit;
# Triton's interpreter truncates: one); a layer that is not the same function (BIN without its
# instance half: 10-50 units) fails.  A global tolerance against the composition run in the
# low dtype itself let that BIN pass in bfloat16.
LOW_PRECISION_UNITS = 4.0


def _wider_reference(impls, layer, c, g, source, device, dtype):
    """The reference of a case: the composition in float32 for a float16 / bfloat16 case, in
    float64 for a float32 one; None for float64 (the case's own composition is the reference).
    A float32 composition is no oracle for parameter gradients: BIN's gate gradient, a sum of
    N * H * W terms that cancel, came out 1-2e-3 from float64 at (32, 16, 32, 32) where
    normfuse's was 2-4e-5 off, and failed correct contenders."""
    wider = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
             torch.float32: torch.float64}.get(dtype)
    impl = next((i for i in impls if i.name == "composition"), None)
    if wider is None or impl is None:
        return None
    return L.build(impl, layer, c, g, source, device).to(wider)


def _failed_builds(key, impls, mods, notes) -> List[dict]:
    """A normfuse contender that could not be built or run once fails its checks (the run
    must not read "all checks pass" without it)."""
    return [dict(key, impl=impl.name, check="build", max_abs_diff=None, tol=None, agrees=False,
                 error=notes.get(impl.name, "not built"))
            for impl in impls if impl.kind == "normfuse" and impl.name not in mods]


def _check(key, impls, mods, x, dy, ref_wide=None) -> List[dict]:
    """Every contender against the composition (same parameter values), in every dtype and
    layout measured: the forward output and the input gradient for ``dy``, and in float32 /
    float64 every parameter gradient of a normfuse contender (``agrees``: within
    ``check_tolerance``), against the composition run in float64 on the same input and dy
    (``ref_wide``; a float64 case's own composition).  In float16 / bfloat16 the reference is
    ``ref_wide``, the composition in float32 on the upcast input and dy, compared element by
    element (``LOW_PRECISION_UNITS``; ``max_abs_diff`` is then the largest difference relative
    to the element's magnitude, at least 1, and ``tol`` that many eps).  A contender that does
    not agree does not compute the same layer, and the report says so next to its timings
    (``report.failed_checks``).
    A ``compiled`` contender (the composition through torch.compile: it computes in the low
    dtype too, rounding its intermediates) is checked, forward only, against the eager
    composition in its dtype, within ``LOW_PRECISION_GLOBAL_UNITS`` eps of the output's
    largest magnitude (at least 1).

    A fused-ReLU contender's gradient is checked against the composition's backward for ``dy``
    masked where the contender's own output is 0: which side of 0 a pre-activation within
    rounding of 0 falls is not the layer's to agree on (two correct layers differ there by a
    whole ``dy`` term), and its forward, checked first, already says that its output agrees."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    ref_mod = ref_wide if ref_wide is not None else (None if low else mods.get("composition"))
    if ref_mod is None:
        return []
    ours = [impl for impl in impls if impl.kind in ("normfuse", "compiled") and impl.name in mods]
    res = []
    ref_dtype = next(ref_mod.parameters()).dtype
    ref_x = x.detach().to(ref_dtype).requires_grad_()
    ref_dy = dy.to(ref_dtype)
    ref_params = dict(ref_mod.named_parameters(remove_duplicate=False))
    renames = getattr(ref_mod, "RENAMES", L.comp._RENAMES)
    try:  # a reference that cannot run (a float64 one out of memory) fails the case's checks
        with torch.enable_grad():
            ref_out = ref_mod(ref_x)
    except Exception as exc:
        return [dict(key, impl=impl.name, check="reference", max_abs_diff=None, tol=None,
                     agrees=False, error=f"reference ({ref_dtype}): {_err(exc)}")
                for impl in ours]
    ref = ref_out.detach()

    def ref_grads(grad, names):
        wanted = [ref_x] + [ref_params[renames.get(n, n)] for n in names]
        got = torch.autograd.grad(ref_out, wanted, grad, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, got)]

    def difference(got, want):
        if low:
            return ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()
        return (got - want).abs().max().item()

    eps = torch.finfo(x.dtype).eps
    if low and "composition" in mods:
        res += _check_compiled_low(key, [i for i in ours if i.kind == "compiled"], mods, x, eps)
    for impl in ours:
        if low and impl.kind == "compiled":
            continue
        mod = mods[impl.name]
        leaf = x.detach().requires_grad_(impl.kind == "normfuse")
        names = ([n for n, p in mod.named_parameters() if p.requires_grad]
                 if impl.kind == "normfuse" and not low else [])
        expected = torch.relu(ref) if impl.relu else ref
        try:
            with impl.context(), torch.set_grad_enabled(leaf.requires_grad):
                y = mod(leaf)
                got = {"fwd": y.detach().to(ref_dtype)}
                want = {"fwd": expected}
                if leaf.requires_grad:
                    params = dict(mod.named_parameters())
                    grads = torch.autograd.grad(y, [leaf] + [params[n] for n in names], dy)
                    mask = ref_dy if not impl.relu else torch.where(
                        y.detach() > 0, ref_dy, torch.zeros_like(ref_dy))
                    wanted = ref_grads(mask, names)
                    got["bwd dx"], want["bwd dx"] = grads[0].to(ref_dtype), wanted[0]
                    for n, g, w in zip(names, grads[1:], wanted[1:]):
                        got[f"bwd {n}"], want[f"bwd {n}"] = g.to(ref_dtype), w.reshape(g.shape)
            for what in got:
                tol = LOW_PRECISION_UNITS * eps if low else check_tolerance(want[what])
                err = difference(got[what], want[what])
                res.append(dict(key, impl=impl.name, check=what, max_abs_diff=err, tol=tol,
                                agrees=bool(err <= tol)))
        except Exception as exc:
            res.append(dict(key, impl=impl.name, check="fwd+bwd", max_abs_diff=None, tol=None,
                            agrees=False, error=_err(exc)))
    return res


LOW_PRECISION_GLOBAL_UNITS = 8.0


def _check_compiled_low(key, compiled, mods, x, eps) -> List[dict]:
    """``_check``'s float16 / bfloat16 forward check of the compiled compositions."""
    res = []
    with torch.no_grad():
        ref = mods["composition"](x).float()
    tol = LOW_PRECISION_GLOBAL_UNITS * eps * max(1.0, ref.abs().max().item())
    for impl in compiled:
        try:
            with impl.context(), torch.no_grad():
                want = torch.relu(ref) if impl.relu else ref
                err = (mods[impl.name](x).float() - want).abs().max().item()
            res.append(dict(key, impl=impl.name, check="fwd", max_abs_diff=err, tol=tol,
                            agrees=bool(err <= tol)))
        except Exception as exc:
            res.append(dict(key, impl=impl.name, check="fwd", max_abs_diff=None, tol=None,
                            agrees=False, error=_err(exc)))
    return res


def _memory(key, impls, mods, x, dy, dev) -> List[dict]:
    """Bytes autograd saves for backward (and GPU peak memory of one fwd+bwd) per contender."""
    res = []
    x_bytes = x.numel() * x.element_size()
    for impl in impls:
        mod = mods.get(impl.name)
        if mod is None or impl.kind == "compiled":
            continue
        leaf = x.detach().requires_grad_(True)
        try:
            with impl.context():
                saved = timing.saved_bytes(lambda: mod(leaf))

                def step():
                    y = mod(leaf)
                    torch.autograd.grad(y, [leaf], dy)

                peak = timing.peak_memory(step, dev)
            res.append(dict(key, impl=impl.name, kind=impl.kind, x_bytes=x_bytes,
                            saved_over_x=saved["saved_bytes"] / x_bytes, peak_bytes=peak,
                            **saved))
        except Exception as exc:
            res.append(dict(key, impl=impl.name, kind=impl.kind, error=_err(exc)))
    return res
