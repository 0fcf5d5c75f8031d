"""normfuse.convert(model, to, fuse_relu=True): each norm whose output goes only into a ReLU gets
activation="relu" and the ReLU call goes (torch.fx); the result computes what the unfused
conversion computes (issue 14).

The ResNets are bench/resnet.py's faithful copy of torchvision's (torchvision/models/resnet.py,
0.29.1: BasicBlock, Bottleneck, ResNet, the same module names, one inplace ``self.relu`` per
block called after bn1, bn2 and the residual add, the downsample branch).  torchvision itself is not
a test dependency: its wheel for torch 2.14 requires torch>=2.14.0, outside the torch range the
project supports (the lowest-torch CI runs 2.11); ``test_copy_matches_torchvision`` checks the
copy against it where it is installed.

Numbers: run under the "torch" backend (the reference), and under the default backend ("auto":
the compiled kernels).
"""

from __future__ import annotations

import argparse
import copy
import io
import pickle
import random
import re
import warnings

import pytest
import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import fx, nn

import normfuse
from bench.resnet import BasicBlock, conv1x1, resnet18, resnet50
from normfuse.fuse import NORM_TYPES, FusedGraphModule, _Tracer

F64 = torch.float64


# ---------------------------------------------------- torchvision's ResNet (bench/resnet.py)
def small_resnet():
    """torchvision's BasicBlocks (shared inplace ReLU, downsample branch), narrow: cheap steps."""
    down = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True), BasicBlock(8, 8), BasicBlock(8, 16, 2, down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _group_norm(channels):
    return nn.GroupNorm(32, channels)


# ------------------------------------------------------------------------------------ helpers
def _randomize(model, seed):
    """Norm parameters and running statistics away from their defaults (biases of either sign:
    the ReLUs clip some planes more than others)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(3)
    return model


def _pair(model, to, seed, dtype=F64):
    """(unfused conversion, fused conversion) of one model, the same weights."""
    model = _randomize(model, seed).to(dtype)
    with torch.random.fork_rng():  # the same random parameters (AssocNorm's encoder) in both
        torch.manual_seed(seed)
        plain = normfuse.convert(copy.deepcopy(model), to)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # these models trace: no warning
            fused = normfuse.convert(model, to, fuse_relu=True)
    return plain, fused


def _fused_norms(model):
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, NORM_TYPES) and getattr(m, "activation", None) == "relu")


def _relu_calls(model):
    """ReLU calls left in ``model``'s forward (traced, the GraphModules in it included)."""
    n = 0
    for node in _Tracer().trace(model).nodes:
        if node.op == "call_module":
            n += type(model.get_submodule(node.target)) is nn.ReLU
        elif node.op == "call_function":
            n += node.target in (torch.relu, torch.relu_, F.relu)
        elif node.op == "call_method":
            n += node.target in ("relu", "relu_")
    return n


def _step(model, inputs, seed):
    """Output, input gradients and parameter gradients (by name) of one forward/backward."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    y = model(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(y, inputs + list(params.values()), dy)
    return y.detach(), grads[:len(inputs)], dict(zip(params, grads[len(inputs):]))


def _assert_same_step(fused, plain, inputs, seed, what):
    y, dx, dp = _step(fused, inputs, seed)
    yr, dxr, dpr = _step(plain, inputs, seed)
    torch.testing.assert_close(y, yr, msg=lambda m: f"{what}: output: {m}")
    for a, b in zip(dx, dxr):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: input gradient: {m}")
    assert dp.keys() == dpr.keys(), what
    for name in dp:
        torch.testing.assert_close(dp[name], dpr[name],
                                   msg=lambda m: f"{what}: gradient of {name}: {m}")


def _assert_same_in_train_and_eval(fused, plain, x, seed):
    """Steps in training, eval and training again: same outputs, gradients and state."""
    for training in (True, False, True):
        fused.train(training), plain.train(training)
        _assert_same_step(fused, plain, [x], seed, f"training={training}")
        _assert_same_state(fused, plain, f"training={training}")


def _assert_same_state(fused, plain, what):
    a, b = fused.state_dict(), plain.state_dict()
    assert list(a) == list(b), f"{what}: state_dict keys"
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{what}: {k}: {m}")


@pytest.fixture(params=["torch", "default"])
def fuse_backend(request):
    """The reference "torch" backend, and the default ("auto": the compiled kernels)."""
    if request.param == "torch":
        with normfuse.use_backend("torch"):
            yield "torch"
        return
    with normfuse.use_backend("auto"):
        yield "auto"


# --------------------------------------------------------------------------------- patterns
class Patterns(nn.Module):
    """Every ReLU form after a norm, and norms that must stay unfused."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(14))
        self.relu = nn.ReLU()
        self.relu_ = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.shared = nn.BatchNorm2d(4)

    def forward(self, x):
        b = self.bns
        ys = [self.relu(b[0](x)), self.relu_(b[1](x)), torch.relu(b[2](x)),
              torch.relu_(b[3](x)), F.relu(b[4](x)), F.relu(b[5](x), inplace=True),
              F.relu(b[6](x), True), b[7](x).relu(), b[8](x).relu_(), F.relu_(b[9](x)),
              self.block(x)]
        h = b[10](x)
        ys.append(self.relu(h) + h)             # two users: unfused
        ys.append(torch.sigmoid(b[11](x)))       # not a ReLU: unfused
        h = b[12](x)
        ys.append(self.relu_(h))                 # the ReLU is in place, but h is used after it
        ys.append(h * 2)
        ys.append(self.relu(self.shared(x)))     # one call site fusable, the other not
        ys.append(self.shared(ys[-1]) - 1)
        ys.append(b[13](x))                      # a model output
        return torch.stack(ys)


FUSED_IN_PATTERNS = sorted([f"bns.{i}" for i in range(10)] + ["block.1"])


def test_fuses_every_relu_form(fuse_backend, seed):
    plain, fused = _pair(Patterns(), "bin", seed)
    assert isinstance(fused, fx.GraphModule)
    assert _fused_norms(fused) == FUSED_IN_PATTERNS
    assert _relu_calls(fused) == 3, fused.code   # bns.10's, bns.12's, shared's
    assert not any(getattr(m, "activation", None) for m in plain.modules())
    x = torch.randn(3, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


def test_norm_with_another_user_stays_unfused(seed):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.relu(y), y.mean()

    _, fused = _pair(Two(), "bin", seed)
    assert _fused_norms(fused) == []
    assert getattr(fused.bn, "activation", None) is None
    assert not isinstance(fused, fx.GraphModule), "nothing fused: the model itself comes back"


def test_plain_identities_between_norm_and_relu(seed):
    """timm's blocks call a drop_block (an nn.Identity unless drop-block is on) between norm and
    ReLU: plain identities in between do not break the pair; one with a hook does."""
    class Graph(nn.Module):  # the ReLU is functional: fused in a GraphModule
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.drop = nn.Identity()

        def forward(self, x):
            return F.relu(self.drop(self.drop(self.bn(x))))

    hooked = nn.Identity()
    hooked.register_forward_pre_hook(lambda m, args: None)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Identity(), nn.ReLU(), Graph(),
                          nn.BatchNorm2d(3), hooked, nn.ReLU())
    plain, fused = _pair(model, "bin", seed)
    assert fused is model and _fused_norms(fused) == ["0", "3.bn"]
    assert type(fused[2]) is nn.Identity and isinstance(fused[3], FusedGraphModule)
    assert type(fused[6]) is nn.ReLU and _relu_calls(fused) == 1
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


def test_relu_module_with_hooks_stays_unfused(seed):
    """Fusing would drop the ReLU call, and with it the hooks registered on it: that pair stays
    unfused, and convert says so."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    calls = []
    model[2].register_forward_hook(lambda m, i, o: calls.append(1))
    model = _randomize(model, seed).to(F64)
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with pytest.warns(UserWarning, match=r"left unfused: '1' \(its ReLU has hooks\)"):
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert _fused_norms(fused) == ["4"]
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    calls.clear()
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert len(calls) == 2  # once per model: the hook still runs in the fused one


def test_convert_without_fuse_relu_fuses_nothing():
    model = resnet18()
    out = normfuse.convert(model, "bin")
    assert out is model and _fused_norms(out) == []


# ------------------------------------------------------------------------------- ResNets
@pytest.mark.parametrize("fuse_backend", ["default"], indirect=True)
@pytest.mark.parametrize("to", ["bin", "iebn", "assoc"])
def test_resnet50_every_pair_fused(fuse_backend, to, seed):
    """ResNet-50 (BatchNorm for "bin"/"iebn", GroupNorm(32) for "assoc"): the 33 norms followed
    by a ReLU are fused, the 16 bn3 (into the residual add) and 4 downsample norms are not;
    outputs and gradients equal the unfused conversion's.  float32: float64 convolutions take
    ~1 s a ResNet-50 forward here (no oneDNN); the small models below are float64, and run on
    the torch backend too (which fuses the same pairs: fusing is the graph's business; ~15 s a
    ResNet-50 case)."""
    norm_layer = _group_norm if to == "assoc" else None
    torch.manual_seed(seed)
    plain, fused = _pair(resnet50(num_classes=10, norm_layer=norm_layer), to, seed,
                         dtype=torch.float32)
    names = _fused_norms(fused)
    assert len(names) == 1 + 16 * 2, names  # the stem's bn1, and each block's bn1 and bn2
    assert all(n == "bn1" or n.endswith((".bn1", ".bn2")) for n in names), names
    assert _relu_calls(fused) == 16, "the ReLU after each residual add stays"
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    fused.train(), plain.train()
    _assert_same_step(fused, plain, [x], seed, f"{to} train")
    _assert_same_state(fused, plain, to)
    fused.eval(), plain.eval()  # eval gradients: the smaller models below
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), msg=lambda m: f"{to} eval: {m}")


def test_resnet18_basic_blocks(seed):
    """Structure only (resnet10 below runs BasicBlocks)."""
    plain, fused = _pair(resnet18(num_classes=10), "bin", seed)
    assert len(_fused_norms(fused)) == 1 + 8 and _relu_calls(fused) == 8
    # The model stays a ResNet (it has methods of its own); its stem's ReLU, called only after
    # bn1, became an nn.Identity.  Each block's shared self.relu stays: its after-the-add call
    # sites still use it, so the block (a class with nothing but __init__ and forward) is a
    # GraphModule without the fused call sites.
    assert type(fused).__name__ == "ResNet" and type(fused.relu) is nn.Identity
    block = fused.layer1[0]
    assert isinstance(block, FusedGraphModule) and type(block.relu) is nn.ReLU
    assert block.code.count("self.relu(") == 1 and block.stride == 1 and block.expansion == 1


def test_copy_matches_torchvision(seed):
    tv = pytest.importorskip("torchvision")
    for name, ours in (("resnet50", resnet50), ("resnet18", resnet18)):
        theirs = getattr(tv.models, name)(num_classes=10).double().eval()
        mine = ours(num_classes=10).double().eval()
        assert {k: v.shape for k, v in mine.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}, name
        mine.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 3, 32, 32, dtype=F64)
        torch.testing.assert_close(mine(x), theirs(x))
        fused = normfuse.convert(theirs, "bin", fuse_relu=True)
        assert len(_fused_norms(fused)) == {"resnet50": 33, "resnet18": 9}[name]


# ---------------------------------------------------------------- untraceable submodules
class DataDependent(nn.Module):
    """Data-dependent control flow: fx cannot trace it.  Its own bn->relu stays unfused; its
    traceable child is fused on its own."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x) -> torch.Tensor:
        y = F.relu(self.bn(x))
        if y.sum() > 0:
            y = y * 2
        return self.inner(y)


class ModeDependent(nn.Module):
    """A forward that branches on self.training: one graph cannot stand for both modes."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x) -> torch.Tensor:
        y = torch.relu(self.bn(x))
        return y * 0.5 if self.training else y


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.bad = DataDependent()
        self.mode = ModeDependent()
        self.good = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        return self.good(self.mode(self.bad(x)))


def test_untraceable_submodule_left_plain_and_reported(fuse_backend, seed):
    model = _randomize(WithUntraceable(), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")  # BIN: no random parameters
    with pytest.warns(UserWarning) as record:
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert len(record) == 1, [str(r.message) for r in record]
    msg = str(record[0].message)
    assert "'bad'" in msg and "control flow" in msg, msg
    assert "'mode'" in msg and "train/eval" in msg, msg
    assert "'good'" not in msg and "'bad.inner'" not in msg and "model itself" not in msg, msg
    # The rest is fused: the root's bn, good.0, and bad.inner.1 (bad.inner traced on its own).
    assert _fused_norms(fused) == ["bad.inner.1", "bn", "good.0"]
    # Every fused pair's ReLU is a module called only there: an nn.Identity now, no graph.
    assert type(fused) is WithUntraceable and type(fused.bad) is DataDependent
    assert type(fused.bad.inner[2]) is nn.Identity and type(fused.good[1]) is nn.Identity
    assert type(fused.mode) is ModeDependent and getattr(fused.mode.bn, "activation", None) is None
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


def test_untraceable_model_returns_itself_with_fused_children(seed):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.stem(x)
            return F.relu(self.bn(x)) if x.mean() > 0 else x

    model = Root()
    with pytest.warns(UserWarning, match="the model itself, Root"):
        out = normfuse.convert(model, "bin", fuse_relu=True)
    assert out is model and type(out.stem[2]) is nn.Identity
    assert _fused_norms(out) == ["stem.1"]


# ------------------------------------------------------- state, modes, copies, in-place contract
def test_train_eval_running_statistics(fuse_backend, seed):
    """Several steps, modes alternating: outputs, gradients and running statistics equal."""
    plain, fused = _pair(small_resnet(), "bin", seed)
    assert len(_fused_norms(fused)) == 3 and _relu_calls(fused) == 2
    g = torch.Generator().manual_seed(seed)
    for step, training in enumerate((True, False, True, True, False)):
        fused.train(training), plain.train(training)
        x = torch.randn(3, 3, 8, 8, dtype=F64, generator=g)
        _assert_same_step(fused, plain, [x], seed + step, f"step {step}")
        _assert_same_state(fused, plain, f"step {step}")


def test_state_dict_round_trip_and_copies(fuse_backend, seed):
    plain, fused = _pair(Patterns(), "iebn", seed)
    x = torch.randn(3, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    plain.train()
    for _ in range(2):
        plain(x)  # move the unfused model's running statistics on
    # The unfused model's state_dict loads into the fused one (strict), through torch.save.
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    fused.load_state_dict(torch.load(buf))
    _assert_same_state(fused, plain, "loaded")
    _assert_same_step(fused.eval(), plain.eval(), [x], seed, "loaded, eval")
    # deepcopy: the whole tree, the same keys and numbers, independent state.
    twin = copy.deepcopy(fused)
    assert type(twin) is not type(fused) and isinstance(twin, fx.GraphModule)
    assert type(twin).__name__ == type(fused).__name__ != "GraphModule"  # (a name to select by)
    assert _fused_norms(twin) == FUSED_IN_PATTERNS
    _assert_same_state(twin, fused, "deepcopy")
    assert twin.bns[0].weight is not fused.bns[0].weight
    _assert_same_step(twin.train(), plain.train(), [x], seed, "deepcopy, train")
    _assert_same_state(twin, plain, "deepcopy after a train step")
    # torch.save of the whole module (a plain GraphModule comes back: fx retraces the code).
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert list(loaded.state_dict()) == list(twin.state_dict())
    _assert_same_step(loaded.eval(), twin.eval(), [x], seed, "torch.save(module)")
    # .to(): dtype changes with the model, and the numbers follow.
    twin32, plain32 = twin.to(torch.float32), plain.to(torch.float32)
    assert twin32 is twin and all(p.dtype == torch.float32 for p in twin.parameters())
    torch.testing.assert_close(twin32.eval()(x.float()), plain32.eval()(x.float()))


def test_in_place_contract(seed):
    """The input model is converted and fused in place and comes back itself (an nn.Sequential
    stays one); its BasicBlocks, whose shared ReLU module also follows the residual add, are
    replaced by GraphModules holding the same submodules (parameters shared)."""
    model = _randomize(small_resnet(), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    blocks = model[3], model[4]
    fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert fused is model and type(fused) is nn.Sequential and type(fused[2]) is nn.Identity
    for i, block in zip((3, 4), blocks):
        assert isinstance(fused[i], FusedGraphModule) and fused[i] is not block
        assert fused[i].bn1 is block.bn1 and block.bn1.activation == "relu"
        assert list(fused[i].parameters()) == list(block.parameters())
    x = torch.randn(3, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))
    with normfuse.use_backend("torch"):
        for training in (True, False):
            fused.train(training), plain.train(training)
            _assert_same_step(fused, plain, [x], seed, f"training={training}")


def test_bare_norm_and_norm_free_models():
    bn = normfuse.convert(nn.BatchNorm2d(3), "bin", fuse_relu=True)
    assert type(bn) is normfuse.BatchInstanceNorm2d
    mlp = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    assert normfuse.convert(mlp, "bin", fuse_relu=True) is mlp


# ------------------------------------- models with an API of their own; what a GraphModule keeps
class Classifier(nn.Module):
    """A model like timm's: plain attributes a training script reads, a property, methods (one
    that changes the model, one that timm's optimizer factory asks for with hasattr), a ``train``
    that keeps its BatchNorms frozen (fine-tuning)."""

    def __init__(self, functional=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.functional = functional
        self.num_classes = 3
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "crop_pct": 0.95}

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    def no_weight_decay(self):
        return {"head.bias"}

    def reset_classifier(self, num_classes):
        self.head = nn.Linear(4, num_classes)
        self.num_classes = num_classes

    def train(self, mode=True):
        super().train(mode)
        self.features[1].eval()  # frozen statistics
        return self

    def forward(self, x):
        y = self.features(x)
        y = F.relu(self.bn(y)) if self.functional else self.bn(y)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
def test_model_with_an_api_of_its_own_stays_itself(functional, seed):
    """A model whose class has methods and properties of its own comes back itself, with all of
    them (a GraphModule would lack them, or run nn.Module's train instead of its own): the pair
    whose ReLU is a module called only there is fused in place (the ReLU an nn.Identity); a pair
    that needs a graph (here a functional ReLU in its forward) is left, and the warning says so."""
    model = _randomize(Classifier(functional), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    messages = [str(r.message) for r in record]
    assert fused is model and type(fused) is Classifier
    assert _fused_norms(fused) == ["features.1"] and type(fused.features[2]) is nn.Identity
    if functional:
        expected = "left unfused: 'bn' (in the forward of Classifier: its class has"
        assert len(messages) == 1 and expected in messages[0], messages
        assert _relu_calls(fused) == 1
    else:
        assert messages == []
    assert fused.no_weight_decay() == {"head.bias"} and fused.default_cfg["crop_pct"] == 0.95
    fused.train()
    assert not fused.features[1].training  # its own train()
    x = torch.randn(2, 3, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


class Block(nn.Module):
    """A block a GraphModule may stand for (only __init__, forward and a class constant), with a
    ReLU module called after its norm and again after the residual add."""

    expansion = 1

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.aux = nn.Linear(4, 2)  # not called by forward: no node of the graph holds it
        self.stride = 1
        self.cfg = {"mean": (0.5, 0.5, 0.5)}

    def forward(self, x):
        return self.relu(self.relu(self.bn(x)) + x)


CALLS = []


def _count_call(module, args, output):  # module level: a whole-module torch.save pickles it
    CALLS.append(type(module).__name__)


def _rename_old_keys(module, state_dict, prefix, *args):
    assert isinstance(module, FusedGraphModule)  # the fused block, also after torch.load
    if prefix + "old_bn.weight" in state_dict:
        for name in ("weight", "bias"):
            state_dict[f"{prefix}bn.{name}"] = state_dict.pop(f"{prefix}old_bn.{name}")


def test_graph_module_keeps_the_blocks_attributes_hooks_and_tree(seed):
    """What a GraphModule would drop (the object's own attributes, its class's constants, its
    hooks, modules its forward does not call) the fused block keeps, through deepcopy and
    torch.save (a plain GraphModule: no stride, a hook dropped, ``aux`` gone after torch.save)."""
    block = Block().double()
    handle = block.register_forward_hook(_count_call)
    block.register_load_state_dict_pre_hook(_rename_old_keys)
    fused = normfuse.convert(block, "bin", fuse_relu=True)
    assert isinstance(fused, FusedGraphModule) and _fused_norms(fused) == ["bn"]
    assert fused.stride == 1 and fused.cfg is block.cfg and fused.expansion == 1
    assert _relu_calls(fused) == 1
    x = torch.randn(2, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    CALLS.clear()
    fused(x)
    assert CALLS == [type(fused).__name__]  # the block's hook, once
    sd = {k.replace("bn.", "old_bn.") if k in ("bn.weight", "bn.bias") else k: v.clone()
          for k, v in fused.state_dict().items()}
    fused.load_state_dict(sd)  # the block's load_state_dict pre-hook renames the old keys
    twin = copy.deepcopy(fused)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded, copy.deepcopy(loaded), copy.copy(fused)):
        assert isinstance(other, FusedGraphModule)
        assert list(other.state_dict()) == list(block.state_dict())  # aux included
        assert other.stride == 1 and other.cfg == block.cfg and other.expansion == 1
        CALLS.clear()
        torch.testing.assert_close(other(x), fused(x), rtol=0, atol=0)
        assert len(CALLS) == 2, CALLS  # its own copy of the hook, and fused's
        other.load_state_dict(sd)  # the pre-hook, called with the module it sits on
    # Copies of the block's hooks: its handle removes its own, the fused block keeps its copy.
    handle.remove()
    CALLS.clear()
    fused(x)
    assert CALLS == [type(fused).__name__]


def test_a_pickle_naming_the_old_module_still_loads(seed):
    """FusedGraphModule's rebuild and the tracer a GraphModule records lived in normfuse.fuse
    until they moved to _fused_graph.py / _fuse_trace.py: a model pickled then names them there.
    (Protocol 0 writes module names as plain lines, so the old names can be put back.)"""
    fused = normfuse.convert(Block().double(), "bin", fuse_relu=True)
    data = pickle.dumps(fused, protocol=0)
    moved = (b"normfuse._fused_graph\n", b"normfuse._fuse_trace\n")
    assert all(name in data for name in moved)  # (else this test no longer tests anything)
    for name in moved:
        data = data.replace(name, b"normfuse.fuse\n")
    old = pickle.loads(data)
    assert isinstance(old, FusedGraphModule) and list(old.state_dict()) == list(fused.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(old(x), fused(x), rtol=0, atol=0)


def test_relu_module_also_inside_a_leaf_stays(seed):
    """One nn.ReLU object after a norm and also the act of a norm + act layer (a leaf of the
    trace, whose forward calls it unseen): replacing it by an Identity would drop that act."""
    relu = nn.ReLU()  # (a drop that is not an identity: the layer does not take its act in)
    act_layer = normfuse.BatchInstanceNormAct2d(3, drop=nn.Dropout(0.0), act=relu)
    model = _randomize(nn.Sequential(nn.BatchNorm2d(3), relu, act_layer), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with pytest.warns(UserWarning,
                      match=r"left unfused: '0' \(in the forward of Sequential: its class has"):
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert _fused_norms(fused) == [] and fused[1] is relu and fused[2].act is relu
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


# ------------------------------------------------------------ what must not be fused, or replaced
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(x))


class CallsChildsRelu(nn.Module):
    """Calls its child's ReLU module itself, after something else; a method keeps it itself."""

    def __init__(self):
        super().__init__()
        self.block = _Block()

    def features(self, x):
        return self.block(x)

    def forward(self, x):
        return self.block.relu(self.block(x) - 1)


class OptionalResidual(nn.Module):
    """A block whose forward takes an optional argument: one trace would fix its branch."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, residual=None):
        y = F.relu(self.bn(x))
        return y if residual is None else y + residual


class UsesOptional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = OptionalResidual(), OptionalResidual()

    def forward(self, x):
        return self.b(self.a(x), x)


class NormLast(nn.Module):
    """DenseNet's shape: the norm ends a child's forward, the ReLU is in the parent's; code
    that calls the child on its own (DenseNet's ``features``) takes the norm's output."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return F.relu(self.features(x))


class NoGrad(nn.Module):
    """A forward that sets grad mode: a graph would not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        with torch.no_grad():
            shift = x.mean()  # no gradient through it: a graph would give it one
        return F.relu(self.bn(self.conv(x) - shift))


class Remembers(nn.Module):
    """A forward that keeps its output on the module: tracing it must not leave a Proxy."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.last = None

    def forward(self, x):
        self.last = F.relu(self.bn(x))
        return self.last


class _WithMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x))

    def extra(self):
        return 1


class TwoOwners(nn.Module):
    """y.bn's pairs are in y's forward (y has a method: not replaced) and in this forward (a
    graph may stand for it, and takes bn2's pair): y.bn stays unfused, so this graph must keep
    the ReLU after its own call of y.bn."""

    def __init__(self):
        super().__init__()
        self.y = _WithMethod()
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.y(x) + F.relu(self.y.bn(x - 1)) + F.relu(self.bn2(x))


class Up(nn.Module):
    """A UNet decoder block: its forward checks an argument that its callers pass as None."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, skip):
        if skip is not None:
            x = x + skip
        return F.relu(self.bn(x))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1, self.up2 = Up(), Up()

    def forward(self, x):
        return self.up2(self.up1(x, x * 2), None)


class Taps(nn.Module):
    """A forward that appends to a list it holds and fills a dict: tracing must not leave
    Proxies in them."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.taps, self.stats = [], {}

    def forward(self, x):
        y = F.relu(self.bn(x))
        self.taps.append(y)
        self.stats["last"] = y
        return y


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        with torch.no_grad():
            shift = x.mean()  # no gradient through it: an inlined graph would give it one
        return self.conv(x) - shift


class ListOfBlocks(nn.Module):
    """Blocks in a ModuleList, one setting grad mode in its forward: a graph of this forward
    keeps them as calls (their hooks run, their grad mode holds)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Lin(), _Lin()])
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return F.relu(self.bn(x))


class Stage(nn.Module):
    """Calls a block with None from inside its own forward (which a graph may stand for)."""

    def __init__(self):
        super().__init__()
        self.up = Up()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(self.up(x, None)))


class Cat(nn.Module):
    """DenseNet's layers take a list of tensors."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            x = torch.stack(x).sum(0)
        return F.relu(self.bn(x))


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cat = Cat()

    def forward(self, x):
        return self.cat([x, x + 1]) + 0


class EnableGrad(nn.Module):
    """enable_grad changes nothing when converting with grad on, and does under no_grad."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        with torch.enable_grad():
            return F.relu(self.bn(x))


class Meta(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.meta = {"gain": 2.0}

    def forward(self, x):
        return F.relu(self.bn(x))


class ReadsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.cfg = {"shift": 1.0}

    def forward(self, x):
        return F.relu(self.bn(x)) + self.cfg["shift"]


class Gained(nn.Module):
    """A gain computed from a buffer outside the graph's flow: a graph would hold it stale."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("log_gain", torch.zeros(3))

    def forward(self, x):
        return F.relu(self.bn(x)) * self.log_gain.exp().view(1, 3, 1, 1)


class _Config:
    scale = 2.0


class ReadsConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.config = _Config()

    def forward(self, x):
        return F.relu(self.bn(x)) * self.config.scale


class _Split(nn.Module):
    """Does not trace (data-dependent) and returns a list: a Proxy would stand for it."""

    def forward(self, x):
        return [x, x.flip(1)] if x.sum() > 0 else [x, -x]


class _TakesList(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        if isinstance(x, list):
            y = self.bn(x[0] + x[1])
            return self.relu(y) + y
        return self.relu(self.bn(x))

    def extra(self):
        return 0


class AfterSplit(nn.Sequential):
    def __init__(self):
        super().__init__(_Split(), _TakesList())


class _TakesTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        if isinstance(x, tuple):  # an LSTM's (output, state)
            y = self.bn(x[0].transpose(1, 2))
            return self.relu(y) + y
        return self.relu(self.bn(x))

    def extra(self):
        return 0


class AfterLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.LSTM(3, 3, batch_first=True), _TakesTuple())

    def forward(self, x):
        return self.seq(x.flatten(2).transpose(1, 2))


class GradBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn(x))
        return y if torch.is_grad_enabled() else y * 3


