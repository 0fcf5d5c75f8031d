"""Synchronized BIN and IEBN (normfuse.distributed).

Multi-process checks run in spawned gloo groups on the CPU (tests/distributed/sync_workers.py):
one spawn of 2 ranks and one of 3 ranks, each running every check; here each check is one test.
They compare, in float64, the synchronized layers on uneven per-rank batches (some ranks with zero
samples) with one process running the plain module on the concatenated batch: outputs, input
gradients, summed parameter gradients, running statistics (bit-identical on every rank); the same
inside DistributedDataParallel; ranks with different spatial sizes; sub-groups; error cases.
World size 1, no process group and convert_sync run in this process.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sync_workers  # noqa: E402

import normfuse  # noqa: E402
from normfuse.distributed import (  # noqa: E402
    SyncBatchInstanceNorm, SyncInstanceEnhancementBatchNorm, convert_sync)

dist = torch.distributed
# The README's test command spreads the tests over the cores (-n auto --dist loadgroup): this
# module's stay on one worker, as they share the multi-process runs cached in _RUNS, which a
# second worker would start again.
pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.xdist_group("test_sync"),
]

# float64 on the CPU: the backends that run there (a GPU's gloo group would need a GPU each).
# "torch" first: the spawned runs stop at their first failure (see sync_workers._worker).
# The CPU backends available here (gloo runs on the CPU), narrowed by NORMFUSE_TEST_BACKENDS
# like the rest of the suite. (Not imported from tests/conftest.py: several conftest modules
# share that name.)
_ONLY = os.environ.get("NORMFUSE_TEST_BACKENDS")
BACKENDS = [b for b in ("torch", "cpu") if b in normfuse.available_backends()
            and (not _ONLY or b in _ONLY.split(","))] or ["torch"]
_RUNS: dict = {}


def _results(world, tmp_path_factory):
    if world not in _RUNS:
        outdir = tmp_path_factory.mktemp(f"world{world}")
        try:
            _RUNS[world] = sync_workers.run_world(world, BACKENDS, str(outdir))
        except Exception as exc:  # noqa: BLE001 - every check of this world reports it
            _RUNS[world] = exc
    return _RUNS[world]


def _check(world, name, tmp_path_factory):
    results = _results(world, tmp_path_factory)
    if isinstance(results, Exception):
        pytest.fail(f"the {world}-process run failed: {results!r}")
    failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results)
                if name in res and res[name] != "ok"]
    assert not failures, "\n".join(failures)
    missing = [r for r, res in enumerate(results) if name not in res]
    if missing:
        stopped = results[missing[0]].get("_stopped_after")
        pytest.fail(f"not run on ranks {missing}: the run stopped after the failed check "
                    f"{stopped!r}")


@pytest.mark.parametrize("name", sync_workers.check_names(2, BACKENDS))
def test_two_processes(name, tmp_path_factory):
    _check(2, name, tmp_path_factory)


@pytest.mark.parametrize("name", sync_workers.check_names(3, BACKENDS))
def test_three_processes(name, tmp_path_factory):
    _check(3, name, tmp_path_factory)


# ---------------------------------------------------------------- in this process: no group, size 1
PAIRS = [(normfuse.BatchInstanceNorm2d, SyncBatchInstanceNorm),
         (normfuse.InstanceEnhancementBatchNorm2d, SyncInstanceEnhancementBatchNorm)]


def _same_as_plain(plain_cls, sync_cls, **kw):
    """Bitwise: the synchronized module runs the plain module's code."""
    plain = sync_workers.randomize(plain_cls(3, **kw), 1).to(torch.float64)
    sync = sync_cls(3, **kw).to(torch.float64)
    sync.load_state_dict(plain.state_dict())
    for step in range(2):
        x = sync_workers.data((4, 3, 5, 2), step).requires_grad_()
        xs = x.detach().clone().requires_grad_()
        y, ys = plain(x), sync(xs)
        y.sum().backward()
        ys.sum().backward()
        assert torch.equal(y, ys) and torch.equal(x.grad, xs.grad)
    for (n, p), (_, ps) in zip(plain.named_parameters(), sync.named_parameters()):
        assert torch.equal(p.grad, ps.grad), n
    for (n, b), (_, bs) in zip(plain.named_buffers(), sync.named_buffers()):
        assert torch.equal(b, bs), n


@pytest.fixture
def world_of_one():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=BACKENDS)
def cpu_backend(request):
    with normfuse.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("plain_cls,sync_cls", PAIRS)
