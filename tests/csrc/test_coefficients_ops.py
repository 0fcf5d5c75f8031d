"""The compiled coefficient ops (torch.ops.normfuse.{bin,iebn,assoc}_coefficients[_backward]) against
the float64 reference (normfuse/coefficients/): CPU kernels with float64 and float32 statistics,
training and eval, with and without running statistics and affine parameters; in-place running
statistics and num_batches_tracked; results independent of the thread count; torch.library.opcheck
(schema incl. the declared mutation of the running statistics and of the counter, fake impls, aot
dispatch); argument errors. The CUDA kernels get
the same comparisons when a GPU is visible (skipped otherwise).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from test_coefficients_cases import (OUTPUTS, assert_close, expected, make_inputs, op_args, op_name,
                                     opcheck_cases)

try:
    import normfuse
    from normfuse import _extension, torch_backend
except Exception as exc:  # pragma: no cover
    pytest.skip(f"normfuse does not import: {exc}", allow_module_level=True)

if not _extension.HAS_CPU_KERNELS:
    pytest.skip(_extension.REASON, allow_module_level=True)
if not torch._C._dispatch_has_kernel_for_dispatch_key("normfuse::bin_coefficients", "CPU"):
    pytest.skip("normfuse._C predates the coefficient kernels: rebuild it (csrc/README.md)",
                allow_module_level=True)
OPS = torch.ops.normfuse
HAS_GPU = _extension.HAS_CUDA_KERNELS and torch.cuda.is_available()

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}  # CPU: double arithmetic, one final rounding
GPU_TOL = 2e-5                                      # CUDA: float32 arithmetic

BATCH_SHAPES = [(4, 5, 7), (1, 3, 9), (6, 1, 1), (3, 37, 2)]  # N, C, L
MODES = [(True, True, True), (True, False, True), (False, True, True), (False, False, False),
         (True, True, False), (False, True, False)]  # training, running, affine
ASSOC_SHAPES = [(1, 6, 5, 1, 1), (3, 8, 3, 8, 2), (5, 40, 7, 4, 3), (4, 70, 1, 2, 5), (2, 12, 9, 3, 1),
                (3, 5, 1, 5, 2)]  # N, C, L, G, M; the last: one-element groups


def _call(op, t, L, G, training, running, affine, device="cpu", dtype=torch.float64):
    """Run the compiled op on copies of `t` in `dtype` on `device`; returns (outputs by name,
    the running statistics after the call or None)."""
    tt = {k: v.to(device=device, dtype=dtype).clone() for k, v in t.items()}
    out = getattr(OPS, op_name(op))(*op_args(op, tt, L, G, training, running, affine))
    res = dict(zip(OUTPUTS[op], out))
    if not op.endswith("backward") and op != "assoc" and running:
        res["running_mean"], res["running_var"] = tt["running_mean"], tt["running_var"]
    return res


def _compare(res, want, tol, what):
    assert set(res) == set(want), what
    for name, ref in want.items():
        assert res[name].dtype == res["c_dy" if "c_dy" in res else "scale"].dtype
        assert_close(res[name], ref, tol, f"{what} {name}")


def _batch_params():
    for layer in ("bin", "iebn"):
        for shape in BATCH_SHAPES:
            for mode in MODES:
                if shape[0] == 1 and mode[0]:
                    continue  # N = 1 in training: a variance over one plane (fine, but nn.BN refuses)
                yield layer, shape, mode


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layer,shape,mode", list(_batch_params()))
def test_batch_layers_cpu(layer, shape, mode, dtype):
    N, C, L = shape
    training, running, affine = mode
    for op in (layer, layer + "_backward"):
        t = make_inputs(op, N, C, L, seed=zlib.crc32(f"{op}{shape}".encode()) & 0xFFFF, dtype=dtype, zero_m2=(L == 1))
        res = _call(op, t, L, 1, training, running, affine, dtype=dtype)
        want = expected(op, t, L, 1, training, running, affine)
        _compare(res, want, TOL[dtype], f"{op} {shape} {mode} {dtype}")
        for v in res.values():
            assert v.is_contiguous() and v.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", ASSOC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_assoc_cpu(shape, dtype):
    N, C, L, G, M = shape
    for op in ("assoc", "assoc_backward"):
        t = make_inputs(op, N, C, L, G, M, seed=sum(shape), dtype=dtype)
        res = _call(op, t, L, G, False, False, True, dtype=dtype)
        _compare(res, expected(op, t, L, G), TOL[dtype], f"{op} {shape} {dtype}")


def test_running_stats_in_place_and_large_offset():
    """Training updates the given buffers themselves (no copy); eval leaves them alone; an input
    offset of 1e4 costs float32 nothing (means are merged relative to the first plane's)."""
    t = make_inputs("bin", 5, 4, 6, seed=3, offset=1e4, dtype=torch.float32)
    rm, rv = t["running_mean"].float().clone(), t["running_var"].float().clone()
    rm0, rv0 = rm.clone(), rv.clone()
    f = {k: v.float() for k, v in t.items()}
    OPS.bin_coefficients(f["mean"], f["m2"], 6, f["gate"], f["weight"], f["bias"], rm, rv, True, 0.1, 1e-5)
    want = expected("bin", t, 6)
    assert_close(rm, want["running_mean"], 1e-7, "running_mean")
    assert_close(rv, want["running_var"], 1e-6, "running_var")
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    rm1, rv1 = rm.clone(), rv.clone()
    scale, shift = OPS.bin_coefficients(f["mean"], f["m2"], 6, f["gate"], f["weight"], f["bias"], rm, rv,
                                        False, 0.1, 1e-5)
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1)
    evaluated = dict(t, running_mean=rm.double(), running_var=rv.double())
    want = expected("bin", evaluated, 6, training=False)
    assert_close(scale, want["scale"], 1e-6, "scale at offset 1e4")
    assert_close(shift, want["shift"], 1e-6, "shift at offset 1e4")