class Checkpointed(nn.Module):
    """A non-reentrant checkpoint traces through: a graph would drop it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
        return F.relu(self.bn(y))


USE_SCALE = True


class ReadsGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn(x))
        return y * 2 if USE_SCALE else y


@pytest.mark.parametrize("build,fused_norms,replaced,warns", [
    (CallsChildsRelu, ["block.bn"], False, None),  # the block a GraphModule, its ReLU kept
    (UsesOptional, [], False, r"'a\.bn' \(in the forward of 'a', OptionalResidual: its forward "
                              r"takes optional"),
    (NormLast, [], False, None),
    (NoGrad, [], False, r"'bn' \(in the forward of NoGrad: its forward sets grad mode"),
    (Remembers, [], False, r"'bn' \(in the forward of Remembers: its forward changes "),
    (TwoOwners, ["bn2"], True, r"'y\.bn' \(in the forward of 'y', _WithMethod: its class has"),
    (Decoder, ["up1.bn"], False, r"'up2\.bn' \(in the forward of 'up2', Up: it is called "
                                 r"with arguments that are not tensors"),
    (Taps, [], False, r"'bn' \(in the forward of Taps: its forward changes attributes"),
    (Stage, ["bn"], True, r"'up\.bn' \(in the forward of 'up', Up: it is called with"),
    (ListNet, [], False, r"'cat\.bn' \(in the forward of 'cat', Cat: its forward checks types"),
    (GradBranch, [], False, r"its forward depends on grad mode or autocast"),
    (Checkpointed, [], False, r"its forward checkpoints"),
    (ReadsGlobal, [], False, r"its forward reads the global 'USE_SCALE'"),
    (EnableGrad, [], False, r"its forward sets grad mode"),
    (Meta, [], False, r"its attribute 'meta' is a name torch\.fx's GraphModule uses"),
    (ReadsDict, [], False, r"its forward reads 'cfg', whose later changes"),
    (Gained, [], False, r"its forward computes tensors a graph would hold as constants"),
    (ReadsConfig, [], False, r"its forward reads 'config', whose later changes"),
    (AfterSplit, [], False, r"left unfused: '1' \(_TakesList\), given the output of a module "
                            r"that may not return a tensor"),
    (AfterLSTM, [], False, r"left unfused: 'seq\.1' \(_TakesTuple\), given the output"),
    (ListOfBlocks, ["bn"], True, None),
])
def test_what_stays_unfused_or_unreplaced(build, fused_norms, replaced, warns, seed):
    """Each model computes what its unfused conversion computes; a pair whose ReLU the rest of
    the model (or another caller of a submodule) may see is not fused; a module a graph cannot
    stand for is not replaced, and the warning says why."""
    model = _randomize(build(), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    messages = [str(r.message) for r in record]
    if warns is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(warns, messages[0]), messages
    assert _fused_norms(fused) == fused_norms
    assert isinstance(fused, FusedGraphModule) == replaced
    assert all(not isinstance(v, fx.Proxy) for m in model.modules() for v in vars(m).values())
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)
    if build is CallsChildsRelu:
        assert isinstance(fused.block, FusedGraphModule) and type(fused.block.relu) is nn.ReLU
        torch.testing.assert_close(fused.features(x), plain.features(x))
    if build is NormLast:
        torch.testing.assert_close(fused.features(x), plain.features(x))
    if build is UsesOptional:
        torch.testing.assert_close(fused.a(x), plain.a(x))
    if build in (Remembers, Taps):
        io.BytesIO().write(pickle.dumps(fused))
    if build is ListOfBlocks:
        calls = []
        fused.blocks[0].register_forward_hook(lambda *a: calls.append(1))
        fused(x)
        assert calls == [1] and type(fused.blocks[0]) is _Lin


class _Counts(nn.Module):
    """A step counter buffer, updated in place by the forward (as a warm-up schedule keeps)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        self.step += 1
        return F.relu(self.bn(self.conv(x))) * self.step


