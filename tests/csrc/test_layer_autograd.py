"""The whole-layer ops' backward node (csrc/layer_autograd.cpp, ``LayerBackward``): a C++ autograd
node written as PyTorch's generated ones are, so it must keep what torch's autograd promises for
any node, beyond the gradients' values (tests/test_numerics.py checks those against the oracles):

* gradients w.r.t. any subset of inputs equal the full backward's, and only what is asked for is
  computed (``autograd.grad`` trims edges; the node reads ``task_should_compute_output``);
* a second backward without ``retain_graph`` is refused, with it gives the same gradients;
* an input modified in place after the forward is refused (saved-tensor version check);
* ``saved_tensors_hooks`` see every saved tensor, and what they unpack is what is used;
* compiled autograd (``torch._dynamo.compiled_autograd``) runs the node, as an opaque call, and
  gets the eager gradients, also where only the filled saved slots tell two calls apart;
* ``node_creation_hook``s see the node; an undefined incoming gradient gives zero gradients;
* dual tensors (forward-mode AD) and an empty plane are refused before anything runs;
* the running statistics written in training get version bumps (eval mode: none);
* the node's name says which layer it is (profiler traces, ``grad_fn``).

Every test runs on the CPU ("cpu" backend) and, where a GPU and the CUDA kernels are present, on
CUDA ("cuda" backend): the node is device-generic, the ops it calls are not.
"""
from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse import _autograd, _extension

pytestmark = pytest.mark.skipif(not _extension.HAS_CPU_KERNELS, reason="needs normfuse._C")
C = 6
_DEV = "cpu"  # the device of the current test (the autouse fixture below), and its backend


@pytest.fixture(autouse=True, params=["cpu", "cuda"])
def _device(request):
    global _DEV
    if request.param == "cuda" and not (torch.cuda.is_available() and _extension.HAS_CUDA_KERNELS):
        pytest.skip("needs a GPU and normfuse's CUDA kernels")
    if (request.node.callspec.params.get("name") == "ilm"
            and request.param not in _autograd._ILM_KERNELS):
        pytest.skip("the ILM layers call the whole-layer op where its coefficient kernels are "
                    "trusted (normfuse/_autograd.py, _ILM_KERNELS)")
    _DEV = request.param
    yield
    _DEV = "cpu"


def _compiled():
    """The compiled backend of the test's device."""
    return normfuse.use_backend(_DEV)


LAYERS = [
    ("bin", lambda: normfuse.BatchInstanceNorm2d(C), "NormfuseBinLayerBackward"),
    ("iebn", lambda: normfuse.InstanceEnhancementBatchNorm2d(C), "NormfuseIebnLayerBackward"),
    ("assoc", lambda: normfuse.AssocNorm(3, C), "NormfuseAssocLayerBackward"),
    ("ilm", lambda: normfuse.ILMNorm(C, num_groups=3, key_group_size=2),
     "NormfuseIlmLayerBackward"),
]
IDS = [name for name, _, _ in LAYERS]


def _layer(build, seed=0, relu=False, eval_mode=False):
    torch.manual_seed(seed)
    m = build().to(_DEV)
    if relu:
        m.activation = "relu"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # parameters away from their initial values (zeros, ones, 0.5 gates)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(_DEV) * 0.3)
        for name in ("running_mean", "running_var"):
            if getattr(m, name, None) is not None:
                getattr(m, name).uniform_(0.5, 1.5)
    return m.eval() if eval_mode else m.train()


