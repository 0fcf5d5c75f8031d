"""Norm + activation modules (normfuse/norm_act.py) and the conversion of timm's norm + act layers.

timm's CNNs (EfficientNet, MobileNet, RegNet, DenseNet, CSPNet, ResNetV2/BiT, ...) use
``BatchNormAct2d`` / ``GroupNormAct``: a norm subclass applying its ``drop`` and ``act`` modules.
Here against tests/timm_norm_act.py, a copy of timm's classes (timm needs torchvision, which pins
a torch); tests/test_timm.py runs timm's own models (CI: .ci/timm.sh).  References: the float64
oracles of tests/oracles.py followed by the activation, and timm's layer itself where the
converted layer computes the same function (BIN with gates at 1, AssocNorm as converted).
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import oracles
import timm_norm_act as timm
from oracles import assert_close_dtype, dtype_supported, randn

KINDS = {"bin": timm.BatchNormAct2d, "iebn": timm.BatchNormAct2d,
         "assoc": timm.GroupNormAct, "ilm": timm.GroupNormAct}
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "leaky": nn.LeakyReLU,
        "none": None}


def _timm_layer(to, act, channels=8, **kw):
    cls = KINDS[to]
    if cls is timm.GroupNormAct:
        kw.setdefault("num_groups", 4)
    layer = cls(channels, act_layer=ACTS[act], apply_act=act != "none", **kw).double()
    return oracles.randomize_parameters(layer, 11)


def _convert(nf, module, to, **kw):
    options = {"key_group_size": 2, "reduction": 2} if to == "ilm" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left unconverted
        return nf.convert(module, to, **options, **kw)


class AddOne(nn.Module):
    """A drop layer that is not the identity and does not commute with the acts: the order
    act(drop(norm(x))) shows (timm's CSPNet passes DropBlock as its norm + act layers' drop)."""

    def forward(self, x):
        return x + 1.0


TARGET_CLASSES = {"bin": "BatchInstanceNormAct2d", "iebn": "InstanceEnhancementBatchNormAct2d",
                  "assoc": "AssocNormAct", "ilm": "ILMNormAct"}


def _oracle_with_act(layer, x, act, dy):
    """float64 ``act(norm(x))`` and its gradients: the oracle of the norm, the activation
    differentiated on its output."""
    plain = oracles.module_step(layer, x)
    pre = plain.y.clone().requires_grad_()
    out = act(pre.clone())  # a clone: the act may work in place
    dpre, = torch.autograd.grad(out, pre, dy)
    return out.detach(), oracles.module_step(layer, x, dpre)


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc", "ilm"])
@pytest.mark.parametrize("act", ["relu", "silu", "hardswish", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_converted_layer_is_the_norm_then_act(nf, backend, device, to, act, training, seed):
    """The converted layer (of the target's class) computes act(drop(norm(x))), forward and
    every gradient, vs the float64 oracle of the norm followed by the timm layer's drop and
    act; the running statistics as the oracle's. float64 where the backend runs it (the CPU
    ones), else float32."""
    dtype = torch.float64 if dtype_supported(device, torch.float64) else torch.float32
    timm_layer = _timm_layer(to, act).train(training)
    timm_layer.drop = AddOne()
    drop, act_module = timm_layer.drop, timm_layer.act
    layer = _convert(nf, timm_layer, to)
    assert type(layer) is getattr(nf, TARGET_CLASSES[to])
    assert layer.drop is drop and layer.act is act_module
    layer = oracles.randomize_parameters(layer, seed).to(device=device, dtype=dtype)
    x = randn((3, 8, 5, 4), seed, dtype, device, scale=1.5, offset=0.3).requires_grad_()
    dy = randn((3, 8, 5, 4), seed + 1, torch.float64)
    expected, oracle = _oracle_with_act(layer, x.detach(), lambda t: act_module(t + 1.0), dy)
    y = layer(x)
    assert_close_dtype(y, expected, dtype, "output")
    y.backward(dy.to(device=device, dtype=dtype))
    assert_close_dtype(x.grad, oracle.grads["input"], dtype, "grad input")
    for name, p in layer.named_parameters(recurse=False):
        assert_close_dtype(p.grad, oracle.grads[name], dtype, f"grad {name}")
    if to in ("bin", "iebn") and training:
        assert_close_dtype(layer.running_mean, oracle.running_mean, dtype, "running_mean")
        assert_close_dtype(layer.running_var, oracle.running_var, dtype, "running_var")


def _net(to, act, inplace=True):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _timm_layer(to, act, inplace=inplace),
                          nn.Conv2d(8, 4, 3)).double()
    return oracles.randomize_parameters(model, 5)


@pytest.mark.parametrize("to", ["bin", "assoc"])
@pytest.mark.parametrize("act", ["relu", "silu", "leaky"])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("fuse", [False, True])
def test_converted_model_computes_what_timm_did(nf, to, act, inplace, fuse, seed):
    """BIN (gates at 1) and AssocNorm as converted compute timm's function: outputs, gradients
    (an in-place activation on the layer's output included) and running statistics, train and
    eval, with and without fuse_relu."""
    model = _net(to, act, inplace)
    converted = _convert(nf, copy.deepcopy(model), to, fuse_relu=fuse)
    assert isinstance(converted[1], nf.norm_act._NormAct)
    if fuse and act == "relu":
        assert converted[1].activation == "relu" and type(converted[1].act) is nn.Identity
    else:
        assert converted[1].activation is None and type(converted[1].act) is ACTS[act]
    for training in (True, False):
        model.train(training)
        converted.train(training)
        x = randn((4, 3, 6, 5), seed + training, torch.float64)
        outs = []
        for m in (model, converted):
            m.zero_grad()
            y = m(x)
            y.square().sum().backward()
            outs.append((y.detach(), {k: p.grad for k, p in m.named_parameters()}))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
        for name, grad in outs[0][1].items():
            torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-8, atol=1e-10, msg=name)
    timm_state = model.state_dict()
    state = converted.state_dict()
    assert set(timm_state) <= set(state)
    for name, value in timm_state.items():
        if name.endswith("weight") and to == "assoc" and name.startswith("1."):
            continue  # AssocNorm's weight is GroupNorm's minus 0.5 (README, "What is computed")
        torch.testing.assert_close(state[name], value, msg=name)


def test_state_dict_keeps_timm_keys_of_act_parameters(nf):
    """An activation with parameters (PReLU) keeps its key, ``act.weight``, and its value."""
    layer = timm.BatchNormAct2d(6, act_layer=nn.PReLU)
    with torch.no_grad():
        layer.act.weight.fill_(0.3)
    converted = _convert(nf, nn.Sequential(layer), "bin")
    assert converted.state_dict()["0.act.weight"].item() == pytest.approx(0.3)
    assert converted[0].act is layer.act


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc", "ilm"])
def test_fuse_relu_takes_in_a_relu_act_only(nf, to, seed):
    """fuse_relu: an nn.ReLU act goes into the layer; another act, a drop that is not the
    identity, or a ReLU with hooks stays a module; no ReLU after a layer with an act is fused
    into it (relu(silu(x)) is not silu(relu(x)))."""
    norms = [_timm_layer(to, a).float() for a in ("relu", "silu", "relu", "relu", "silu")]
    norms[2].drop = nn.Dropout(0.0)
    norms[3].act.register_forward_hook(lambda *a: None)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = nn.ModuleList(norms)

        def forward(self, x):
            for norm in self.norms[:4]:
                x = norm(x)
            return torch.relu(self.norms[4](x))  # silu then relu: not fusable

    model = Net().train()
    x = randn((2, 8, 4, 4), seed)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    fused = _convert(nf, model, to, fuse_relu=True)
    assert [n.activation for n in fused.norms] == ["relu", None, None, None, None]
    assert [type(n.act) for n in fused.norms] == [nn.Identity, nn.SiLU, nn.ReLU, nn.ReLU,
                                                   nn.SiLU]
    if to in ("bin", "assoc"):  # the same function as timm's
        with torch.no_grad():
            torch.testing.assert_close(fused(x), expected)


@pytest.mark.parametrize("hooked", ["drop", "act"])
def test_fuse_relu_respects_hooks_on_identity_drop_and_act(nf, hooked):
    """An identity drop with a hook keeps the layer's ReLU act a module (the hook must run);
    a layer whose identity drop or act has a hook keeps the ReLU after it out of the layer (the
    hook must see the pre-ReLU output)."""
    calls = []
    relu_act = timm.BatchNormAct2d(8)  # act: nn.ReLU
    no_act = timm.BatchNormAct2d(8, apply_act=False)  # act: nn.Identity
    relu_act.drop.register_forward_hook(lambda *a: calls.append("relu_act"))
    getattr(no_act, hooked).register_forward_hook(lambda *a: calls.append("no_act"))
    model = nn.Sequential(relu_act, no_act, nn.ReLU())
    fused = _convert(nf, model, "bin", fuse_relu=True)
    assert fused is model  # nothing fused: no graph rewritten
    assert model[0].activation is None and type(model[0].act) is nn.ReLU
    assert model[1].activation is None
    fused(randn((2, 8, 3, 3), 0))
    assert calls == ["relu_act", "no_act"]


def test_relu_after_a_layer_without_act_is_fused(nf):
    """A converted layer made with apply_act=False is a plain norm: the ReLU that follows it in
    the model is fused as for any norm."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm.BatchNormAct2d(8, apply_act=False),
                          nn.ReLU())
    x = randn((2, 3, 4, 4), 0)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    fused = _convert(nf, model, "bin", fuse_relu=True)  # the ReLU module an nn.Identity
    assert fused is model and fused.get_submodule("1").activation == "relu"
    assert type(fused[2]) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected)


