"""What the spawned processes of test_sync.py run: gloo process groups on the CPU, float64.

``run_world(world_size, backends, outdir)`` spawns the processes; each initializes a gloo group
(file store), runs every check of ``build_checks`` under each backend, in the same order on every
rank (they are collective), and writes ``{"check[backend]": "ok" | traceback}`` to
``outdir/rank<r>.json``.  The plain module that results are compared with always runs on the
"torch" backend; the synchronized one runs its full-size passes on the backend under test.
After each check the ranks agree (one all-reduce) whether every rank passed; on the first failure
they stop, so that a failed check cannot leave the others waiting in mismatched collectives.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normfuse
from normfuse.distributed import (SyncBatchInstanceNorm, SyncInstanceEnhancementBatchNorm,
                                  convert_sync)
from normfuse.modules import (BatchInstanceNorm1d, BatchInstanceNorm2d, BatchInstanceNorm3d,
                              InstanceEnhancementBatchNorm1d, InstanceEnhancementBatchNorm2d,
                              InstanceEnhancementBatchNorm3d)

F64 = torch.float64
PLAIN = {
    "bin": {2: BatchInstanceNorm1d, 3: BatchInstanceNorm1d, 4: BatchInstanceNorm2d,
            5: BatchInstanceNorm3d},
    "iebn": {2: InstanceEnhancementBatchNorm1d, 3: InstanceEnhancementBatchNorm1d,
             4: InstanceEnhancementBatchNorm2d, 5: InstanceEnhancementBatchNorm3d},
}
SYNC = {"bin": SyncBatchInstanceNorm, "iebn": SyncInstanceEnhancementBatchNorm}


# ------------------------------------------------------------------------------- helpers
def gen(seed):
    return torch.Generator().manual_seed(seed)


def data(shape, seed, dtype=F64):
    """Per-channel and per-sample offsets, so that batch and instance statistics differ."""
    x = torch.randn(shape, generator=gen(seed), dtype=F64) * 1.3 + 0.4
    if x.dim() >= 2 and shape[0]:
        x = x + (torch.randn(shape[1], generator=gen(seed + 1), dtype=F64) * 0.8).reshape(
            1, -1, *[1] * (x.dim() - 2))
        x = x + (torch.randn(shape[0], generator=gen(seed + 2), dtype=F64) * 0.5).reshape(
            -1, *[1] * (x.dim() - 1))
    return x.to(dtype)


def layout(t, name):
    if name == "cl":
        if t.dim() == 3:
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


def randomize(module, seed):
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(module.named_parameters())):
            r = torch.randn(p.shape, generator=gen(seed + i), dtype=F64)
            base = name.rsplit(".", 1)[-1]
            if base == "gate":
                v = torch.rand(p.shape, generator=gen(seed + i), dtype=F64)
            elif base == "weight":
                v = 1 + 0.4 * r
            else:
                v = 0.6 * r
            p.copy_(v.to(p.dtype))
        for i, (name, b) in enumerate(sorted(module.named_buffers())):
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen(seed + 50 + i), dtype=F64))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen(seed + 50 + i), dtype=F64))
    return module


def close(actual, expected, what, tol=1e-12):
    """|actual - expected| <= tol * (max(1, max|expected|) + |expected|), elementwise.

    (Not torch.testing.assert_close: its first call imports sympy, seconds in every process.)
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    if not e.numel():
        return
    bound = tol * (max(1.0, float(e.abs().max())) + e.abs())
    err = (a - e).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {e.numel()} elements differ; max "
                           f"error {float(err.max()):.3g} (tolerance {tol:g}, relative)")


def all_sum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def assert_same_on_all_ranks(t, what, group=None):
    """Bit-identical on every rank of ``group``."""
    size = dist.get_world_size(group)
    rows = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(rows, t.detach().contiguous(), group=group)
    for r, row in enumerate(rows):
        assert torch.equal(row, rows[0]), f"{what}: rank {r} differs from rank 0 " \
                                          f"(max diff {(row - rows[0]).abs().max()})"


