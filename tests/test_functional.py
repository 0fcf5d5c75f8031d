"""normfuse.functional against the float64 oracles; gradcheck and second-order gradients."""

import copy
import re

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import oracles
from oracles import (assert_close_dtype, dtype_supported, make_input, randn, to_layout, gen)

F64 = torch.float64


def _params(kind, c, seed, device, dtype=torch.float32, groups=None, m=3, affine=True):
    def r(shape, k, scale=0.5, offset=0.0):
        return randn(shape, seed + k, dtype, device, scale=scale, offset=offset)
    if kind == "bin":
        gate = torch.rand(c, generator=gen(seed + 3), dtype=F64).to(device=device, dtype=dtype)
        return dict(weight=r((c,), 1, 0.4, 1.0) if affine else None,
                    bias=r((c,), 2) if affine else None, gate=gate)
    if kind == "iebn":
        return dict(weight=r((c,), 1, 0.4, 1.0) if affine else None,
                    bias=r((c,), 2) if affine else None,
                    gate_weight=r((c,), 3, 0.6), gate_bias=r((c,), 4, 0.6))
    return dict(encoder=r((m, groups), 5, 0.7), decoder_mean=r((groups, m), 6, 0.7),
                decoder_var=r((groups, m), 7, 0.7), weight=r((c,), 1, 0.4, 1.0),
                bias=r((c,), 2))


def _running(c, seed, device, dtype=torch.float32):
    rm = randn((c,), seed + 11, dtype, device, scale=0.5)
    rv = (torch.rand(c, generator=gen(seed + 12), dtype=F64) + 0.5).to(device=device, dtype=dtype)
    return rm, rv


def call(nf, kind, x, p, rm=None, rv=None, training=False, momentum=0.1, eps=1e-5, groups=None):
    fn = nf.functional
    if kind == "bin":
        return fn.batch_instance_norm(x, rm, rv, p["weight"], p["bias"], p["gate"],
                                      training=training, momentum=momentum, eps=eps)
    if kind == "iebn":
        return fn.instance_enhancement_batch_norm(x, rm, rv, p["weight"], p["bias"],
                                                  p["gate_weight"], p["gate_bias"],
                                                  training=training, momentum=momentum, eps=eps)
    return fn.assoc_norm(x, groups, p["encoder"], p["decoder_mean"], p["decoder_var"],
                         p["weight"], p["bias"], eps=eps)


CASES = [("bin", (4, 3, 5)), ("bin", (3, 5, 4, 3)), ("bin", (6, 4)), ("bin", (2, 3, 2, 3, 2)),
         ("iebn", (4, 3, 5)), ("iebn", (3, 5, 4, 3)), ("iebn", (6, 4)), ("iebn", (2, 3, 2, 3, 2)),
         ("assoc", (3, 6, 4, 3)), ("assoc", (4, 6, 5)), ("assoc", (4, 6)), ("assoc", (2, 4, 2, 3, 2))]