def test_bare_timm_layer_converts_and_fuses(nf):
    layer = timm.BatchNormAct2d(4)
    new = _convert(nf, layer, "bin", fuse_relu=True)
    assert isinstance(new, nf.BatchInstanceNormAct2d) and new.activation == "relu"
    assert type(new.act) is nn.Identity
    assert _convert(nf, timm.BatchNormAct2d(4), "bin").activation is None


def test_group_norm_1_act_and_group_size(nf, seed):
    """GroupNorm1Act (one group) and GroupNormAct(group_size=...) keep their group count, and
    compute timm's layer (AssocNorm as converted)."""
    x = randn((2, 8, 3, 3), seed, torch.float64)
    for layer, groups in ((timm.GroupNorm1Act(8), 1), (timm.GroupNormAct(8, group_size=2), 4)):
        layer = oracles.randomize_parameters(layer.double(), seed)
        expected = layer(x)
        converted = _convert(nf, layer, "assoc")
        assert type(converted) is nf.AssocNormAct and converted.num_groups == groups
        torch.testing.assert_close(converted(x), expected)


def test_sync_batch_norm_act(nf, seed):
    """timm's SyncBatchNormAct (from its convert_sync_batchnorm) becomes the synchronized norm +
    act, over the same process group; outside a process group it is the plain layer."""
    sync = timm.SyncBatchNormAct(8, process_group="group")
    sync.act = nn.SiLU()
    sync.drop = nn.Identity()
    new = _convert(nf, nn.Sequential(sync), "bin")[0]
    assert type(new) is nf.SyncBatchInstanceNormAct and new.process_group == "group"
    assert type(new.act) is nn.SiLU
    bare = _convert(nf, nn.Sequential(timm.SyncBatchNormAct(8)), "iebn")[0]  # no drop / act
    assert type(bare) is nf.SyncInstanceEnhancementBatchNormAct
    assert type(bare.act) is nn.Identity and type(bare.drop) is nn.Identity


