"""The three layers as modules, against the float64 oracles (tests/oracles.py).

Every test runs once per available backend (the ``backend`` fixture of conftest.py).
Checked: forward, the input gradient and every parameter gradient, train and eval, running
statistics and num_batches_tracked over several steps, dtypes, memory formats, awkward shapes
and strided views.
"""

import numpy as np
import pytest
import torch

import oracles
from oracles import (assert_close_dtype, dtype_supported, layout_of, make_input, randn,
                      randomize_parameters, to_layout)

KINDS = ["bin", "iebn", "assoc"]
REDUCED = (torch.float16, torch.bfloat16)


def _dim_of(rank):
    return {2: 1, 3: 1, 4: 2, 5: 3}[rank]


def assoc_groups(c):
    """Largest proper divisor of c (>= 2 channels per group), or 1."""
    for g in range(c - 1, 0, -1):
        if c % g == 0 and g < c:
            return g
    return 1


def make_layer(nf, kind, shape, groups=None, embed_dim=3, **kw):
    c = shape[1]
    d = _dim_of(len(shape))
    if kind == "bin":
        return getattr(nf, f"BatchInstanceNorm{d}d")(c, **kw)
    if kind == "iebn":
        return getattr(nf, f"InstanceEnhancementBatchNorm{d}d")(c, **kw)
    if kind == "assoc":
        g = assoc_groups(c) if groups is None else groups
        return nf.AssocNorm(g, c, embed_dim=embed_dim, **kw)
    raise ValueError(kind)


def prepare(module, seed, device, training, param_dtype=torch.float32):
    module = randomize_parameters(module, seed)
    module = module.to(device=device, dtype=param_dtype)
    module.train(training)
    return module


def run_and_check(module, x, dy, dtype, what, grad_wrt=None, expected_dx=None):
    """Run module(x) and backward(dy); compare with oracles.module_step.

    ``grad_wrt``: the leaf whose gradient is checked (default: ``x`` itself, made a leaf).
    Returns (y, dx) for further layout checks.
    """
    exp = oracles.module_step(module, x, dy)
    lp = oracles.module_step(module, x, dy, torch.float32) if dtype != torch.float64 else None
    if grad_wrt is None:
        leaf = x.detach().clone()  # clone keeps the strides of a dense tensor
        leaf.requires_grad_(True)
        xin = leaf
    else:
        leaf, xin = grad_wrt
    params = [p for _, p in module.named_parameters()]
    names = [n for n, _ in module.named_parameters()]
    y = module(xin)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype} != input dtype {x.dtype}"
    assert y.device == x.device
    assert tuple(y.shape) == tuple(x.shape)
    grads = torch.autograd.grad(y, [leaf] + params, dy, allow_unused=True)
    dx, pgrads = grads[0], grads[1:]
    def low(v):
        return None if lp is None else v(lp)

    assert_close_dtype(y, exp.y, dtype, f"{what}: output", lowp=low(lambda r: r.y))
    assert dx is not None and dx.dtype == x.dtype, f"{what}: dx dtype"
    ex = (lambda g: g) if expected_dx is None else expected_dx
    assert_close_dtype(dx, ex(exp.grads["input"]), dtype, f"{what}: dx",
                       lowp=low(lambda r: ex(r.grads["input"])))
    for n, g in zip(names, pgrads):
        assert g is not None, f"{what}: no gradient for parameter {n}"
        assert g.dtype == dict(module.named_parameters())[n].dtype
        assert_close_dtype(g, exp.grads[n], dtype, f"{what}: grad {n}",
                           lowp=low(lambda r: r.grads[n]))
    # buffers
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if exp.running_mean is not None:
        assert_close_dtype(module.running_mean, exp.running_mean, acc, f"{what}: running_mean")
        assert_close_dtype(module.running_var, exp.running_var, acc, f"{what}: running_var")
    if exp.num_batches_tracked is not None:
        assert int(module.num_batches_tracked) == exp.num_batches_tracked, \
            f"{what}: num_batches_tracked"
    return y, dx


# ------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("d", [1, 2, 3])
def test_bin_defaults(nf, d):
    m = getattr(nf, f"BatchInstanceNorm{d}d")(7)
    assert isinstance(m, torch.nn.Module)
    for name, val in [("weight", 1.0), ("bias", 0.0), ("gate", 1.0)]:
        p = getattr(m, name)
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad, name
        assert p.shape == (7,) and p.dtype == torch.float32
        assert torch.all(p == val), name
    assert torch.all(m.running_mean == 0) and m.running_mean.shape == (7,)
    assert torch.all(m.running_var == 1) and m.running_var.shape == (7,)
    assert int(m.num_batches_tracked) == 0 and m.num_batches_tracked.dtype == torch.long
    assert m.eps == 1e-5 and m.momentum == 0.1
    assert set(dict(m.named_parameters())) == {"weight", "bias", "gate"}
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(m.state_dict())


@pytest.mark.parametrize("d", [1, 2, 3])
def test_bin_affine_false_keeps_gate(nf, d):
    m = getattr(nf, f"BatchInstanceNorm{d}d")(4, affine=False)
    assert m.weight is None and m.bias is None
    assert isinstance(m.gate, torch.nn.Parameter) and torch.all(m.gate == 1)
    assert set(dict(m.named_parameters())) == {"gate"}


