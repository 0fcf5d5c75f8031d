"""Portable export (README, "Export and deployment"): a model holding BIN, IEBN, AssocNorm and
ILMNorm exports to a program of standard ATen ops that computes what eager computes (outputs,
running statistics, gradients), and to ONNX that onnxruntime runs.

* ``torch.export.export`` under the default backend ("auto") traces the "torch" backend: no
  normfuse op in the program at all;
* a program exported under an explicit backend holds the normfuse ops;
  ``normfuse.export.portable`` decomposes them (``torch.ops.normfuse.*`` and
  ``torch.ops.normfuse_triton.*``) into the "torch" backend's implementation.
"""
import copy
import importlib.util
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import normfuse
import normfuse.export as nfx
from normfuse import torch_backend

ROOT = Path(__file__).resolve().parent.parent
# Shapes: N = 3, C = 6 (AssocNorm: 3 groups of 2 channels), planes of 4 x 3 after the conv.
SHAPE = (3, 3, 6, 5)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}
PORTABLE_NAMESPACES = ("aten", "prims")
KERNEL_BACKENDS = [b for b in ("cpu", "torch") if b in normfuse.available_backends()]


def _model(dtype=torch.float32, seed=0):
    """Conv -> BIN -> ReLU -> IEBN -> AssocNorm with its ReLU fused -> ILMNorm (every layer of
    the package, and the fused activation), every parameter and running statistic random (gates
    inside (0, 1), the AssocNorm and ILM decoders non-zero), so each coefficient path matters."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), normfuse.BatchInstanceNorm2d(6), nn.ReLU(),
                          normfuse.IEBN2d(6), normfuse.AssocNorm(3, 6, activation="relu"),
                          normfuse.ILMNorm(6, num_groups=3, key_group_size=2, reduction=2)
                          ).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) if name.endswith("gate")
                    else 0.5 * torch.randn(p.shape, generator=g, dtype=dtype) + 0.1)
        for layer in (model[1], model[3]):
            layer.running_mean.copy_(torch.randn(6, generator=g, dtype=dtype))
            layer.running_var.copy_(torch.rand(6, generator=g, dtype=dtype) + 0.5)
            layer.num_batches_tracked.fill_(3)
    return model


def _input(seed, dtype=torch.float32, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(shape, generator=g, dtype=dtype) + 0.3).requires_grad_()


def _targets(ep):
    """Every op a node of ``ep`` (or of a graph nested in it) calls, including ops passed to
    higher-order ops such as ``auto_functionalized``."""
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function":
                    yield node.target
                    yield from (a for a in node.args if isinstance(a, torch._ops.OperatorBase))


def _assert_portable(ep):
    """Only ATen / prims ops (and tuple indexing): no normfuse op, no higher-order op."""
    bad = {str(t) for t in _targets(ep)
           if t is not operator.getitem
           and not (isinstance(t, torch._ops.OpOverload) and t.namespace in PORTABLE_NAMESPACES)}
    assert not bad, f"non-ATen ops left in the exported program: {sorted(bad)}"
    assert nfx.normfuse_ops(ep) == []


def _namespaces(ep):
    return {t.namespace for t in _targets(ep) if isinstance(t, torch._ops.OpOverload)}


def _run_steps(module, inputs):
    """Forward + backward per input: outputs, input gradients, parameter gradients."""
    outs = []
    for x in inputs:
        x = x.detach().clone().requires_grad_()
        y = module(x)
        y.backward(torch.cos(y.detach()))
        outs.append((y.detach(), x.grad))
    grads = {n: p.grad for n, p in module.named_parameters()}
    return outs, grads


def _compare(exported, eager, inputs, dtype):
    """Run ``inputs`` through both; outputs, dx, parameter gradients and buffers must match."""
    tol = TOL[dtype]
    got, got_grads = _run_steps(exported, inputs)
    want, want_grads = _run_steps(eager, inputs)
    for (y, dx), (y_ref, dx_ref) in zip(got, want):
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(dx, dx_ref, **tol)
    for name, g_ref in want_grads.items():
        torch.testing.assert_close(got_grads[name], g_ref, **tol, msg=name)
    return _assert_buffers_match(exported, eager, dtype)


def _assert_buffers_match(module, eager, dtype):
    """Running statistics close, ``num_batches_tracked`` equal; returns ``module``'s buffers."""
    buffers = dict(module.named_buffers())
    assert buffers.keys() == dict(eager.named_buffers()).keys()
    for name, b_ref in eager.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers[name], b_ref), name
        else:
            torch.testing.assert_close(buffers[name], b_ref, **TOL[dtype], msg=name)
    return buffers


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_under_auto_has_no_normfuse_ops(training):
    """The default backend: the program is portable as exported, and stays so through the
    Core ATen decompositions.  Gradients flow through it (float64, tight tolerances)."""
    dtype = torch.float64
    model = _model(dtype).train(training)
    eager, before = copy.deepcopy(model), copy.deepcopy(model)
    ep = torch.export.export(model, (_input(1, dtype),))
    assert not _namespaces(ep) & set(nfx.NAMESPACES)
    _assert_portable(ep.run_decompositions())
    # Eager under "auto" runs the fused kernels; the program, the "torch" backend's ops.
    buffers = _compare(ep.module(), eager, [_input(2, dtype), _input(3, dtype)], dtype)
    if training:  # two steps, each counted and folded into the running statistics
        assert int(buffers["1.num_batches_tracked"]) == 5
        assert not torch.equal(buffers["1.running_mean"], before[1].running_mean)
    else:
        for name, b in before.named_buffers():
            assert torch.equal(buffers[name], b), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_portable_matches_eager(backend, training):
    """A program exported under an explicit backend, made portable: only ATen ops, same
    outputs and running statistics as eager on that backend, over two steps."""
    dtype = torch.float32
    model = _model(dtype, seed=4).train(training)
    eager = copy.deepcopy(model)
    with normfuse.use_backend(backend):
        ep = torch.export.export(model, (_input(5),))
        if backend == "cpu":  # the program holds our ops: the decomposition has work to do
            assert nfx.normfuse_ops(ep) == sorted(
                f"normfuse::{n}" for n in ("moments", "affine_apply", "bin_coefficients",
                                           "iebn_coefficients", "assoc_coefficients",
                                           "ilm_coefficients"))
        portable = nfx.portable(ep)
        _assert_portable(portable)
        mutated = {s.target for s in portable.graph_signature.output_specs
                   if s.kind == torch.export.graph_signature.OutputKind.BUFFER_MUTATION}
        if training:
            assert mutated == {f"{i}.{b}" for i in (1, 3)
                               for b in ("running_mean", "running_var", "num_batches_tracked")}
        else:
            assert mutated == set()
        inputs = [_input(6), _input(7)]
        module = portable.module()
        with torch.no_grad():
            got = [module(x) for x in inputs]
            want = [eager(x) for x in inputs]
    for y, y_ref in zip(got, want):
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
    _assert_buffers_match(module, eager, dtype)