@pytest.mark.parametrize("to", ["bin", "iebn"])
def test_convert_sync_keeps_drop_and_act(nf, to, seed):
    layer = _timm_layer(to, "silu")
    layer.drop = AddOne()
    model = _convert(nf, nn.Sequential(layer), to)
    act, drop = model[0].act, model[0].drop
    params = {k: v for k, v in model.named_parameters()}
    x = randn((3, 8, 4, 4), seed, torch.float64)
    expected = copy.deepcopy(model)(x)
    nf.convert_sync(model)
    assert type(model[0]) is {"bin": nf.SyncBatchInstanceNormAct,
                              "iebn": nf.SyncInstanceEnhancementBatchNormAct}[to]
    assert model[0].act is act and model[0].drop is drop
    assert all(p is params[k] for k, p in model.named_parameters())
    torch.testing.assert_close(model(x), expected)  # no process group: the plain layer


def test_left_as_is_and_reported(nf):
    """FrozenBatchNormAct2d (frozen by design) and a class named like timm's in a module named
    like timm's that is not timm's are left as they are, each named in the warning; a class of
    timm's name and module on another base is not taken either."""
    class BatchNormAct2d(nn.BatchNorm2d):  # not timm's: may compute something else
        pass

    BatchNormAct2d.__module__ = "mylib.layers.norm_act"
    model = nn.Sequential(timm.FrozenBatchNormAct2d(4), BatchNormAct2d(4))
    with pytest.warns(UserWarning, match=r"0 \(FrozenBatchNormAct2d\), 1 \(BatchNormAct2d\)"):
        nf.convert(model, "bin")
    assert type(model[0]) is timm.FrozenBatchNormAct2d and type(model[1]) is BatchNormAct2d

    class GroupNormAct(nn.BatchNorm2d):  # timm's name and module, not a GroupNorm
        pass

    GroupNormAct.__module__ = timm.TIMM_MODULE
    model = nn.Sequential(GroupNormAct(4))
    nf.convert(model, "assoc")
    assert type(model[0]) is GroupNormAct