@pytest.mark.parametrize("d", [1, 2, 3])
def test_iebn_defaults_and_aliases(nf, d):
    cls = getattr(nf, f"InstanceEnhancementBatchNorm{d}d")
    assert getattr(nf, f"IEBN{d}d") is cls
    m = cls(6)
    for name, val in [("weight", 1.0), ("bias", 0.0), ("gate_weight", 0.0), ("gate_bias", -1.0)]:
        p = getattr(m, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == (6,), name
        assert torch.all(p == val), name
    assert set(dict(m.named_parameters())) == {"weight", "bias", "gate_weight", "gate_bias"}
    assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
    assert int(m.num_batches_tracked) == 0
    assert m.eps == 1e-5 and m.momentum == 0.1


@pytest.mark.parametrize("name", ["BatchInstanceNorm2d", "IEBN2d", "SyncBatchInstanceNorm",
                                  "SyncIEBN"])
def test_batch_norm_arguments_drop_in(nf, name):
    """README: the modules take nn.BatchNorm2d's arguments (nn.SyncBatchNorm's for the Sync
    forms) by keyword, BIN positionally too; IEBN used to lack ``affine``
    (``IEBN2d(c, affine=False)`` raised TypeError).  IEBN's positional order is its pinned
    public signature (tests/test_functional.py), without ``affine``."""
    cls = getattr(nf, name)
    ref_cls = torch.nn.SyncBatchNorm if name.startswith("Sync") else torch.nn.BatchNorm2d
    positional = [((4, 1e-3, 0.3, False, True), {}), ((4, 1e-3, 0.3, True, False), {})]
    for args, kwargs in (positional if "IEBN" not in name else []) + [
                         ((4,), {"affine": False, "track_running_stats": True}),
                         ((4,), {"eps": 1e-3, "momentum": None, "affine": True,
                                 "track_running_stats": False, "dtype": torch.float64})]:
        ref, m = ref_cls(*args, **kwargs), cls(*args, **kwargs)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(m, attr) == getattr(ref, attr), (args, kwargs, attr)
        assert (m.weight is None) == (ref.weight is None)
        assert (m.running_mean is None) == (ref.running_mean is None)
        for key, value in ref.state_dict().items():
            assert m.state_dict()[key].dtype == value.dtype, key


@pytest.mark.parametrize("name", ["BatchInstanceNorm2d", "IEBN2d"])
@pytest.mark.parametrize("metadata", ["version-1", "none"])
def test_old_checkpoint_without_counter_keeps_the_modules_as_batchnorm(nf, name, metadata):
    """A state_dict of version < 2 (or without metadata) lacks num_batches_tracked: the module
    keeps its own counter, as nn.BatchNorm2d does (a 0 would restart momentum=None's cumulative
    average, and the next step would overwrite the loaded statistics)."""
    for make in (torch.nn.BatchNorm2d, getattr(nf, name)):
        m = make(4, momentum=None)
        m.num_batches_tracked.fill_(5)
        sd = make(4).state_dict()
        del sd["num_batches_tracked"]
        if metadata == "none":
            sd = dict(sd)
        else:
            sd._metadata[""]["version"] = 1
        m.load_state_dict(sd)
        assert int(m.num_batches_tracked) == 5, make.__name__


def test_iebn_affine_false_is_weight_one_bias_zero(nf, backend, device):
    """IEBN(affine=False): no weight/bias parameters, the layer with weight 1 and bias 0; the
    gates stay learnable; train and eval."""
    x = randn((3, 4, 2, 3), 0, device=device).requires_grad_()
    plain = nf.IEBN2d(4, affine=False, device=device)
    full = nf.IEBN2d(4, device=device)
    assert set(dict(plain.named_parameters())) == {"gate_weight", "gate_bias"}
    with torch.no_grad():
        for m in (plain, full):
            m.gate_weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(full, mode)()
        y, y_ref = plain(x), full(x)  # one call each: the same running statistics
        torch.testing.assert_close(y, y_ref)
        g, = torch.autograd.grad(y.square().sum(), plain.gate_weight)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), full.gate_weight)
        torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(plain.running_var, full.running_var)
    assert "affine=False" in repr(plain)


def test_assoc_groupnorm_style_positional_eps_is_a_clear_error(nf):
    """nn.GroupNorm(G, C, eps): AssocNorm's third argument is embed_dim; a float there is
    refused naming it (it used to fail inside torch.empty with an unrelated message)."""
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int, got 0\.001 .*eps="):
        nf.AssocNorm(2, 4, 1e-3)
    assert nf.AssocNorm(2, 4, 3).embed_dim == 3


@pytest.mark.parametrize("args,name", [((2.0, 4), "num_groups"), ((4.0, 8), "num_groups"),
                                       ((True, 4), "num_groups"), ((0, 4), "num_groups"),
                                       ((2, -4), "num_channels"), ((2, 4.0), "num_channels")])
def test_assoc_group_and_channel_counts_are_positive_ints(nf, args, name):
    """A float count is refused naming it (was: torch.empty's message, or, for a float
    num_groups, a complaint about embed_dim, whose default it feeds); numpy integers pass."""
    with pytest.raises(ValueError, match=rf"^{name} must be a positive int, got "):
        nf.AssocNorm(*args)
    m = nf.AssocNorm(np.int64(2), np.int32(4))
    assert (m.num_groups, m.num_channels) == (2, 4) and type(m.num_groups) is int


def test_ilm_counts_take_numpy_integers_as_assoc_does(nf):
    """ILMNorm's four counts follow AssocNorm's rule: ints and numpy integers, stored as int."""
    m = nf.ILMNorm(np.int64(32), np.int32(8), np.int16(16), np.int64(4))
    assert (m.num_channels, m.num_groups, m.key_group_size, m.reduction) == (32, 8, 16, 4)
    assert all(type(v) is int for v in (m.num_channels, m.num_groups, m.key_group_size,
                                        m.reduction))
    for bad in (True, 4.0, 0):
        with pytest.raises(ValueError, match=r"^reduction must be a positive int, got "):
            nf.ILMNorm(32, 8, 16, bad)