def _data(seed=0, shape=(3, C, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.3 + 0.2).to(_DEV).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(_DEV)
    return x, dy


def _grads(m, x, dy, **kw):
    with _compiled():
        y = m(x)
    return torch.autograd.grad(y, [x] + list(m.parameters()), dy, **kw)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_node_is_ours_and_named(name, build, node):
    m = _layer(build)
    x, _ = _data()
    with _compiled():
        y = m(x)
    assert y.grad_fn.name() == node
    # one edge per input slot: x and five parameter slots (empty where the layer has fewer)
    edges = y.grad_fn.next_functions
    assert len(edges) == 6
    assert sum(fn is not None for fn, _ in edges) == 1 + len(list(m.parameters()))


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
@pytest.mark.parametrize("relu", [False, True])
def test_subsets_of_inputs_get_the_full_backwards_gradients(name, build, node, relu):
    m = _layer(build, seed=3, relu=relu)
    x, dy = _data(seed=4)
    full = _grads(m, x, dy)
    inputs = [x] + list(m.parameters())
    for i, t in enumerate(inputs):
        with _compiled():
            y = m(x)
        (only,) = torch.autograd.grad(y, [t], dy)
        torch.testing.assert_close(only, full[i], rtol=0, atol=0)
    # and .backward() accumulates the same values into .grad
    for t in inputs:
        t.grad = None
    with _compiled():
        m(x).backward(dy)
    for t, g in zip(inputs, full):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def _ops_run(m, x, dy, wrt):
    from torch.profiler import ProfilerActivity, profile
    with _compiled():
        y = m(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(y, wrt, dy)
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_input_gradient_computed_only_when_asked_for(name, build, node):
    m = _layer(build, seed=13)
    x, dy = _data(seed=14)
    params = list(m.parameters())
    # the ops that produce dx: a whole backward direction (on the CPU its inner kernels run
    # without the dispatcher; a device may run it as one kernel), or backward_apply itself
    dx_ops = {"normfuse::backward_apply", *(f"normfuse::{layer}_layer_backward"
                                            for layer in ("bin", "iebn", "assoc", "ilm"))}
    assert dx_ops & _ops_run(m, x, dy, [x])
    assert not dx_ops & _ops_run(m, x, dy, params)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_incoming_gradient_in_any_layout(name, build, node):
    """A channels-last layer's incoming gradient: channels-last (the usual case) is read as it is,
    with no copy and no view op; contiguous, strided or expanded ones are copied into x's layout
    first. All give the same gradients."""
    m = _layer(build, seed=21)
    x, dy = _data(seed=22)
    x = x.detach().movedim(1, -1).contiguous().movedim(-1, 1).requires_grad_(True)
    wrt = [x] + list(m.parameters())
    dy_cl = dy.movedim(1, -1).contiguous().movedim(-1, 1)
    full = _grads(m, x, dy_cl)
    torch.testing.assert_close(full, _grads(m, x, dy.contiguous()), rtol=0, atol=0)
    column = dy[:, :, :, :1]
    for other in (dy.contiguous(), dy.transpose(2, 3).contiguous().transpose(2, 3),
                  column.expand_as(dy)):
        want = _grads(m, x, other.movedim(1, -1).contiguous().movedim(-1, 1))
        for a, b in zip(_grads(m, x, other), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert full[0].movedim(1, -1).is_contiguous()  # dx in x's layout
    copies = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::movedim"}
    assert not copies & _ops_run(m, x, dy_cl, wrt)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_second_backward_needs_retain_graph(name, build, node):
    m = _layer(build, seed=5)
    x, dy = _data(seed=6)
    with _compiled():
        y = m(x)
    first = torch.autograd.grad(y, [x] + list(m.parameters()), dy, retain_graph=True)
    second = torch.autograd.grad(y, [x] + list(m.parameters()), dy)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y, x, dy)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_input_modified_in_place_after_forward_is_refused(name, build, node):
    m = _layer(build, seed=7)
    x, dy = _data(seed=8)
    h = x * 1.0  # a non-leaf, so it can be modified in place
    with _compiled():
        y = m(h)
    with torch.no_grad():
        h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, x, dy)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_saved_tensors_hooks_see_what_is_saved(name, build, node):
    m = _layer(build, seed=9)
    x, dy = _data(seed=10)
    expected = _grads(m, x, dy)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # the backward must use what unpack returns, not the original

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        got = _grads(m, x, dy)
    # x, the two moments and every parameter, at least
    assert len(packed) >= 3 + len(list(m.parameters())) and tuple(x.shape) in packed
    assert len(unpacked) == len(packed)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _compiled_autograd():
    try:
        from torch._dynamo import compiled_autograd
    except Exception as exc:  # pragma: no cover - torch without dynamo
        pytest.skip(f"compiled autograd unavailable: {exc}")
    return compiled_autograd


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
@pytest.mark.parametrize("relu,eval_mode", [(False, False), (True, False), (False, True)])
def test_compiled_autograd_gets_the_eager_gradients(name, build, node, relu, eval_mode):
    if eval_mode and name in ("assoc", "ilm"):
        pytest.skip("AssocNorm and ILM-Norm behave the same in train and eval")
    compiled_autograd = _compiled_autograd()
    m = _layer(build, seed=11, relu=relu, eval_mode=eval_mode)
    x, dy = _data(seed=12)
    inputs = [x] + list(m.parameters())
    expected = _grads(m, x, dy)
    for t in inputs:
        t.grad = None
    with _compiled():
        y = m(x)
    with compiled_autograd._enable(lambda gm: gm):  # the graph as traced, run as is
        y.backward(dy)
    for t, g in zip(inputs, expected):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def _op_call(name, m, x):
    """The whole-layer op called directly (the modules route dual tensors to NormFunction)."""
    ops = torch.ops.normfuse
    if name == "bin":
        return ops.bin_layer(x, m.gate, m.weight, m.bias, m.running_mean, m.running_var, True, 0.1,
                             m.eps, m.num_batches_tracked, False)
    if name == "iebn":
        return ops.iebn_layer(x, m.gate_weight, m.gate_bias, m.weight, m.bias, m.running_mean,
                              m.running_var, True, 0.1, m.eps, m.num_batches_tracked, False)
    if name == "ilm":
        return ops.ilm_layer(x, m.num_groups, m.encoder, m.decoder_weight, m.decoder_bias,
                             m.weight, m.bias, m.eps, False)
    return ops.assoc_layer(x, m.num_groups, m.encoder, m.decoder_mean, m.decoder_var, m.weight,
                           m.bias, m.eps, False)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(name, build, node, requires_grad):
    import torch.autograd.forward_ad as fwAD
    m = _layer(build, seed=15)
    x, _ = _data(seed=16)
    x = x.detach().requires_grad_(requires_grad)
    assert _op_call(name, m, x).shape == x.shape  # the direct call itself is right
    counter = m.num_batches_tracked.clone() if hasattr(m, "num_batches_tracked") else None
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match=f"normfuse::{name}_layer: forward-mode AD"):
            _op_call(name, m, dual)
    if counter is not None:  # refused before anything ran
        assert torch.equal(m.num_batches_tracked, counter)


