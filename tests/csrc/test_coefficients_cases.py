"""Inputs and float64 oracle results for the coefficient-op tests (no tests in this module).

The oracle is the reference implementation ``normfuse/coefficients/`` run in float64 on the very
values the implementation under test sees (float32 inputs are rounded first, then widened), so
the comparison measures only the implementation's own rounding.

Ops and their positional arguments follow the schemas of docs/architecture.md; the reference
functions take the same arguments, so one argument list serves both.
"""
from __future__ import annotations

import torch

from normfuse import coefficients as reference

F64 = torch.float64

# Output names, in the order the ops return them.
OUTPUTS = {
    "bin": ("scale", "shift"),
    "iebn": ("scale", "shift"),
    "assoc": ("scale", "shift"),
    "bin_backward": ("c_dy", "c_x", "c_0", "grad_gate", "grad_weight", "grad_bias"),
    "iebn_backward": ("c_dy", "c_x", "c_0", "grad_gate", "grad_gate_bias", "grad_weight", "grad_bias"),
    "assoc_backward": ("c_dy", "c_x", "c_0", "grad_encoder", "grad_decoder_mean", "grad_decoder_var",
                       "grad_weight", "grad_bias"),
    "ilm": ("scale", "shift"),
    "ilm_backward": ("c_dy", "c_x", "c_0", "grad_encoder", "grad_decoder_weight", "grad_decoder_bias",
                     "grad_weight", "grad_bias"),
}
OP_NAMES = {"bin": "bin_coefficients", "iebn": "iebn_coefficients", "assoc": "assoc_coefficients",
            "ilm": "ilm_coefficients"}
GROUP_LAYERS = ("assoc", "ilm")  # no running statistics


def op_name(op: str) -> str:
    """'bin_backward' -> 'bin_coefficients_backward'."""
    layer, _, back = op.partition("_")
    return OP_NAMES[layer] + ("_backward" if back else "")


def make_inputs(op: str, N: int, C: int, L: int, G: int = 1, M: int = 1, seed: int = 0,
                offset: float = 0.0, dtype=torch.float32, zero_m2: bool = False, K: int = 1) -> dict:
    """Random inputs of `op` (float64 tensors holding values exactly representable in `dtype`).
    ILM-Norm: M is the meta network's E, K its key-group count.

    Plane means get per-channel and per-sample offsets (so batch != instance statistics) plus
    `offset`; m2 = L * var with var in [0.05, 2] (0 with zero_m2, as for real L = 1 planes)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale + shift

    def uni(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g, dtype=F64) * (hi - lo) + lo

    d = {
        "mean": rnd(N, C, scale=0.7, shift=0.3 + offset) + rnd(1, C, scale=0.8) + rnd(N, 1, scale=0.4),
        "m2": torch.zeros(N, C, dtype=F64) if zero_m2 else L * uni(N, C, lo=0.05, hi=2.0),
        "sum_dy": rnd(N, C),
        "sum_dy_xmu": rnd(N, C, scale=1.5),
        "weight": rnd(C, scale=0.4, shift=1.0),
        "bias": rnd(C, scale=0.5),
    }
    layer = op.split("_")[0]
    if layer == "bin":
        d["gate"] = uni(C)
    elif layer == "iebn":
        d["gate"] = rnd(C, scale=0.6)  # gate_weight
        d["gate_bias"] = rnd(C, scale=0.6)
    elif layer == "assoc":
        d["encoder"] = rnd(M, G, scale=0.5)
        d["decoder_mean"] = rnd(G, M, scale=0.5)
        d["decoder_var"] = rnd(G, M, scale=0.5)
    else:
        d["encoder"] = rnd(M, K, scale=0.5)
        d["decoder_weight"] = rnd(K, M, scale=0.5)
        d["decoder_bias"] = rnd(K, M, scale=0.5)
    if layer not in GROUP_LAYERS:
        d["running_mean"] = rnd(C, scale=0.5, shift=offset)
        d["running_var"] = uni(C, lo=0.5, hi=1.5)
    return {k: v.to(dtype).to(F64) for k, v in d.items()}


def op_args(op: str, t: dict, L: int, G: int = 1, training: bool = True, running: bool = True,
            affine: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> list:
    """Positional arguments of the op (schema order) from the tensors `t` (used as given: clone
    the running statistics first if the call may update them)."""
    layer = op.split("_")[0]
    backward = op.endswith("backward")
    head = [t["sum_dy"], t["sum_dy_xmu"]] if backward else []
    if layer == "assoc":
        return head + [t["mean"], t["m2"], L, G, t["encoder"], t["decoder_mean"], t["decoder_var"],
                       t["weight"], t["bias"], eps]
    if layer == "ilm":
        return head + [t["mean"], t["m2"], L, G, t["encoder"], t["decoder_weight"], t["decoder_bias"],
                       t["weight"], t["bias"], eps]
    gates = [t["gate"]] + ([t["gate_bias"]] if layer == "iebn" else [])
    affine_args = [t["weight"], t["bias"]] if affine else [None, None]
    run = [t["running_mean"], t["running_var"]] if running else [None, None]
    tail = [training, eps] if backward else [training, momentum, eps]
    return head + [t["mean"], t["m2"], L] + gates + affine_args + run + tail


def expected(op: str, t: dict, L: int, G: int = 1, training: bool = True, running: bool = True,
             affine: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> dict:
    """Float64 reference outputs by name; BIN / IEBN forwards given running statistics also give
    their values after the call ('running_mean' / 'running_var': updated iff training)."""
    t64 = {k: v.to(F64).clone() for k, v in t.items()}
    fn = getattr(reference, op_name(op))
    out = fn(*op_args(op, t64, L, G, training, running, affine, momentum, eps))
    res = dict(zip(OUTPUTS[op], out))
    if not op.endswith("backward") and op not in GROUP_LAYERS and running:  # updated, or left alone
        res["running_mean"] = t64["running_mean"]
        res["running_var"] = t64["running_var"]
    return res


def assert_close(actual: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """|actual - want| <= tol * (max(1, max|want|) + |want|): float32 results of O(N C) sums are
    compared at a tolerance relative to the scale of the quantity."""
    a = actual.detach().to("cpu", F64)
    assert a.shape == want.shape, f"{what}: shape {tuple(a.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    scale = max(1.0, float(want.abs().max()))
    err = (a - want).abs() - tol * (scale + want.abs())
    bad = err > 0
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {want.numel()} values off; worst |diff| "
        f"{float((a - want).abs().max()):.3e} (scale {scale:.3e}, tol {tol:.1e})\n"
        f"got  {a.flatten()[:8].tolist()}\nwant {want.flatten()[:8].tolist()}")


def opcheck_cases():
    """(op, (N, C, L, G, M), (training, running, affine)) for opcheck of the coefficient ops, the
    C++ ones (tests/csrc/test_coefficients_ops.py) and the Triton ones
    (tests/triton_kernels/test_opcheck.py)."""
    for op in ("bin", "bin_backward", "iebn", "iebn_backward"):
        for training, running, affine in [(True, True, True), (False, True, False), (True, False, True)]:
            yield op, (3, 4, 5, 1, 1), (training, running, affine)
    for op in ("assoc", "assoc_backward"):
        yield op, (2, 6, 5, 3, 2), (False, False, True)