def test_batch_layer_feature_count_is_an_int(nf):
    """num_features as nn.BatchNorm2d takes it (numpy integers too, stored as int); a float or a
    string is refused naming it (was: torch.zeros' TypeError, or a comparison error)."""
    m = nf.BatchInstanceNorm2d(np.int64(4))
    assert m.num_features == 4 and type(m.num_features) is int
    for bad in (2.5, "4", True):
        with pytest.raises(ValueError, match=r"^num_features must be a positive int, got "):
            nf.InstanceEnhancementBatchNorm2d(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_hyperparameters_as_torch_norms_take_them(nf, backend, device, kind):
    """momentum and eps as NumPy scalars (read from a config array; nn.BatchNorm2d and
    nn.GroupNorm run with them, and convert copies them over) compute what the same values
    as Python floats compute; the functional forms take NumPy integer group counts."""
    momentum, eps = np.float32(0.3), np.float32(1e-3)
    shape = (3, 4, 5, 2)
    x = make_input(shape, 3, torch.float32, device)
    kw = dict(eps=eps) if kind == "assoc" else dict(momentum=momentum, eps=eps)
    plain = dict(eps=float(eps)) if kind == "assoc" else dict(momentum=float(momentum),
                                                              eps=float(eps))
    a = randomize_parameters(make_layer(nf, kind, shape, **kw), 5).to(device)
    b = randomize_parameters(make_layer(nf, kind, shape, **plain), 5).to(device)
    for _ in range(2):
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    for (n, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(u, v, rtol=0, atol=0, msg=n)
    if kind == "assoc":
        g = a.num_groups
        args = (a.encoder, a.decoder_mean, a.decoder_var, a.weight, a.bias)
        torch.testing.assert_close(nf.functional.assoc_norm(x, np.int64(g), *args, eps=eps),
                                   a(x), rtol=0, atol=0)


def test_assoc_defaults(nf):
    m = nf.AssocNorm(4, 12, embed_dim=5)
    assert m.encoder.shape == (5, 4)
    assert m.decoder_mean.shape == (4, 5)
    assert m.decoder_var.shape == (4, 5)
    assert m.weight.shape == (12,) and torch.all(m.weight == 1)
    assert m.bias.shape == (12,) and torch.all(m.bias == 0)
    assert set(dict(m.named_parameters())) == {"encoder", "decoder_mean", "decoder_var",
                                                "weight", "bias"}
    assert m.num_groups == 4 and m.eps == 1e-5
    d = nf.AssocNorm(4, 12)  # default embed_dim: some M >= 1
    mm = d.encoder.shape[0]
    assert d.encoder.shape == (mm, 4) and d.decoder_mean.shape == (4, mm) and mm >= 1
    assert torch.isfinite(d.encoder).all() and torch.isfinite(d.decoder_var).all()


@pytest.mark.parametrize("kind", KINDS)
def test_factory_kwargs(nf, kind):
    m = make_layer(nf, kind, (2, 6, 3, 3), dtype=torch.float64)
    for n, p in m.named_parameters():
        assert p.dtype == torch.float64, n
    for n, b in m.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert b.dtype == torch.long
        else:
            assert b.dtype == torch.float64, n
    m = make_layer(nf, kind, (2, 6, 3, 3), device="meta")
    for n, p in m.named_parameters():
        assert p.device.type == "meta", n


# ------------------------------------------------------------------- forward / backward
SHAPES = [
    (5, 3), (4, 3, 7), (6, 5, 1), (3, 11, 2),               # 1d: (N, C), odd L, L = 1, C = 11
    (3, 5, 4, 3), (2, 3, 1, 1), (1, 6, 3, 5), (4, 1, 3, 3),  # 2d: odd, L = 1, N = 1, C = 1
    (2, 3, 3, 2, 5), (3, 2, 1, 1, 1),                        # 3d
]
EVAL_ONLY = [(1, 5), (1, 4, 1), (1, 3, 1, 1), (1, 2, 1, 1, 1)]  # one value per channel


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (3, 6, 7)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_zero_on_ordinary_planes(nf, backend, device, seed, kind, shape, training):
    """eps = 0 is accepted (docs/errors.md): on planes with spread every output and gradient is
    finite and matches the oracle. (The Triton coefficient kernels' padding lanes, a masked
    sample or group whose m2 read as 0, gave rsqrt(0) = Inf, and Inf * 0 a NaN in their sums:
    NaN parameter gradients for BIN, NaN dx for AssocNorm.)"""
    m = prepare(make_layer(nf, kind, shape, eps=0.0), seed, device, training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"{kind}{shape} eps=0")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_float32(nf, backend, device, seed, kind, shape, training):
    m = prepare(make_layer(nf, kind, shape), seed, device, training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"{kind}{shape}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EVAL_ONLY, ids=str)
def test_eval_one_value_per_channel(nf, backend, device, seed, kind, shape):
    """N = 1 and L = 1 is legal in eval mode (running statistics; instance part is 0)."""
    groups = 1 if kind == "assoc" else None
    m = prepare(make_layer(nf, kind, shape, groups=groups), seed, device, False)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"{kind}{shape}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (1, 4, 5), (3, 5, 2, 2, 2)], ids=str)
def test_instance_and_group_paths_allow_n1(nf, backend, device, seed, kind, shape):
    """N = 1 in training (L > 1), and AssocNorm with one channel per group."""
    groups = shape[1] if kind == "assoc" else None
    xshape = (1,) + shape[1:]
    m = prepare(make_layer(nf, kind, xshape, groups=groups), seed, device, True)
    x = make_input(xshape, seed, torch.float32, device)
    dy = randn(xshape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"{kind}{xshape}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (6, 5, 7), (4, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtypes(nf, backend, device, seed, kind, dtype, shape, training):
    """Output (and dx) in the input's dtype; reduced types vs the oracle on the upcast input."""
    if not dtype_supported(device, dtype):
        pytest.skip(f"{dtype} not supported by the {backend} backend on {device}")
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = prepare(make_layer(nf, kind, shape), seed, device, training, param_dtype)
    x = make_input(shape, seed, dtype, device)
    dy = randn(shape, seed + 7, dtype, device)
    run_and_check(m, x, dy, dtype, f"{kind}{shape}")
    for n, p in m.named_parameters():
        assert p.dtype == param_dtype, f"parameter {n} changed dtype"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_module(nf, backend, device, seed, kind, dtype):
    """module.to(dtype) (parameters and buffers in half precision), like nn.BatchNorm allows."""
    shape = (4, 6, 3, 3)
    m = prepare(make_layer(nf, kind, shape), seed, device, True, dtype)
    x = make_input(shape, seed, dtype, device)
    dy = randn(shape, seed + 7, dtype, device)
    exp = oracles.module_step(m, x, dy)
    y = m(x)
    assert y.dtype == dtype
    assert_close_dtype(y, exp.y, dtype, "output", factor=2)
    if exp.running_mean is not None:
        assert m.running_mean.dtype == dtype
        assert_close_dtype(m.running_mean, exp.running_mean, dtype, "running_mean", factor=2)
        assert_close_dtype(m.running_var, exp.running_var, dtype, "running_var", factor=2)


# ------------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (2, 3, 3, 2, 5), (4, 6, 5), (2, 4, 1, 3)],
                         ids=str)
@pytest.mark.parametrize("dtype,dy_layout", [(torch.float32, "same"), (torch.float32, "contiguous"),
                                             (torch.float16, "same")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last(nf, backend, device, seed, kind, shape, dtype, dy_layout, training):
    """channels_last / channels_last_3d / (N, L, C)-permuted rank 3: output and dx keep it."""
    m = prepare(make_layer(nf, kind, shape), seed, device, training)
    x = make_input(shape, seed, dtype, device, layout="cl")
    want = layout_of(x)
    assert want in ("nlc", "channels_last", "channels_last_3d") or shape[2:] == (1, 3)
    dy = randn(shape, seed + 7, dtype, device)
    if dy_layout == "same":
        dy = to_layout(dy, "cl")
    y, dx = run_and_check(m, x, dy, dtype, f"{kind}{shape}")
    assert y.stride() == x.stride(), f"output strides {y.stride()} != input {x.stride()}"
    assert dx.stride() == x.stride(), f"dx strides {dx.stride()} != input {x.stride()}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (2, 3, 3, 2, 5), (4, 6, 5), (4, 6)], ids=str)
def test_contiguous_output_is_contiguous(nf, backend, device, seed, kind, shape):
    m = prepare(make_layer(nf, kind, shape), seed, device, True)
    x = make_input(shape, seed, torch.float32, device).requires_grad_()
    y = m(x)
    assert y.is_contiguous()
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y) + randn(shape, seed, device=device))
    assert dx.is_contiguous()


# --------------------------------------------------------------------------- strided views
def _views(rank, c, seed, device):
    """(name, base leaf, function base -> view of shape (N, c, ...))"""
    out = []
    if rank == 2:
        out.append(("chan_step", (5, 2 * c), lambda b: b[:, ::2]))
        out.append(("transposed", (c, 5), lambda b: b.t()))
    elif rank == 3:
        out.append(("chan_step", (4, 2 * c, 5), lambda b: b[:, ::2]))
        out.append(("transposed_sliced", (4, 7, c), lambda b: b.transpose(1, 2)[:, :, 1:]))
        out.append(("last_step", (4, c, 9), lambda b: b[..., ::2]))
        out.append(("nlc_channel_slice", (4, 5, 2 * c), lambda b: b.transpose(1, 2)[:, 1:c + 1]))
    elif rank == 4:
        out.append(("chan_step", (3, 2 * c, 4, 3), lambda b: b[:, ::2]))
        out.append(("transposed_sliced", (3, 4, c, 5), lambda b: b.transpose(1, 2)[..., 1:]))
        out.append(("spatial_step", (3, c, 4, 7), lambda b: b[:, :, 1:, ::2]))
        out.append(("batch_step", (6, c, 3, 3), lambda b: b[::2]))
        # a channel slice of an NHWC tensor (ShuffleNet's split in channels-last): C innermost
        out.append(("nhwc_channel_slice", (3, 4, 3, 2 * c),
                    lambda b: b.permute(0, 3, 1, 2)[:, c:]))
    else:
        out.append(("chan_step", (2, 2 * c, 3, 2, 3), lambda b: b[:, ::2]))
        out.append(("transposed_sliced", (2, 3, c, 4, 2),
                    lambda b: b.transpose(1, 2)[:, :, :, 1:]))
    return out


VIEW_CASES = [(rank, i) for rank, n in [(2, 2), (3, 4), (4, 5), (5, 2)] for i in range(n)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank,view_index", VIEW_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_views(nf, backend, device, seed, kind, rank, view_index, training):
    c = 6
    name, base_shape, fn = _views(rank, c, seed, device)[view_index]
    base = make_input(base_shape, seed, torch.float32, device)
    x = fn(base)
    assert not x.is_contiguous(), name
    shape = tuple(x.shape)
    m = prepare(make_layer(nf, kind, shape), seed, device, training)
    dy = randn(shape, seed + 7, torch.float32, device)
    leaf = base.detach().clone().requires_grad_()
    xin = fn(leaf)

    def expected_dx(gx):
        full = torch.zeros(base_shape, dtype=torch.float64)
        fn(full).copy_(gx)
        return full

    run_and_check(m, x, dy, torch.float32, f"{kind} {name}", grad_wrt=(leaf, xin),
                  expected_dx=expected_dx)


@pytest.mark.parametrize("kind", KINDS)
def test_channel_slice_of_channels_last_stays_channels_last(nf, backend, device, seed, kind):
    """A channel slice of an NHWC tensor (C innermost, not dense) is copied in channels-last,
    not transposed to NCHW: output and input gradient channels-last, as nn.BatchNorm2d's output
    is there (a channels-last model keeps its layout)."""
    base = make_input((3, 4, 5, 12), seed, torch.float32, device).permute(0, 3, 1, 2)
    x = base[:, 6:].detach().requires_grad_()
    m = prepare(make_layer(nf, kind, tuple(x.shape)), seed, device, True)
    y = m(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    for what, t in (("output", y), ("input gradient", dx)):
        assert t.is_contiguous(memory_format=torch.channels_last), (what, t.stride())
    cl = torch.nn.BatchNorm2d(6).to(device)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)  # torch's own choice there


# ----------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_several_steps(nf, backend, device, seed, kind, rank, momentum):
    c = 5
    shapes = {2: [(6, c), (4, c), (9, c), (2, c)],
              3: [(4, c, 3), (2, c, 7), (5, c, 1), (3, c, 4)],
              4: [(3, c, 4, 3), (2, c, 2, 5), (1, c, 3, 3), (4, c, 1, 2)],
              5: [(2, c, 3, 2, 2), (3, c, 1, 2, 3), (1, c, 2, 2, 2), (2, c, 2, 1, 1)]}[rank]
    m = make_layer(nf, kind, shapes[0], momentum=momentum)
    with torch.no_grad():
        randomize_parameters(m, seed)
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    m = m.to(device).train()
    params = {n: p for n, p in m.named_parameters()}
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for step, shape in enumerate(shapes):
        x = make_input(shape, seed + 10 * step, torch.float32, device, scale=1 + step,
                       offset=step - 1)
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        exp = oracles.run(kind, x, params, running_mean=rm, running_var=rv, training=True,
                          momentum=factor, eps=m.eps)
        y = m(x)
        assert_close_dtype(y, exp.y, torch.float32, f"step {step} output")
        rm, rv = exp.running_mean, exp.running_var
        assert_close_dtype(m.running_mean, rm, torch.float32, f"step {step} running_mean")
        assert_close_dtype(m.running_var, rv, torch.float32, f"step {step} running_var")
        assert int(m.num_batches_tracked) == step + 1
    # eval uses the accumulated statistics and does not change them or the counter
    m.eval()
    before = (m.running_mean.clone(), m.running_var.clone())
    x = make_input((3, c) + shapes[0][2:], seed + 99, torch.float32, device)
    exp = oracles.run(kind, x, params, running_mean=rm, running_var=rv, training=False,
                      eps=m.eps)
    assert_close_dtype(m(x), exp.y, torch.float32, "eval output")
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert int(m.num_batches_tracked) == len(shapes)


def _training_steps_against_oracle(m, kind, shape, seed, device, factor, steps):
    """``steps`` training calls of ``m`` on fresh inputs: output and running statistics against
    the oracle's, with ``factor`` as its momentum."""
    params = {n: p for n, p in m.named_parameters()}
    rm, rv = m.running_mean.double().cpu(), m.running_var.double().cpu()
    for step in range(steps):
        x = make_input(shape, seed + step, torch.float32, device)
        exp = oracles.run(kind, x, params, running_mean=rm, running_var=rv, training=True,
                          momentum=factor, eps=m.eps)
        assert_close_dtype(m(x), exp.y, torch.float32, f"step {step} output")
        rm, rv = exp.running_mean, exp.running_var
        assert_close_dtype(m.running_mean, rm, torch.float32, f"step {step} running_mean")
        assert_close_dtype(m.running_var, rv, torch.float32, f"step {step} running_var")


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("momentum", [-0.5, 1.5])
def test_momentum_outside_the_unit_interval(nf, backend, device, seed, kind, momentum):
    """Legal and computed as given, as in nn.BatchNorm (docs/errors.md, "Accepted")."""
    shape = (4, 3, 5)
    m = prepare(make_layer(nf, kind, shape, momentum=momentum), seed, device, True)
    _training_steps_against_oracle(m, kind, shape, seed, device, momentum, steps=2)


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_stats_without_a_counter(nf, backend, device, seed, kind, momentum):
    """``num_batches_tracked`` set to None, which nn.BatchNorm accepts: momentum is the factor,
    and with momentum=None the factor is 0 (nn.BatchNorm's rule), so the statistics stay."""
    shape = (4, 3, 5)
    m = prepare(make_layer(nf, kind, shape, momentum=momentum), seed, device, True)
    m.num_batches_tracked = None
    _training_steps_against_oracle(m, kind, shape, seed, device,
                                   0.0 if momentum is None else momentum, steps=1)
    assert m.num_batches_tracked is None


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stat_requiring_grad_is_refused_unless_no_grad(nf, backend, device, seed, kind,
                                                                stat, training):
    """As nn.BatchNorm: refused with grad mode on (no gradient would ever reach it), nothing
    changed; accepted under torch.no_grad."""
    m = prepare(make_layer(nf, kind, (3, 4, 2, 3)), seed, device, training)
    getattr(m, stat).requires_grad_()
    x = make_input((3, 4, 2, 3), seed, torch.float32, device)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{type(m).__name__}: {stat} must not require grad"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        y = m(x)
    assert torch.isfinite(y).all()
    assert torch.equal(m.num_batches_tracked, before["num_batches_tracked"] + int(training))


@pytest.mark.parametrize("kind", ["bin", "iebn"])
def test_running_stats_no_grad_and_inference_mode(nf, backend, device, seed, kind):
    """Training-mode forward without autograd still updates the running statistics."""
    shape = (4, 3, 5)
    m = prepare(make_layer(nf, kind, shape), seed, device, True)
    x = make_input(shape, seed, torch.float32, device)
    exp = oracles.module_step(m, x)
    with torch.no_grad():
        y = m(x)
    assert_close_dtype(y, exp.y, torch.float32, "no_grad output")
    assert_close_dtype(m.running_mean, exp.running_mean, torch.float32, "running_mean")
    assert int(m.num_batches_tracked) == exp.num_batches_tracked
    exp = oracles.module_step(m, x)
    with torch.inference_mode():
        y = m(x)
    assert_close_dtype(y, exp.y, torch.float32, "inference_mode output")
    assert_close_dtype(m.running_var, exp.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 5, 4, 3), (1, 3, 4, 2)], ids=str)
def test_track_running_stats_false(nf, backend, device, seed, kind, shape):
    m = make_layer(nf, kind, shape, track_running_stats=False)
    assert m.running_mean is None and m.running_var is None
    assert getattr(m, "num_batches_tracked", None) is None
    randomize_parameters(m, seed)
    m = m.to(device)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    for training in (True, False):
        m.train(training)
        # both modes normalize with the batch statistics
        run_and_check(m, x, dy, torch.float32, f"{kind} track=False training={training}")


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_affine_false(nf, backend, device, seed, d, training):
    shape = {1: (5, 4, 3), 2: (3, 4, 3, 2), 3: (2, 4, 2, 3, 2)}[d]
    m = getattr(nf, f"BatchInstanceNorm{d}d")(4, affine=False)
    m = prepare(m, seed, device, training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, "bin affine=False")


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bias_false(nf, backend, device, seed, kind, training):
    """``bias=False`` (keyword only, as ``nn.BatchNorm2d``'s since torch 2.12): a weight and
    no bias, the layer with bias 0, against the float64 oracle; the synchronized layers and
    ``convert_sync`` keep it."""
    shape = (3, 4, 3, 2)
    m = make_layer(nf, kind, shape, bias=False)
    assert m.bias is None and isinstance(m.weight, torch.nn.Parameter)
    assert "bias" not in m.state_dict() and "bias=False" in repr(m)
    m = prepare(m, seed, device, training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"{kind} bias=False")
    sync = nf.convert_sync(torch.nn.Sequential(m))[0]
    assert type(sync).__name__.startswith("Sync") and sync.bias is None
    assert sync.weight is m.weight


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_1d_one_element_per_plane(nf, backend, device, seed, training):
    """(N, C) input: the instance part has a zero numerator, so gate 0 gives exactly bias."""
    m = prepare(nf.BatchInstanceNorm1d(4), seed, device, training)
    with torch.no_grad():
        m.gate.zero_()
    x = make_input((6, 4), seed, torch.float32, device).requires_grad_()
    y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, m.bias.detach().expand(6, 4), atol=1e-6, rtol=0)
    (dx, dg) = torch.autograd.grad(y, (x, m.gate), randn((6, 4), seed, device=device))
    assert torch.isfinite(dx).all() and torch.isfinite(dg).all()


def test_state_dict_round_trip(nf, backend, device, seed):
    """state_dict round trip between two modules gives identical outputs."""
    shape = (3, 4, 5, 2)
    for kind in KINDS:
        a = prepare(make_layer(nf, kind, shape), seed, device, False)
        b = make_layer(nf, kind, shape).to(device).eval()
        b.load_state_dict(a.state_dict())
        x = make_input(shape, seed, torch.float32, device)
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


# -------------------------------------------------------------- authors' IEBN checkpoints
class _AuthorsIEBN2d(torch.nn.BatchNorm2d):
    """Re-creation of the IEBN authors' layer (their parameter names and (1, C, 1, 1) shapes):
    weight, bias, weight_readjust, bias_readjust all (1, C, 1, 1); BN buffers as usual."""

    def __init__(self, c):
        super().__init__(c, affine=False)
        self.weight = torch.nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(1, c, 1, 1))
        self.weight_readjust = torch.nn.Parameter(torch.zeros(1, c, 1, 1))
        self.bias_readjust = torch.nn.Parameter(torch.full((1, c, 1, 1), -1.0))

    def forward(self, x):
        att = torch.sigmoid(x.mean((2, 3), keepdim=True) * self.weight_readjust
                            + self.bias_readjust)
        out = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, None, None,
                                             self.training, self.momentum, self.eps)
        return out * (self.weight * att) + self.bias