def test_no_process_group_is_plain(plain_cls, sync_cls, cpu_backend, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_initialized()
    _same_as_plain(plain_cls, sync_cls)
    _same_as_plain(plain_cls, sync_cls, momentum=None, track_running_stats=False)


@pytest.mark.parametrize("plain_cls,sync_cls", PAIRS)
def test_world_size_one_is_plain(plain_cls, sync_cls, cpu_backend, world_of_one):
    _same_as_plain(plain_cls, sync_cls)


def test_any_rank(cpu_backend, monkeypatch):
    """Ranks above 5 run as (N, C, L), like nn.SyncBatchNorm accepts any rank >= 2."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    x = sync_workers.data((3, 2, 2, 3, 1, 2), 9)
    plain = sync_workers.randomize(normfuse.BatchInstanceNorm1d(2), 3).to(torch.float64)
    sync = convert_sync(copy.deepcopy(plain))
    assert torch.equal(sync(x), plain(x.reshape(3, 2, -1)).reshape(x.shape))
    assert torch.equal(sync.running_var, plain.running_var)
    with pytest.raises(ValueError, match="rank"):
        sync(torch.zeros(3, dtype=torch.float64))


def test_nested_input_is_refused_by_name(monkeypatch):
    """A nested tensor gets the plain layers' error, also one of rank > 5 (which the any-rank
    reshape would otherwise take) and on the checks a group's call runs."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    m = SyncBatchInstanceNorm(4)
    wide = torch.nested.nested_tensor([torch.randn(4, 2, 2, 2, 2), torch.randn(4, 2, 2, 2, 3)])
    small = torch.nested.nested_tensor([torch.randn(4, 3), torch.randn(4, 5)])
    for call in (lambda: m(wide), lambda: m._check_sync_input(small, m.running_mean,
                                                              m.running_var, 0.1)):
        with pytest.raises(ValueError, match="input must be a dense .* got a nested tensor"):
            call()


def test_world_size_without_group_raises(cpu_backend, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    m = SyncBatchInstanceNorm(3)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=4.*not initialized"):
        m(torch.randn(4, 3, 2))
    m.eval()
    m(torch.randn(4, 3, 2))  # eval mode needs no group


def test_destroyed_group_raises():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        m = SyncInstanceEnhancementBatchNorm(3, process_group=group)
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="process_group was given.*not initialized"):
        m(torch.randn(4, 3, 2))


# ------------------------------------------------------------------------------- convert_sync
def test_convert_sync():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), normfuse.BatchInstanceNorm2d(4, affine=False, momentum=None),
        nn.Sequential(normfuse.BatchInstanceNorm1d(4, eps=1e-3),
                      normfuse.InstanceEnhancementBatchNorm3d(4, track_running_stats=False)),
        normfuse.InstanceEnhancementBatchNorm1d(4, momentum=0.2), normfuse.AssocNorm(2, 4),
        nn.BatchNorm2d(4)).to(torch.float64)
    sync_workers.randomize(model, 4)
    model[3].eval()
    before = dict(model.named_modules())
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    state = copy.deepcopy(model.state_dict())
    group = object()
    out = convert_sync(model, process_group=group)
    assert out is model
    expect = {"1": SyncBatchInstanceNorm, "2.0": SyncBatchInstanceNorm,
              "2.1": SyncInstanceEnhancementBatchNorm, "3": SyncInstanceEnhancementBatchNorm}
    for name, m in model.named_modules():
        if name in expect:
            assert type(m) is expect[name], name
            old = before[name]
            assert m.process_group is group
            assert (m.num_features, m.eps, m.momentum, m.track_running_stats) == (
                old.num_features, old.eps, old.momentum, old.track_running_stats)
            assert m.training == old.training
        elif name:
            assert m is before[name], name  # everything else untouched
    assert model[1].affine is False and model[1].weight is None
    assert model[3].training is False
    for n, p in model.named_parameters():  # the same objects: optimizers keep working
        assert p is params[n], n
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert convert_sync(model) is model and type(model[1]) is SyncBatchInstanceNorm
    single = convert_sync(normfuse.InstanceEnhancementBatchNorm2d(5, dtype=torch.float64))
    assert type(single) is SyncInstanceEnhancementBatchNorm
    assert single.weight.dtype == torch.float64 and single.process_group is None
    assert single.running_mean.device.type == "cpu"
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync("not a module")


