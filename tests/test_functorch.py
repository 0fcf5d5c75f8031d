"""``torch.func`` transforms over the layers (functional training loops, meta-learning): a module
called with ``torch.func.functional_call`` computes what it computes with those parameters
loaded, ``torch.func.grad`` gives autograd's gradients (and ``grad`` of ``grad`` the second
derivatives), ``jacrev`` runs; as ``nn.GroupNorm``, and unlike ``nn.BatchNorm2d``, whose
running-statistics update is refused under ``grad``, a BIN / IEBN layer in training updates its
running statistics once per call, as in eager mode. ``vmap`` is refused with PyTorch's
message naming it (the layers' autograd.Function has no vmap rule; BIN / IEBN mix the samples
of a batch, which a rule would have to keep apart). Under these transforms the modules run
``NormFunction`` (``setup_context`` form), not the compiled whole-layer op."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

C = 8
LAYERS = ["bin", "iebn", "assoc", "ilm"]


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
def test_grad_of_grad_and_jacrev(nf, backend, device, layer):
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


@pytest.mark.parametrize("layer", LAYERS)
def test_vmap_is_refused_by_name(nf, backend, device, layer):
    m = _layer(nf, layer).to(device)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(m)(torch.randn(3, 2, C, 3, 3, device=device))
