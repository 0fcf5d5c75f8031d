"""normfuse.convert(module, to): replaces BatchNorm (bin, iebn) / GroupNorm (assoc) layers."""

import copy
import warnings

import pytest
import torch
from torch import nn

from oracles import assert_close_dtype, make_input, randn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 1)
        self.bn3 = nn.BatchNorm3d(3, momentum=None)

    def forward(self, x):
        return self.bn3(self.conv(x))


class Net(nn.Module):
    """Nested modules and Sequentials, BatchNorm1d/2d/3d with various options."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)),
        )
        self.inner = Inner()
        self.fc = nn.Linear(4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.bn1_seq = nn.BatchNorm1d(4, affine=False)
        self.head = nn.Linear(5, 2)

    def forward(self, x, x3):
        h = self.features(x)                       # (N, 4, H, W)
        seq = self.bn1_seq(h.flatten(2))           # (N, 4, L)
        v = self.fc(seq.mean(-1))                  # (N, 5)
        v = self.bn1(v)
        z = self.inner(x3)
        return self.head(v).sum() * 0 + torch.cat([self.head(v).flatten(), z.flatten()])


def _randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(7)
    return model


def _inputs(seed, device="cpu", dtype=torch.float32, n=4):
    return (make_input((n, 3, 5, 4), seed, dtype, device), make_input((n, 2, 2, 3, 2), seed + 1,
                                                                    dtype, device))


@pytest.mark.parametrize("to", ["bin", "iebn"])
def test_convert_replaces_every_batchnorm(nf, to, seed):
    model = _randomize_bn(Net(), seed)
    model.train()
    model.features[3][1].eval()  # mixed modes must be carried per module
    orig = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    assert len(orig) == 5
    out = nf.convert(model, to)
    assert out is model, "convert returns the (same) module, like convert_sync_batchnorm"
    mods = dict(out.named_modules())
    left = [n for n, m in mods.items() if type(m) in BN_TYPES]
    assert not left, f"BatchNorm layers left after convert: {left}"
    prefix = "BatchInstanceNorm" if to == "bin" else "InstanceEnhancementBatchNorm"
    for name, bn in orig.items():
        new = mods[name]
        d = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[type(bn)]
        assert type(new) is getattr(nf, f"{prefix}{d}d"), f"{name}: {type(new)}"
        assert new.training == bn.training, f"{name}: train/eval mode not carried"
        assert new.eps == bn.eps and new.momentum == bn.momentum, name
        assert new.track_running_stats == bn.track_running_stats, name
        if bn.affine:
            assert torch.equal(new.weight.detach(), bn.weight.detach()), f"{name}: weight"
            assert torch.equal(new.bias.detach(), bn.bias.detach()), f"{name}: bias"
            assert isinstance(new.weight, nn.Parameter)
        else:
            assert new.weight is None and new.bias is None and not new.affine
        assert torch.equal(new.running_mean, bn.running_mean), f"{name}: running_mean"
        assert torch.equal(new.running_var, bn.running_var), f"{name}: running_var"
        assert int(new.num_batches_tracked) == int(bn.num_batches_tracked), name
        if to == "bin":
            assert torch.all(new.gate == 1), "BIN gates start at 1"
        else:
            assert torch.all(new.gate_weight == 0) and torch.all(new.gate_bias == -1)


@pytest.mark.parametrize("to", ["bin", "iebn"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_convert_bare_batchnorm_returns_replacement(nf, to, d):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d](5).eval()
    out = nf.convert(bn, to)
    prefix = "BatchInstanceNorm" if to == "bin" else "InstanceEnhancementBatchNorm"
    assert type(out) is getattr(nf, f"{prefix}{d}d")
    assert not out.training


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc"])
def test_convert_shared_norm_stays_shared(nf, to):
    """One norm object registered at several places (twice in one Sequential, and inside a
    child) is replaced by one new layer at each place: every place is converted (the second name
    within a parent too) and they stay one module, as in the input model."""
    norm = nn.GroupNorm(2, 4) if to == "assoc" else nn.BatchNorm2d(4)
    model = nn.Sequential(norm, nn.Conv2d(4, 4, 1), norm, nn.Sequential(norm))
    ref = copy.deepcopy(model)
    nf.convert(model, to)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert model[2] is model[0] and model[3][0] is model[0]
    if to == "bin":  # one module: its running statistics count both calls, as the input's do
        x = randn((3, 4, 2, 2), 0)
        torch.testing.assert_close(model(x), ref(x))
        assert int(model[0].num_batches_tracked) == int(ref[0].num_batches_tracked) == 3
        assert torch.allclose(model[0].running_mean, ref[0].running_mean, atol=1e-6)


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc", "ilm"])
def test_convert_keeps_frozen_weights_frozen(nf, to):
    """A norm whose weight and bias were frozen (fine-tuning) stays frozen after convert;
    the new layer's own parameters (gate, meta network) are trainable."""
    norm = nn.GroupNorm(2, 4) if to in ("assoc", "ilm") else nn.BatchNorm2d(4)
    norm.weight.requires_grad_(False)
    norm.bias.requires_grad_(False)
    opts = {"key_group_size": 2} if to == "ilm" else {}
    new = nf.convert(nn.Sequential(norm, nn.BatchNorm2d(4), nn.GroupNorm(2, 4)), to, **opts)
    assert not new[0].weight.requires_grad and not new[0].bias.requires_grad
    assert all(p.requires_grad for p in new[1].parameters())  # not frozen: trainable
    assert all(p.requires_grad for p in new[2].parameters())
    own = [p for n, p in new[0].named_parameters() if n not in ("weight", "bias")]
    assert own and all(p.requires_grad for p in own)


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc", "ilm"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_convert_tensorless_norm_takes_model_device_and_dtype(nf, to, device):
    """A norm with no parameters or buffers (GroupNorm(affine=False), BatchNorm(affine=False,
    track_running_stats=False)) gives no device or dtype of its own; its replacement has
    parameters, which must follow the model (meta stands in for a GPU: parameters left on the
    CPU would make the forward raise)."""
    norm = (nn.GroupNorm(2, 4, affine=False) if to in ("assoc", "ilm")
            else nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm).to(device=device, dtype=torch.float64)
    opts = {"key_group_size": 2} if to == "ilm" else {}
    new = nf.convert(model, to, **opts)
    assert {(p.device.type, p.dtype) for p in new[1].parameters()} == {(device, torch.float64)}
    y = new(torch.randn(2, 3, 2, 2, device=device, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.device.type == device
    bare = nf.convert(norm, to, **opts)  # nothing to take them from: the defaults
    assert {p.dtype for p in bare.parameters()} == {torch.get_default_dtype()}


@pytest.mark.parametrize("to", ["bin", "iebn"])
def test_convert_batchnorm_without_bias(nf, to):
    """nn.BatchNorm2d(bias=False) (weight, no bias) converts to a layer with a weight and no
    bias (bias=False): the parameters the model trains are the original's.  It used to fail
    in convert with copy_() of None, then got a trainable bias the original never had."""
    try:
        bn = nn.BatchNorm2d(4, bias=False)
    except TypeError:
        pytest.skip("this torch's BatchNorm has no bias argument")
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    ref = copy.deepcopy(bn)
    new = nf.convert(nn.Sequential(bn), to)[0]
    assert torch.equal(new.weight.detach(), ref.weight.detach())
    assert new.bias is None and "bias" not in new.state_dict()
    assert [n for n, _ in new.named_parameters() if not n.startswith("gate")] == ["weight"]
    if to == "bin":
        x = randn((3, 4, 2, 2), 1)
        torch.testing.assert_close(new(x), ref(x))


def test_convert_batchnorm_without_weight(nf):
    """A BatchNorm whose weight was removed by hand (torch runs it as weight 1) converts to a
    layer without a weight, not a copy_() of None."""
    bn = nn.BatchNorm2d(4)
    bn.register_parameter("weight", None)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    ref = copy.deepcopy(bn)
    new = nf.convert(nn.Sequential(bn), "bin")[0]
    assert new.weight is None and torch.equal(new.bias.detach(), ref.bias.detach())
    x = randn((3, 4, 2, 2), 2)
    torch.testing.assert_close(new(x), ref(x))


def test_convert_track_running_stats_false(nf):
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    out = nf.convert(model, "bin")
    assert out[0].track_running_stats is False and out[0].running_mean is None


@pytest.mark.parametrize("case", ["flag-off-stats-kept", "flag-on-no-stats"])
def test_convert_follows_the_buffers_not_only_the_flag(nf, seed, case):
    """nn.BatchNorm reads its running statistics in eval whenever they exist, and updates them
    in training only when track_running_stats says so; both are often changed after
    construction (test-time adaptation, frozen statistics). The converted BIN (gates at 1) keeps
    the buffers and the flag as they are, so it computes what the batch norm computes."""
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(randn((4,), seed, torch.float32))
        bn.running_var.copy_(randn((4,), seed + 1, torch.float32).abs() + 0.5)
        bn.num_batches_tracked.fill_(7)
    if case == "flag-off-stats-kept":
        bn.track_running_stats = False
    else:
        bn.running_mean = bn.running_var = None
    ours = nf.convert(copy.deepcopy(bn), "bin")
    assert ours.track_running_stats is bn.track_running_stats
    for training in (False, True, False):
        bn.train(training), ours.train(training)
        x = make_input((3, 4, 5, 2), seed, torch.float32, "cpu")
        assert_close_dtype(ours(x), bn(x), torch.float32, f"{case} training={training}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            theirs, mine = getattr(bn, name), getattr(ours, name)
            assert (theirs is None) == (mine is None), name
            if theirs is not None:
                assert_close_dtype(mine.double(), theirs.double(), torch.float32, name)


@pytest.mark.parametrize("to", ["bin", "iebn", "assoc"])
def test_convert_dtype_and_device(nf, to, seed):
    if to == "assoc":
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model = model.double()
    out = nf.convert(model, to)
    for n, p in out.named_parameters():
        assert p.dtype == torch.float64, n
    for n, b in out.named_buffers():
        if not n.endswith("num_batches_tracked"):
            assert b.dtype == torch.float64, n
    meta = nf.convert(copy.deepcopy(model).to("meta"), to)
    for n, p in meta.named_parameters():
        assert p.device.type == "meta", n
    for n, b in meta.named_buffers():
        assert b.device.type == "meta", n


def test_converted_bin_reproduces_batchnorm(nf, backend, device, seed):
    """A BatchNorm model converted to BIN (gates at 1) gives the same outputs, gradients and
    running statistics, in train and eval mode."""
    ref = _randomize_bn(Net(), seed).to(device)
    ours = nf.convert(copy.deepcopy(ref), "bin")
    for step in range(3):
        for training in (True, False):
            ref.train(training), ours.train(training)
            x, x3 = _inputs(seed + step, device)
            yr, y = ref(x, x3), ours(x, x3)
            assert_close_dtype(y, yr, torch.float32, f"step {step} training={training}")
            dy = randn(y.shape, seed + 3, torch.float32, device)
            gr = torch.autograd.grad(yr, list(ref.parameters()), dy)
            params = [p for n, p in ours.named_parameters() if not n.endswith("gate")]
            g = torch.autograd.grad(y, params, dy)
            for a, b in zip(g, gr):
                assert_close_dtype(a, b, torch.float32, "parameter gradient", factor=4)
    for (n, b), (nr, br) in zip(ours.named_buffers(), ref.named_buffers()):
        assert n == nr
        assert_close_dtype(b.double(), br.double(), torch.float32, n)


def test_convert_iebn_state_carried(nf, seed):
    ref = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), seed).eval()
    ours = nf.convert(copy.deepcopy(ref), "iebn")
    with torch.no_grad():
        ours[1].gate_bias.fill_(30.0)  # sigmoid(30) == 1: IEBN == BN
    x = make_input((2, 3, 4, 4), seed)
    assert_close_dtype(ours(x), ref(x), torch.float32, "eval output")


def test_convert_assoc(nf, seed):
    gn_model = nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.GroupNorm(3, 6, eps=1e-3),
        nn.Sequential(nn.Conv2d(6, 8, 1), nn.GroupNorm(2, 8)),
        nn.BatchNorm2d(8),
    )
    _randomize_bn(gn_model, seed)
    gn_model[2].eval()
    gns = {n: m for n, m in gn_model.named_modules() if isinstance(m, nn.GroupNorm)}
    out = nf.convert(gn_model, "assoc")
    assert out is gn_model
    mods = dict(out.named_modules())
    for name, gn in gns.items():
        new = mods[name]
        assert type(new) is nf.AssocNorm, name
        assert new.num_groups == gn.num_groups and new.eps == gn.eps, name
        assert new.weight.shape == (gn.num_channels,) and new.encoder.shape[1] == gn.num_groups
        assert new.training == gn.training, name
        assert new.weight.device == gn.weight.device and new.weight.dtype == gn.weight.dtype
        # "carrying weights": either copied verbatim, or (as normfuse documents) chosen so that
        # the converted layer computes the same function as the GroupNorm it replaces.
        x = make_input((2, gn.num_channels, 3, 5), seed)
        verbatim = torch.equal(new.weight.detach(), gn.weight.detach()) and \
            torch.equal(new.bias.detach(), gn.bias.detach())
        if not verbatim:
            assert_close_dtype(new(x), gn(x), torch.float32, f"{name}: function carried")
    assert type(mods["3"]) is nn.BatchNorm2d, "assoc converts GroupNorm only"
    y = out(make_input((2, 3, 4, 4), seed))
    assert torch.isfinite(y).all()


