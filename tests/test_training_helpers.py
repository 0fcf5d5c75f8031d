"""clip_gates_, attach_gate_clipping and param_groups (the BIN paper's training recipe)."""

import pytest
import torch
from torch import nn

from oracles import make_input


def _model(nf):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nf.BatchInstanceNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 1), nf.BatchInstanceNorm2d(6, affine=False)),
        nf.IEBN2d(6), nf.AssocNorm(2, 6, embed_dim=2),
        nn.Flatten(2), nf.BatchInstanceNorm1d(6),
    )


def _gates(model, nf):
    return [m.gate for m in model.modules()
            if isinstance(m, (nf.BatchInstanceNorm1d, nf.BatchInstanceNorm2d,
                              nf.BatchInstanceNorm3d))]


def test_clip_gates_clamps_only_bin_gates(nf, seed):
    model = _model(nf)
    gates = _gates(model, nf)
    assert len(gates) == 3
    with torch.no_grad():
        for g in gates:
            g.copy_(torch.linspace(-1.5, 2.5, g.numel()))
    other = {n: p.detach().clone() for n, p in model.named_parameters()
             if not n.endswith("gate")}
    ids = [id(g) for g in gates]
    nf.clip_gates_(model)
    for g in gates:
        ref = torch.linspace(-1.5, 2.5, g.numel()).clamp(0, 1)
        assert torch.equal(g.detach(), ref)
        assert g.min() >= 0 and g.max() <= 1
    assert ids == [id(g) for g in _gates(model, nf)], "gates must stay the same Parameters"
    for n, p in model.named_parameters():
        if n in other:
            # IEBN gate_bias starts at -1 and must not be touched
            assert torch.equal(p.detach(), other[n]), f"{n} changed by clip_gates_"


def test_clip_gates_on_single_module(nf):
    m = nf.BatchInstanceNorm3d(3)
    with torch.no_grad():
        m.gate.copy_(torch.tensor([-0.2, 0.4, 1.2]))
    nf.clip_gates_(m)
    assert torch.equal(m.gate.detach(), torch.tensor([0.0, 0.4, 1.0]))
    assert m.gate.requires_grad


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_attach_gate_clipping(nf, seed, opt_name):
    torch.manual_seed(seed)
    model = _model(nf)
    gates = _gates(model, nf)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=5.0)
    handle = nf.attach_gate_clipping(opt, model)
    x = make_input((4, 3, 5, 5), seed)
    target = torch.randn(4, 6, 25, generator=torch.Generator().manual_seed(seed))

    def step():
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean() + sum((g * 3.0).sum() for g in gates) \
            - sum((g[:1] * 7.0).sum() for g in gates)
        loss.backward()
        for g in gates:
            assert g.grad is not None and g.grad.abs().min() > 0
        conv_before = model[0].weight.detach().clone()
        opt.step()
        assert not torch.equal(model[0].weight.detach(), conv_before), "the step happened"

    step()
    for g in gates:
        assert g.min() >= 0 and g.max() <= 1, "gates clipped after the step"
    # the step pushed gates out on both sides, so clipping must have produced 0s and 1s
    allg = torch.cat([g.detach() for g in gates])
    assert (allg == 0).any() and (allg == 1).any()
    handle.remove()
    step()
    allg = torch.cat([g.detach() for g in gates])
    assert (allg < 0).any() or (allg > 1).any(), "handle.remove() must stop the clipping"


def _ids(groups):
    return [id(p) for g in groups for p in g["params"]]


def test_param_groups(nf):
    model = _model(nf)
    groups = nf.param_groups(model, lr=0.01, weight_decay=5e-4)
    groups = list(groups)
    ids = _ids(groups)
    all_params = list(model.parameters())
    assert sorted(ids) == sorted(id(p) for p in all_params), \
        "every parameter must appear exactly once"
    assert len(ids) == len(set(ids))
    gate_ids = {id(g) for g in _gates(model, nf)}
    for g in groups:
        for p in g["params"]:
            if id(p) in gate_ids:
                assert g["lr"] == pytest.approx(0.1), "gates at lr * gate_lr_scale (10)"
                assert g.get("weight_decay", None) == 0.0, "no weight decay on gates"
    conv_w = model[0].weight
    (g_conv,) = [g for g in groups if any(p is conv_w for p in g["params"])]
    assert g_conv["lr"] == pytest.approx(0.01)
    assert g_conv.get("weight_decay", 5e-4) == pytest.approx(5e-4)
    # the groups are usable by an optimizer as they are
    opt = torch.optim.SGD(groups, lr=0.01, weight_decay=5e-4)
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) in gate_ids:
                assert g["lr"] == pytest.approx(0.1) and g["weight_decay"] == 0.0
            elif p is conv_w:
                assert g["lr"] == pytest.approx(0.01) and g["weight_decay"] == pytest.approx(5e-4)


def test_param_groups_scale_and_defaults(nf):
    model = _model(nf)
    groups = list(nf.param_groups(model, lr=0.2, gate_lr_scale=3.0))
    gate_ids = {id(g) for g in _gates(model, nf)}
    for g in groups:
        for p in g["params"]:
            if id(p) in gate_ids:
                assert g["lr"] == pytest.approx(0.6)
                assert g["weight_decay"] == 0.0
            else:
                assert g["lr"] == pytest.approx(0.2)
                assert g.get("weight_decay", 0.0) == 0.0
    opt = torch.optim.Adam(groups)
    assert len(opt.param_groups) == len(groups)


def test_param_groups_without_bin(nf):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = list(nf.param_groups(model, lr=0.1))
    assert sorted(_ids(groups)) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD([g for g in groups if g["params"]], lr=0.1)