@pytest.mark.parametrize("kind,shape", CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps,momentum", [(1e-5, 0.1), (1e-2, 0.35)])
def test_functional_matches_oracle(nf, backend, device, seed, kind, shape, training, eps,
                                   momentum):
    c = shape[1]
    groups = 2 if kind == "assoc" else None
    p = _params(kind, c, seed, device, groups=groups)
    for t in p.values():
        if t is not None:
            t.requires_grad_(True)
    x = make_input(shape, seed, torch.float32, device).requires_grad_(True)
    dy = randn(shape, seed + 9, torch.float32, device)
    rm, rv = _running(c, seed, device) if kind != "assoc" else (None, None)
    exp = oracles.run(kind, x, p, dy, running_mean=rm, running_var=rv, training=training,
                      momentum=momentum, eps=eps, num_groups=groups)
    y = call(nf, kind, x, p, rm, rv, training, momentum, eps, groups)
    assert y.dtype == x.dtype and y.shape == x.shape
    names = ["input"] + [k for k, v in p.items() if v is not None]
    tensors = [x] + [v for v in p.values() if v is not None]
    grads = torch.autograd.grad(y, tensors, dy)
    assert_close_dtype(y, exp.y, torch.float32, "output")
    for n, g in zip(names, grads):
        assert_close_dtype(g, exp.grads[n], torch.float32, f"grad {n}")
    if kind != "assoc":
        # running statistics updated in place in training, untouched in eval
        assert_close_dtype(rm, exp.running_mean, torch.float32, "running_mean")
        assert_close_dtype(rv, exp.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("shape", [(4, 3, 5), (5, 3)], ids=str)
def test_functional_no_affine_and_no_running_stats(nf, backend, device, seed, kind, shape):
    """weight/bias None mean 1/0; no running statistics -> batch statistics, even in eval."""
    c = shape[1]
    p = _params(kind, c, seed, device, affine=False)
    x = make_input(shape, seed, torch.float32, device)
    for training in (True, False):
        exp = oracles.run(kind, x, p, training=True)
        y = call(nf, kind, x, p, None, None, training=training)
        assert_close_dtype(y, exp.y, torch.float32, f"training={training}")


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_functional_dtypes(nf, backend, device, seed, kind, dtype):
    if not dtype_supported(device, dtype):
        pytest.skip("dtype not supported on this backend's device")
    shape = (4, 6, 3, 3)
    pdt = F64 if dtype == F64 else torch.float32
    groups = 3 if kind == "assoc" else None
    p = _params(kind, 6, seed, device, pdt, groups=groups)
    rm, rv = _running(6, seed, device, pdt) if kind != "assoc" else (None, None)
    x = make_input(shape, seed, dtype, device)
    exp = oracles.run(kind, x, p, running_mean=rm, running_var=rv, training=True,
                      num_groups=groups)
    y = call(nf, kind, x, p, rm, rv, True, groups=groups)
    assert y.dtype == dtype
    assert_close_dtype(y, exp.y, dtype, "output")
    if rm is not None:
        assert rm.dtype == pdt
        assert_close_dtype(rm, exp.running_mean, pdt, "running_mean")
        assert_close_dtype(rv, exp.running_var, pdt, "running_var")


# ------------------------------------------------------------------------------ gradcheck
GC_CASES = [("bin", (4, 3)), ("bin", (3, 2, 4)), ("bin", (2, 3, 2, 3)), ("bin", (2, 2, 1, 2, 2)),
            ("iebn", (4, 3)), ("iebn", (3, 2, 4)), ("iebn", (2, 3, 2, 3)),
            ("assoc", (3, 4)), ("assoc", (2, 4, 3)), ("assoc", (2, 4, 2, 2))]


def _gc_setup(nf, kind, shape, seed, device, training, layout="contiguous"):
    c = shape[1]
    groups = 2 if kind == "assoc" else None
    p = _params(kind, c, seed, device, F64, groups=groups, m=2)
    x = to_layout(make_input(shape, seed, F64, device), layout)
    rm, rv = (None, None)
    if kind != "assoc" and not training:
        rm, rv = _running(c, seed, device, F64)
    names = [k for k, v in p.items() if v is not None]
    inputs = tuple([x] + [p[k] for k in names])
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    if layout != "contiguous":
        inputs = (to_layout(inputs[0].detach(), layout).requires_grad_(True),) + inputs[1:]

    def fn(xx, *params):
        q = dict(zip(names, params))
        for k in p:
            q.setdefault(k, None)
        return call(nf, kind, xx, q, rm, rv, training=training, groups=groups)

    return fn, inputs


@pytest.mark.parametrize("kind,shape", GC_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(nf, backend, device, seed, kind, shape, training):
    if not dtype_supported(device, F64):
        pytest.skip("no float64 on this backend")
    fn, inputs = _gc_setup(nf, kind, shape, seed, device, training)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
def test_gradcheck_channels_last(nf, backend, device, seed, kind):
    if not dtype_supported(device, F64):
        pytest.skip("no float64 on this backend")
    fn, inputs = _gc_setup(nf, kind, (2, 4, 2, 3), seed, device, True, layout="cl")
    assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


_CLEAR = re.compile(r"double|second|twice|higher|order|differentiab", re.I)


@pytest.mark.parametrize("kind,shape", [("bin", (3, 2, 4)), ("bin", (4, 3)), ("iebn", (3, 2, 4)),
                                        ("assoc", (2, 4, 3))], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_order(nf, backend, device, seed, kind, shape, training):
    """gradgradcheck passes, or the double backward raises a clear RuntimeError.

    A wrong second derivative (GradcheckError) is a failure, and so is a silent zero.
    """
    if not dtype_supported(device, F64):
        pytest.skip("no float64 on this backend")
    fn, inputs = _gc_setup(nf, kind, shape, seed, device, training)
    try:
        ok = torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    except GradcheckError:
        raise
    except RuntimeError as exc:
        assert _CLEAR.search(str(exc)), f"unclear error for second-order gradients: {exc}"
        return
    assert ok


# ------------------------------------------------------------------ the public signatures
import inspect  # noqa: E402

_SIGNATURES = {
    ("functional", "batch_instance_norm"): [
        ("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
        ("bias", None), ("gate", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)],
    ("functional", "instance_enhancement_batch_norm"): [
        ("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
        ("bias", None), ("gate_weight", None), ("gate_bias", None), ("training", False),
        ("momentum", 0.1), ("eps", 1e-5)],
    ("functional", "assoc_norm"): [
        ("input", None), ("num_groups", None), ("encoder", None), ("decoder_mean", None),
        ("decoder_var", None), ("weight", None), ("bias", None), ("eps", 1e-5)],
    (None, "BatchInstanceNorm2d"): [
        ("num_features", None), ("eps", 1e-5), ("momentum", 0.1), ("affine", True),
        ("track_running_stats", True), ("device", None), ("dtype", None)],
    (None, "InstanceEnhancementBatchNorm2d"): [
        ("num_features", None), ("eps", 1e-5), ("momentum", 0.1),
        ("track_running_stats", True), ("device", None), ("dtype", None)],
    (None, "AssocNorm"): [
        ("num_groups", None), ("num_channels", None), ("embed_dim", None), ("eps", 1e-5),
        ("device", None), ("dtype", None)],
    (None, "param_groups"): [("module", None), ("lr", None), ("weight_decay", 0.0),
                             ("gate_lr_scale", 10.0)],
    (None, "convert"): [("module", None), ("to", None)],
    (None, "clip_gates_"): [("module", None)],
    (None, "attach_gate_clipping"): [("optimizer", None), ("module", None)],
}


@pytest.mark.parametrize("where,name", list(_SIGNATURES), ids=str)
def test_public_signature(nf, where, name):
    """Names, order and defaults exactly as issue 2 states them."""
    obj = getattr(nf.functional if where else nf, name)
    sig = inspect.signature(obj)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default)
           for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert got[:len(_SIGNATURES[(where, name)])] == _SIGNATURES[(where, name)], got
    for p in params[len(_SIGNATURES[(where, name)]):]:
        assert p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL,
                                                                      p.VAR_KEYWORD), p.name


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
def test_functional_keyword_call_and_param_grads_without_input_grad(nf, backend, device, seed,
                                                                    kind):
    """Keyword arguments by their documented names; x that needs no gradient still gives
    every parameter gradient."""
    shape = (4, 6, 3, 2)
    groups = 3 if kind == "assoc" else None
    p = _params(kind, 6, seed, device, groups=groups)
    for t in p.values():
        t.requires_grad_(True)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 1, torch.float32, device)
    fn = nf.functional
    if kind == "bin":
        y = fn.batch_instance_norm(input=x, running_mean=None, running_var=None,
                                   weight=p["weight"], bias=p["bias"], gate=p["gate"],
                                   training=True, momentum=0.1, eps=1e-5)
    elif kind == "iebn":
        y = fn.instance_enhancement_batch_norm(input=x, running_mean=None, running_var=None,
                                               weight=p["weight"], bias=p["bias"],
                                               gate_weight=p["gate_weight"],
                                               gate_bias=p["gate_bias"], training=True,
                                               momentum=0.1, eps=1e-5)
    else:
        y = fn.assoc_norm(input=x, num_groups=groups, encoder=p["encoder"],
                          decoder_mean=p["decoder_mean"], decoder_var=p["decoder_var"],
                          weight=p["weight"], bias=p["bias"], eps=1e-5)
    exp = oracles.run(kind, x, p, dy, training=True, num_groups=groups)
    grads = torch.autograd.grad(y, list(p.values()), dy)
    for (n, _), g in zip(p.items(), grads):
        assert_close_dtype(g, exp.grads[n], torch.float32, f"grad {n}")


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
def test_autocast_cpu_bfloat16(nf, backend, device, seed, kind):
    """Under autocast a conv emits bfloat16; the layer takes it with float32 parameters and
    returns bfloat16 (as batch norm does), with float32 parameter gradients."""
    if device != "cpu":
        pytest.skip("cpu autocast")
    conv = torch.nn.Conv2d(3, 6, 1)
    if kind == "assoc":
        layer = nf.AssocNorm(3, 6, embed_dim=2)
    else:
        layer = (nf.BatchInstanceNorm2d if kind == "bin" else nf.IEBN2d)(6)
    x = make_input((4, 3, 5, 5), seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        exp = oracles.module_step(layer, h.detach())
        y = layer(h)
    assert y.dtype == torch.bfloat16
    assert_close_dtype(y, exp.y, torch.bfloat16, "autocast output")
    y.float().sum().backward()
    for n, prm in layer.named_parameters():
        assert prm.grad is not None and prm.grad.dtype == torch.float32, n


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc", "ilm"])
def test_autocast_leaves_a_float32_layer_in_float32(nf, backend, device, seed, kind):
    """A float32 input under autocast(bfloat16): the layer is no autocast op, so its statistics
    and coefficients stay float32 (docs/layers.md, Precision), forward and backward. AssocNorm's
    and ILM-Norm's meta networks are matmuls, which autocast would run in bfloat16 (~1e-3 off)."""
    c = 8
    layer = {"bin": lambda: nf.BatchInstanceNorm2d(c), "iebn": lambda: nf.IEBN2d(c),
             "assoc": lambda: nf.AssocNorm(4, c, embed_dim=3),
             "ilm": lambda: nf.ILMNorm(c, num_groups=4, key_group_size=2, reduction=2)}[kind]()
    torch.manual_seed(seed)
    with torch.no_grad():  # decoders start at zero: random ones make the meta network count
        for p in layer.parameters():
            p.normal_(0.3, 0.5)
    layer = layer.to(device)
    x = make_input((4, c, 5, 3), seed, torch.float32, device, scale=3.0, offset=1.0)
    dy = randn(x.shape, seed + 1, torch.float32, device)
    results = []
    for autocast in (False, True):
        m = copy.deepcopy(layer).train()
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
            grads = torch.autograd.grad(y, [xi, *m.parameters()], dy)
        assert y.dtype == torch.float32
        results.append((y, *grads))
    for name, got, want in zip(["output", "dx", *[n for n, _ in layer.named_parameters()]],
                               results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{kind} {name}")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_export_of_the_meta_networks_holds_no_autocast_region(device):
    """Outside autocast the coefficient step enters no autocast context: an exported program
    stays plain ATen ops (no wrap_with_autocast region), also with meta tensors, where
    torch.autocast itself is refused."""
    import normfuse
    m = torch.nn.Sequential(
        normfuse.AssocNorm(2, 4, embed_dim=3),
        normfuse.ILMNorm(4, num_groups=2, key_group_size=2, reduction=2)).to(device)
    x = torch.randn(2, 4, 5, 3, device=device)
    for training in (False, True):
        ep = torch.export.export(m.train(training), (x,))
        regions = [str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and "autocast" in str(n.target)]
        assert not regions, regions