def test_backward_ignores_running_stats_in_training():
    t = make_inputs("iebn_backward", 3, 5, 4, seed=5)
    a = _call("iebn_backward", t, 4, 1, True, True, True)
    b = _call("iebn_backward", t, 4, 1, True, False, True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("op,shape", [("bin_backward", (64, 600, 3, 1, 1)), ("iebn", (64, 600, 3, 1, 1)),
                                      ("assoc_backward", (700, 8, 3, 4, 3)), ("assoc", (700, 8, 3, 4, 3))])
def test_independent_of_thread_count(op, shape):
    """Big enough that at::parallel_for splits the work; 1 and 2 threads agree bit for bit."""
    N, C, L, G, M = shape
    t = make_inputs(op, N, C, L, G, M, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _call(op, t, L, G, True, True, True)
        torch.set_num_threads(2)
        two = _call(op, t, L, G, True, True, True)
    finally:
        torch.set_num_threads(threads)
    for k in one:
        assert torch.equal(one[k], two[k]), k


@pytest.mark.parametrize("op,shape,mode", list(opcheck_cases()))
def test_opcheck(op, shape, mode):
    N, C, L, G, M = shape
    t = make_inputs(op, N, C, L, G, M, seed=11, dtype=torch.float32)
    tt = {k: v.float() for k, v in t.items()}
    args = op_args(op, tt, L, G, *mode)
    torch.library.opcheck(getattr(OPS, op_name(op)).default, tuple(args))


def _counter_opcheck_cases():
    for op in ("bin", "iebn"):
        for training, running in [(True, True), (True, False), (False, True)]:
            yield op, training, running


@pytest.mark.parametrize("op,training,running", list(_counter_opcheck_cases()))
def test_opcheck_with_counter(op, training, running):
    """The forwards with num_batches_tracked given (schema: mutated, Tensor(c!)?)."""
    t = make_inputs(op, 3, 4, 5, seed=11, dtype=torch.float32)
    args = op_args(op, {k: v.float() for k, v in t.items()}, 5, 1, training, running, True)
    torch.library.opcheck(getattr(OPS, op_name(op)).default, (*args, torch.tensor(7)))


def _check_counter(op, device):
    """num_batches_tracked: +1 per training call (running statistics or not), untouched in eval;
    the results are those of the call without it; an empty batch still counts; a bad counter
    raises before anything is written."""
    t = make_inputs(op, 4, 5, 3, seed=21, dtype=torch.float32)
    f = {k: v.to(device=device, dtype=torch.float32) for k, v in t.items()}
    fn = getattr(OPS, op_name(op))
    for training, running in [(True, True), (True, False), (False, True), (False, False)]:
        plain = {k: v.clone() for k, v in f.items()}
        counted = {k: v.clone() for k, v in f.items()}
        nbt = torch.tensor(3, device=device)
        want = fn(*op_args(op, plain, 3, 1, training, running, True))
        got = fn(*op_args(op, counted, 3, 1, training, running, True), num_batches_tracked=nbt)
        assert int(nbt) == 3 + training, (op, training, running)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(plain["running_mean"], counted["running_mean"])
        assert torch.equal(plain["running_var"], counted["running_var"])
        # positional, a 1-element 1-d counter
        nbt1 = torch.zeros(1, dtype=torch.int64, device=device)
        fn(*op_args(op, {k: v.clone() for k, v in f.items()}, 3, 1, training, running, True), nbt1)
        assert int(nbt1) == int(training)
    empty = {k: (v[:0] if v.dim() == 2 else v) for k, v in f.items()}
    nbt = torch.tensor(0, device=device)
    fn(*op_args(op, empty, 3, 1, True, False, True), nbt)
    assert int(nbt) == 1, "an empty batch counts too"
    bad = [torch.tensor(1.0, device=device), torch.zeros(2, dtype=torch.int64, device=device),
           torch.zeros(1, 1, dtype=torch.int64, device=device), torch.tensor(1, dtype=torch.int32, device=device)]
    if device != "cpu":
        bad.append(torch.tensor(1))
    for counter in bad:
        before = counter.clone()
        rm, rv = f["running_mean"].clone(), f["running_var"].clone()
        with pytest.raises(RuntimeError, match="num_batches_tracked must be a 0-dim"):
            fn(*op_args(op, dict(f, running_mean=rm, running_var=rv), 3, 1, True, True, True), counter)
        assert torch.equal(counter, before)
        assert torch.equal(rm, f["running_mean"]) and torch.equal(rv, f["running_var"])


@pytest.mark.parametrize("op", ["bin", "iebn"])
def test_batch_counter_cpu(op):
    _check_counter(op, "cpu")


def test_argument_errors():
    t = {k: v.float() for k, v in make_inputs("assoc", 2, 6, 3, 3, 2).items()}
    with pytest.raises(RuntimeError, match="num_groups"):
        OPS.assoc_coefficients(t["mean"], t["m2"], 3, 4, t["encoder"], t["decoder_mean"], t["decoder_var"],
                               t["weight"], t["bias"], 1e-5)
    b = {k: v.float() for k, v in make_inputs("bin", 2, 6, 3).items()}
    with pytest.raises(RuntimeError, match="running_mean and running_var"):
        OPS.bin_coefficients(b["mean"], b["m2"], 3, b["gate"], None, None, b["running_mean"], None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        OPS.bin_coefficients(b["mean"].half(), b["m2"].half(), 3, b["gate"], None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="gate must have shape"):
        OPS.bin_coefficients(b["mean"], b["m2"], 3, b["gate"][:5], None, None, None, None, True, 0.1, 1e-5)


def test_running_statistics_must_not_share_memory():
    """Found by fuzzing: in training the running statistics are written while the other
    arguments are read, so running_mean is running_var (or a view of mean, or the gate) gave
    silently wrong statistics or coefficients. Refused before anything is written; eval mode
    only reads them, and there sharing is fine."""
    b = {k: v.float() for k, v in make_inputs("bin", 2, 6, 3).items()}
    rv = b["running_var"].clone()
    cases = [("running_mean must not share memory with running_var", dict(running_mean=rv, running_var=rv)),
             ("running_mean must not share memory with gate", dict(running_mean=b["gate"])),
             ("running_var must not share memory with mean", dict(running_var=b["mean"][1])),
             ("running_mean must not share memory with bias", dict(running_mean=b["bias"]))]
    for match, bad in cases:
        a = {**b, "running_mean": b["running_mean"].clone(), "running_var": rv.clone(), **bad}
        before = [a[k].clone() for k in ("running_mean", "running_var", "gate", "mean")]
        nbt = torch.tensor(5)
        with pytest.raises(RuntimeError, match=f"normfuse.bin_coefficients: {match}"):
            OPS.bin_coefficients(a["mean"], a["m2"], 3, a["gate"], a["weight"], a["bias"], a["running_mean"],
                                 a["running_var"], True, 0.1, 1e-5, nbt)
        assert int(nbt) == 5
        assert all(torch.equal(x, a[k]) for x, k in zip(before, ("running_mean", "running_var", "gate", "mean")))
    with pytest.raises(RuntimeError, match="normfuse.iebn_coefficients: running_mean must not share memory with "
                                           "gate_bias"):
        OPS.iebn_coefficients(b["mean"], b["m2"], 3, b["gate"], b["bias"], None, None, b["bias"], rv, True, 0.1,
                              1e-5)
    OPS.bin_coefficients(b["mean"], b["m2"], 3, b["gate"], None, None, rv, rv, False, 0.1, 1e-5)  # eval: read only


def test_layer_ops_refuse_running_statistics_sharing_the_input():
    """Found by fuzzing: the step, direction and whole-layer ops read the input, update the
    running statistics in place, and (directions) read the input again for the apply, so a
    running statistic that is a view of the input gave a wrong output and changed the input.
    Refused before anything is written (the functional API refused it already); eval mode only
    reads them."""
    gate = torch.rand(3)
    for name in ("bin_moments_coefficients", "bin_layer_forward", "bin_layer",
                 "iebn_moments_coefficients", "iebn_layer_forward", "iebn_layer"):
        iebn = name.startswith("iebn")
        for which in ("running_mean", "running_var"):
            buf = torch.randn(6, 3)
            buf[5] = 1.0
            x = buf[:4]  # (N, C) = (4, 3), L = 1
            stats = {"running_mean": buf[4], "running_var": buf[5]}
            stats[which] = buf[1]
            before = buf.clone()
            nbt = torch.tensor(2)
            args = ((x, gate, torch.zeros(3)) if iebn else (x, gate)) + (
                None, None, stats["running_mean"], stats["running_var"], True, 0.1, 1e-5, nbt)
            if not name.endswith("coefficients"):
                args += (False,)
            op = "iebn_coefficients" if iebn else "bin_coefficients"
            with pytest.raises(RuntimeError, match=f"normfuse.{op}: {which} must not share memory with input"):
                getattr(OPS, name)(*args)
            assert torch.equal(buf, before) and int(nbt) == 2, name
    x = torch.randn(4, 3)
    OPS.bin_layer_forward(x, gate, None, None, x[0], x[1].abs(), False, 0.1, 1e-5, None, False)  # eval: read only


@pytest.mark.parametrize("namespace", ["normfuse", "torch", "normfuse_triton"])
def test_num_batches_tracked_must_not_share_memory_with_running_statistics(namespace):
    """Found by fuzzing: a counter that is a view of a running statistic was incremented in it.
    Every backend's op refuses it with the C++ message (the torch backend's function and the
    Triton op, in the interpreter here, accepted it)."""
    if namespace == "normfuse_triton":
        if "triton" not in normfuse.available_backends():
            pytest.skip("no triton backend here")
        op = torch.ops.normfuse_triton.bin_coefficients
    else:
        op = torch_backend.bin_coefficients if namespace == "torch" else OPS.bin_coefficients
    b = {k: v.float() for k, v in make_inputs("bin", 2, 6, 3).items()}
    rm = torch.zeros(6, dtype=torch.float64)
    nbt = rm.view(torch.int64)[0]
    st = {k: b[k].double() for k in ("mean", "m2", "gate")}
    who = "normfuse_triton" if namespace == "normfuse_triton" else "normfuse"
    with pytest.raises(RuntimeError, match=f"{who}.bin_coefficients: num_batches_tracked must not share memory "
                                           "with running_mean"):
        op(st["mean"], st["m2"], 3, st["gate"], None, None, rm, torch.ones(6, dtype=torch.float64), True, 0.0, 1e-5,
           nbt)
    assert torch.all(rm == 0)
    op(st["mean"], st["m2"], 3, st["gate"], None, None, rm, torch.ones(6, dtype=torch.float64), False, 0.0, 1e-5,
       nbt)  # eval: the counter is left alone


def test_empty_batch_gives_zero_parameter_gradients():
    t = {k: v.float() for k, v in make_inputs("bin_backward", 3, 4, 2).items()}
    e = {k: (v[:0] if v.dim() == 2 else v) for k, v in t.items()}
    out = OPS.bin_coefficients_backward(e["sum_dy"], e["sum_dy_xmu"], e["mean"], e["m2"], 2, e["gate"], None, None,
                                        None, None, True, 1e-5)
    assert out[0].shape == (0, 4) and all(torch.equal(g, torch.zeros(4)) for g in out[3:])


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and normfuse._C built with CUDA")


@gpu
@pytest.mark.parametrize("layer,shape,mode", list(_batch_params()))
def test_batch_layers_cuda(layer, shape, mode):
    N, C, L = shape
    for op in (layer, layer + "_backward"):
        t = make_inputs(op, N, C, L, seed=7, dtype=torch.float32)
        res = _call(op, t, L, 1, *mode, device="cuda", dtype=torch.float32)
        _compare(res, expected(op, t, L, 1, *mode), GPU_TOL, f"cuda {op} {shape} {mode}")


@gpu
@pytest.mark.parametrize("shape", ASSOC_SHAPES + [(300, 64, 9, 8, 4), (3, 2048, 4, 2048, 8), (257, 96, 2, 1, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_assoc_cuda(shape):
    """Includes a deep reduction tree (N = 300, 257) and G = C = 2048 (> 48 KiB shared memory)."""
    N, C, L, G, M = shape
    for op in ("assoc", "assoc_backward"):
        t = make_inputs(op, N, C, L, G, M, seed=13, dtype=torch.float32)
        res = _call(op, t, L, G, False, False, True, device="cuda", dtype=torch.float32)
        _compare(res, expected(op, t, L, G), GPU_TOL, f"cuda {op} {shape}")
        again = _call(op, t, L, G, False, False, True, device="cuda", dtype=torch.float32)
        for k in res:
            assert torch.equal(res[k], again[k]), f"{op} {k} not reproducible"


@gpu
@pytest.mark.parametrize("op", ["assoc", "assoc_backward"])
def test_assoc_cuda_too_large_for_shared_memory(op):
    """G = C = 16384 needs 320 KiB of shared memory per block (5 G floats forward, 9 G
    backward), more than any GPU has (227 KiB on sm_90): a clear error naming the sizes, not
    'invalid argument' from the launch."""
    N, C, L, G, M = 2, 16384, 1, 16384, 1
    t = make_inputs(op, N, C, L, G, M, seed=3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="num_groups = 16384 and embed_dim = 1 need .* shared memory"):
        _call(op, t, L, G, False, False, True, device="cuda", dtype=torch.float32)


@gpu
def test_large_batch_cuda_reproducible():
    t = make_inputs("bin_backward", 512, 300, 49, seed=17, dtype=torch.float32, offset=100.0)
    res = _call("bin_backward", t, 49, 1, True, True, True, device="cuda", dtype=torch.float32)
    again = _call("bin_backward", t, 49, 1, True, True, True, device="cuda", dtype=torch.float32)
    _compare(res, expected("bin_backward", t, 49), 1e-4, "cuda bin_backward N=512")
    for k in res:
        assert torch.equal(res[k], again[k]), k


@gpu
@pytest.mark.parametrize("op,shape,mode", list(opcheck_cases()))
def test_opcheck_cuda(op, shape, mode):
    N, C, L, G, M = shape
    t = make_inputs(op, N, C, L, G, M, seed=11, dtype=torch.float32)
    args = op_args(op, {k: v.float().cuda() for k, v in t.items()}, L, G, *mode)
    torch.library.opcheck(getattr(OPS, op_name(op)).default, tuple(args))


@gpu
@pytest.mark.parametrize("op", ["bin", "iebn"])
def test_batch_counter_cuda(op):
    _check_counter(op, "cuda")


@gpu
@pytest.mark.parametrize("op,training,running", list(_counter_opcheck_cases()))
def test_opcheck_with_counter_cuda(op, training, running):
    t = make_inputs(op, 3, 4, 5, seed=11, dtype=torch.float32)
    args = op_args(op, {k: v.float().cuda() for k, v in t.items()}, 5, 1, training, running, True)
    torch.library.opcheck(getattr(OPS, op_name(op)).default, (*args, torch.tensor(7, device="cuda")))
