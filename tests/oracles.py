"""Independent float64 oracles for BIN, IEBN, AssocNorm and ILM-Norm.

Written straight from the papers' formulas (design.md section 1), as a composition of plain
PyTorch ops on a float64 copy of the inputs, so that autograd on that graph gives the reference
input and parameter gradients.  Nothing here imports normfuse: these functions must stay
independent of the implementation they check.

Batch statistics are computed the textbook way: ``x.mean(dims)`` and
``x.var(dims, unbiased=False)`` over the batch and spatial dimensions of the float64 copy.

Conventions (the ones of ``torch.nn.BatchNorm*d``):

* batch statistics are used when ``training`` is true or no running statistics are given;
  otherwise the running statistics are used (eval mode) for the batch part, and the instance
  part / IEBN's delta always come from the sample itself;
* running statistics are updated iff ``training`` and they are given:
  ``rm <- (1 - f) rm + f mu_B``, ``rv <- (1 - f) rv + f var_B * n / (n - 1)`` with ``n = N * L``;
* ``f = momentum``, or ``1 / num_batches_tracked`` (after the increment) when ``momentum`` is None.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

F64 = torch.float64


def _f64(t, dtype=F64):
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=dtype).clone()


def _as_ncl(x):
    """(N, C, *S) -> (N, C, L); (N, C) -> (N, C, 1).  Works on copies (reshape)."""
    n, c = x.shape[0], x.shape[1]
    return x.reshape(n, c, -1)


def _bc(p, ref):
    """Reshape a (C,) vector to broadcast over (N, C, L)."""
    return p.reshape(1, -1, 1)


# --------------------------------------------------------------------------- pure formulas
def batch_stats(x3):
    """x3: (N, C, L) float64.  Textbook biased batch mean / variance per channel."""
    mu = x3.mean(dim=(0, 2))
    var = x3.var(dim=(0, 2), unbiased=False)
    return mu, var


def instance_stats(x3):
    mu = x3.mean(dim=2)
    var = x3.var(dim=2, unbiased=False)
    return mu, var


def _running_update(running_mean, running_var, mu_b, var_b, count, factor):
    if running_mean is None:
        return None, None
    var_unbiased = var_b * count / (count - 1)
    new_rm = (1 - factor) * running_mean + factor * mu_b.detach()
    new_rv = (1 - factor) * running_var + factor * var_unbiased.detach()
    return new_rm, new_rv


def _batch_part(x3, running_mean, running_var, training, factor, eps):
    """Returns (xhat_batch, new_rm, new_rv)."""
    n, c, l = x3.shape
    use_batch = training or running_mean is None
    new_rm, new_rv = running_mean, running_var
    if use_batch:
        mu_b, var_b = batch_stats(x3)
        if training and running_mean is not None:
            new_rm, new_rv = _running_update(running_mean, running_var, mu_b, var_b, n * l, factor)
    else:
        mu_b, var_b = running_mean, running_var
    xhat_b = (x3 - mu_b.reshape(1, c, 1)) / torch.sqrt(var_b.reshape(1, c, 1) + eps)
    return xhat_b, new_rm, new_rv


def bin_ref(x, running_mean, running_var, weight, bias, gate, training=False, momentum=0.1,
            eps=1e-5):
    """Batch-Instance Norm (Nam & Kim 2018).

    y = (rho * xhat_batch + (1 - rho) * xhat_instance) * gamma + beta
    All tensors float64; returns (y, new_running_mean, new_running_var).  The running tensors
    are not modified in place.  ``momentum`` is the resolved factor.
    """
    shape = x.shape
    x3 = _as_ncl(x)
    xhat_b, new_rm, new_rv = _batch_part(x3, running_mean, running_var, training, momentum, eps)
    mu_i, var_i = instance_stats(x3)
    xhat_i = (x3 - mu_i.unsqueeze(-1)) / torch.sqrt(var_i.unsqueeze(-1) + eps)
    rho = _bc(gate, x3)
    y = rho * xhat_b + (1 - rho) * xhat_i
    if weight is not None:
        y = y * _bc(weight, x3)
    if bias is not None:
        y = y + _bc(bias, x3)
    return y.reshape(shape), new_rm, new_rv


def iebn_ref(x, running_mean, running_var, weight, bias, gate_weight, gate_bias, training=False,
             momentum=0.1, eps=1e-5):
    """Instance Enhancement BN (Liang et al. 2020).

    delta[n, c] = sigmoid(mean_hw(x[n, c]) * gate_weight[c] + gate_bias[c])
    y = xhat_batch * (weight * delta) + bias
    """
    shape = x.shape
    x3 = _as_ncl(x)
    xhat_b, new_rm, new_rv = _batch_part(x3, running_mean, running_var, training, momentum, eps)
    pooled = x3.mean(dim=2)  # (N, C)
    delta = torch.sigmoid(pooled * gate_weight.reshape(1, -1) + gate_bias.reshape(1, -1))
    scale = delta if weight is None else delta * weight.reshape(1, -1)
    y = xhat_b * scale.unsqueeze(-1)
    if bias is not None:
        y = y + _bc(bias, x3)
    return y.reshape(shape), new_rm, new_rv


def assoc_ref(x, num_groups, encoder, decoder_mean, decoder_var, weight, bias, eps=1e-5):
    """Associate Normalization (ICLR 2019 submission), the paper's form.

    GroupNorm standardisation with G groups; per sample the group means mu (G) and biased group
    variances v (G) go through the auto-encoder with a shared encoder W1 (M, G):
        D_mu = sigmoid(W2 @ relu(W1 @ mu)),  D_v = tanh(W3 @ relu(W1 @ v))
        omega[n, c] = D_mu[n, group(c)] + weight[c];  beta[n, c] = D_v[n, group(c)] + bias[c]
        y = xhat_group * omega + beta
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    g = num_groups
    xg = x.reshape(n, g, -1)
    mu = xg.mean(dim=2)                       # (N, G)
    v = xg.var(dim=2, unbiased=False)         # (N, G)
    xhat = ((xg - mu.unsqueeze(-1)) / torch.sqrt(v.unsqueeze(-1) + eps)).reshape(n, c, -1)
    d_mu = torch.sigmoid(torch.relu(mu @ encoder.t()) @ decoder_mean.t())   # (N, G)
    d_v = torch.tanh(torch.relu(v @ encoder.t()) @ decoder_var.t())         # (N, G)
    per = c // g
    omega = d_mu.repeat_interleave(per, dim=1) + weight.reshape(1, -1)
    beta = d_v.repeat_interleave(per, dim=1) + bias.reshape(1, -1)
    y = xhat * omega.unsqueeze(-1) + beta.unsqueeze(-1)
    return y.reshape(shape)


