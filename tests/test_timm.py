"""``normfuse.convert`` on timm's own models (timm 1.0.31).

timm needs torchvision, whose wheels pin a torch, so it is not among the test requirements: CI
runs this file in a venv that adds torchvision and timm to the main environment
(``.ci/timm.sh``); without timm it is skipped.  tests/test_norm_act.py tests the same conversion
against a copy of timm's layers (tests/timm_norm_act.py) everywhere; ``test_copy_matches_timm``
keeps the copy honest.
"""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import timm_norm_act as copied
from oracles import randn

timm = pytest.importorskip("timm")
norm_act = pytest.importorskip("timm.layers.norm_act")


def test_recognised_classes_are_timms(nf):
    """The classes convert recognises by module and name exist in this timm, there, derived
    from the torch norm that convert expects; the copies name the same modules."""
    import importlib  # noqa: PLC0415

    from normfuse.convert import _TIMM_LAYERS  # noqa: PLC0415

    for (module, name), (base, _) in _TIMM_LAYERS.items():
        cls = getattr(importlib.import_module(f"timm.layers.{module}"), name)
        assert cls.__module__ == f"timm.layers.{module}" and issubclass(cls, base), name
        assert getattr(copied, name).__module__ == cls.__module__, name
    assert norm_act.FrozenBatchNormAct2d.__module__ == copied.TIMM_MODULE


# (class, its constructor's keyword arguments): each act, with and without apply_act, a group
# size, and the layers without an act.
COPIED = [("BatchNormAct2d", {"act_layer": nn.ReLU}), ("BatchNormAct2d", {"act_layer": nn.SiLU}),
          ("BatchNormAct2d", {"apply_act": False}),
          ("GroupNormAct", {"num_groups": 4, "act_layer": nn.SiLU}),
          ("GroupNormAct", {"group_size": 2, "act_layer": nn.ReLU}),
          ("GroupNorm1Act", {"act_layer": nn.Hardswish}),
          ("FrozenBatchNormAct2d", {"act_layer": nn.ReLU}),
          ("GroupNorm", {"num_groups": 4}), ("GroupNorm1", {}), ("SyncBatchNormAct", {})]


@pytest.mark.parametrize("name,kwargs", COPIED)
def test_copy_matches_timm(name, kwargs, seed):
    """tests/timm_norm_act.py computes what timm's layers compute (random parameters and
    buffers, train and eval), with the same state_dict and the same drop / act modules."""
    module = timm.layers.norm if name in ("GroupNorm", "GroupNorm1") else norm_act
    theirs = getattr(module, name)(8, **kwargs).double()
    ours = getattr(copied, name)(8, **kwargs).double()
    if name == "SyncBatchNormAct":  # as timm's convert_sync_batchnorm leaves it
        for layer in (theirs, ours):
            layer.act, layer.drop = nn.SiLU(), nn.Identity()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for i, t in enumerate(itertools.chain(theirs.parameters(), theirs.buffers())):
            if t.is_floating_point():
                t.copy_(randn(t.shape, seed + i, torch.float64).abs() + 0.5)
    ours.load_state_dict(theirs.state_dict())
    for post in ("act", "drop"):
        assert type(getattr(ours, post, None)) is type(getattr(theirs, post, None))
    for training in (True, False):
        x = randn((3, 8, 4, 5), seed + training, torch.float64)
        torch.testing.assert_close(ours.train(training)(x), theirs.train(training)(x))
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


# (model, target, fuse_relu): the families whose norms are timm's norm + act layers, with ReLU,
# SiLU, Hardswish and LeakyReLU acts; GroupNormAct in BiT and the GN EfficientNet; timm's
# GroupNorm in ResNet-50-GN, GroupNorm1 in MobileViTv2.
MODELS = [("densenet121", "bin", True), ("mobilenetv3_small_050", "bin", True),
          ("regnetx_002", "bin", True), ("efficientnet_b0", "bin", False),
          ("cspresnet50", "bin", True), ("resnetv2_50x1_bit", "assoc", True),
          ("efficientnet_b0_gn", "assoc", False), ("resnet50_gn", "assoc", False),
          ("mobilevitv2_050", "assoc", False), ("mobilenetv3_small_050", "iebn", True),
          ("efficientnet_b0_gn", "ilm", False)]