@pytest.mark.parametrize("nested", [False, True])
def test_iebn_loads_authors_checkpoint(nf, backend, device, seed, nested):
    c = 5
    authors = _AuthorsIEBN2d(c)
    with torch.no_grad():
        for i, p in enumerate(authors.parameters()):
            p.copy_(randn(p.shape, seed + i, scale=0.5, offset=0.5 if i == 0 else 0.0))
        authors.running_mean.copy_(randn((c,), seed + 10, scale=0.3))
        authors.running_var.copy_(0.5 + torch.rand(c))
        authors.num_batches_tracked.fill_(11)
    ours = nf.IEBN2d(c)
    if nested:
        src = torch.nn.Sequential(torch.nn.Identity(), authors)
        dst = torch.nn.Sequential(torch.nn.Identity(), ours)
    else:
        src, dst = authors, ours
    sd = src.state_dict()
    assert any(k.endswith("weight_readjust") for k in sd)
    assert sd[("1." if nested else "") + "bias_readjust"].shape == (1, c, 1, 1)
    dst.load_state_dict(sd, strict=True)
    torch.testing.assert_close(ours.gate_weight.detach(), authors.weight_readjust.detach().flatten())
    torch.testing.assert_close(ours.gate_bias.detach(), authors.bias_readjust.detach().flatten())
    torch.testing.assert_close(ours.weight.detach(), authors.weight.detach().flatten())
    torch.testing.assert_close(ours.bias.detach(), authors.bias.detach().flatten())
    assert ours.gate_weight.shape == (c,) and isinstance(ours.gate_weight, torch.nn.Parameter)
    assert int(ours.num_batches_tracked) == 11
    ours = ours.to(device)
    authors = authors.to(device)
    x = make_input((3, c, 4, 5), seed, torch.float32, device)
    for training in (False, True):
        ours.train(training), authors.train(training)
        assert_close_dtype(ours(x), authors(x), torch.float32, f"training={training}")
    torch.testing.assert_close(ours.running_mean, authors.running_mean)
    # our own state_dict uses our names and round-trips
    fresh = nf.IEBN2d(c)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    assert "gate_weight" in ours.state_dict()