def test_convert_assoc_affine_false(nf, seed):
    gn = nn.GroupNorm(2, 4, affine=False)
    new = nf.convert(nn.Sequential(gn), "assoc")[0]
    assert type(new) is nf.AssocNorm
    x = make_input((3, 4, 2, 5), seed)
    if not (torch.all(new.weight == 1) and torch.all(new.bias == 0)):
        assert_close_dtype(new(x), gn(x), torch.float32, "function carried")


def test_convert_assoc_groupnorm_without_bias(nf, seed):
    """nn.GroupNorm(..., bias=False) (newer torch; 2.11 has no such argument): a weight but no
    bias; the converted layer computes the same function (it crashed copying the missing bias)."""
    try:
        gn = nn.GroupNorm(2, 4, bias=False)
    except TypeError:
        pytest.skip("this torch's nn.GroupNorm has no bias argument")
    with torch.no_grad():
        gn.weight.copy_(1 + 0.3 * torch.randn(4, generator=torch.Generator().manual_seed(seed)))
    new = nf.convert(nn.Sequential(gn), "assoc")[0]
    assert type(new) is nf.AssocNorm and torch.all(new.bias == 0)
    x = make_input((3, 4, 2, 5), seed)
    assert_close_dtype(new(x), gn(x), torch.float32, "function carried")