class _Averages(nn.Module):
    """An exponential average buffer: its decay does not involve the input (it would run, not
    be recorded, while tracing), its increment does (it would be recorded)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("ema", torch.ones(3))

    def forward(self, x):
        y = F.relu(self.bn(x))
        self.ema.mul_(0.9).add_(y.detach().mean((0, 2, 3)), alpha=0.1)
        return y + self.ema.view(1, 3, 1, 1)


class _CountsAttribute(nn.Module):
    """A tensor attribute (not a buffer) updated in place."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        return F.relu(self.bn(x)) + self.calls


class _CountsReluModule(nn.Module):
    """The pair fused by identity (its ReLU a module: no graph needed), the counter kept."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.seen += 1
        return self.relu(self.bn(x))


@pytest.mark.parametrize("build,fused_norms", [(_Counts, []), (_Averages, []),
                                               (_CountsAttribute, []), (_CountsReluModule, ["bn"])])
def test_forward_updating_tensors_in_place(build, fused_norms, seed):
    """torch.fx proxies parameters, not buffers or tensor attributes: tracing runs a forward's
    in-place updates of those for real, once a trace, and the graph would not record them.
    convert puts their values back and replaces no module whose forward updates them; the
    model computes what the unfused conversion computes, counters included."""
    model = _randomize(build(), seed).double()

    def tensors(m):
        return {n: t.clone() for n, t in [*m.named_buffers(), *(
            (k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor))]}

    before = tensors(model)
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    after = tensors(fused)
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed by convert"
    messages = [str(r.message) for r in record]
    if fused_norms:
        assert messages == []
    else:
        assert len(messages) == 1 and "updates buffers or tensor attributes in place" in \
            messages[0], messages
    assert _fused_norms(fused) == fused_norms and not isinstance(fused, FusedGraphModule)
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)
    after, want = tensors(fused), tensors(plain)
    for name, value in want.items():
        assert torch.equal(after[name], value), name


def test_forward_updating_tensors_in_place_under_inference_mode(seed):
    """Inside inference mode a model built there updates its inference buffers in place for
    real while traced, and they have no version counter: convert compares their values."""
    with torch.inference_mode():
        model = _randomize(_Counts(), seed).double()
        plain = normfuse.convert(copy.deepcopy(model), "bin")
        with pytest.warns(UserWarning, match="updates buffers or tensor attributes in place"):
            fused = normfuse.convert(model, "bin", fuse_relu=True)
        assert float(fused.step) == 0 and not isinstance(fused, FusedGraphModule)
        x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
        assert float(fused.step) == float(plain.step) == 2


def test_lazy_and_meta_tensors_are_no_obstacle():
    """Buffers without values (a lazy module's uninitialized ones, meta tensors) are left out
    of what convert copies while it traces."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.LazyBatchNorm2d())
    fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert _fused_norms(fused) == ["1"]
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert _fused_norms(normfuse.convert(meta, "bin", fuse_relu=True)) == ["1"]


def test_attributes_a_graph_holds_cannot_be_set():
    """A replaced module's forward read ``scale``: its graph holds the value, so setting it
    raises instead of changing nothing (an attribute the forward does not read can be set)."""
    class Scaled(nn.Module):
        k = 3.0

        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.scale = 2.0
            self.note = "free"
            self.bias = torch.zeros(3, 1, 1)  # used as it is: a get_attr, read at run time

        def forward(self, x):
            return F.relu(self.bn(x)) * self.scale * self.k + self.bias

    fused = normfuse.convert(Scaled(), "bin", fuse_relu=True)
    assert isinstance(fused, FusedGraphModule) and "* 2.0" in fused.code and "* 3.0" in fused.code
    with pytest.raises(AttributeError, match=r"Scaled\.scale: the fused graph .* holds the value "
                       r"it had then \(2\.0\)"):
        fused.scale = 0.5
    with pytest.raises(AttributeError, match=r"Scaled\.k: "):
        fused.k = 1.0  # a class constant it read
    fused.scale = float("2.0")  # an equal value: nothing changes
    fused.note = "set"
    fused.bias = torch.ones(3, 1, 1)  # a tensor it reads at run time (get_attr): settable
    torch.testing.assert_close(fused(torch.zeros(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 1.0))
    assert fused.scale == 2.0 and fused.note == "set"
    assert copy.deepcopy(fused).scale == 2.0


def test_convert_under_no_grad_or_autocast_sees_the_forwards_modes():
    """Grad mode and autocast set inside a forward show whatever mode convert runs in."""
    for context in (torch.no_grad, torch.enable_grad,
                    lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        for build in (NoGrad, EnableGrad):
            with context(), warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                fused = normfuse.convert(build(), "bin", fuse_relu=True)
            assert not isinstance(fused, FusedGraphModule), (context, build)
            assert any("sets grad mode" in str(r.message) for r in record)


def test_tracing_leaves_no_proxy_in_containers():
    from collections import defaultdict, deque

    class Fills(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.by_key, self.recent = defaultdict(list), deque(maxlen=2)

        def forward(self, x):
            y = F.relu(self.bn(x))
            self.by_key["y"].append(y)
            self.recent.append(y)
            return y

    model = Fills()
    with pytest.warns(UserWarning, match="its forward changes attributes"):
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert dict(fused.by_key) == {} and list(fused.recent) == []


def test_leaf_insides_called_from_outside_are_not_fused(seed):
    """A module kept as a leaf (its forward does not trace) is fused on its own; a forward
    outside it that calls into it (here its ReLU, after something else) keeps that module."""
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner.inner[2](self.inner(x) - 1)

    model = _randomize(Outer(), seed).double()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with pytest.warns(UserWarning, match="could not trace 'inner'"):
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert _fused_norms(fused) == [] and type(fused.inner.inner[2]) is nn.ReLU
    x = torch.randn(2, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    _assert_same_in_train_and_eval(fused, plain, x, seed)


def test_containers_are_not_reported(seed):
    """A ModuleList has no forward of its own: its children are fused, nothing is reported."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x) if x.sum() > 0 else block(-x)
            return x

    model = _randomize(Untraceable(), seed).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    messages = [str(r.message) for r in record]
    assert len(messages) == 1 and "'blocks'" not in messages[0], messages
    assert _fused_norms(fused) == ["blocks.0.bn", "blocks.1.bn"]


def test_converting_a_graph_again_names_it(seed):
    class BG(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, x):
            return F.relu(self.gn(F.relu(self.bn(x))))

    fused = normfuse.convert(BG(), "bin", fuse_relu=True)
    assert isinstance(fused, FusedGraphModule)
    with pytest.warns(UserWarning, match=r"'gn' \(in the forward of BG: it is a graph already"):
        again = normfuse.convert(fused, "assoc", fuse_relu=True)
    assert again is fused and again.gn.activation is None


# ------------------------------------- values a graph would freeze: refused, the block stays
_CONFIG = argparse.Namespace(mult=1.0)
_SCALE = 1.0


def _scaled(y):
    return y * _SCALE


class _ReadsGlobalObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x)) * _CONFIG.mult


class _CallsHelperReadingGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return _scaled(F.relu(self.bn(x)))


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = 1.0

    def forward(self, x):
        return x / self.t


class _ReadsChildAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.head = _Temperature()

    def forward(self, x):
        return F.relu(self.bn(x)) / self.head.t


class _RandomDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if self.training and random.random() < 0.2:
            return x
        return x + F.relu(self.bn(x))


class _BufferFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("use_skip", torch.tensor(True))

    def forward(self, x):
        y = F.relu(self.bn(x))
        if self.use_skip:
            y = y + x
        return y


class _BufferFlagNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.register_buffer("act", torch.tensor(True))

    def forward(self, x):
        y = self.bn(x)
        return self.relu(y) if self.act else y

    def describe(self):  # a method of its own: the model stays itself (the in-place path)
        return "stays itself"


def _change_config(plain, fused):
    _CONFIG.mult = 0.5


def _change_global(plain, fused):
    global _SCALE
    _SCALE = 3.0


def _change_child(plain, fused):
    plain[0].head.t = fused[0].head.t = 4.0


@pytest.mark.parametrize("build,change", [(_ReadsGlobalObject, _change_config),
                                          (_CallsHelperReadingGlobal, _change_global),
                                          (_ReadsChildAttribute, _change_child)],
                         ids=["global-object", "global-via-helper", "submodule-attribute"])
def test_values_read_outside_the_block_are_not_frozen(seed, build, change):
    """A block whose forward reads a global object, a global through a helper, or a plain
    attribute of a submodule is not replaced by a graph (which would hold the traced value):
    later changes reach the fused model as they reach the unfused one."""
    global _SCALE
    _CONFIG.mult, _SCALE = 1.0, 1.0
    try:
        model = nn.Sequential(build()).eval()
        plain = normfuse.convert(copy.deepcopy(model), "bin")
        with pytest.warns(UserWarning):  # the pair left, named
            fused = normfuse.convert(model, "bin", fuse_relu=True)
        assert not isinstance(fused[0], FusedGraphModule)
        change(plain, fused)
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    finally:
        _CONFIG.mult, _SCALE = 1.0, 1.0


def test_python_random_in_a_forward_is_not_frozen():
    """Stochastic depth drawn with Python's random: a graph would keep the branch of the trace
    (never dropping); the block stays itself and keeps drawing."""
    random.seed(1)  # the traces draw >= 0.2
    with pytest.warns(UserWarning):
        fused = normfuse.convert(nn.Sequential(_RandomDepth()), "bin", fuse_relu=True)
    x = torch.randn(2, 3, 4, 4)
    random.seed(0)
    assert any(torch.equal(fused(x), x) for _ in range(100))  # ~20 drops expected


@pytest.mark.parametrize("build", [lambda: nn.Sequential(_BufferFlag()), _BufferFlagNet],
                         ids=["replaced-block", "model-itself"])
def test_branch_on_a_buffer_value_follows_a_loaded_checkpoint(build):
    """A forward branching on a buffer's value: tracing reads it for real (torch.fx proxies
    parameters and arguments only), so a trace would freeze the branch; reading a tensor's
    value while tracing makes the module untraceable instead (reported), and a checkpoint that
    flips the flag reaches the fused model. Other threads read tensor values as always, and
    torch.Tensor is as it was after convert."""
    model = build()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    with pytest.warns(UserWarning, match="reads a tensor's value"):
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert not any(n in vars(torch.Tensor) for n in ("__bool__", "item", "tolist"))
    state = plain.state_dict()
    for k in state:
        if k.endswith(("use_skip", "act")):
            state[k] = torch.tensor(False)
    plain.load_state_dict(state)
    fused.load_state_dict(state)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)


def test_user_hooks_do_not_run_while_tracing():
    """convert traces forwards without running the modules' hooks (a graph keeps submodules as
    calls, so they run at run time): a hook keeping outputs got Proxies, and a hook's check
    failed the trace, leaving the next block unfused under a misleading warning."""
    model = resnet18().eval()
    seen = []
    model.layer1[0].register_forward_hook(
        lambda mod, i, o: seen.append(type(o).__name__) if o.shape[0] > 0 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert seen == []
    assert fused.layer1[1].bn1.activation == "relu"
    fused(torch.randn(1, 3, 32, 32))
    assert seen == ["Tensor"]  # and at run time it runs


class _PassThrough(nn.Module):
    def forward(self, x):
        return x


class _HookedBetween(nn.Module):
    """bn -> a pass-through module whose forward hook changes its output -> ReLU module."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.p = _PassThrough()
        self.p.register_forward_hook(lambda m, i, o: o - 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.p(self.bn(x)))


def test_a_hooked_module_between_norm_and_relu_is_no_pair(seed):
    """Forwards are traced without their hooks: a module with hooks traced through (a
    pass-through adds no node) gets a marker node on its output, so the norm -> ReLU path
    through it is no pair (fused, the model computed hook(relu(bn(x))), not relu(hook(bn(x))))."""
    model = nn.Sequential(_HookedBetween()).eval()
    plain = normfuse.convert(copy.deepcopy(model), "bin")
    fused = normfuse.convert(model, "bin", fuse_relu=True)
    assert fused[0].bn.activation is None and isinstance(fused[0].relu, nn.ReLU)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)


def test_tensor_value_reads_are_put_back_as_they_were():
    """The wrapping of torch.Tensor's value reads during a trace puts back what was there (an
    override of someone else's stays, called during the trace), and nested traces in one
    thread keep refusing until the outermost ends."""
    from normfuse import _fuse_trace
    original = torch.Tensor.item
    calls = []

    def override(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    torch.Tensor.item = override
    try:
        with _fuse_trace._tensor_values_unreadable():
            with _fuse_trace._tensor_values_unreadable():
                pass
            with pytest.raises(fx.proxy.TraceError, match="Tensor.item"):
                torch.ones(()).item()
        assert vars(torch.Tensor)["item"] is override
        assert torch.ones(()).item() == 1.0 and calls == [1]
        assert not any(n in vars(torch.Tensor) for n in ("__bool__", "tolist", "__float__"))
    finally:
        del torch.Tensor.item


class _ImportedRandom(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if self.training and _random_draw() < 0.2:
            return x
        return x + F.relu(self.bn(x))


_random_draw = random.random  # as `from random import random`: a method of a hidden Random


def test_a_function_bound_to_a_random_state_is_not_frozen():
    random.seed(1)
    with pytest.warns(UserWarning, match="_random_draw"):
        fused = normfuse.convert(nn.Sequential(_ImportedRandom()), "bin", fuse_relu=True)
    assert not isinstance(fused[0], FusedGraphModule)