def test_iebn_loads_readjust_only_checkpoint(nf):
    """weight/bias of shape (C,) with weight_readjust/bias_readjust of shape (1, C, 1, 1)."""
    c = 3
    sd = nf.IEBN2d(c).state_dict()
    del sd["gate_weight"], sd["gate_bias"]  # the checkpoint has the readjust pair instead
    sd["weight_readjust"] = torch.arange(c, dtype=torch.float32).reshape(1, c, 1, 1)
    sd["bias_readjust"] = -torch.arange(c, dtype=torch.float32).reshape(1, c, 1, 1)
    m = nf.IEBN2d(c)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.gate_weight.detach(), torch.arange(c, dtype=torch.float32))
    assert torch.equal(m.gate_bias.detach(), -torch.arange(c, dtype=torch.float32))


@pytest.mark.parametrize("shape", [(64, 16), (64, 16, 1), (8, 16, 1, 1)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_one_value_per_plane_dx_accuracy(nf, backend, device, seed, shape, training):
    """With L = 1 the instance part is identically 0, so its gradient contributes nothing;
    float32 dx must be as accurate as a plain float32 computation (the oracle's float32 run
    is ~3e-7 off here), not amplified by the instance factor 1/sqrt(eps) ~ 316."""
    m = prepare(make_layer(nf, "bin", shape), seed, device, training)
    x = make_input(shape, seed, torch.float32, device).requires_grad_()
    dy = randn(shape, seed + 7, torch.float32, device)
    exp = oracles.module_step(m, x, dy)
    (dx,) = torch.autograd.grad(m(x), x, dy)
    ref = exp.grads["input"]
    err = float((dx.double().cpu() - ref).abs().max())
    assert err <= 1e-5 * max(1.0, float(ref.abs().max())), f"dx max error {err:.2e}"


@pytest.mark.parametrize("activation", [None, "relu"], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bin_one_value_per_plane_parameter_gradients_alone(nf, backend, device, seed, activation,
                                                           affine, training):
    """(N, C) input with only the parameters' gradients asked for (a trained head on a frozen
    trunk): the backward that computes no dx, where the whole-layer op runs BIN as batch norm
    with weight gamma * rho and takes the gate's and weight's gradients by the chain rule
    (csrc/layer_directions.cpp, bin_as_one_sample), against the float64 oracle; the running
    statistics too."""
    shape = (37, 5)
    m = prepare(nf.BatchInstanceNorm1d(5, affine=affine, activation=activation), seed, device,
                training)
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    exp = oracles.module_step(m, x, dy)
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(m(x), [p for _, p in m.named_parameters()], dy)
    for name, g in zip(names, grads):
        assert_close_dtype(g, exp.grads[name], torch.float32, f"grad {name}")
    if training:
        assert_close_dtype(m.running_mean, exp.running_mean, torch.float32, "running_mean")
        assert_close_dtype(m.running_var, exp.running_var, torch.float32, "running_var")


def test_bin_one_value_per_plane_eval_far_from_zero(nf, backend, device, seed):
    """Eval mode on (N, C) values far from 0 (their running mean ~1e4, spread ~1): the one-sample
    path centres the map and the backward's sums on the running mean, as batch norm's eval
    does, so float32 keeps the oracle's accuracy (centred on 0 instead, sum(dy * x) -
    running_mean * sum(dy) would lose ~4 digits to cancellation)."""
    shape = (300, 4)
    m = prepare(nf.BatchInstanceNorm1d(4), seed, device, False)
    with torch.no_grad():
        m.running_mean.copy_(1e4 + randn((4,), seed + 3, device=device))
    x = (1e4 + make_input(shape, seed, torch.float32, device)).requires_grad_()
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x.detach(), dy, torch.float32, "bin eval far from 0")


def test_bin_one_value_per_plane_eval_eps_zero(nf, backend, device, seed):
    """eps = 0 in eval mode on (N, C) values, one column constant across the batch: the running
    statistics normalise it and a one-value plane's instance half is exactly 0 (docs/errors.md),
    so BIN is batch norm's eval with weight gamma * rho, finite, on every backend and path
    (float64 reference: that formula; the papers' formula itself reads 0 / 0 there). The
    one-sample view's instance half has weight 0, but 0 * rsqrt(0 + eps) would be NaN: the
    eager path gives it a unit m2; the Python path (under torch.func here: grad, jvp, grad of
    grad, which recompute the moments) keeps the general path at eps = 0 in eval."""
    m = prepare(nf.BatchInstanceNorm1d(4, eps=0.0), seed, device, False)
    x = make_input((9, 4), seed, torch.float32, device)
    x[:, 0] = 0.75
    dy = randn((9, 4), seed + 7, torch.float32, device)
    names = ("gate", "weight", "bias")
    ref = {n: getattr(m, n).detach().double().requires_grad_() for n in names}
    x64 = x.double().requires_grad_()
    y64 = ((x64 - m.running_mean.double()) / m.running_var.double().sqrt()
           * ref["weight"] * ref["gate"] + ref["bias"])
    expected = torch.autograd.grad(y64, [x64, *ref.values()], dy.double())
    xin = x.clone().requires_grad_()
    y = m(xin)
    got = torch.autograd.grad(y, [xin, *(getattr(m, n) for n in names)], dy)
    assert_close_dtype(y, y64, torch.float32, "output")
    for name, g, e in zip(("input",) + names, got, expected):
        assert_close_dtype(g, e, torch.float32, f"grad {name}")
    params = {k: v.detach() for k, v in m.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).mul(dy).sum())(params)
    for name in names:
        assert_close_dtype(grads[name], expected[1 + names.index(name)], torch.float32,
                           f"torch.func grad {name}")
    # forward mode and a second derivative (of a loss whose Hessian in x is not 0)
    scale = (m.weight * m.gate / m.running_var.sqrt()).detach().double()
    _, tangent = torch.func.jvp(m, (x,), (dy,))
    assert_close_dtype(tangent, dy.double() * scale, torch.float32, "jvp")
    second = torch.func.grad(lambda t: torch.func.grad(lambda u: m(u).square().sum())(t)
                             .mul(dy).sum())(x)
    assert_close_dtype(second, 2 * dy.double() * scale ** 2, torch.float32, "grad of grad")


def test_bin_one_value_per_plane_op_refuses_running_stats_sharing_parameters(nf, backend, device):
    """The whole-layer op called directly in training on (N, C) input: running statistics that
    share memory with the gate or the weight are refused, as for any other input, and nothing
    is written (the one-sample call hands the op a gate and a weight of its own, whose overlap
    check would not see the caller's)."""
    if backend not in ("cpu", "cuda"):
        pytest.skip("the whole-layer op serves the cpu and cuda backends")
    x = make_input((8, 4), 3, torch.float32, device)
    for shared in ("gate", "weight"):
        for stat in ("running_mean", "running_var"):
            gate, weight = torch.rand(4, device=device), torch.rand(4, device=device)
            stats = {"running_mean": torch.zeros(4, device=device),
                     "running_var": torch.ones(4, device=device)}
            stats[stat] = gate if shared == "gate" else weight
            before = (gate.clone(), weight.clone())
            with pytest.raises(RuntimeError, match=f"{stat} must not share memory with {shared}"):
                torch.ops.normfuse.bin_layer(x, gate, weight, None, stats["running_mean"],
                                             stats["running_var"], True, 0.1, 1e-5, None, False)
            assert torch.equal(gate, before[0]) and torch.equal(weight, before[1])


# (N, C): a W-lane tail and C < W; more rows than the reduction's chunk (64); more channels than
# its column block (64); several blocks with a tail.
IEBN_HEADS = [(2, 1), (9, 7), (130, 67), (5, 300)]


@pytest.mark.parametrize("shape", IEBN_HEADS, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("mode", ["train", "eval", "untracked"])
def test_iebn_one_value_per_plane(nf, backend, device, seed, shape, activation, affine, mode):
    """IEBN on (N, C) input, where the gate sigmoid(x * gate_weight + gate_bias) reads each value
    itself: on the cpu backend the whole-layer op computes it elementwise from per-channel
    statistics (csrc/layer_directions.cpp, iebn_pointwise); output, every gradient and the running
    statistics against the float64 oracle, in training, eval and without running statistics."""
    m = nf.InstanceEnhancementBatchNorm1d(shape[1], affine=affine, activation=activation,
                                          track_running_stats=mode != "untracked")
    m = prepare(m, seed, device, mode == "train")
    x = make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, f"iebn{shape} {mode}")
    m.train(mode == "train")
    exp = oracles.module_step(m, x, dy)  # the parameters' gradients alone (no dx asked for)
    grads = torch.autograd.grad(m(x), list(m.parameters()), dy)
    for (name, _), g in zip(m.named_parameters(), grads):
        assert_close_dtype(g, exp.grads[name], torch.float32, f"grad {name} without dx")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_iebn_one_value_per_plane_far_from_zero(nf, backend, device, seed, training):
    """(N, C) values ~1e4 with a spread of ~1 (and running mean there in eval): the elementwise
    path centres on the float32 batch (or running) mean, as batch norm does, so float32 keeps the
    oracle's accuracy, gate_weight's gradient (a sum of terms times x) included."""
    shape = (300, 12)
    m = prepare(nf.InstanceEnhancementBatchNorm1d(12), seed, device, training)
    with torch.no_grad():
        m.running_mean.copy_(1e4 + randn((12,), seed + 3, device=device))
        m.gate_weight.mul_(1e-4)  # the gate's argument ~1, not ~1e4 (a saturated sigmoid)
    x = 1e4 + make_input(shape, seed, torch.float32, device)
    dy = randn(shape, seed + 7, torch.float32, device)
    run_and_check(m, x, dy, torch.float32, "iebn far from 0")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_two_forwards_then_backward(nf, backend, device, seed, kind, training):
    """Two calls of the same module before one backward (siamese nets, gradient accumulation
    over micro-batches in one graph) must work, like nn.BatchNorm: eval mode must not touch
    the running statistics (not even their version counter), and training mode must not save
    them for backward."""
    shape = (3, 6, 4, 3)
    m = prepare(make_layer(nf, kind, shape), seed, device, training)
    x1 = make_input(shape, seed, torch.float32, device).requires_grad_()
    x2 = make_input(shape, seed + 1, torch.float32, device).requires_grad_()
    dy = randn(shape, seed + 2, torch.float32, device)
    exp1 = oracles.module_step(m, x1, dy)
    versions = [b._version for b in m.buffers()]
    y1 = m(x1)
    exp2 = oracles.module_step(m, x2, dy)
    y2 = m(x2)
    if not training:
        assert [b._version for b in m.buffers()] == versions, \
            "eval mode must not write the running statistics"
    g1, g2 = torch.autograd.grad((y1 * dy).sum() + (y2 * dy).sum(), (x1, x2))
    assert_close_dtype(g1, exp1.grads["input"], torch.float32, "dx1")
    assert_close_dtype(g2, exp2.grads["input"], torch.float32, "dx2")