def test_convert_groupnorm_untouched_by_bin(nf):
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
    out = nf.convert(model, "bin")
    assert type(out[0]) is nn.GroupNorm and type(out[1]) is nf.BatchInstanceNorm2d


def test_convert_bad_target(nf):
    with pytest.raises((ValueError, KeyError)) as info:
        nf.convert(nn.Sequential(nn.BatchNorm2d(3)), "batchnorm")
    msg = str(info.value)
    assert "bin" in msg and "iebn" in msg and "assoc" in msg


def test_convert_then_train_step(nf, seed):
    """The converted model trains: parameters receive gradients and change with an optimizer."""
    model = nf.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "bin")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = make_input((4, 3, 6, 6), seed)
    gate_before = model[1].gate.detach().clone()
    model(x).pow(2).mean().backward()
    assert model[1].gate.grad is not None and torch.isfinite(model[1].gate.grad).all()
    opt.step()
    assert not torch.equal(model[1].gate.detach(), gate_before)


def test_norms_convert_does_not_take_are_reported(nf):
    """A subclass of a norm (it may compute something else) and a lazy norm (no parameters yet)
    are left as they are, and convert says so in one warning naming each; exact types convert
    without a warning."""
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(ScaledBN(3)), nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning, match=r"left 2 normalization layer\(s\) as they are: "
                                         r"1\.0 \(ScaledBN\), 2 \(LazyBatchNorm2d\)"):
        nf.convert(model, "bin")
    assert isinstance(model[0], nf.BatchInstanceNorm2d)
    assert type(model[1][0]) is ScaledBN and isinstance(model[2], nn.LazyBatchNorm2d)

    class MyGN(nn.GroupNorm):
        pass

    with pytest.warns(UserWarning, match=r"the module itself \(MyGN\).*convert takes nn\.GroupNorm "
                                         r"\(exactly"):
        nf.convert(MyGN(2, 4), "assoc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf.convert(nn.Sequential(nn.BatchNorm2d(3), nn.GroupNorm(1, 3)), "iebn")  # GN: not its kind

    class FrozenBatchNorm2d(nn.Module):  # torchvision.ops.FrozenBatchNorm2d's name and buffers
        def __init__(self, n):
            super().__init__()
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(name, torch.ones(n))

        def forward(self, x):
            return x

    backbone = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"left 1 normalization layer\(s\) as they are: "
                                         r"1 \(FrozenBatchNorm2d\).*frozen by design"):
        nf.convert(backbone, "bin")
    assert type(backbone[1]) is FrozenBatchNorm2d