@pytest.mark.parametrize("name,to,fuse", MODELS)
def test_timm_model_converts_every_norm(nf, name, to, fuse, seed):
    """Every norm of the model is converted, with no warning; with fuse_relu each ReLU act is
    fused. BIN (gates at 1) and AssocNorm compute timm's model: outputs and gradients in float64,
    train and eval; IEBN and ILM-Norm give finite outputs and gradients."""
    model = timm.create_model(name, pretrained=False).double()
    relu_acts = sum(type(getattr(m, "act", None)) is nn.ReLU for m in model.modules())
    options = {"key_group_size": 4, "reduction": 4} if to == "ilm" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = nf.convert(copy.deepcopy(model), to, fuse_relu=fuse, **options)
    norms = [m for m in converted.modules() if isinstance(m, nf.fuse.NORM_TYPES)]
    kind = nn.GroupNorm if to in ("assoc", "ilm") else nn.modules.batchnorm._BatchNorm
    assert len(norms) == sum(isinstance(m, kind) for m in model.modules()) and norms
    assert not any(isinstance(m, kind) for m in converted.modules())
    fused = sum(m.activation == "relu" for m in norms)
    assert fused == (relu_acts if fuse else 0)
    for training in (True, False):
        x = randn((2, 3, 64, 64), seed + training, torch.float64)
        outputs, grads = [], []
        for m in (model, converted):
            m.train(training).zero_grad()
            y = m(x)
            y.square().sum().backward()
            outputs.append(y.detach())
            grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
        if to in ("bin", "assoc"):
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
            for key, grad in grads[0].items():
                torch.testing.assert_close(grads[1][key], grad, rtol=1e-7, atol=1e-9, msg=key)
        else:
            assert torch.isfinite(outputs[1]).all()
            assert all(torch.isfinite(g).all() for g in grads[1].values())


def test_timm_sync_conversion_then_convert(nf):
    """timm's convert_sync_batchnorm (SyncBatchNormAct, act and drop moved over), then
    normfuse.convert: the synchronized norm + act, its act kept."""
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    model = norm_act.convert_sync_batchnorm(model)
    acts = [type(m.act) for m in model.modules() if type(m).__name__ == "SyncBatchNormAct"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf.convert(model, "bin")
    ours = [m for m in model.modules() if isinstance(m, nf.SyncBatchInstanceNormAct)]
    assert [type(m.act) for m in ours] == acts and acts


def test_timm_resnet_fused_stays_a_timm_model(nf, seed):
    """timm's ResNet has separate nn.ReLU modules: fuse_relu traces it, fuses every pair whose
    ReLU module is called only after its norm (the stem's and each block's first), and hands
    back timm's ResNet itself, so what timm's train.py reads and calls is there: its data config
    (a GraphModule would have no pretrained_cfg: timm's defaults, crop_pct 0.875 instead of
    0.95), reset_classifier, set_grad_checkpointing, the optimizer factory's hasattr checks."""
    from timm.data import resolve_data_config  # noqa: PLC0415
    from timm.optim import create_optimizer_v2  # noqa: PLC0415

    model = timm.create_model("resnet18", pretrained=False, num_classes=7).double()
    config = resolve_data_config({}, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = nf.convert(copy.deepcopy(model), "bin", fuse_relu=True)
    assert type(fused) is type(model)
    assert sum(getattr(m, "activation", None) == "relu" for m in fused.modules()) == 1 + 8
    assert type(fused.act1) is nn.Identity and type(fused.layer1[0].act2) is nn.ReLU
    assert resolve_data_config({}, model=fused) == config and config["crop_pct"] != 0.875
    x = randn((2, 3, 32, 32), seed, torch.float64)
    plain = nf.convert(model, "bin")
    for training in (True, False):
        torch.testing.assert_close(fused.train(training)(x), plain.train(training)(x))
    fused.set_grad_checkpointing(True)
    plain.set_grad_checkpointing(True)
    torch.testing.assert_close(fused.train()(x), plain.train()(x))
    fused.reset_classifier(3)
    assert fused(x).shape == (2, 3)
    groups = create_optimizer_v2(fused, "sgd", lr=0.1, weight_decay=1e-4).param_groups
    assert [len(g["params"]) for g in groups] == \
        [len(g["params"]) for g in create_optimizer_v2(plain, "sgd", lr=0.1,
                                                          weight_decay=1e-4).param_groups]


def test_timm_model_fx_feature_extractor(nf):
    """timm's fx feature extraction on a converted model (its tracer keeps normfuse layers as
    one node each, as it keeps its own norm + act layers)."""
    from timm.models import create_feature_extractor  # noqa: PLC0415

    model = nf.convert(timm.create_model("regnetx_002", pretrained=False), "bin").eval()
    nodes = {"s1": "s1", "s4": "s4"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(1, 3, 64, 64)
    features = extractor(x)
    torch.testing.assert_close(features["s4"], model.forward_features(x))


def test_converted_timm_model_exports_to_onnx(nf, seed, tmp_path):
    """A converted, fused timm model (MobileNetV3: its ReLU acts fused, its Hardswish acts kept)
    exports to ONNX and onnxruntime computes what the model computes (README, "Export")."""
    ort = pytest.importorskip("onnxruntime")
    model = nf.convert(timm.create_model("mobilenetv3_small_050", pretrained=False), "bin",
                       fuse_relu=True).eval()
    x = randn((2, 3, 64, 64), seed)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own notices
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)
