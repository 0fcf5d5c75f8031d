"""``torch.func`` transforms over the layers (functional training loops, meta-learning): a module
called with ``torch.func.functional_call`` computes what it computes with those parameters
loaded, ``torch.func.grad`` gives autograd's gradients (and ``grad`` of ``grad`` the second
derivatives), ``jacrev`` runs, forward mode (``jvp``, ``jacfwd``, ``hessian``, dual numbers)
agrees with finite differences; as ``nn.GroupNorm``, and unlike ``nn.BatchNorm2d``, whose
running-statistics update is refused under ``grad``, a BIN / IEBN layer in training updates its
running statistics once per call, as in eager mode. ``vmap`` gives per-sample gradients
(``vmap(grad(loss))``, the samples folded into one call where each output is its sample's own)
and ensembles (``stack_module_state``: each member's own running statistics); it refuses to
update one set of running statistics from several mapped batches, as nn.BatchNorm2d does. The
synchronized layers are refused under any transform and in forward mode (before their
statistics are exchanged; the other ranks are told, and raise too). ``torch.compile``
of a transformed function gets the eager gradients. Under these transforms the modules run
``NormFunctionTransforms`` (``setup_context`` form), not the compiled whole-layer op. Their first
derivatives run the backend's backward ops (``NormBackward``; under vmap, folded as the forward
is), and second derivatives the differentiable recomputation; both are checked against plain
autograd."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

C = 8
LAYERS = ["bin", "iebn", "assoc", "ilm"]
# torch 2.11 (the GPU machines'), whose Dynamo differs under transforms (see the tests using it)
TORCH_2_11 = torch.torch_version.TorchVersion(torch.__version__) < (2, 12)


def _layer(nf, layer, relu=False):
    act = "relu" if relu else None
    return {"bin": lambda: nf.BatchInstanceNorm2d(C, activation=act),
            "iebn": lambda: nf.IEBN2d(C, activation=act),
            "assoc": lambda: nf.AssocNorm(4, C, activation=act),
            "ilm": lambda: nf.ILMNorm(C, num_groups=4, key_group_size=4, activation=act)}[layer]()


def _shifted(m):
    """Parameters away from the module's (a zero decoder would hide a parameter not taken)."""
    return {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in m.named_parameters()}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_functional_call_and_grad_match_autograd(nf, backend, device, layer, relu):
    m = _layer(nf, layer, relu).to(device)
    params = _shifted(m)
    loaded = copy.deepcopy(m)
    with torch.no_grad():
        for k, v in loaded.named_parameters():
            v.copy_(params[k])
    x = torch.randn(4, C, 5, 3, device=device) + 0.5
    y = functional_call(m, params, (x,))
    torch.testing.assert_close(y, loaded(x))
    loaded.zero_grad()

    def loss(p):
        return functional_call(m, p, (x,)).sin().sum()

    g = grad(loss)(params)
    loaded(x).sin().sum().backward()
    for k, v in loaded.named_parameters():
        torch.testing.assert_close(g[k], v.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("layer", LAYERS)
def test_grad_of_grad_jacrev_and_hessian(nf, backend, device, layer):
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    m = _layer(nf, layer).double().to(device)
    if layer in ("bin", "iebn"):
        m.eval()  # a pure function of x (training would count the batches)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, device=device)

    def f(t):
        return m(t).sin().sum()

    xr = x.clone().requires_grad_()
    g1, = torch.autograd.grad(f(xr), xr, create_graph=True)
    expected, = torch.autograd.grad(g1.square().sum(), xr)
    torch.testing.assert_close(grad(lambda t: grad(f)(t).square().sum())(x), expected)
    torch.testing.assert_close(grad(f)(x), g1.detach())
    jac = jacrev(lambda t: m(t)[0, 1, 2])(x)  # a row of 3 outputs: (3, *x.shape)
    rows = [torch.autograd.grad(m(xr)[0, 1, 2, i], xr)[0] for i in range(3)]
    torch.testing.assert_close(jac, torch.stack(rows))
    # forward mode: hessian (forward over reverse) and jacfwd against the reverse-mode ones
    torch.testing.assert_close(torch.func.hessian(f)(x), jacrev(jacrev(f))(x))
    torch.testing.assert_close(torch.func.jacfwd(m)(x), jacrev(m)(x))


@pytest.mark.parametrize("layer", ["bin", "iebn"])
def test_training_under_grad_updates_running_statistics_once(nf, backend, device, layer):
    m = _layer(nf, layer).to(device)
    eager = copy.deepcopy(m)
    x = torch.randn(4, C, 5, 3, device=device) + 0.5
    grad(lambda p: functional_call(m, p, (x,)).sum())(dict(m.named_parameters()))
    eager(x)
    for (name, a), b in zip(m.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("layer", ["bin", "assoc"])
def test_compiled_transform_gets_the_eager_gradients(nf, backend, device, layer, request):
    """torch.compile(grad(f)): x's gradient came back zero (the compiled backward was told x
    needed none); the parameters' were right."""
    if backend != "torch" and TORCH_2_11:
        # torch 2.11's Dynamo fails on the compiled backends here (an AssertionError in
        # meta_utils wrapping a functorch tensor of autograd.grad's _make_grads): an error, not
        # a wrong result; torch 2.14 passes. Strict where seen (cpu); the GPU backends unseen.
        request.applymarker(pytest.mark.xfail(raises=AssertionError, strict=backend == "cpu",
                                              reason="torch 2.11 Dynamo, compile(grad(f))"))
    m = _layer(nf, layer).to(device)
    if backend == "torch" and layer == "bin":
        # Dynamo fails tracing the torch backend's in-place running-statistics update inside the
        # transformed function ("AssertionError: False != True" in meta_utils, torch 2.14): an
        # error, not a wrong result; eval mode (no update) is compared here
        m.eval()
    x = torch.randn(4, C, 5, 3, device=device) + 0.5
    params = dict(m.named_parameters())

    def f(t, p):
        return functional_call(m, p, (t,)).sin().sum()

    eager = grad(f, argnums=(0, 1))(x, params)
    torch._dynamo.reset()
    # x alone, the module's own parameters captured: the case that came back zero
    dx = torch.compile(grad(lambda t: m(t).sin().sum()), backend="eager")(x)
    torch.testing.assert_close(dx, eager[0], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(grad(f, argnums=(0, 1)), backend="eager")(x, params)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for k in params:
        torch.testing.assert_close(compiled[1][k], eager[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_synchronized_merge_is_refused_under_a_transform(nf, backend, device):
    """A synchronized layer's call (a merge given) under grad: a clear refusal naming the
    transforms, not the "double backward" of its backward, which functorch runs with grad mode on."""
    from normfuse import _autograd
    from normfuse.coefficients._merge import BatchMerge
    x = torch.randn(4, C, 3, 3, device=device)
    gate, w, b = (torch.rand(C, device=device) for _ in range(3))
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)

    def f(g):
        return _autograd.run_layer("bin", x, rm, rv, True, 0.1, 1e-5, 0, (g, w, b),
                                   merge=BatchMerge()).sum()

    with pytest.raises(RuntimeError, match="synchronized layers do not support torch.func"):
        grad(f)(gate)
    assert torch.equal(rm, torch.zeros(C, device=device))  # nothing ran
    # forward mode: the tangent would be this rank's alone (its jvp has no all-reduce)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(gate, torch.randn_like(gate))
        with pytest.raises(RuntimeError, match="or forward-mode AD"):
            f(dual)
    assert torch.equal(rm, torch.zeros(C, device=device))


# ---- vmap (normfuse/_vmap.py): per-sample gradients and ensembles ----------------------------

def _per_sample_layer(nf, layer, relu):
    """A layer whose outputs are per sample: AssocNorm / ILM-Norm, BIN / IEBN in eval mode with
    running statistics away from their initial values (set .train() for batch statistics)."""
    m = _layer(nf, layer, relu)
    if layer in ("bin", "iebn"):
        with torch.no_grad():
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        m.eval()
    return m


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_per_sample_gradients_match_a_loop(nf, backend, device, layer, relu, channels_last,
                                           monkeypatch):
    """vmap(grad(loss)) over the samples, as Opacus-style per-sample gradients take it: each
    sample's gradients are grad(loss) of that sample alone, in one call of the layer (the B
    samples folded into one batch)."""
    from normfuse import _vmap
    m = _per_sample_layer(nf, layer, relu).to(device)
    params = _shifted(m)
    buffers = dict(m.named_buffers())
    x = torch.randn(5, C, 4, 3, device=device) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def loss(p, xi):
        y = functional_call(m, (p, buffers), (xi.unsqueeze(0),))
        return (y * y.cos()).sum()

    expected = [grad(loss)(params, x[i]) for i in range(len(x))]
    monkeypatch.setattr(_vmap, "_instance", None)  # the per-instance path would fail: not taken
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(per_sample[k], torch.stack([e[k] for e in expected]),
                                   rtol=1e-4, atol=1e-5, msg=k)
    y = vmap(m)(x.unflatten(0, (5, 1)))
    torch.testing.assert_close(y.squeeze(1), torch.cat([m(x[i:i + 1]) for i in range(5)]),
                               rtol=1e-5, atol=1e-5)
    # grad of vmap: the folded call differentiated as the plain batch is
    g = grad(lambda p: vmap(loss, in_dims=(None, 0))(p, x).sum())(params)
    expected = grad(lambda p: sum(loss(p, x[i]) for i in range(len(x))))(params)
    for k in params:
        torch.testing.assert_close(g[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)


def _loaded(m, params):
    """A copy of ``m`` holding ``params``: what plain autograd differentiates."""
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for k, v in twin.named_parameters():
            v.copy_(params[k])
    return twin


@pytest.mark.parametrize("layer", LAYERS)
def test_first_derivatives_under_a_transform_run_the_backend_kernels(nf, backend, device, layer,
                                                                     monkeypatch):
    """grad, vmap(grad), jacrev and a torch.func.vjp's vjp_fn compute first derivatives with the
    backend's backward ops (kernel_grads: one pass each for the sums and for dx), not the
    differentiable recomputation only a second derivative needs (graph_grads: several passes
    more, ~3x the time of grad), and get plain autograd's gradients."""
    from normfuse import _autograd
    m = _per_sample_layer(nf, layer, False).to(device)
    params, buffers = _shifted(m), dict(m.named_buffers())
    twin = _loaded(m, params)
    x = torch.randn(4, C, 3, 5, device=device) + 0.5
    xr = x.clone().requires_grad_()
    v = torch.randn_like(x)  # the cotangent of y
    dx, *dparams = torch.autograd.grad(twin(xr), [xr, *twin.parameters()], v)
    rows = [torch.autograd.grad(twin(xr)[0, 1, 2, i], xr)[0] for i in range(x.shape[-1])]
    per_sample = [torch.autograd.grad((twin(x[i:i + 1]) * v[i]).sum(), list(twin.parameters()))
                  for i in range(len(x))]

    def recomputed(*args):
        raise AssertionError("a first derivative took the differentiable recomputation")

    kernel_calls = []

    def counted(*args, **kwargs):
        kernel_calls.append(1)
        return kernel_grads(*args, **kwargs)

    kernel_grads = _autograd.kernel_grads
    monkeypatch.setattr(_autograd, "graph_grads", recomputed)
    monkeypatch.setattr(_autograd, "kernel_grads", counted)

    def f(p, t, w):
        return (functional_call(m, (p, buffers), (t,)) * w).sum()

    got_params, got_x = grad(f, argnums=(0, 1))(params, x, v)
    torch.testing.assert_close(got_x, dx, rtol=1e-4, atol=1e-5)
    for k, g in zip(params, dparams):
        torch.testing.assert_close(got_params[k], g, rtol=1e-4, atol=1e-5, msg=k)
    got = vmap(grad(f), in_dims=(None, 0, 0))(params, x.unsqueeze(1), v.unsqueeze(1))
    for j, k in enumerate(params):
        torch.testing.assert_close(got[k], torch.stack([g[j] for g in per_sample]),
                                   rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(jacrev(lambda t: functional_call(m, (params, buffers), (t,))
                                      [0, 1, 2])(x), torch.stack(rows), rtol=1e-4, atol=1e-5)
    _, vjp_fn = torch.func.vjp(lambda t: functional_call(m, (params, buffers), (t,)), x)
    torch.testing.assert_close(vjp_fn(v)[0], dx, rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) >= 4


@pytest.mark.parametrize("layer", LAYERS)
def test_second_derivatives_take_the_recomputation_directly(nf, backend, device, layer,
                                                            monkeypatch):
    """Where a grad / vjp level below will differentiate a backward (grad of grad, jacrev of
    jacrev, a penalty on per-sample gradients, MAML's inner step), the backward is graph_grads
    itself: NormBackward's kernels and then its own recomputation would cost more. Its backward
    must not run there (the values are checked by the other tests)."""
    from normfuse import _transforms
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")

    def differentiated(*args):
        raise AssertionError("NormBackward differentiated: graph_grads should have been taken")

    monkeypatch.setattr(_transforms.NormBackward, "backward", staticmethod(differentiated))
    m = _per_sample_layer(nf, layer, False).double().to(device)
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    x = torch.randn(3, C, 2, 3, dtype=torch.float64, device=device) + 0.5

    def loss(p, t):
        y = functional_call(m, (p, buffers), (t,))
        return (y * y.cos()).sum()

    grad(lambda t: grad(loss, argnums=1)(params, t).square().sum())(x)
    jacrev(jacrev(lambda t: loss(params, t)))(x)
    grad(lambda p: sum(g.square().sum() for g in vmap(grad(loss), in_dims=(None, 0))(
        p, x.unsqueeze(1)).values()))(params)

    def maml(p):
        inner = grad(loss)(p, x)
        return loss({k: p[k] - 0.1 * inner[k] for k in p}, x)

    grad(maml)(params)


def _skip_or_batch_instances(backend, layer, instance_calls, monkeypatch):
    """For a float64 test parametrized by ``instance_calls``: skips the GPU backends, and BIN /
    IEBN without instance calls (they fold into the channels: one call whatever B); AssocNorm /
    ILM-Norm without them batch every instance's parameter gradients (INSTANCE_CALLS_MAX 1)."""
    from normfuse import _autograd
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    if not instance_calls:
        if layer not in ("assoc", "ilm"):
            pytest.skip("BIN / IEBN fold into the channels: one call")
        monkeypatch.setattr(_autograd, "INSTANCE_CALLS_MAX", 1)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("instance_calls", [True, False],
                         ids=["per-instance-calls", "batched-reference"])
def test_second_derivatives_of_per_sample_gradients(nf, backend, device, layer, relu,
                                                    instance_calls, monkeypatch):
    """Per-sample gradients (the kernels' first derivatives, folded), and a penalty on them
    differentiated (grad of vmap(grad): the grad level below makes that backward the
    differentiable recomputation), each as the samples' own, in float64 against a loop over the
    samples. AssocNorm / ILM-Norm parameter gradients per instance: a coefficient-backward call
    each ("calls") or, past INSTANCE_CALLS_MAX instances, the reference batched over them
    ("batched")."""
    _skip_or_batch_instances(backend, layer, instance_calls, monkeypatch)
    m = _per_sample_layer(nf, layer, relu).double().to(device)
    params = {k: v.double() for k, v in _shifted(m).items()}
    buffers = dict(m.named_buffers())
    x = torch.randn(3, C, 3, 4, dtype=torch.float64, device=device) + 0.5

    def loss(p, xi):
        y = functional_call(m, (p, buffers), (xi.unsqueeze(0),))
        return (y * y.cos()).sum()

    def penalty(per_sample):
        return sum((g * g).sum() for g in per_sample.values())

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(per_sample[k], torch.stack([grad(loss)(params, x[i])[k]
                                                              for i in range(len(x))]), msg=k)
    got = grad(lambda p: penalty(vmap(grad(loss), in_dims=(None, 0))(p, x)))(params)
    expected = grad(lambda p: sum(penalty(grad(loss)(p, x[i])) for i in range(len(x))))(params)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], msg=k)


def _ensemble(nf, layer, training, device):
    """Three members with parameters of their own, stacked (``stack_module_state``), and a
    meta-device copy to call them through: ``(members, params, buffers, base)``."""
    members = [_per_sample_layer(nf, layer, False).to(device).train(training) for _ in range(3)]
    for m in members:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    params, buffers = torch.func.stack_module_state(members)
    return members, params, buffers, copy.deepcopy(members[0]).to("meta")


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("instance_calls", [True, False],
                         ids=["per-instance-calls", "batched-reference"])
def test_autograd_over_a_transform_differentiates_its_first_derivatives(
        nf, backend, device, layer, relu, instance_calls, monkeypatch):
    """Regular autograd over torch.func.grad and vmap(grad) (the input requires grad outside
    any transform): the first derivatives the transforms return (NormBackward's kernels) are
    differentiated as create_graph=True autograd differentiates them, in float64."""
    _skip_or_batch_instances(backend, layer, instance_calls, monkeypatch)
    m = _per_sample_layer(nf, layer, relu).double().to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, C, 3, 4, dtype=torch.float64, device=device) + 0.5

    def loss(t):
        y = m(t)
        return (y * y.cos()).sum()

    def expected_penalty_grad(per_sample):
        xr = x.clone().requires_grad_()
        if per_sample:
            gs = [torch.autograd.grad(loss(xr[i:i + 1]), xr, create_graph=True)[0][i]
                  for i in range(len(x))]
            g = torch.stack(gs)
        else:
            g, = torch.autograd.grad(loss(xr), xr, create_graph=True)
        return torch.autograd.grad((g * g.sin()).sum(), xr)[0]

    for per_sample in (False, True):
        xr = x.clone().requires_grad_()
        g = (vmap(grad(lambda t: loss(t.unsqueeze(0))))(xr) if per_sample else grad(loss)(xr))
        (g * g.sin()).sum().backward()
        torch.testing.assert_close(xr.grad, expected_penalty_grad(per_sample),
                                   msg=f"per_sample={per_sample}")


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ensemble_gradients_are_each_members_own(nf, backend, device, layer, training,
                                                 monkeypatch):
    """vmap(grad(loss)) over stacked members' parameters and buffers: each member's gradients
    are its own call's (BIN / IEBN in one call, the members' channels laid end to end)."""
    from normfuse import _vmap
    if layer in ("bin", "iebn"):
        monkeypatch.setattr(_vmap, "_instance", None)  # the per-instance loop would fail
    members, params, buffers, base = _ensemble(nf, layer, training, device)
    x = torch.randn(4, C, 3, 5, device=device) + 0.5

    def loss(p, b, t):
        return functional_call(base, (p, b), (t,)).sin().sum()

    got = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(members):
        m.zero_grad()
        m(x).sin().sum().backward()
        for k, v in m.named_parameters():
            torch.testing.assert_close(got[k][i], v.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("layer", LAYERS)
def test_jacobians_and_small_vmaps_match_autograd(nf, backend, device, layer):
    """In float64: jacrev (a vmap over mapped cotangents, the input unmapped), jacrev of jacrev
    and per-sample Jacobians against torch.autograd.functional (plain autograd, no transform),
    on batches of one sample and of three, channels-last too; vmap over one sample and vmap's
    chunk_size against a grad per sample; BIN / IEBN in training with one channel."""
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    jacobian, hessian = torch.autograd.functional.jacobian, torch.autograd.functional.hessian
    m = _per_sample_layer(nf, layer, False).double().to(device)
    params = {k: v.double() for k, v in _shifted(m).items()}
    buffers = dict(m.named_buffers())

    def f(t, p=params):
        return functional_call(m, (p, buffers), (t,))

    def scalar(t):
        y = f(t)
        return (y * y.cos()).sum()

    for n, channels_last in ((1, False), (3, False), (3, True)):
        x = torch.randn(n, C, 2, 3, dtype=torch.float64, device=device) + 0.5
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(jacrev(f)(x), jacobian(f, x), msg=f"jacrev, N={n}")
        torch.testing.assert_close(jacrev(jacrev(scalar))(x), hessian(scalar, x),
                                   msg=f"jacrev(jacrev), N={n}")
        names = list(params)
        by_params = jacrev(lambda p: f(x, p)[0, :3, 0, 0])(params)
        expected = jacobian(lambda *v: f(x, dict(zip(names, v)))[0, :3, 0, 0],
                            tuple(params.values()))
        for k, e in zip(names, expected):
            torch.testing.assert_close(by_params[k], e, msg=f"jacrev over {k}, N={n}")
    xs = torch.randn(5, C, 2, 3, dtype=torch.float64, device=device) + 0.5

    def loss(p, xi):
        return (f(xi.unsqueeze(0), p) ** 3).sum()

    expected = [grad(loss)(params, xs[i]) for i in range(5)]
    for chunk_size, count in ((None, 1), (2, 5)):  # chunks of 2, 2 and 1
        got = vmap(grad(loss), in_dims=(None, 0), chunk_size=chunk_size)(params, xs[:count])
        for k in params:
            torch.testing.assert_close(got[k], torch.stack([e[k] for e in expected[:count]]),
                                       msg=f"{k}, chunk_size={chunk_size}")
    per_sample = vmap(jacrev(lambda xi: f(xi.unsqueeze(0))[0, :, 0, 0]))(xs)
    torch.testing.assert_close(per_sample, torch.stack(
        [jacobian(lambda xi: f(xi.unsqueeze(0))[0, :, 0, 0], xi) for xi in xs]))
    if layer in ("bin", "iebn"):  # training, one channel: batch statistics, C = 1 folds
        one = {"bin": nf.BatchInstanceNorm2d, "iebn": nf.IEBN2d}[layer](1).double().to(device)
        x = torch.randn(4, 1, 2, 3, dtype=torch.float64, device=device)
        torch.testing.assert_close(jacrev(lambda t: one(t)[0, 0, 0])(x),
                                   jacobian(lambda t: one(t)[0, 0, 0], x))


def test_compiled_vmap(nf, backend, device, request):
    """torch.compile around vmap of a layer: fails in Dynamo on torch 2.14 (pytorch/pytorch
    #129845), and on 2.11 for the compiled backends; torch 2.11 runs the torch backend's.
    Strict where seen (cpu, torch), so that an upgrade that makes it work says so."""
    if not (TORCH_2_11 and backend == "torch"):
        request.applymarker(pytest.mark.xfail(
            strict=backend in ("cpu", "torch"),
            reason="Dynamo does not carry an autograd.Function's vmap rule (#129845)"))
    m = _layer(nf, "assoc").to(device)
    x = torch.randn(3, 2, C, 3, 3, device=device)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(vmap(m), backend="eager")(x), vmap(m)(x))


@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_vmap_batch_statistics_are_each_instances_own(nf, backend, device, layer, affine,
                                                      monkeypatch):
    """BIN / IEBN with batch statistics (training, no running statistics): each mapped instance
    is a batch of its own, as vmap over nn.BatchNorm2d(track_running_stats=False) computes
    (mapped on dim 2 here, out on dim 1), in one call (channels laid end to end)."""
    from normfuse import _vmap
    monkeypatch.setattr(_vmap, "_instance", None)  # the per-instance loop would fail
    cls = {"bin": nf.BatchInstanceNorm2d, "iebn": nf.IEBN2d}[layer]
    m = cls(C, track_running_stats=False, affine=affine).to(device)
    params = _shifted(m)
    xs = torch.randn(3, 4, C, 3, 5, device=device) + 0.5

    def f(p, x):
        return functional_call(m, p, (x,))

    torch.testing.assert_close(
        vmap(f, in_dims=(None, 2), out_dims=1)(params, xs.movedim(0, 2)),
        torch.stack([f(params, x) for x in xs], 1), rtol=1e-5, atol=1e-5)
    g = grad(lambda p: vmap(f, in_dims=(None, 0))(p, xs).sin().sum())(params)
    expected = grad(lambda p: sum(f(p, x).sin().sum() for x in xs))(params)
    for k in params:
        torch.testing.assert_close(g[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)


_SHARED = {  # what is mapped (the rest shared) in a training call that must be refused
    "input": dict(x=0, params=None, buffers=None),
    "parameters": dict(x=None, params=0, buffers=None),  # an ensemble with shared statistics
    "counter-only": dict(x=0, params=None, buffers={"running_mean": None, "running_var": None,
                                                     "num_batches_tracked": 0}),
    "mean-only": dict(x=0, params=None, buffers={"running_mean": 0, "running_var": None,
                                                  "num_batches_tracked": 0}),
}


@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("outer", ["grad", "jvp"])
def test_transform_over_a_training_ensemble(nf, backend, device, layer, outer):
    """grad / jvp of a vmapped ensemble in training, its buffers captured (not arguments): the
    members' counters and running statistics are updated once, as by their own calls, and the
    gradient is the members' summed."""
    members = [_layer(nf, layer).to(device) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, C, 3, 3, device=device) + 0.5

    def total(p):
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)).square().sum())(
            p, buffers).sum()

    if outer == "grad":
        g = grad(total)(params)
        expected = {k: torch.stack([grad(lambda q: functional_call(copy.deepcopy(m), q, (x,))
                                         .square().sum())(dict(m.named_parameters()))[k]
                                    for m in members]) for k in params}
        for k in params:
            torch.testing.assert_close(g[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    else:
        torch.func.jvp(total, (params,), ({k: torch.ones_like(v) for k, v in params.items()},))
    for m in members:
        m(x)  # each member's own step
    for k, stacked in buffers.items():
        torch.testing.assert_close(stacked, torch.stack([dict(m.named_buffers())[k]
                                                         for m in members]), msg=k)


@pytest.mark.parametrize("layer", ["bin", "iebn"])
@pytest.mark.parametrize("mapped", list(_SHARED))
def test_vmap_updating_shared_running_statistics_is_refused(nf, backend, device, layer, mapped):
    """Training with running statistics that the mapped instances share (any of the three not
    mapped): B batches cannot update one running mean (nn.BatchNorm2d refuses too). A clear
    error naming the module, the buffers untouched."""
    m = _layer(nf, layer).to(device)
    params = {k: torch.stack([v.detach()] * 3) for k, v in m.named_parameters()}
    buffers = {k: torch.stack([v] * 3) if k in ("running_mean", "num_batches_tracked") else v
               for k, v in m.named_buffers()}  # (mapped copies where a test maps them)
    shared = {k: v.clone() for k, v in m.named_buffers()}
    dims = _SHARED[mapped]
    x = torch.randn(3, 4, C, 3, 3, device=device) if dims["x"] == 0 else torch.randn(
        4, C, 3, 3, device=device)
    b = shared if dims["buffers"] is None else {k: buffers[k] if d == 0 else shared[k]
                                               for k, d in dims["buffers"].items()}

    def f(p, b, t):
        return functional_call(m, (p if dims["params"] == 0 else dict(m.named_parameters()), b),
                               (t,))

    name = {"bin": "BatchInstanceNorm2d", "iebn": "InstanceEnhancementBatchNorm2d"}[layer]
    with pytest.raises(RuntimeError, match=rf"^{name}: under torch.func.vmap, training mode "
                                           r"cannot update running statistics that the mapped"):
        vmap(f, in_dims=(dims["params"], dims["buffers"], dims["x"]))(params, b, x)
    for k, v in m.named_buffers():
        assert torch.equal(shared[k], v), k
    for k in ("running_mean", "num_batches_tracked"):
        assert torch.equal(buffers[k], torch.stack([getattr(m, k)] * 3)), k


def test_vmap_refusal_names_the_function(nf, backend, device):
    m = _layer(nf, "bin").to(device)
    with pytest.raises(RuntimeError, match=r"^batch_instance_norm: under torch.func.vmap"):
        vmap(lambda t: nf.functional.batch_instance_norm(
            t, m.running_mean, m.running_var, m.weight, m.bias, m.gate, training=True))(
                torch.randn(3, 4, C, 3, 3, device=device))


@pytest.mark.parametrize("layer", ["bin", "iebn"])
def test_vmap_cumulative_average_with_mapped_counter_is_refused(nf, backend, device, layer):
    """momentum=None reads num_batches_tracked as one number: a mapped counter has none. Our
    message, not vmap's ".item()" one; nothing updated."""
    cls = {"bin": nf.BatchInstanceNorm2d, "iebn": nf.IEBN2d}[layer]
    members = [cls(C, momentum=None).to(device) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    before = {k: v.clone() for k, v in buffers.items()}
    base = copy.deepcopy(members[0]).to("meta")
    with pytest.raises(RuntimeError, match=r"momentum=None \(a cumulative average\) reads "
                                           r"num_batches_tracked as one number"):
        vmap(lambda p, b, t: functional_call(base, (p, b), (t,)), in_dims=(0, 0, None))(
            params, buffers, torch.randn(4, C, 3, 3, device=device))
    for k, v in buffers.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_ensemble_of_stacked_modules(nf, backend, device, layer, training, channels_last,
                                     monkeypatch):
    """torch.func.stack_module_state + vmap over parameters and buffers, one input for all
    (PyTorch's model-ensembling recipe): each member computes what it computes alone, and in
    training each member's running statistics are updated as its own call updates them. BIN /
    IEBN members run as one layer of their channels laid end to end (one call, not a loop)."""
    from normfuse import _vmap
    if layer in ("bin", "iebn"):
        monkeypatch.setattr(_vmap, "_instance", None)  # the per-instance loop would fail
    members, params, buffers, base = _ensemble(nf, layer, training, device)
    x = torch.randn(4, C, 3, 5, device=device) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def f(p, b, t):
        return functional_call(base, (p, b), (t,))

    y = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    torch.testing.assert_close(y, torch.stack([m(x) for m in members]), rtol=1e-5, atol=1e-5)
    for k, stacked in buffers.items():
        torch.testing.assert_close(stacked, torch.stack([dict(m.named_buffers())[k]
                                                         for m in members]), msg=k)


# ---- forward mode: jvp, jacfwd, hessian, torch.autograd.forward_ad ---------------------------

@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_gradcheck(nf, backend, device, layer, relu, training):
    """Forward-mode derivatives (dual numbers) of the output in x and every parameter against
    finite differences (gradcheck's check_forward_ad), then torch.func.jvp against them."""
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    m = _per_sample_layer(nf, layer, relu).double().to(device).train(training)
    names = [k for k, _ in m.named_parameters()]
    params = _shifted(m)
    buffers = dict(m.named_buffers())
    x = torch.randn(3, C, 2, 3, dtype=torch.float64, device=device) + 0.5

    def f(x, *p):  # (on copies of the buffers: gradcheck calls it many times)
        return functional_call(m, (dict(zip(names, p)), {k: v.clone() for k, v in
                                                         buffers.items()}), (x,))

    inputs = (x.requires_grad_(), *(params[k].requires_grad_() for k in names))
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    primals = tuple(t.detach() for t in inputs)
    _, y_t = torch.func.jvp(f, primals, tangents)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        expected = torch.autograd.forward_ad.unpack_dual(f(*duals)).tangent
    torch.testing.assert_close(y_t, expected)


@pytest.mark.parametrize("layer", ["assoc", "bin"])
def test_grad_over_a_forward_mode_level(nf, backend, device, layer):
    """torch.func.grad of a function that opens its own forward_ad level (the tangent's
    gradient): forward mode does not nest, so the layer's jvp uses the open level."""
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    fw = torch.autograd.forward_ad
    m = _layer(nf, layer).double().to(device).eval()
    params = _shifted(m)
    x = torch.randn(3, C, 2, 2, dtype=torch.float64, device=device)
    t = torch.randn_like(x)

    def dual_tangent(p):
        with fw.dual_level():
            y = functional_call(m, p, (fw.make_dual(x, t),))
            return fw.unpack_dual(y).tangent.square().sum()

    def jvp_tangent(p):
        return torch.func.jvp(lambda z: functional_call(m, p, (z,)), (x,), (t,))[1].square().sum()

    g, expected = grad(dual_tangent)(params), grad(jvp_tangent)(params)
    for k in params:
        torch.testing.assert_close(g[k], expected[k], msg=k)


@pytest.mark.parametrize("layer", ["bin", "iebn"])
def test_forward_mode_updates_running_statistics_once(nf, backend, device, layer):
    m = _layer(nf, layer).to(device)
    eager = copy.deepcopy(m)
    x = torch.randn(4, C, 5, 3, device=device) + 0.5
    y, _ = torch.func.jvp(m, (x,), (torch.randn_like(x),))
    torch.testing.assert_close(y, eager(x))
    for (name, a), b in zip(m.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_on_2d_inputs_under_transforms(nf, backend, device, training):
    """BIN on (N, C) inputs runs as batch norm of one sample (x viewed channels-last, weight
    gamma * rho: normfuse/_autograd.py, _bin_as_one_sample) under the transforms too: grad equals
    autograd, vmap over inputs and vmap(grad) equal a loop, and jvp and grad of grad equal the
    torch backend's general path (float64)."""
    if backend not in ("cpu", "torch"):
        pytest.skip("float64: the CPU backends")
    from torch.func import jvp
    m = nf.BatchInstanceNorm1d(5, track_running_stats=not training).double().to(device)
    with torch.no_grad():
        m.gate.uniform_(0, 1), m.weight.normal_(), m.bias.normal_()
        if not training:
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    m.train(training)
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    x = torch.randn(7, 5, dtype=torch.float64, device=device)

    def loss(p, x):
        return functional_call(m, p, (x,)).sin().sum()

    g = grad(loss)(params, x)
    loss(dict(m.named_parameters()), x).backward()
    for k, v in m.named_parameters():
        torch.testing.assert_close(g[k], v.grad, msg=k)
    xs = torch.randn(3, 7, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(vmap(lambda x: functional_call(m, params, (x,)))(xs),
                               torch.stack([functional_call(m, params, (x,)) for x in xs]))
    per_input = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i, x_i in enumerate(xs):
        for k, v in grad(loss)(params, x_i).items():
            torch.testing.assert_close(per_input[k][i], v, msg=k)
    t = torch.randn_like(x)

    def tangent_and_second(x):
        _, tangent = jvp(lambda x: functional_call(m, params, (x,)), (x,), (t,))
        second = grad(lambda x: grad(lambda x: functional_call(m, params, (x,)).sin().sum())(x)
                      .square().sum())(x)
        return tangent, second

    got = tangent_and_second(x)
    with nf.use_backend("torch"):
        expected = tangent_and_second(x)
    torch.testing.assert_close(got, expected)