def reference():
    """The plain module that results are compared with runs on the "torch" backend."""
    return normfuse.use_backend("torch")


def offsets(split):
    return [sum(split[:r]) for r in range(len(split))]


def raises(exc_type, match, fn):
    try:
        fn()
    except exc_type as exc:
        assert match in str(exc), f"expected {match!r} in the message, got: {exc}"
        return exc
    raise AssertionError(f"expected {exc_type.__name__} ({match!r}), nothing was raised")


# -------------------------------------------------------- sync module == plain on the full batch
def check_against_concat(rank, world, layer, shape, splits, lay="contiguous", dtype=F64,
                         steps=2, convert=True, **kw):
    """``splits``: per step, the per-rank batch sizes; ``shape``: (C, *S)."""
    tol = 1e-12 if dtype == F64 else 2e-5
    rank_of_input = len(shape) + 1
    plain_cls = PLAIN[layer][3 if rank_of_input > 5 else rank_of_input]  # rank 6: as (N, C, L)
    ref = randomize(plain_cls(shape[0], **kw), 11).to(dtype).train()
    if convert:
        sync = convert_sync(copy.deepcopy(ref))
        assert type(sync) is SYNC[layer]
    else:
        sync = SYNC[layer](shape[0], **kw).to(dtype).train()
        sync.load_state_dict(ref.state_dict())
    for step, split in enumerate(splits):
        assert len(split) == world
        total = sum(split)
        full = layout(data((total,) + tuple(shape), 100 + step, dtype), lay)
        weight = data((total,) + tuple(shape), 200 + step, dtype)
        lo, n = offsets(split)[rank], split[rank]
        x = full[lo:lo + n].detach().clone()
        x = layout(x, lay).requires_grad_()
        y = sync(x)
        (y * weight[lo:lo + n]).sum().backward()
        xr = full.detach().clone().requires_grad_()
        xin = xr if rank_of_input <= 5 else xr.reshape(total, shape[0], -1)
        with reference():
            yr = ref(xin).reshape(xr.shape)
        (yr * weight).sum().backward()
        what = f"{layer}{tuple(shape)} step {step} rank {rank}"
        close(y, yr[lo:lo + n], f"{what} output", tol)
        close(x.grad, xr.grad[lo:lo + n], f"{what} input grad", tol)
        if lay == "cl" and n > 1:
            assert y.stride() == x.stride(), f"{what}: output layout {y.stride()}"
    for (name, p), (_, pr) in zip(sync.named_parameters(), ref.named_parameters()):
        close(all_sum(p.grad), pr.grad, f"{layer} summed grad of {name}", tol)
    for (name, b), (_, br) in zip(sync.named_buffers(), ref.named_buffers()):
        if b.dtype.is_floating_point:
            close(b, br, f"{layer} buffer {name}", tol)
        else:
            assert torch.equal(b, br), f"{name}: {b} != {br}"
        assert_same_on_all_ranks(b, f"buffer {name}")