def test_convert_sync_shared_layer_stays_one_module():
    """A layer registered at several places (twice in one parent, and in a child) becomes one
    synchronized layer at each of them: none is left unsynchronized, none is unshared."""
    bin_ = normfuse.BatchInstanceNorm2d(3)
    model = nn.Sequential(bin_, nn.Conv2d(3, 3, 1), bin_, nn.Sequential(bin_))
    convert_sync(model)
    assert type(model[0]) is SyncBatchInstanceNorm
    assert model[2] is model[0] and model[3][0] is model[0]


def test_convert_sync_regroups_synchronized_layers():
    """Layers that already synchronize get the new process_group, as
    nn.SyncBatchNorm.convert_sync_batchnorm gives its own (the docs' flow: SyncBatchNorm,
    convert, then convert_sync(model, process_group=g))."""
    g1, g2 = object(), object()
    model = nn.Sequential(SyncBatchInstanceNorm(3, process_group=g1),
                          SyncInstanceEnhancementBatchNorm(3))
    layers = list(model)
    assert convert_sync(model, process_group=g2) is model
    assert [m.process_group for m in model] == [g2, g2]
    assert list(model) == layers  # the same modules, regrouped


def test_convert_sync_leaves_subclasses_with_a_warning():
    """A user subclass of a plain layer may compute something else: left as it is and named,
    as normfuse.convert does (it was replaced by the bare synchronized layer)."""
    class Scaled(normfuse.BatchInstanceNorm2d):
        def forward(self, input):
            return 2 * super().forward(input)

    model = nn.Sequential(Scaled(3), nn.Sequential(normfuse.IEBN2d(3)))
    with pytest.warns(UserWarning, match=r"left 1 normalization layer.*0 \(Scaled\)"):
        convert_sync(model)
    assert type(model[0]) is Scaled
    assert type(model[1][0]) is SyncInstanceEnhancementBatchNorm
    with pytest.warns(UserWarning, match="the module itself"):
        single = Scaled(3)
        assert convert_sync(single) is single


@pytest.mark.parametrize("how", ["jit.trace", "export"])
def test_trace_and_export_refused_while_synchronizing(how, monkeypatch):
    """A trace records ops, not the collectives' meaning: it would hold local batch
    statistics. Refused before any collective (here a faked group: no exchange may start)."""
    m = SyncBatchInstanceNorm(3).to(torch.float64)
    monkeypatch.setattr(SyncBatchInstanceNorm, "_sync_group", lambda self: object())
    monkeypatch.setattr(SyncBatchInstanceNorm, "_handshake",
                        lambda *a: pytest.fail("a collective started"))
    x = sync_workers.data((2, 3, 4), 1)
    before = {n: b.clone() for n, b in m.named_buffers()}
    with pytest.raises(RuntimeError, match="synchronizes"):
        if how == "jit.trace":
            torch.jit.trace(m, (x,), check_trace=False)
        else:
            torch.export.export(m, (x,))
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("to,sync_cls", [("bin", SyncBatchInstanceNorm),
                                         ("iebn", SyncInstanceEnhancementBatchNorm)])
def test_convert_syncbatchnorm(to, sync_cls):
    """A model that already uses nn.SyncBatchNorm (convert_sync_batchnorm) is converted, to the
    synchronized layer over the same process group, with its state, instead of left as it is."""
    group = object()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, momentum=0.3,
                                                               process_group=group))
    sync_workers.randomize(model, 5)
    state = copy.deepcopy(model.state_dict())
    normfuse.convert(model, to)
    assert type(model[1]) is sync_cls and model[1].process_group is group
    assert model[1].momentum == 0.3
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_constructor_matches_plain():
    plain = normfuse.BatchInstanceNorm2d(6, eps=1e-3, momentum=0.3, affine=False,
                                         dtype=torch.float64)
    sync = SyncBatchInstanceNorm(6, 1e-3, 0.3, False, True, None, None, torch.float64)
    assert dict(plain.named_parameters()).keys() == dict(sync.named_parameters()).keys()
    assert plain.state_dict().keys() == sync.state_dict().keys()
    assert isinstance(sync, type(plain).__mro__[1])  # a subclass of the shared base
    sync.load_state_dict(plain.state_dict())
    iebn = SyncInstanceEnhancementBatchNorm(6, track_running_stats=False)
    assert iebn.running_mean is None and iebn.gate_bias.shape == (6,)
