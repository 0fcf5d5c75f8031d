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
                assert g["weight_decay"] == 0.0
    opt = torch.optim.Adam(groups)
    assert len(opt.param_groups) == len(groups)


def test_param_groups_weight_decay_none_leaves_it_to_the_optimizer(nf):
    """weight_decay=None: the non-gate group has none of its own, so the optimizer's applies;
    gates never decay; a given value (the default 0.0 too) wins over the optimizer's."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nf.BatchInstanceNorm2d(4))
    opt = torch.optim.AdamW(nf.param_groups(model, lr=1e-3, weight_decay=None),
                            weight_decay=0.05)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model[0].weight)]["weight_decay"] == 0.05
    assert by_param[id(model[1].gate)]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(nf.param_groups(model, lr=1e-3), weight_decay=0.05)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_param_groups_without_bin(nf):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = list(nf.param_groups(model, lr=0.1))
    assert sorted(_ids(groups)) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD([g for g in groups if g["params"]], lr=0.1)


# ---- update_bn: torch.optim.swa_utils.update_bn for normfuse's batch-statistics layers ----------
@pytest.mark.parametrize("layer", ["BatchInstanceNorm2d", "IEBN2d", "SyncBatchInstanceNorm"])
def test_update_bn_is_the_cumulative_average_of_batch_statistics(nf, layer):
    """One pass over a loader of unequal batches: running_mean / running_var are the plain
    averages over the batches of each batch's channel mean and unbiased variance (float64
    oracle), num_batches_tracked counts them; momentum and the module's mode are restored.
    torch's own update_bn leaves the layer as it was (it only sees _BatchNorm subclasses)."""
    torch.manual_seed(3)
    m = getattr(nf, layer)(5, momentum=0.3).eval()
    with torch.no_grad():
        m.running_mean.fill_(7.0)
    batches = [make_input((n, 5, 3, 4), seed) for seed, n in enumerate((4, 2, 7))]
    loader = [(b, torch.zeros(len(b))) for b in batches]  # (input, target) pairs, as torch's
    torch.optim.swa_utils.update_bn(loader, m)
    assert torch.equal(m.running_mean, torch.full((5,), 7.0))
    nf.update_bn(loader, m)
    x64 = [b.double() for b in batches]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in x64]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3)) for b in x64]).mean(0)
    torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == 3
    assert m.momentum == 0.3 and not m.training


def test_update_bn_on_a_converted_model_matches_torchs_on_the_original(nf):
    """A BatchNorm model converted to BIN (gates at 1: the same function) gets, layer by layer,
    the statistics torch's update_bn gives the original; plain nn.BatchNorm layers left in a
    model are updated too."""
    torch.manual_seed(5)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6))
    import copy
    converted = copy.deepcopy(original)
    converted[1] = nf.convert(converted[1], "bin")
    converted[4] = nf.convert(converted[4], "bin")  # converted[6] stays an nn.BatchNorm2d
    loader = [make_input((n, 3, 5, 5), 10 + n) for n in (3, 6)]
    torch.optim.swa_utils.update_bn(loader, original)
    nf.update_bn(loader, converted.train())
    assert converted.training
    for i in (1, 4, 6):
        torch.testing.assert_close(converted[i].running_mean, original[i].running_mean)
        torch.testing.assert_close(converted[i].running_var, original[i].running_var)
        assert int(converted[i].num_batches_tracked) == 2


def test_update_bn_restores_every_modules_mode(nf):
    """A layer frozen in eval mode and a Dropout left in eval inside a training model come back
    in eval (restoring the root's mode on every module switched them to training)."""
    m = nn.Sequential(nf.BatchInstanceNorm2d(3), nn.Dropout(0.5), nn.BatchNorm2d(3)).train()
    m[0].eval()
    m[1].eval()
    before = [c.training for c in m.modules()]
    nf.update_bn([torch.randn(4, 3, 5, 5)], m)
    assert [c.training for c in m.modules()] == before


def test_update_bn_without_batch_statistics_is_a_no_op(nf):
    """No layer with running statistics: the loader is not even read, the mode is kept."""
    class Unread:
        def __iter__(self):
            raise AssertionError("update_bn read the loader of a model without running stats")

    m = nn.Sequential(nf.AssocNorm(2, 4), nf.BatchInstanceNorm2d(4, track_running_stats=False))
    nf.update_bn(Unread(), m.eval())
    assert not m.training
