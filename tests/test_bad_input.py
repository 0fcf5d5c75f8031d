"""Bad input: a ValueError/RuntimeError whose message names the argument, and no state change.

Every failing call must leave running_mean, running_var and num_batches_tracked as they were.
"""

import re

import pytest
import torch

from oracles import make_input, randomize_parameters, snapshot_buffers, assert_buffers_equal

ERRORS = (ValueError, RuntimeError)


def _names(msg, *words):
    """True when one of ``words`` appears in ``msg`` as a whole identifier."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])", msg, re.I)
               for w in words)


def _expect_error(fn, *words):
    with pytest.raises(ERRORS) as info:
        fn()
    msg = str(info.value)
    assert _names(msg, *words), f"message does not name {words}: {msg!r}"
    return msg


def _bn_layer(nf, kind, d, c, **kw):
    cls = {"bin": "BatchInstanceNorm", "iebn": "InstanceEnhancementBatchNorm"}[kind]
    return getattr(nf, f"{cls}{d}d")(c, **kw)


# ---------------------------------------------------------------------------- wrong rank
RANK_CASES = [(1, (2, 3, 4, 5)), (1, (3,)), (2, (4, 3, 5)), (2, (2, 3, 2, 2, 2)), (2, (4, 3)),
              (3, (2, 3, 4, 4)), (3, (1, 2, 3, 2, 2, 2))]


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("d,shape", RANK_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_rank(nf, backend, device, seed, kind, d, shape, training):
    m = randomize_parameters(_bn_layer(nf, kind, d, 3), seed).to(device).train(training)
    snap = snapshot_buffers(m)
    x = make_input(shape, seed, device=device) if len(shape) > 1 else torch.randn(shape)
    msg = _expect_error(lambda: m(x), "input")
    assert re.search(r"\d", msg), f"message should say what rank was expected: {msg!r}"
    assert_buffers_equal(m, snap, "wrong rank")


def test_assoc_wrong_rank(nf, backend, device, seed):
    m = nf.AssocNorm(2, 4).to(device)
    _expect_error(lambda: m(torch.randn(4, device=device)), "input")


# ------------------------------------------------------------------------ wrong channels
@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("d,shape", [(1, (4, 5)), (1, (4, 5, 3)), (2, (3, 5, 2, 2)),
                                     (3, (2, 2, 2, 2, 2))], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_channel_count(nf, backend, device, seed, kind, d, shape, training):
    m = randomize_parameters(_bn_layer(nf, kind, d, 4), seed).to(device).train(training)
    snap = snapshot_buffers(m)
    x = make_input(shape, seed, device=device)
    _expect_error(lambda: m(x), "num_features", "channels", "channel", "input")
    assert_buffers_equal(m, snap, "wrong channels")


def test_assoc_wrong_channel_count(nf, backend, device, seed):
    m = nf.AssocNorm(2, 4).to(device)
    _expect_error(lambda: m(make_input((3, 6, 2, 2), seed, device=device)),
                  "num_channels", "channels", "channel", "input")


# ---------------------------------------------------------- one value per channel (training)
@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("d,shape", [(1, (1, 4)), (1, (1, 4, 1)), (2, (1, 4, 1, 1)),
                                     (3, (1, 4, 1, 1, 1))], ids=str)
@pytest.mark.parametrize("track", [True, False])
def test_single_value_per_channel_in_training(nf, backend, device, seed, kind, d, shape, track):
    m = _bn_layer(nf, kind, d, 4, track_running_stats=track)
    m = randomize_parameters(m, seed).to(device).train()
    snap = snapshot_buffers(m)
    x = make_input(shape, seed, device=device)
    msg = _expect_error(lambda: m(x), "value", "values", "channel", "input")
    assert_buffers_equal(m, snap, "single value per channel")
    # the same input is legal in eval mode when running statistics exist
    if track:
        m.eval()
        assert torch.isfinite(m(x)).all()


# ---------------------------------------------------------------------------- groups
def test_assoc_groups_must_divide_channels(nf):
    with pytest.raises(ERRORS) as info:
        nf.AssocNorm(3, 4)
    assert _names(str(info.value), "num_groups", "num_channels", "divisible"), str(info.value)
    with pytest.raises(ERRORS):
        nf.AssocNorm(0, 4)


def test_functional_assoc_groups_must_divide_channels(nf, backend, device, seed):
    x = make_input((2, 6, 3, 3), seed, device=device)
    g, m = 4, 2
    args = (torch.randn(m, g, device=device), torch.randn(g, m, device=device),
            torch.randn(g, m, device=device), torch.ones(6, device=device),
            torch.zeros(6, device=device))
    _expect_error(lambda: nf.functional.assoc_norm(x, g, *args), "num_groups", "groups")


# --------------------------------------------------------- parameters: device, dtype, shape
BIN_ARGS = ["running_mean", "running_var", "weight", "bias", "gate"]
IEBN_ARGS = ["running_mean", "running_var", "weight", "bias", "gate_weight", "gate_bias"]
ASSOC_ARGS = ["encoder", "decoder_mean", "decoder_var", "weight", "bias"]


def _functional_args(kind, c, device, groups=2, m=3):
    f = dict(device=device)
    if kind == "bin":
        return dict(running_mean=torch.zeros(c, **f), running_var=torch.ones(c, **f),
                    weight=torch.ones(c, **f), bias=torch.zeros(c, **f),
                    gate=torch.full((c,), 0.5, **f))
    if kind == "iebn":
        return dict(running_mean=torch.zeros(c, **f), running_var=torch.ones(c, **f),
                    weight=torch.ones(c, **f), bias=torch.zeros(c, **f),
                    gate_weight=torch.full((c,), 0.3, **f), gate_bias=torch.full((c,), -1.0, **f))
    return dict(encoder=torch.randn(m, groups, **f), decoder_mean=torch.randn(groups, m, **f),
                decoder_var=torch.randn(groups, m, **f), weight=torch.ones(c, **f),
                bias=torch.zeros(c, **f))


def _call(nf, kind, x, a, training):
    F = nf.functional
    if kind == "bin":
        return F.batch_instance_norm(x, a["running_mean"], a["running_var"], a["weight"],
                                     a["bias"], a["gate"], training=training)
    if kind == "iebn":
        return F.instance_enhancement_batch_norm(x, a["running_mean"], a["running_var"],
                                                 a["weight"], a["bias"], a["gate_weight"],
                                                 a["gate_bias"], training=training)
    return F.assoc_norm(x, 2, a["encoder"], a["decoder_mean"], a["decoder_var"], a["weight"],
                        a["bias"])


FUNC_CASES = [(k, n, t) for k, names in (("bin", BIN_ARGS), ("iebn", IEBN_ARGS))
              for n in names for t in (True, False)] + [("assoc", n, True) for n in ASSOC_ARGS]


def _bad_variants(t, how):
    if how == "meta":
        return t.to("meta")
    if how == "int":
        return t.round().to(torch.int64)
    if how == "bool":
        return t != 0
    if how == "shape":
        return torch.cat([t, t[..., :1]], dim=-1)
    raise ValueError(how)


@pytest.mark.parametrize("kind,arg,training", FUNC_CASES, ids=str)
@pytest.mark.parametrize("how", ["meta", "int", "shape"])
def test_functional_bad_parameter(nf, backend, device, seed, kind, arg, how, training):
    """A parameter/buffer on another device ('meta' stands in for a GPU), of an integer dtype,
    or of the wrong shape: the error names it, and the running stats are unchanged."""
    c = 4
    a = _functional_args(kind, c, device)
    a[arg] = _bad_variants(a[arg], how)
    keep = {k: v.clone() for k, v in a.items() if k.startswith("running") and k != arg}
    x = make_input((3, c, 2, 3), seed, device=device)
    _expect_error(lambda: _call(nf, kind, x, a, training), arg)
    for k, v in keep.items():
        assert torch.equal(a[k], v), f"{k} changed by a call that raised"


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("how", ["expanded-mean", "expanded-var", "same", "overlapping-views",
                                 "mean-is-weight", "var-is-bias", "mean-views-weight",
                                 "var-views-bias"])
def test_functional_running_stats_updated_in_place(nf, backend, device, seed, kind, how):
    """Found by fuzzing: in training the running statistics are written in place, so an expanded
    one failed in the write-back after the other was updated (state changed by a call that
    raised), and running statistics sharing memory with each other or with a parameter gave
    silently wrong results on every backend. Now a ValueError naming them, nothing written; in
    eval mode (read only) the same tensors are accepted."""
    c = 4
    a = _functional_args(kind, c, device)
    if how.startswith("expanded"):
        key = "running_mean" if how == "expanded-mean" else "running_var"
        a[key] = torch.ones(1, device=device).expand(c)
        words = (key,)
    elif how == "same":
        a["running_var"] = a["running_mean"]
        words = ("running_mean",)
    elif how == "overlapping-views":  # partial overlap: passes the common path's predicate
        buf = torch.ones(c + 2, device=device)
        a["running_mean"], a["running_var"] = buf[:c], buf[2:]
        words = ("running_mean",)
    elif how == "mean-is-weight":
        a["running_mean"] = a["weight"]
        words = ("running_mean",)
    elif how == "mean-views-weight":  # another tensor object on the weight's memory
        a["running_mean"] = a["weight"].detach()
        words = ("running_mean",)
    elif how == "var-views-bias":
        a["running_var"] = a["bias"][:]
        words = ("running_var",)
    else:
        a["running_var"] = a["bias"]
        words = ("running_var",)
    keep = {k: v.clone() for k, v in a.items()}
    x = make_input((3, c, 2, 3), seed, device=device)
    msg = _expect_error(lambda: _call(nf, kind, x, a, True), *words)
    assert "overlapping" in msg or "share memory" in msg, msg
    for k, v in keep.items():
        assert torch.equal(a[k], v), f"{k} changed by a call that raised"
    _call(nf, kind, x, a, False)  # eval mode reads them only


def test_interleaved_running_statistics_are_accepted(nf, backend, device, seed):
    """running_mean / running_var as interleaved views of one buffer share no element: legal
    (docs/errors.md: strided statistics are accepted and updated), as F.batch_norm takes them;
    BIN with gate 1 updates them exactly as it does."""
    c = 4
    x = make_input((3, c, 2, 3), seed, device=device)
    ours, ref = (torch.rand(2 * c, device=device) + 0.5 for _ in range(2))
    ref.copy_(ours)
    before = ours.clone()
    y = nf.functional.batch_instance_norm(x, ours[0::2], ours[1::2], None, None,
                                          torch.ones(c, device=device), training=True)
    y_ref = torch.nn.functional.batch_norm(x, ref[0::2], ref[1::2], training=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, before)  # updated, both halves
    # strided views that do share elements are still refused, before any write
    buf = torch.rand(2 * c + 2, device=device) + 0.5
    before = buf.clone()
    with pytest.raises(ValueError, match="running_mean must not share memory with running_var"):
        nf.functional.batch_instance_norm(x, buf[0:2 * c:2], buf[2:2 * c + 2:2], None, None,
                                          torch.ones(c, device=device), training=True)
    assert torch.equal(buf, before)


@pytest.mark.parametrize("cls", ["BatchInstanceNorm2d", "IEBN2d"])
def test_training_forward_under_fake_tensor_mode(cls):
    """Fake tensors answer data_ptr() with 0 rather than an error: the running statistics'
    memory checks must not take two of them for one buffer (a ValueError under FakeTensorMode,
    e.g. shape propagation or memory estimation, on every training forward)."""
    import warnings

    import normfuse
    from torch._subclasses.fake_tensor import FakeTensorMode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor touch their data pointers (deprecated)
        with FakeTensorMode():
            m = getattr(normfuse, cls)(6).train()
            y = m(torch.randn(3, 6, 4, 4))
    assert y.shape == (3, 6, 4, 4)


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_functional_bad_input_dtype(nf, backend, device, seed, kind, dtype):
    a = _functional_args(kind, 4, device)
    keep = {k: v.clone() for k, v in a.items() if k.startswith("running")}
    x = (make_input((3, 4, 2, 3), seed, device=device) * 3).to(dtype)
    _expect_error(lambda: _call(nf, kind, x, a, True), "input")
    for k, v in keep.items():
        assert torch.equal(a[k], v), f"{k} changed by a call that raised"


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
def test_functional_input_on_other_device(nf, backend, device, seed, kind):
    a = _functional_args(kind, 4, device)
    x = make_input((3, 4, 2, 3), seed).to("meta")
    names = ["input"] + list(a)
    _expect_error(lambda: _call(nf, kind, x, a, True), *names)


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
@pytest.mark.parametrize("where", ["param", "buffer"])
def test_module_parameter_on_other_device(nf, backend, device, seed, kind, where):
    shape = (3, 4, 2, 3)
    if kind == "assoc":
        m = nf.AssocNorm(2, 4)
    else:
        m = _bn_layer(nf, kind, 2, 4)
    m = randomize_parameters(m, seed).to(device).train()
    if where == "buffer" and kind == "assoc":
        pytest.skip("AssocNorm has no buffers")
    snap = snapshot_buffers(m)
    name = "weight" if where == "param" else "running_var"
    if where == "param":
        m.weight = torch.nn.Parameter(m.weight.detach().to("meta"))
    else:
        m.running_var = m.running_var.to("meta")
        snap["running_var"] = m.running_var
    x = make_input(shape, seed, device=device)
    _expect_error(lambda: m(x), name)
    for n, b in m.named_buffers():
        if n != "running_var" or where != "buffer":
            assert torch.equal(b.cpu(), snap[n].cpu()), f"buffer {n} changed"


@pytest.mark.parametrize("kind", ["bin", "iebn", "assoc"])
def test_module_integer_parameter(nf, backend, device, seed, kind):
    m = nf.AssocNorm(2, 4) if kind == "assoc" else _bn_layer(nf, kind, 2, 4)
    m = m.to(device).train()
    arg = {"bin": "gate", "iebn": "gate_bias", "assoc": "decoder_var"}[kind]
    p = getattr(m, arg)
    # integer tensors cannot be Parameters that require grad: plain tensor attribute
    delattr(m, arg)
    setattr(m, arg, p.detach().round().to(torch.int64))
    snap = snapshot_buffers(m)
    x = make_input((3, 4, 2, 3), seed, device=device)
    _expect_error(lambda: m(x), arg)
    assert_buffers_equal(m, snap, "integer parameter")


@pytest.mark.parametrize("kind", ["bin", "iebn"])
def test_failed_call_keeps_counter_with_momentum_none(nf, backend, device, seed, kind):
    """num_batches_tracked must not be incremented by a call that raises (nn.BatchNorm
    increments before the functional call; we must not)."""
    m = _bn_layer(nf, kind, 2, 4, momentum=None).to(device).train()
    m(make_input((3, 4, 2, 2), seed, device=device))
    assert int(m.num_batches_tracked) == 1
    snap = snapshot_buffers(m)
    for bad in [make_input((3, 5, 2, 2), seed, device=device),
                make_input((1, 4, 1, 1), seed, device=device)]:
        with pytest.raises(ERRORS):
            m(bad)
        assert_buffers_equal(m, snap, "failed call")
    m(make_input((3, 4, 2, 2), seed + 1, device=device))
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("kind", ["bin", "iebn"])
@pytest.mark.parametrize("how", ["float", "shape", "meta"])
def test_module_bad_counter(nf, backend, device, seed, kind, how):
    """The coefficient op increments num_batches_tracked in place, so a buffer it cannot take
    (not a 0-dim int64 tensor on the input's device) is refused before anything runs."""
    m = randomize_parameters(_bn_layer(nf, kind, 2, 4), seed).to(device).train()
    bad = {"float": torch.tensor(2.0, device=device),
           "shape": torch.zeros(2, dtype=torch.long, device=device),
           "meta": torch.tensor(2, device="meta")}[how]
    m.num_batches_tracked = bad
    snap = {n: b for n, b in snapshot_buffers(m).items() if n != "num_batches_tracked"}
    _expect_error(lambda: m(make_input((3, 4, 2, 3), seed, device=device)),
                  "num_batches_tracked")
    for n, b in snap.items():
        assert torch.equal(dict(m.named_buffers())[n].cpu(), b.cpu()), f"buffer {n} changed"
    if how != "meta":
        assert torch.equal(m.num_batches_tracked.cpu(), bad.cpu())