def ilm_ref(x, num_groups, key_group_size, encoder, decoder_weight, decoder_bias, weight, bias,
            eps=1e-5):
    """Instance-Level Meta Normalization (Jia, Chen & Chen, CVPR 2019), as the authors' layer
    (github Gasoonjia/ILM-Norm, lib/nn/ilm_gn.py) computes it, for any rank.

    Key groups: K = C / key_group_size groups of consecutive channels; per sample their mean and
    *unbiased* variance (``torch.var``'s default, as theirs) feed the meta network, whose
    embedding layer W_e (E, K) is shared by both branches:
        weight[n, c] = sigmoid(W_w @ relu(W_e @ key_var))[key(c)] + weight_bias[c]
        bias[n, c]   = tanh(W_b @ relu(W_e @ key_mean))[key(c)] + bias_bias[c]
    Normalisation: G = num_groups groups, again with the unbiased variance:
        y = (x - mean_G) / sqrt(var_G + eps) * weight + bias
    Here W_e = ``encoder``, W_w = ``decoder_weight``, W_b = ``decoder_bias``, ``weight`` /
    ``bias`` the (C,) weight_bias / bias_bias.
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    k = c // key_group_size
    xk = x.reshape(n, k, -1)
    key_mean = xk.mean(dim=2)                                  # (N, K)
    key_var = xk.var(dim=2, unbiased=True)                     # (N, K)
    w = torch.sigmoid(torch.relu(key_var @ encoder.t()) @ decoder_weight.t())   # (N, K)
    b = torch.tanh(torch.relu(key_mean @ encoder.t()) @ decoder_bias.t())       # (N, K)
    scale = w.repeat_interleave(key_group_size, dim=1) + weight.reshape(1, -1)  # (N, C)
    shift = b.repeat_interleave(key_group_size, dim=1) + bias.reshape(1, -1)
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = xg.var(dim=2, unbiased=True, keepdim=True)
    xhat = ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, -1)
    y = xhat * scale.unsqueeze(-1) + shift.unsqueeze(-1)
    return y.reshape(shape)


# --------------------------------------------------------------------------- gradients
PARAM_NAMES = {
    "bin": ("weight", "bias", "gate"),
    "iebn": ("weight", "bias", "gate_weight", "gate_bias"),
    "assoc": ("encoder", "decoder_mean", "decoder_var", "weight", "bias"),
    "ilm": ("encoder", "decoder_weight", "decoder_bias", "weight", "bias"),
}


@dataclasses.dataclass
class OracleResult:
    y: torch.Tensor                                   # float64
    grads: Dict[str, torch.Tensor]                    # "input" and every parameter, float64
    running_mean: Optional[torch.Tensor] = None       # expected value after the call
    running_var: Optional[torch.Tensor] = None
    num_batches_tracked: Optional[int] = None


def run(kind, x, params, dy=None, *, running_mean=None, running_var=None, training=False,
        momentum=0.1, eps=1e-5, num_groups=None, key_group_size=None, compute_dtype=F64,
        activation=None):
    """Evaluate the oracle of ``kind`` ("bin", "iebn", "assoc", "ilm") in float64.

    ``x`` and ``params`` (name -> tensor or None) may have any dtype/device/layout: they are
    copied to contiguous float64 CPU tensors.  With ``dy`` the float64 graph is back-propagated
    and ``grads`` holds the gradient of ``(y * dy).sum()`` w.r.t. the input and every given
    parameter.  ``momentum`` is the resolved update factor.

    ``compute_dtype`` (float64 by default) may be set to float32 to measure how well-conditioned
    a case is: the same formulas in float32 show the error any float32 computation must expect.
    ``activation="relu"``: the layer followed by ``torch.relu`` (the fused activation's meaning).
    """
    cd = compute_dtype
    xd = _f64(x, cd).requires_grad_(dy is not None)
    pd = {}
    for name in PARAM_NAMES[kind]:
        t = params.get(name)
        pd[name] = None if t is None else _f64(t, cd).requires_grad_(dy is not None)
    rm, rv = _f64(running_mean, cd), _f64(running_var, cd)
    if kind == "bin":
        y, nrm, nrv = bin_ref(xd, rm, rv, pd["weight"], pd["bias"], pd["gate"], training,
                              momentum, eps)
    elif kind == "iebn":
        y, nrm, nrv = iebn_ref(xd, rm, rv, pd["weight"], pd["bias"], pd["gate_weight"],
                               pd["gate_bias"], training, momentum, eps)
    elif kind == "assoc":
        y = assoc_ref(xd, num_groups, pd["encoder"], pd["decoder_mean"], pd["decoder_var"],
                      pd["weight"], pd["bias"], eps)
        nrm = nrv = None
    elif kind == "ilm":
        y = ilm_ref(xd, num_groups, key_group_size, pd["encoder"], pd["decoder_weight"],
                    pd["decoder_bias"], pd["weight"], pd["bias"], eps)
        nrm = nrv = None
    else:
        raise ValueError(kind)
    if activation == "relu":
        y = torch.relu(y)
    elif activation is not None:
        raise ValueError(activation)
    grads = {}
    if dy is not None:
        names = ["input"] + [k for k, v in pd.items() if v is not None]
        tensors = [xd] + [v for v in pd.values() if v is not None]
        gs = torch.autograd.grad(y, tensors, _f64(dy, cd), allow_unused=True)
        for name, gr, t in zip(names, gs, tensors):
            grads[name] = torch.zeros_like(t) if gr is None else gr
    return OracleResult(y.detach(), grads, nrm, nrv)


def module_kind(module):
    """Guess the oracle kind of a normfuse module from its parameters (no normfuse import)."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if hasattr(module, "gate_weight") or "gate_weight" in names:
        return "iebn"
    if hasattr(module, "gate") or "gate" in names:
        return "bin"
    if hasattr(module, "decoder_weight"):
        return "ilm"
    if hasattr(module, "encoder"):
        return "assoc"
    raise TypeError(f"unknown module {type(module).__name__}")


def module_step(module, x, dy=None, compute_dtype=F64):
    """Expected result of ``module(x)`` (and ``backward(dy)``) following nn.BatchNorm semantics.

    Reads the module's parameters, buffers and flags; does not modify the module.  Returns an
    OracleResult with the expected buffers after the call.
    """
    kind = module_kind(module)
    params = {n: getattr(module, n, None) for n in PARAM_NAMES[kind]}
    eps = module.eps
    act = getattr(module, "activation", None)
    if kind == "assoc":
        return run(kind, x, params, dy, eps=eps, num_groups=module.num_groups,
                   compute_dtype=compute_dtype, activation=act)
    if kind == "ilm":
        return run(kind, x, params, dy, eps=eps, num_groups=module.num_groups,
                   key_group_size=module.key_group_size, compute_dtype=compute_dtype,
                   activation=act)

    training = module.training
    track = getattr(module, "track_running_stats", True)
    rm = module.running_mean if track else None
    rv = module.running_var if track else None
    nbt = module.num_batches_tracked
    nbt = None if nbt is None else int(nbt)
    momentum = module.momentum
    new_nbt = nbt
    if training and track and nbt is not None:
        new_nbt = nbt + 1
    if momentum is None:
        factor = 1.0 / new_nbt if (training and track) else 0.0
    else:
        factor = momentum
    # nn.BatchNorm: in training mode batch statistics; in eval mode running statistics when
    # they are tracked, else batch statistics.
    res = run(kind, x, params, dy, running_mean=rm, running_var=rv,
              training=training or rm is None, momentum=factor, eps=eps,
              compute_dtype=compute_dtype, activation=act)
    if not training:
        # eval: running stats unchanged
        res.running_mean, res.running_var = _f64(rm, compute_dtype), _f64(rv, compute_dtype)
    res.num_batches_tracked = new_nbt
    return res


# ==========================================================================================
# Test helpers (no normfuse import here either)
def device_for_backend(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def dtype_supported(device: str, dtype: torch.dtype) -> bool:
    # GPU kernels are float32/16/bf16 only (docs/architecture.md); float64 needs a CPU path.
    return not (device == "cuda" and dtype == torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)


def randn(shape, seed, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    t = torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale + offset
    return t.to(device=device, dtype=dtype)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Return ``t`` (same values) in the given layout.

    layouts: "contiguous", "channels_last" (rank 4), "channels_last_3d" (rank 5),
    "nlc" (rank 3, the (N, L, C)-contiguous permuted layout), "cl" (the channels-last layout
    of whatever rank, i.e. one of the three above).
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "cl":
        layout = {3: "nlc", 4: "channels_last", 5: "channels_last_3d"}[t.dim()]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "nlc":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(layout)


def layout_of(t: torch.Tensor) -> str:
    if t.dim() == 3 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) == 1 \
            and t.stride(2) == t.shape[1] and t.stride(0) == t.shape[1] * t.shape[2]:
        return "nlc"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) \
            and not t.is_contiguous():
        return "channels_last_3d"
    if t.is_contiguous():
        return "contiguous"
    return "other"


def make_input(shape, seed, dtype=torch.float32, device="cpu", layout="contiguous", scale=1.5,
               offset=0.3):
    """Fresh random input (never all-zero), per-channel offsets so batch != instance stats."""
    x = randn(shape, seed, torch.float64, "cpu", scale=scale, offset=offset)
    if len(shape) >= 2:
        chan = randn((shape[1],), seed + 1, torch.float64) * 0.7
        x = x + chan.reshape(1, -1, *[1] * (len(shape) - 2))
        samp = randn((shape[0],), seed + 2, torch.float64) * 0.5
        x = x + samp.reshape(-1, *[1] * (len(shape) - 1))
    x = x.to(device=device, dtype=dtype)
    return to_layout(x, layout)


# per dtype: (atol, rtol) applied after scaling atol by max(1, max|expected|)
TOLS = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}