def test_ilm_refusal_names_the_timm_layer(nf):
    model = nn.Sequential(timm.GroupNormAct(12, num_groups=4))
    with pytest.raises(ValueError, match=r"the GroupNormAct at '0'"):
        nf.convert(model, "ilm", key_group_size=5)
    assert type(model[0]) is timm.GroupNormAct  # untouched


@pytest.mark.parametrize("cls", ["BatchInstanceNormAct2d", "AssocNormAct"])
def test_act_must_be_a_module(nf, cls):
    args = (8,) if cls.startswith("Batch") else (2, 8)
    with pytest.raises(TypeError, match=f"{cls}: act must be an nn.Module or None, got str"):
        getattr(nf, cls)(*args, act="relu")
    with pytest.raises(TypeError, match=f"{cls}: drop must be an nn.Module or None, got float"):
        getattr(nf, cls)(*args, drop=0.1)


def test_fx_trace_records_the_layer_once(nf, seed):
    """Under torch.fx the layer, act included, is one call_module node: act runs once."""
    model = _convert(nf, _net("bin", "silu"), "bin").eval()
    graph_module = torch.fx.symbolic_trace(model)
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2"]
    x = randn((2, 3, 5, 5), seed, torch.float64)
    torch.testing.assert_close(graph_module(x), model(x))


def test_pickle_and_deepcopy(nf, seed):
    model = _convert(nf, _net("assoc", "silu"), "assoc")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = pickle.loads(pickle.dumps(model))
    x = randn((2, 3, 5, 5), seed, torch.float64)
    for other in (loaded, copied, copy.deepcopy(model)):
        assert type(other[1]) is nf.AssocNormAct
        torch.testing.assert_close(other(x), model(x))


def test_export_of_a_converted_layer(nf, seed):
    """torch.export sees the layer and its act (a program users deploy)."""
    model = _convert(nf, _net("bin", "silu", inplace=False).float(), "bin").eval()
    x = randn((2, 3, 5, 5), seed)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))