def test_compiled_autograd_cache_key_tells_filled_slots_apart():
    """Two BIN calls with the same edges but different saved slots (running statistics and no
    affine parameters, or frozen affine parameters and no running statistics), under
    saved_tensors_hooks, where a saved tensor adds nothing to compiled autograd's cache key: the
    second must not reuse the first's compiled graph (it read the gate as running_mean)."""
    compiled_autograd = _compiled_autograd()
    from normfuse import functional as F
    g = torch.Generator().manual_seed(17)
    x = torch.randn(3, C, 5, 4, generator=g).to(_DEV).requires_grad_(True)
    dy = torch.randn(3, C, 5, 4, generator=g).to(_DEV)
    gate = torch.rand(C, generator=g).to(_DEV).requires_grad_(True)
    weight = (torch.randn(C, generator=g) * 0.3 + 1).to(_DEV)
    bias = (torch.randn(C, generator=g) * 0.3).to(_DEV)
    rm, rv = (torch.randn(C, generator=g) * 0.2).to(_DEV), (torch.rand(C, generator=g) + 0.5).to(_DEV)
    calls = [lambda: F.batch_instance_norm(x, rm, rv, None, None, gate),
             lambda: F.batch_instance_norm(x, None, None, weight, bias, gate)]
    for call in calls:
        with _compiled():
            expected = torch.autograd.grad(call(), [x, gate], dy)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                y = call()
        x.grad = gate.grad = None
        with compiled_autograd._enable(lambda gm: gm):
            y.backward(dy)
        torch.testing.assert_close(x.grad, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(gate.grad, expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_node_creation_hooks_see_the_node(name, build, node):
    hook = getattr(torch.autograd.graph, "node_creation_hook", None)
    if hook is None:
        pytest.skip("this torch has no torch.autograd.graph.node_creation_hook")
    m = _layer(build, seed=18)
    x, _ = _data(seed=19)
    seen = []
    with hook(lambda n: seen.append(n.name())):
        with _compiled():
            m(x)
    assert seen.count(node) == 1, seen


class _NoGradient(torch.autograd.Function):
    """The identity whose backward gives no gradient (None) to its input."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_undefined_incoming_gradient_gives_zero_gradients(name, build, node):
    """As torch::autograd::Function (materialize_grads) and the torch backend's NormFunction:
    the inputs get zero gradients, not None (an optimizer skips a parameter whose grad is None,
    and so its momentum and weight decay)."""
    m = _layer(build, seed=20)
    x, dy = _data(seed=21)
    inputs = [x] + list(m.parameters())
    for backend in (_DEV, "torch"):
        for t in inputs:
            t.grad = None
        with normfuse.use_backend(backend):
            _NoGradient.apply(m(x)).backward(dy)
        for t in inputs:
            assert t.grad is not None and t.grad.shape == t.shape, backend
            assert not t.grad.any(), backend


def _running(m):
    return [m.running_mean, m.running_var, m.num_batches_tracked]


@pytest.mark.parametrize("name,build,node", LAYERS[:2], ids=IDS[:2])
@pytest.mark.parametrize("path", ["module", "NormFunction"])
def test_running_statistics_written_in_training_bump_their_versions(name, build, node, path,
                                                                    monkeypatch):
    """Written in place below autograd, they get the version bump that nn.BatchNorm's get: a
    graph that saved them (eval mode) refuses a backward after a training step changed them,
    instead of silently reading the new values; eval mode itself bumps nothing."""
    from normfuse import _autograd
    if path == "NormFunction":  # the compiled backend's ops one by one (tracing, old builds)
        monkeypatch.setattr(_autograd, "_FUSED", {})
        monkeypatch.setattr(_autograd, "_STEPS", (None, None, None))
    m = _layer(build, seed=22, eval_mode=True)
    x, dy = _data(seed=23)
    expected = [t._version for t in _running(m)]
    with _compiled():
        y = m(x)
        torch.autograd.grad(m(x), x, dy)  # an eval graph's own backward is fine
        assert [t._version for t in _running(m)] == expected  # eval: read only
        assert y.grad_fn.name() == (node if path == "module" else "NormFunctionBackward")
        m.train()
        m(x.detach() * 3 + 1)
        m.eval()
    assert all(t._version > v for t, v in zip(_running(m), expected))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, x, dy)


@pytest.mark.parametrize("op", ["bin_coefficients", "iebn_coefficients"])
def test_coefficient_ops_bump_written_arguments_only_in_training(op):
    m = _layer(LAYERS[0 if op.startswith("bin") else 1][1], seed=24)
    x, _ = _data(seed=25)
    with _compiled():
        m(x)  # loads the ops
    mean, m2 = torch.ops.normfuse.moments(x.detach())
    gates = [m.gate] if op.startswith("bin") else [m.gate_weight, m.gate_bias]
    for training in (False, True):
        before = [t._version for t in _running(m)]
        with torch.no_grad():
            getattr(torch.ops.normfuse, op)(mean, m2, 20, *gates, m.weight, m.bias,
                                            m.running_mean, m.running_var, training, 0.1, 1e-5,
                                            m.num_batches_tracked)
        after = [t._version for t in _running(m)]
        assert after == [v + training for v in before], (training, before, after)


@pytest.mark.parametrize("name,build,node", LAYERS, ids=IDS)
def test_empty_plane_is_refused_by_the_layer_op_by_name(name, build, node):
    m = _layer(build, seed=26)
    x, _ = _data(seed=27)
    with _compiled():
        m(x)  # loads the ops
    counter = m.num_batches_tracked.clone() if hasattr(m, "num_batches_tracked") else None
    with pytest.raises(RuntimeError, match=f"normfuse::{name}_layer: input must not have an "
                                           r"empty spatial extent, got shape \[3, 6, 0\]"):
        _op_call(name, m, torch.randn(3, C, 0, device=_DEV))
    if counter is not None:
        assert torch.equal(m.num_batches_tracked, counter)


@pytest.mark.parametrize("relu", [False, True])
def test_whole_layer_ops_opcheck_on_2d_input(relu):
    """BIN / IEBN on (N, C) input take views of x (BIN: one sample; IEBN on the CPU: its
    elementwise ops) that ask for concrete sizes: under a dynamic-shape trace (opcheck's
    test_aot_dispatch_dynamic, torch.compile(dynamic=True) of a direct op call) they must give way
    to the general path, not fail ("Cannot call numel() on tensor with symbolic sizes")."""
    ops = torch.ops.normfuse
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(7, 5, generator=g) + 0.5).to(_DEV).requires_grad_()

    def vec(scale=0.3, shift=1.0):
        return (torch.randn(5, generator=g) * scale + shift).to(_DEV).requires_grad_()

    for training in (True, False):
        stats = ((torch.randn(5, generator=g) * 0.1).to(_DEV), (torch.rand(5, generator=g) + 0.5).to(_DEV))
        nbt = torch.tensor(2, device=_DEV)
        torch.library.opcheck(ops.bin_layer.default, (
            x, vec(0.2, 0.5), vec(), vec(0.3, 0.0), *stats, training, 0.1, 1e-5, nbt, relu))
        torch.library.opcheck(ops.iebn_layer.default, (
            x, vec(0.5, 0.0), vec(0.5, 0.0), vec(), vec(0.3, 0.0), *stats, training, 0.1, 1e-5, nbt, relu))
    ps = [vec() for _ in range(4)]

    def f(x):
        return ops.iebn_layer(x, *ps, torch.zeros(5, device=_DEV), torch.ones(5, device=_DEV), True, 0.1,
                              1e-5, None, relu)
    eager = f(x)
    compiled = torch.compile(f, dynamic=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("relu", [False, True])
def test_whole_layer_ops_opcheck(layout, relu):
    """torch.library.opcheck of the whole-layer ops the one-call module path runs (schema,
    fake / meta, autograd registration, AOT dispatch), on the device of the test; also run on
    the lowest supported torch (.ci/lowest_torch.sh)."""
    ops = torch.ops.normfuse
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 8, 4, 5, generator=g) + 0.5).to(_DEV)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def vec(scale=0.3, shift=1.0):
        return (torch.randn(8, generator=g) * scale + shift).to(_DEV).requires_grad_()

    for training in (True, False):
        stats = ((torch.randn(8, generator=g) * 0.1).to(_DEV),
                 (torch.rand(8, generator=g) + 0.5).to(_DEV))
        nbt = torch.tensor(2, device=_DEV)
        torch.library.opcheck(ops.bin_layer.default, (
            x, vec(0.2, 0.5), vec(), vec(0.3, 0.0), *stats, training, 0.1, 1e-5, nbt, relu))
        torch.library.opcheck(ops.iebn_layer.default, (
            x, vec(0.5, 0.0), vec(0.5, 0.0), vec(), vec(0.3, 0.0), *stats, training, 0.1,
            1e-5, nbt, relu))
    net = [(torch.randn(*shape, generator=g) * 0.4).to(_DEV).requires_grad_()
           for shape in ((2, 4), (4, 2), (4, 2))]
    torch.library.opcheck(ops.assoc_layer.default, (x, 4, *net, vec(), vec(0.3, 0.0), 1e-5, relu))
    ilm_net = [(torch.randn(*shape, generator=g) * 0.4).to(_DEV).requires_grad_()
               for shape in ((2, 2), (2, 2), (2, 2))]  # key groups of 4 channels: K = 2
    torch.library.opcheck(ops.ilm_layer.default, (x, 4, *ilm_net, vec(), vec(0.3, 0.0), 1e-5,
                                                  relu))