def assert_close_dtype(actual, expected, dtype, what="", factor=1.0, lowp=None):
    """Compare an implementation result with a float64 oracle value at ``dtype``'s tolerance.

    ``lowp``: the same oracle evaluated in float32.  Ill-conditioned cases (a tiny group or
    batch variance) lose accuracy in any float32 computation; the absolute tolerance is raised
    to 4x the float32 oracle's own error, so only errors beyond the inherent one fail.
    """
    assert actual is not None, f"{what}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    atol, rtol = TOLS[dtype]
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    atol = atol * factor * scale
    if lowp is not None and e.numel():
        atol = max(atol, 4.0 * float((lowp.detach().double().cpu() - e).abs().max()))
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol * factor,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# random non-default parameters --------------------------------------------------------------
def randomize_parameters(module, seed):
    """Give every parameter and the running statistics random, non-default values."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(module.named_parameters())):
            base = name.rsplit(".", 1)[-1]
            r = randn(p.shape, seed + 100 + i, torch.float64)
            if base == "gate":
                v = torch.rand(p.shape, generator=gen(seed + 100 + i), dtype=torch.float64)
            elif base == "weight":
                v = 1.0 + 0.4 * r
            elif base in ("gate_weight", "gate_bias"):
                v = 0.6 * r
            else:
                v = 0.5 * r
            p.copy_(v.to(p.dtype))
        for i, (name, b) in enumerate(sorted(module.named_buffers())):
            base = name.rsplit(".", 1)[-1]
            if base == "running_mean":
                b.copy_((0.5 * randn(b.shape, seed + 200 + i, torch.float64)).to(b.dtype))
            elif base == "running_var":
                v = torch.rand(b.shape, generator=gen(seed + 200 + i), dtype=torch.float64)
                b.copy_((0.5 + v).to(b.dtype))
    return module


def snapshot_buffers(module):
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def assert_buffers_equal(module, snap, what=""):
    now = dict(module.named_buffers())
    assert set(now) == set(snap)
    for n, b in snap.items():
        assert torch.equal(now[n].cpu(), b.cpu()), f"{what}: buffer {n} changed"