def concat_configs(world):
    if world == 2:
        return [
            ("bin", (3, 4, 5), [(3, 5), (4, 0)], "contiguous", F64, {}),
            ("bin", (3, 4, 5), [(2, 3), (0, 3)], "cl", F64,
             {"affine": False, "momentum": None}),
            ("bin", (5,), [(2, 3), (3, 1)], "contiguous", F64, {}),
            ("bin", (4, 7), [(1, 4), (2, 2)], "cl", F64, {"track_running_stats": False}),
            ("bin", (2, 3, 2, 3), [(2, 1)], "cl", F64, {}),
            ("bin", (2, 2, 3, 1, 2), [(2, 2)], "contiguous", F64, {}),  # rank 6
            ("iebn", (3, 4, 5), [(3, 5), (0, 2)], "contiguous", F64, {}),
            ("iebn", (4,), [(3, 2)], "contiguous", F64, {"momentum": None}),
            ("iebn", (2, 3, 2, 3), [(0, 3), (2, 1)], "cl", F64, {}),
            ("iebn", (3, 6), [(2, 2)], "contiguous", F64, {"track_running_stats": False}),
            ("bin", (3, 4, 5), [(3, 5)], "contiguous", torch.float32, {}),
            ("iebn", (3, 4, 5), [(2, 1)], "cl", torch.float32, {}),
            # the fused ReLU through the synchronized pipeline, a rank without samples included
            ("bin", (3, 4, 5), [(3, 2), (4, 0)], "contiguous", F64, {"activation": "relu"}),
            ("iebn", (2, 3, 2, 3), [(0, 3), (2, 2)], "cl", F64, {"activation": "relu"}),
        ]
    return [
        ("bin", (3, 4, 5), [(2, 0, 3), (1, 4, 2)], "contiguous", F64, {}),
        ("bin", (4, 6), [(0, 0, 3)], "cl", F64, {"momentum": None}),
        ("iebn", (3, 4, 5), [(1, 4, 2), (3, 0, 1)], "cl", F64, {}),
        ("iebn", (2, 2, 3, 2), [(1, 1, 1)], "contiguous", F64, {}),
    ]


# -------------------------------------------------------------------- different plane sizes
def formula(layer, xs, params, eps=1e-5):
    """Reference for inputs of different spatial sizes: the papers' formulas with the batch
    statistics over every value of every input (float64 autograd graph)."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], x.numel() // x.shape[1])
                      for x in xs], 1)
    mu_b = flat.mean(1)
    var_b = flat.var(1, unbiased=False)
    ys = []
    for x in xs:
        if x.numel() == 0:  # no values: an empty output, nothing to any gradient (the formulas'
            ys.append(x * 0)  # per-sample means of no values would put 0 * NaN into them)
            continue
        x3 = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        xb = (x3 - mu_b[:, None]) / torch.sqrt(var_b[:, None] + eps)
        if layer == "bin":
            xi = (x3 - x3.mean(2, keepdim=True)) / torch.sqrt(
                x3.var(2, unbiased=False, keepdim=True) + eps)
            g = params["gate"][:, None]
            y = (g * xb + (1 - g) * xi) * params["weight"][:, None] + params["bias"][:, None]
        else:
            delta = torch.sigmoid(x3.mean(2, keepdim=True) * params["gate_weight"][:, None]
                                  + params["gate_bias"][:, None])
            y = xb * params["weight"][:, None] * delta + params["bias"][:, None]
        ys.append(y.reshape(x.shape))
    return ys, mu_b, flat.var(1, unbiased=True)


def check_plane_sizes(rank, world, layer, empty_planes=False):
    """Ranks with different spatial sizes (as detection models feed SyncBatchNorm); with
    ``empty_planes``, the last rank's samples have no values (a spatial size 0)."""
    sizes = [(2, (3, 4)), (3, (2, 5)), (1, (7, 1))][:world]
    if world == 3:
        sizes[1] = (0, (2, 5))
    if empty_planes:
        sizes[-1] = (2, (0, 3))
    c = 3
    xs = [data((n, c) + s, 300 + r) for r, (n, s) in enumerate(sizes)]
    ws = [data((n, c) + s, 400 + r) for r, (n, s) in enumerate(sizes)]
    module = randomize(SYNC[layer](c, momentum=0.3), 12).to(F64).train()
    rm0, rv0 = module.running_mean.clone(), module.running_var.clone()
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    leaves = [x.clone().requires_grad_() for x in xs]
    ys, mu_b, var_unbiased = formula(layer, leaves, params)
    sum((y * w).sum() for y, w in zip(ys, ws)).backward()
    x = xs[rank].clone().requires_grad_()
    y = module(x)
    (y * ws[rank]).sum().backward()
    close(y, ys[rank], f"{layer} planes output")
    close(x.grad, leaves[rank].grad, f"{layer} planes input grad")
    for name, p in module.named_parameters():
        close(all_sum(p.grad), params[name].grad, f"{layer} planes grad {name}")
    close(module.running_mean, 0.7 * rm0 + 0.3 * mu_b, "running_mean")
    close(module.running_var, 0.7 * rv0 + 0.3 * var_unbiased, "running_var")