def test_timm_group_norms_become_plain_layers(nf, seed):
    """timm's GroupNorm (ResNet-50-GN) and GroupNorm1 (one group) have no act: AssocNorm /
    ILMNorm, computing the GroupNorm's function (AssocNorm as converted)."""
    model = nn.Sequential(timm.GroupNorm(8, num_groups=4), timm.GroupNorm1(8)).double()
    oracles.randomize_parameters(model, seed)
    x = randn((2, 8, 3, 3), seed, torch.float64)
    expected = model(x)
    converted = _convert(nf, copy.deepcopy(model), "assoc")
    assert [type(m) for m in converted] == [nf.AssocNorm, nf.AssocNorm]
    assert [m.num_groups for m in converted] == [4, 1]
    torch.testing.assert_close(converted(x), expected)
    assert [type(m) for m in _convert(nf, model, "ilm")] == [nf.ILMNorm, nf.ILMNorm]


def test_sync_layer_applies_act_once_for_any_rank(nf, seed):
    """A synchronized norm + act flattens an input of rank > 5 and calls the norm on it: the
    act runs once, after (as timm's SyncBatchNormAct)."""
    layer = timm.SyncBatchNormAct(4).double()
    layer.act, layer.drop = nn.SiLU(), nn.Identity()
    calls = []
    converted = _convert(nf, copy.deepcopy(layer), "bin")
    converted.act.register_forward_hook(lambda *a: calls.append(1))
    for training in (True, False):
        x = randn((2, 4, 2, 2, 2, 3), seed + training, torch.float64)
        calls.clear()
        y = converted.train(training)(x)
        assert len(calls) == 1
        torch.testing.assert_close(y, layer.train(training)(x))


def test_convert_sync_of_a_subclass_keeps_drop_and_act(nf, seed):
    class Mine(nf.BatchInstanceNormAct2d):
        pass

    model = nn.Sequential(Mine(4, act=nn.SiLU())).double()
    x = randn((2, 4, 3, 3), seed, torch.float64)
    expected = model(x)
    nf.convert_sync(model)
    assert type(model[0]) is nf.SyncBatchInstanceNormAct and type(model[0].act) is nn.SiLU
    torch.testing.assert_close(model(x), expected)


def test_fuse_relu_leaves_a_norm_with_hooks(nf, seed):
    """A norm with a forward hook keeps the ReLU after it: the hook must see the norm's output,
    not relu of it."""
    for norm in (nn.BatchNorm2d(8), timm.BatchNormAct2d(8, apply_act=False)):
        model = nf.convert(nn.Sequential(nn.Conv2d(3, 8, 1), norm, nn.ReLU()), "bin")
        model[1].register_forward_hook(lambda m, i, o: o - 1.0)
        fused = nf.convert(model, "bin", fuse_relu=True)
        assert fused is model and model[1].activation is None
        assert float(fused(randn((2, 3, 4, 4), seed)).detach().min()) == 0.0  # ReLU still runs


def test_only_own_relus_returns_the_model_itself(nf):
    """With every ReLU a layer's own act there is no graph to rewrite: the model comes back."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm.BatchNormAct2d(8))
    assert _convert(nf, model, "bin", fuse_relu=True) is model
    assert model[1].activation == "relu"


def test_a_norm_left_as_is_keeps_its_children(nf):
    """A norm subclass convert does not take is left whole: timm's SplitBatchNorm2d holds
    BatchNorm2d's of its own (aux_bn), which must not become BIN under an unconverted parent."""
    class SplitBatchNorm2d(nn.BatchNorm2d):
        def __init__(self, num_features):
            super().__init__(num_features)
            self.aux_bn = nn.ModuleList([nn.BatchNorm2d(num_features)])

    model = nn.Sequential(SplitBatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"0 \(SplitBatchNorm2d\)"):
        nf.convert(model, "bin")
    assert type(model[0].aux_bn[0]) is nn.BatchNorm2d