def test_layers_of_another_kind_are_reported(nf):
    """Converting a converted model to another kind replaces nothing (convert takes torch's norms
    only) and says so, naming the layers; converting to the same kind again (e.g. to fuse the ReLUs
    afterwards) is silent."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4))
    nf.convert(model, "bin")
    with pytest.warns(UserWarning, match=r"left 1 normfuse layer\(s\) of another kind as they are: "
                                         r"1 \(BatchInstanceNorm2d\)"):
        nf.convert(model, "iebn")
    assert type(model[1]) is nf.BatchInstanceNorm2d
    with pytest.warns(UserWarning, match=r"the module itself \(BatchInstanceNorm2d\)"):
        assert nf.convert(model[1], "iebn") is model[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf.convert(model, "bin")
        nf.convert(model, "assoc")  # the GroupNorm; a BIN does not replace a GroupNorm
    with pytest.warns(UserWarning, match=r"left 1 normfuse layer\(s\) of another kind as they "
                                         r"are: 3 \(AssocNorm\)"):
        nf.convert(model, "ilm")


def test_nothing_replaced_is_reported(nf):
    """A target that replaces none of the model's norms ("bin" on a GroupNorm model, "assoc" on
    a BatchNorm one) leaves the model as it was: convert says so and names the targets that
    would take the norms it has; a model converted before (a second call, to fuse the ReLUs)
    stays silent."""
    gn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    with pytest.warns(UserWarning, match=r"convert\(\.\.\., 'bin'\) replaced nothing: .* It has 1 "
                                         r"nn\.GroupNorm layer\(s\) \(1\), which \"assoc\" and \"ilm\""):
        nf.convert(gn, "bin")
    assert type(gn[1]) is nn.GroupNorm
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.warns(UserWarning, match=r"'assoc'\) replaced nothing: the model has no nn\.GroupNorm\. "
                                         r"It has 1 batch norm layer\(s\) \(1\), which \"bin\""):
        nf.convert(bn, "assoc")
    with pytest.warns(UserWarning, match=r"replaced nothing: the model has no nn\.BatchNorm"):
        nf.convert(nn.Linear(3, 3), "iebn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nf.convert(bn, "bin")
        nf.convert(model, "bin", fuse_relu=True)


def test_hooks_of_a_replaced_norm_are_reported(nf):
    """A norm's forward / backward hooks stay on the module convert replaces (as with
    nn.SyncBatchNorm.convert_sync_batchnorm): convert names it; a hooked ReLU keeps its pair
    unfused with fuse_relu=True, and says so too."""
    ran = []
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model[1].register_forward_hook(lambda *args: ran.append(1))
    with pytest.warns(UserWarning, match=r"hooks of 1 \(BatchNorm2d\) stay on the replaced module"):
        nf.convert(model, "bin")
    model(torch.randn(2, 3, 5, 5))
    assert not ran
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model[2].register_forward_hook(lambda *args: ran.append(1))
    with pytest.warns(UserWarning, match=r"left unfused: '1' \(its ReLU has hooks\)"):
        model = nf.convert(model, "bin", fuse_relu=True)
    assert model[1].activation is None
    model(torch.randn(2, 3, 5, 5))
    assert ran


def test_convert_refuses_what_it_cannot_convert(nf):
    """A TorchScript module (its submodules are compiled, none could be replaced) and a non-bool
    fuse_relu are clear errors, not silent no-ops."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match="TorchScript module; convert the eager model"):
        nf.convert(scripted, "bin")
    # a scripted child holding a norm: refused by its path, the model untouched; one without
    # a norm of the target's kind is left as it is
    eager_bn = nn.BatchNorm2d(4)
    model = nn.Sequential(eager_bn, scripted)
    with pytest.raises(TypeError, match=r"convert: 1 is a TorchScript module holding norms "
                                        r"convert would replace \(1\)"):
        nf.convert(model, "bin")
    assert model[0] is eager_bn
    model = nn.Sequential(nn.BatchNorm2d(4), torch.jit.script(nn.Conv2d(4, 4, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(nf.convert(model, "bin")[0], nf.BatchInstanceNorm2d)
    assert isinstance(nf.convert(nn.Sequential(scripted), "assoc")[0], torch.jit.ScriptModule)
    with pytest.raises(TypeError, match="fuse_relu must be True or False, got 'yes'"):
        nf.convert(nn.BatchNorm2d(3), "bin", fuse_relu="yes")