def test_decompositions_are_the_torch_backend():
    """Every registered normfuse op (both namespaces) maps to the "torch" backend's function
    of the same name: the math is not written a second time."""
    table = nfx.decompositions()
    by_namespace = {}
    for op, fn in table.items():
        assert op.namespace in nfx.NAMESPACES
        name = op.name().split("::")[1]
        assert fn is getattr(torch_backend, name)
        by_namespace.setdefault(op.namespace, set()).add(name)
    expected = set(torch_backend.__all__)
    if "cpu" in normfuse.available_backends():
        assert by_namespace["normfuse"] == expected
    if normfuse.backends._triton()[0] is not None:  # normfuse.triton_kernels imports here
        assert by_namespace["normfuse_triton"] == expected


@pytest.mark.skipif("cpu" not in normfuse.available_backends(),
                    reason="needs normfuse._C to export a program holding normfuse ops")
def test_portable_decomposes_triton_coefficient_ops():
    """``torch.ops.normfuse_triton.*`` decompose too; here the two that mutate their arguments
    (running statistics, ``num_batches_tracked``), which take another path than the table.

    Exporting through the Triton kernels needs a GPU: without one they run in Triton's
    interpreter, which cannot take the fake tensors of tracing.  So the coefficient ops of a
    program exported with the "cpu" backend are swapped for their Triton twins (same
    schemas); only the mutating ones, because retracing runs the fake implementation of a
    functional op (for a Triton op: its kernels) before the table replaces it."""
    module, reason = normfuse.backends._triton()
    if module is None:
        pytest.skip(reason)
    model = _model(seed=8).train()
    eager = copy.deepcopy(model)
    with normfuse.use_backend("cpu"), torch.no_grad():
        ep = torch.export.export(model, (_input(9),))
        want = eager(_input(10))
    swapped = ("bin_coefficients", "iebn_coefficients")
    for node in ep.graph.nodes:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "normfuse":
            name = target.name().split("::")[1]
            if name in swapped:
                node.target = getattr(torch.ops.normfuse_triton, name).default
    ep.graph_module.recompile()
    assert {f"normfuse_triton::{n}" for n in swapped} <= set(nfx.normfuse_ops(ep))
    portable = nfx.portable(ep, decomp_table={})
    _assert_portable(portable)
    module = portable.module()
    with torch.no_grad():
        got = module(_input(10))
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    _assert_buffers_match(module, eager, torch.float32)