# --------------------------------------------------------------------------------- DDP
def check_ddp(rank, world, splits):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(5)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), normfuse.BatchInstanceNorm2d(4),
                        nn.ReLU(), nn.Conv2d(4, 4, 1), normfuse.InstanceEnhancementBatchNorm2d(4),
                        nn.Conv2d(4, 2, 1)).to(F64)
    randomize(ref[1], 21)
    randomize(ref[4], 22)
    model = DDP(convert_sync(copy.deepcopy(ref)))
    assert isinstance(model.module[1], SyncBatchInstanceNorm)
    assert isinstance(model.module[4], SyncInstanceEnhancementBatchNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step, split in enumerate(splits):
        total, lo, n = sum(split), offsets(split)[rank], split[rank]
        full = data((total, 3, 5, 4), 500 + step)
        weight = data((total, 2, 5, 4), 600 + step)
        x = full[lo:lo + n].clone().requires_grad_()
        y = model(x)
        # DDP averages gradients over the ranks: scale the local loss to get the global sum's.
        (world * (y * weight[lo:lo + n]).sum()).backward()
        xr = full.clone().requires_grad_()
        with reference():
            yr = ref(xr)
        (yr * weight).sum().backward()
        close(y, yr[lo:lo + n], f"ddp step {step} output")
        close(x.grad / world, xr.grad[lo:lo + n], f"ddp step {step} input grad")
        for (name, p), (_, pr) in zip(model.module.named_parameters(), ref.named_parameters()):
            close(p.grad, pr.grad, f"ddp step {step} grad of {name}")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    for (name, p), (_, pr) in zip(model.module.named_parameters(), ref.named_parameters()):
        close(p, pr, f"ddp parameter {name} after training")
    for (name, b), (_, br) in zip(model.module.named_buffers(), ref.named_buffers()):
        close(b.to(F64), br.to(F64), f"ddp buffer {name}")
        assert_same_on_all_ranks(b, f"ddp buffer {name}")


# ------------------------------------------------------------------------------ the rest
def check_eval_is_local(rank, world):
    """Eval mode: running statistics, no communication; equal to the plain module per rank."""
    for layer in ("bin", "iebn"):
        ref = randomize(PLAIN[layer][4](3), 13).to(F64).eval()
        sync = convert_sync(copy.deepcopy(ref))
        x = data((2 + rank, 3, 4, 4), 700 + rank)
        assert torch.equal(sync(x), ref(x))


def check_mixed_input_dtypes(rank, world):
    """Ranks feeding different floating dtypes (float32 on rank 1, float64 elsewhere) to one
    float64 model: both exchanges are float64, so the backward's all_reduce lines up (it
    aborted the process under gloo when each rank reduced in its own dtype)."""
    ref = randomize(BatchInstanceNorm1d(3), 4).to(F64)
    sync = convert_sync(copy.deepcopy(ref))
    splits = [2, 3, 1][:world]
    full, w = data((sum(splits), 3, 4), 1), data((sum(splits), 3, 4), 2)
    lo, n = offsets(splits)[rank], splits[rank]
    dtype = torch.float32 if rank == 1 else F64
    x = full[lo:lo + n].to(dtype).requires_grad_()
    (sync(x) * w[lo:lo + n].to(dtype)).sum().backward()
    xr = full.clone().requires_grad_()
    with reference():
        (ref(xr) * w).sum().backward()
    close(x.grad, xr.grad[lo:lo + n], "mixed-dtype dx", 1e-5)
    for (name, p), (_, pr) in zip(sync.named_parameters(), ref.named_parameters()):
        close(all_sum(p.grad), pr.grad, f"mixed-dtype summed {name} grad", 1e-5)


def check_errors(rank, world):
    # 1. a different number of channels on one rank: every rank raises, nothing hangs
    c = 5 if rank == 1 else 4
    m = SyncBatchInstanceNorm(c).to(F64)
    raises(RuntimeError, "disagree", lambda: m(data((2, c, 3), 1)))
    # 2. a different layer on one rank
    m = (SyncInstanceEnhancementBatchNorm if rank == 1 else SyncBatchInstanceNorm)(4).to(F64)
    raises(RuntimeError, "disagree", lambda: m(data((2, 4, 3), 1)))
    # 3. an input that fails the local checks on rank 1: it raises its own error, the others
    #    learn from the exchange that rank 1 failed; running statistics stay untouched
    m = SyncBatchInstanceNorm(4).to(F64)
    m(data((2, 4, 3), 2)).sum().backward()  # handshake done, group in step
    before = {n: b.clone() for n, b in m.named_buffers()}
    bad = data((2, 3 if rank == 1 else 4, 3), 3)
    if rank == 1:
        raises(ValueError, "expected input with 4 channels", lambda: m(bad))
    else:
        raises(RuntimeError, "failed on rank(s) [1]", lambda: m(bad))
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed by a failed call"
    # 4. one value per channel across all ranks
    x = data((1 if rank == 0 else 0, 4), 4)
    raises(ValueError, "more than 1 value per channel", lambda: m(x))
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed by a failed call"
    # 5. the group still works after all that
    x = data((2, 4, 3), 5).requires_grad_()
    m(x).sum().backward()
    assert_same_on_all_ranks(m.running_var, "running_var after errors")
    # 6. double backward is refused (on every rank, before any collective)
    x = data((2, 4, 3), 6).requires_grad_()
    y = m(x)
    raises(RuntimeError, "double backward",
           lambda: torch.autograd.grad((y * y).sum(), x, create_graph=True))
    # 7. forward mode (a dual input) on rank 1 only: refused there before the statistics are
    #    exchanged, the other ranks told (not left waiting); running statistics untouched
    before = {n: b.clone() for n, b in m.named_buffers()}
    x = data((2, 4, 3), 8)
    if rank == 1:
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            raises(RuntimeError, "or forward-mode AD", lambda: m(dual))
    else:
        raises(RuntimeError, "failed on rank(s) [1]", lambda: m(x))
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed by a refused call"
    # 8. a batch counter of the wrong dtype on rank 1 only: the plain layers' check refuses it
    #    there before the exchange, the other ranks are told (not left waiting)
    x = data((2, 4, 3), 9)
    counter = m.num_batches_tracked
    if rank == 1:
        m.num_batches_tracked = torch.tensor(2.0, dtype=F64)
        raises(ValueError, "num_batches_tracked must be a 0-dim int64", lambda: m(x))
        m.num_batches_tracked = counter
    else:
        raises(RuntimeError, "failed on rank(s) [1]", lambda: m(x))
    # 9. running statistics the update would overwrite something through (a parameter, each
    #    other, the input), on every rank: refused as by the plain layers, nothing written
    weight = m.weight.detach().clone()
    running_mean, running_var = m.running_mean, m.running_var
    for alias, word in ((lambda: m.weight.detach(), "weight"), (lambda: m.running_var, "running_var"),
                        (lambda: x.view(-1)[:4], "input")):
        m.running_mean = alias()
        raises(ValueError, f"must not share memory with {word}", lambda: m(x))
        m.running_mean = running_mean
    m.running_var = torch.zeros(1, dtype=F64).expand(4)
    raises(ValueError, "running_var must not have overlapping elements", lambda: m(x))
    m.running_var = running_var
    assert torch.equal(m.weight.detach(), weight), "the weight changed by a refused call"
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed by a refused call"
    # 10. a process group this rank is not a member of
    other = dist.new_group([0])
    if rank != 0:
        m = SyncBatchInstanceNorm(4, process_group=other).to(F64)
        raises(RuntimeError, "not a member", lambda: m(data((2, 4, 3), 7)))


def check_subgroup(rank, world):
    """A process group of some ranks: statistics over those only; a group of one rank = plain."""
    members = [0, world - 1]
    group = dist.new_group(members)
    solo = dist.new_group([1])
    ref = randomize(BatchInstanceNorm2d(3), 14).to(F64).train()
    split = {0: 2, world - 1: 3}
    full = data((5, 3, 4, 4), 800)
    if rank in members:
        sync = convert_sync(copy.deepcopy(ref), process_group=group)
        lo = 0 if rank == 0 else 2
        x = full[lo:lo + split[rank]]
        with reference():
            expected = ref(full)[lo:lo + split[rank]]
        close(sync(x), expected, "subgroup output")
        assert_same_on_all_ranks(sync.running_mean, "subgroup running_mean", group)
    if rank == 1:
        sync = convert_sync(copy.deepcopy(ref), process_group=solo)
        x = full[:3]
        assert torch.equal(sync(x), ref(x)), "group of one != plain module"
        assert torch.equal(sync.running_var, ref.running_var)


def build_checks(world):
    checks = []
    for i, (layer, shape, splits, lay, dtype, kw) in enumerate(concat_configs(world)):
        name = f"concat_{layer}_{len(shape) + 1}d_{lay}_{str(dtype)[6:]}_{i}"
        checks.append((name, lambda r, w, a=(layer, shape, splits, lay, dtype, kw):
                       check_against_concat(r, w, a[0], a[1], a[2], a[3], a[4],
                                            convert=(a[0] == "bin"), **a[5])))
    checks += [
        ("plane_sizes_bin", lambda r, w: check_plane_sizes(r, w, "bin")),
        ("plane_sizes_iebn", lambda r, w: check_plane_sizes(r, w, "iebn")),
        ("empty_planes_bin", lambda r, w: check_plane_sizes(r, w, "bin", empty_planes=True)),
        ("empty_planes_iebn", lambda r, w: check_plane_sizes(r, w, "iebn", empty_planes=True)),
    ]
    if world == 2:  # building a DDP imports torch._dynamo: seconds per process, so only once
        checks.append(("ddp", lambda r, w: check_ddp(r, w, [(3, 5), (2, 0)])))
    checks += [
        ("eval_is_local", check_eval_is_local),
        ("mixed_input_dtypes", check_mixed_input_dtypes),
        ("errors", check_errors),
        ("subgroup", check_subgroup),
    ]
    return checks


def check_names(world, backends):
    return [f"{name}[{backend}]" for backend in backends for name, _ in build_checks(world)]


# ------------------------------------------------------------------------------ process main
def _worker(rank, world, backends, store_file, outdir, started):
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    times = results["_seconds"] = {"start": round(time.time() - started, 2)}
    try:
        for backend in backends:
            for check, fn in build_checks(world):
                name = f"{check}[{backend}]"
                begin = time.monotonic()
                try:
                    with normfuse.use_backend(backend):
                        fn(rank, world)
                    results[name] = "ok"
                except Exception:  # noqa: BLE001 - reported to the test
                    results[name] = traceback.format_exc()
                times[name] = round(time.monotonic() - begin, 3)
                # Stop everywhere at the first failure: the ranks' collectives may be out of step.
                flag = torch.tensor([0 if results[name] == "ok" else 1])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item():
                    results["_stopped_after"] = name
                    return
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def run_world(world, backends, outdir, timeout=240):
    """Spawn ``world`` processes running every check under each backend of ``backends``;
    returns the per-rank result dicts."""
    store = os.path.join(outdir, "store")
    ctx = mp.start_processes(_worker, args=(world, list(backends), store, outdir, time.time()),
                             nprocs=world, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > timeout:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"the {world} spawned processes did not finish in {timeout} s")
    out = []
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.json")
        with open(path) as f:
            out.append(json.load(f))
    return out