def test_strict_export_as_first_call(monkeypatch):
    """Strict (Dynamo) export works even when it is the process's first normfuse call (the
    backend setting is validated lazily, at the first call, and Dynamo must trace that)."""
    monkeypatch.setattr(normfuse.backends._state, "checked", False)
    model = _model(seed=11).eval()
    x = _input(12)
    ep = torch.export.export(model, (x,), strict=True)
    _assert_portable(ep.run_decompositions())
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), **TOL[torch.float32])


ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime")
                if importlib.util.find_spec(m) is None]
ONNX_ROUTES = ["model", "portable-program"]


def onnx_round_trip(model, x, new_inputs, route, path):
    """Export the eval-mode ``model``, traced on ``x``, to ONNX at ``path`` and check that
    onnxruntime on the CPU matches PyTorch on each of ``new_inputs`` within float32 tolerance.
    ``route``: "model", the module itself; "portable-program", a program exported with the
    "cpu" backend (it holds normfuse's kernels), made portable first.  Also for tests/test_ilm."""
    if ONNX_MISSING:
        pytest.skip(f"ONNX export needs {ONNX_MISSING} (pip install -e '.[export]')")
    import onnxruntime

    x = x.detach()
    if route == "model":
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    else:
        if "cpu" not in normfuse.available_backends():
            pytest.skip("needs normfuse._C to export a program holding normfuse ops")
        with normfuse.use_backend("cpu"):
            ep = torch.export.export(model, (x,))
        assert nfx.normfuse_ops(ep), "the cpu backend's kernels should be in the program"
        ep = nfx.portable(ep)
        _assert_portable(ep)
        torch.onnx.export(ep, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x_new in new_inputs:
        x_new = x_new.detach()
        (y,) = session.run(None, {session.get_inputs()[0].name: x_new.numpy()})
        with torch.no_grad():
            want = model(x_new)
        torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("route", ONNX_ROUTES)
def test_onnx_round_trip(route, tmp_path):
    """``torch.onnx.export(model, (x,), path, dynamo=True)`` of the model holding every layer
    runs in onnxruntime and matches PyTorch, by both routes of ``onnx_round_trip``."""
    onnx_round_trip(_model(seed=13).eval(), _input(14), [_input(15), _input(16)], route,
                    tmp_path / "model.onnx")


# Batch, height and width all dynamic; the other sizes differ in each (and in H * W, the
# coefficient ops' plane_size: an `int` in their schemas pinned it to the traced 6 x 5).
DYNAMIC = {"input": {0: Dim("batch", min=2, max=64), 2: Dim("h", min=4, max=64),
                     3: Dim("w", min=4, max=64)}}
OTHER_SIZES = [(5, 3, 4, 7), (2, 3, 9, 9)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
def test_dynamic_shapes(backend, training):
    """Exported with a dynamic batch, height and width, the program (made portable) computes
    what eager computes at other sizes, running statistics included."""
    model = _model(seed=20).train(training)
    eager = copy.deepcopy(model)
    with normfuse.use_backend(backend):
        ep = torch.export.export(model, (_input(21).detach(),), dynamic_shapes=DYNAMIC)
    module = nfx.portable(ep).module()
    inputs = [_input(22 + i, shape=shape) for i, shape in enumerate(OTHER_SIZES)]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(module(x), eager(x), **TOL[torch.float32])
    _assert_buffers_match(module, eager, torch.float32)


def test_onnx_dynamic_shapes(tmp_path):
    """A portable program with dynamic batch, height and width, through ONNX: onnxruntime
    matches PyTorch at other sizes.  (Not through onnx_round_trip: a dynamic program also holds
    the size arithmetic of its symbolic shapes, which _assert_portable rightly counts as
    non-ATen.)"""
    if ONNX_MISSING:
        pytest.skip(f"ONNX export needs {ONNX_MISSING} (pip install -e '.[export]')")
    if "cpu" not in normfuse.available_backends():
        pytest.skip("needs normfuse._C to export a program holding normfuse ops")
    import onnxruntime

    model = _model(seed=23).eval()
    with normfuse.use_backend("cpu"):
        ep = torch.export.export(model, (_input(24).detach(),), dynamic_shapes=DYNAMIC)
    path = str(tmp_path / "dynamic.onnx")
    torch.onnx.export(nfx.portable(ep), dynamo=True, verbose=False, f=path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for i, shape in enumerate(OTHER_SIZES):
        x = _input(25 + i, shape=shape).detach()
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpu" not in normfuse.available_backends(),
                    reason="needs normfuse._C to export a program holding normfuse ops")
def test_saved_programs_load_in_a_fresh_process_after_import_normfuse(tmp_path):
    """README: a program holding normfuse ops "runs forward where normfuse is installed".  A
    fresh process that imports normfuse (and calls nothing of it) loads a saved program
    (torch.export.load) and a TorchScript trace (torch.jit.load) and gets the same outputs:
    the ops register at import, not at the first layer call.  ILMNorm on the cpu backend is
    one ``normfuse::ilm_layer`` op too, so the trace holds every layer."""
    model = _model(seed=30).eval()
    traceable = model
    x = _input(31).detach()
    with normfuse.use_backend("cpu"), torch.no_grad():
        ep = torch.export.export(model, (x,))
        traced = torch.jit.trace(traceable, x)
        want, want_traced = model(x), traceable(x)
    assert nfx.normfuse_ops(ep)
    assert "normfuse::ilm_layer" in str(traced.inlined_graph)
    torch.export.save(ep, str(tmp_path / "program.pt2"))
    traced.save(str(tmp_path / "traced.pt"))
    torch.save({"x": x, "want": want, "want_traced": want_traced}, str(tmp_path / "ref.pt"))
    code = (
        "import sys, torch, normfuse\n"
        "d = sys.argv[1]\n"
        "ref = torch.load(d + '/ref.pt')\n"
        "with torch.no_grad():\n"
        "    y = torch.export.load(d + '/program.pt2').module()(ref['x'])\n"
        "    y_traced = torch.jit.load(d + '/traced.pt')(ref['x'])\n"
        "assert torch.equal(y, ref['want']), (y - ref['want']).abs().max()\n"
        "assert torch.equal(y_traced, ref['want_traced'])\n"
        "print('LOADED')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0 and "LOADED" in res.stdout, res.stderr[-3000:]


def test_ilm_trace_of_the_torch_backend_keeps_float64():
    """Under torch.jit.trace ILM-Norm's group sizes come from aten::size as int64 tensors and
    the Bessel factor n / (n - 1) was a float32 division: a float64 trace was ~1e-7 off
    (outputs and gradients).  Now computed in the statistics' dtype."""
    model = _model(torch.float64, seed=40)[5:]
    x = _input(41, torch.float64, shape=(3, 6, 5, 4)).detach()
    with normfuse.use_backend("torch"):
        traced = torch.jit.trace(model, x, check_trace=False)
        for seed in (42, 43):
            x = _input(seed, torch.float64, shape=(3, 6, 5, 4))
            y = traced(x)
            want = model(x)
            torch.testing.assert_close(y, want, rtol=0, atol=1e-13)
            dy = torch.randn_like(y)
            got = torch.autograd.grad(y, [x, *model.parameters()], dy)
            exp = torch.autograd.grad(want, [x, *model.parameters()], dy)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [normfuse.BatchInstanceNorm2d, normfuse.IEBN2d])
def test_training_program_of_the_torch_backend_saves_and_loads(cls, tmp_path):
    """The README's export example in training mode on the default backend (the "torch" ops,
    traced): the saved program loads (a no_grad block around the running-statistics update
    was recorded as a node without outputs, which torch.export.load refused) and updates the
    running statistics as the module does."""
    torch.manual_seed(0)
    m = cls(4).train()
    x = _input(40, shape=(3, 4, 5, 2)).detach()
    ep = torch.export.export(copy.deepcopy(m), (x,))
    torch.export.save(ep, str(tmp_path / "train.pt2"))
    loaded = torch.export.load(str(tmp_path / "train.pt2")).module()
    want = m(x)
    torch.testing.assert_close(loaded(x), want)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(loaded, name), getattr(m, name), msg=name)


@pytest.mark.parametrize("cls", [normfuse.BatchInstanceNorm2d, normfuse.IEBN2d])
def test_jit_trace_in_training_updates_running_statistics_once(cls, tmp_path):
    """torch.jit.trace on the "torch" backend records the layer's PyTorch ops (the
    autograd.Function's update was recorded twice: inside it and as its own ops, so each
    traced call moved the running statistics twice), and the trace saves and loads; the
    "triton" backend, whose layer is that Function, refuses such a trace by name."""
    torch.manual_seed(0)
    m = cls(4).train()
    x = _input(41, shape=(3, 4, 5, 2)).detach()
    with normfuse.use_backend("torch"):
        traced = torch.jit.trace(copy.deepcopy(m), x, check_trace=False)
    traced.save(str(tmp_path / "traced.pt"))
    traced = torch.jit.load(str(tmp_path / "traced.pt"))
    start = {k: v.clone() for k, v in m.state_dict().items()}
    traced.load_state_dict(start)
    for _ in range(2):
        torch.testing.assert_close(traced(x), m(x))
    for name, value in m.state_dict().items():
        torch.testing.assert_close(traced.state_dict()[name], value, msg=name)
    if "triton" in normfuse.available_backends():
        with normfuse.use_backend("triton"), pytest.raises(
                RuntimeError, match=rf"{cls.__name__}: torch.jit.trace of a training-mode layer"):
            torch.jit.trace(copy.deepcopy(m), x, check_trace=False)


def test_torchscript_script_is_refused_with_a_clear_error():
    """torch.jit.script cannot compile the layers' Python dispatch; TorchScript asks
    __prepare_scriptable__ first, which names the layer and the alternatives."""
    for layer in (normfuse.BatchInstanceNorm2d(4), normfuse.IEBN2d(4), normfuse.AssocNorm(2, 4),
                  normfuse.ILMNorm(4, num_groups=2, key_group_size=2), normfuse.SyncIEBN(4)):
        with pytest.raises(RuntimeError, match=rf"{type(layer).__name__}: torch.jit.script "
                                               r"cannot compile normfuse layers; use torch.export"):
            torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), layer))
