"""A module call's common path as one C call (normfuse._C.batch_layer_step / assoc_layer_step /
ilm_layer_step, csrc/python_layer_step.cpp; issue 13, host cost).

* It is taken: on the common path (plain tensors, parameters in the accumulation dtype, the
  compiled backend) the C function returns the output, not NotImplemented, so a predicate that
  silently declines everything fails here rather than only in the host-cost bench.
* It changes nothing: outputs, input and parameter gradients, running statistics and
  num_batches_tracked are bitwise those of the Python path (the same op with the same
  arguments), over layers, ranks, layouts, train / eval, tracking, affine, fused ReLU.
* It declines whenever it is not sure, and the Python path then decides (converting, or raising
  the documented error: tests/test_error_contract.py).
"""
from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import normfuse
from normfuse import _autograd, _extension, backends

pytestmark = pytest.mark.skipif(not _extension.HAS_CPU_KERNELS, reason="needs normfuse._C")
C = 6


def _c():
    return _extension._C


def _batch_args(m, x, devices=1):
    return (m._layer_code, x, m._parameters, m._buffers, m.training, m.track_running_stats,
            m.momentum, m.eps, m.num_features, m.activation, m._ranks, devices)


def _assoc_args(m, x, devices=1):
    return (x, m._parameters, m.num_channels, m.num_groups, m.eps, m.activation, devices)


def _ilm_args(m, x, devices=1):
    return (x, m._parameters, m.num_channels, m.num_groups, m.key_group_size, m.eps,
            m.activation, devices)


def _step_call(m, x, devices=1):
    """The module's C step on x: its output, or NotImplemented where it declines."""
    if isinstance(m, normfuse.AssocNorm):
        return _c().assoc_layer_step(*_assoc_args(m, x, devices))
    if isinstance(m, normfuse.ILMNorm):
        return _c().ilm_layer_step(*_ilm_args(m, x, devices))
    return _c().batch_layer_step(*_batch_args(m, x, devices))


def _input(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 0.4
    x = x.float()
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def _perturb(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _run(m, x, dy):
    x = x.detach().requires_grad_(True)
    y = m(x)
    grads = torch.autograd.grad(y, [x] + list(m.parameters()), dy)
    return y.detach(), grads


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    assert torch.equal(a, b), (a - b).abs().max()


CASES = [
    (normfuse.BatchInstanceNorm2d, (3, C, 5, 4), {}),
    (normfuse.BatchInstanceNorm1d, (4, C, 7), {}),
    (normfuse.BatchInstanceNorm1d, (5, C), {}),
    (normfuse.BatchInstanceNorm3d, (2, C, 3, 2, 3), {"affine": False}),
    (normfuse.InstanceEnhancementBatchNorm2d, (3, C, 4, 5), {}),
    (normfuse.InstanceEnhancementBatchNorm1d, (4, C, 9), {"track_running_stats": False}),
    (normfuse.BatchInstanceNorm2d, (3, C, 5, 4), {"momentum": 0}),
    (normfuse.AssocNorm, (3, C, 5, 4), {}),
    (normfuse.AssocNorm, (2, C, 11), {}),
    (normfuse.ILMNorm, (3, C, 5, 4), {}),
    (normfuse.ILMNorm, (2, C, 11), {}),
]
# Constructor arguments besides **kw: AssocNorm 3 groups; ILMNorm 3 groups and 2 key groups of 3.
BUILD = {normfuse.AssocNorm: ((3, C), {}),
         normfuse.ILMNorm: ((C,), {"num_groups": 3, "key_group_size": 3})}


@pytest.mark.parametrize("cls,shape,kw", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [None, "relu"])
def test_bitwise_the_python_path(cls, shape, kw, channels_last, relu, monkeypatch):
    if channels_last and len(shape) < 3:
        pytest.skip("(N, C) has one layout")
    args, extra = BUILD.get(cls, ((C,), {}))
    torch.manual_seed(0)
    fast = cls(*args, **kw, **extra, activation=relu)
    _perturb(fast, 1)
    slow = copy.deepcopy(fast)
    for mode, seed in (("train", 2), ("train", 3), ("eval", 4)):
        x = _input(shape, channels_last, seed)
        dy = _input(shape, channels_last, seed + 100)
        fast.train(mode == "train")
        slow.train(mode == "train")
        # the one-C-call path is taken for this call ...
        with torch.no_grad():
            assert _step_call(copy.deepcopy(fast), x) is not NotImplemented
        with normfuse.use_backend("cpu"):
            y_fast, g_fast = _run(fast, x, dy)
            monkeypatch.setattr(_autograd, "_STEPS", (None, None, None))  # ... and not for this one
            y_slow, g_slow = _run(slow, x, dy)
            monkeypatch.undo()
        _same(y_fast, y_slow)
        for a, b in zip(g_fast, g_slow):
            _same(a, b)
        for (name, a), b in zip(fast.named_buffers(), slow.buffers()):
            _same(a, b)


def _bin(**kw):
    torch.manual_seed(0)
    return normfuse.BatchInstanceNorm2d(C, **kw)


class _Sub(torch.Tensor):
    pass


def _declines(m, x, devices=1):
    return _c().batch_layer_step(*_batch_args(m, x, devices)) is NotImplemented


def test_declines_when_not_sure():
    x = _input((2, C, 3, 3), False, 0)
    m = _bin()
    assert not _declines(m, x)  # the baseline call is taken
    assert _declines(m, x, devices=0)  # backend setting without the compiled CPU ops
    assert _declines(m, x.as_subclass(_Sub))  # subclasses decide in Python
    assert _declines(m, x.transpose(2, 3))  # neither contiguous nor channels-last
    assert _declines(m, x[:, :4])  # wrong channel count
    assert _declines(m, x[:1, :, :1, :1])  # one value per channel in training
    assert not _declines(m, x.half())  # float16 input with float32 parameters: taken ...
    m16 = _bin().half()
    assert _declines(m16, x.half())  # ... float16 parameters are converted by the Python path
    assert _declines(_bin(momentum=None), x)  # cumulative average: read on the host
    bad = _bin()
    bad.activation = "gelu"
    assert _declines(bad, x)
    one = _bin()
    one.running_var = None
    assert _declines(one, x)  # one running statistic of two: the checked path raises
    counter = _bin()
    counter.num_batches_tracked = torch.tensor(0.0)
    assert _declines(counter, x)
    for stat in ("running_mean", "running_var"):  # requires grad: the checked path refuses it
        for training in (True, False):
            graded = _bin().train(training)
            getattr(graded, stat).requires_grad_()
            assert _declines(graded, x), (stat, training)
            with torch.no_grad():
                assert not _declines(graded, x), (stat, training)  # accepted, as nn.BatchNorm
    assert _declines(m, x[0])  # rank 3 for a 2d layer
    frozen = _bin()  # parameters and statistics made under inference_mode (a model loaded there)
    with torch.inference_mode():
        frozen.weight = torch.nn.Parameter(torch.ones(C), requires_grad=False)
        frozen.running_var = torch.ones(C)
    assert _declines(frozen, x)  # training updates the statistics: the checks refuse it
    frozen.eval()
    assert _declines(frozen, x)  # grad mode: autograd may save them, the checks decide
    with torch.no_grad():
        assert not _declines(frozen, x)  # nothing is saved: taken
    shared = _bin()
    shared.weight = torch.nn.Parameter(torch.ones(C + 1))
    assert _declines(shared, x)
    meta = _bin()
    meta.gate = torch.nn.Parameter(torch.ones(C, device="meta"))
    assert _declines(meta, x)

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _declines(m, x)


def test_half_input_float32_parameters_is_taken():
    """Autocast's common case, bf16 / fp16 activations with float32 parameters: no conversion
    needed, so the one-call path runs it."""
    x = _input((2, C, 3, 3), False, 0)
    for dtype in (torch.float16, torch.bfloat16):
        assert _c().batch_layer_step(*_batch_args(_bin(), x.to(dtype))) is not NotImplemented


def test_assoc_declines_when_not_sure():
    x = _input((2, C, 3, 3), False, 0)
    torch.manual_seed(0)
    m = normfuse.AssocNorm(3, C)
    assert _c().assoc_layer_step(*_assoc_args(m, x)) is not NotImplemented
    assert _c().assoc_layer_step(*_assoc_args(m, x, devices=0)) is NotImplemented
    assert _c().assoc_layer_step(*_assoc_args(m, x[:, :3])) is NotImplemented
    odd = normfuse.AssocNorm(3, C)
    odd.num_groups = 4  # C % G != 0: the checked path raises
    assert _c().assoc_layer_step(*_assoc_args(odd, x)) is NotImplemented
    wrong = normfuse.AssocNorm(3, C)
    wrong.decoder_var = torch.nn.Parameter(torch.zeros(2, 3))
    assert _c().assoc_layer_step(*_assoc_args(wrong, x)) is NotImplemented


def _ilm(**kw):
    torch.manual_seed(0)
    return normfuse.ILMNorm(C, **{"num_groups": 3, "key_group_size": 3, **kw})


def test_ilm_declines_when_not_sure():
    x = _input((2, C, 3, 3), False, 0)
    m = _ilm()
    assert _step_call(m, x) is not NotImplemented
    assert _step_call(m, x, devices=0) is NotImplemented
    assert _step_call(m, x[:, :3].contiguous()) is NotImplemented  # wrong channel count
    for name, value in (("num_groups", 4), ("key_group_size", 4), ("key_group_size", 2),
                        ("num_groups", 0)):
        odd = _ilm()
        setattr(odd, name, value)  # C % 4: the checked path raises; 2: the encoder's K is 2, not 3
        assert _step_call(odd, x) is NotImplemented, (name, value)
    # one value per group (C / G = 1 channel, a 1x1 plane) or per key group: the checked path raises
    assert _step_call(_ilm(num_groups=C), x[:, :, :1, :1].contiguous()) is NotImplemented
    assert _step_call(_ilm(num_groups=C), x[:, :, :1, :2].contiguous()) is not NotImplemented
    wrong = _ilm()
    wrong.decoder_bias = torch.nn.Parameter(torch.zeros(2, 3))
    assert _step_call(wrong, x) is NotImplemented
    empty = _ilm()
    empty.encoder = torch.nn.Parameter(torch.zeros(0, 2))
    assert _step_call(empty, x) is NotImplemented
    assert _step_call(_ilm().double(), x) is NotImplemented  # float64 parameters, float32 input


def test_ilm_cuda_waits_for_its_kernels(monkeypatch):
    """Until the ILM GPU kernels are trusted (_autograd._ILM_KERNELS), the CUDA bit is not
    handed to the C step, so a CUDA input takes the Python path and the reference coefficients."""
    gated = "cuda" not in _autograd._ILM_KERNELS
    assert _autograd.ilm_devices(3) == (1 if gated else 3)
    monkeypatch.setattr(_autograd, "_ILM_KERNELS", ("torch", "cpu", "cuda", "triton"))
    assert _autograd.ilm_devices(3) == 3


def test_ilm_bad_input_after_declining_raises_the_documented_error():
    m = _ilm()
    with pytest.raises(ValueError, match="key_group_size"):
        m.key_group_size = 4
        m(_input((2, C, 3, 3), False, 0))


def test_backend_setting_is_followed():
    """Under set_backend("torch") the module must not run the compiled ops (the C path is given
    no device), and its results are the torch backend's."""
    x = _input((2, C, 3, 3), False, 0)
    assert normfuse.backends.compiled_devices() & 1
    with normfuse.use_backend("torch"):
        assert normfuse.backends.compiled_devices() == 0
        m = _bin()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(x)
        names = {e.name for e in prof.events()}
        assert not any(n.startswith("normfuse::") for n in names), names
    assert normfuse.backends.compiled_devices() & 1


def test_compiled_devices_cache_not_left_stale_by_a_concurrent_set_backend(monkeypatch):
    """compiled_devices() reads _state.name, computes, then stores _state.devices. A
    set_backend() from another thread in between clears the cache *before* the stale store, so
    the stale value survives: the modules keep running the compiled CPU ops under
    set_backend("torch") until the setting changes again. The interleaving is forced here by
    running set_backend where the GIL could switch threads (inside _unavailable_reason)."""
    backends.set_backend("auto")
    real = backends._unavailable_reason
    fired = []

    def racing(name):
        if not fired:
            fired.append(True)
            backends.set_backend("torch")  # "another thread"
        return real(name)

    monkeypatch.setattr(backends, "_unavailable_reason", racing)
    monkeypatch.setattr(backends._state, "devices", None)  # a cache miss: the window is reached
    try:
        backends.compiled_devices()
        monkeypatch.setattr(backends, "_unavailable_reason", real)
        assert backends.get_backend() == "torch"
        m = normfuse.BatchInstanceNorm2d(4)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m(torch.randn(2, 4, 3, 3))
        ran = {e.name for e in prof.events() if e.name.startswith("normfuse::")}
        assert not ran, f"backend 'torch' set, yet the compiled ops ran: {sorted(ran)}"
        assert backends.compiled_devices() == 0, "stale cache: compiled ops allowed under 'torch'"
    finally:
        backends.set_backend("auto")


def test_invalid_env_backend_does_not_preempt_the_input_checks():
    """Before the one-C-call path an invalid NORMFUSE_BACKEND was reported by resolve_backend,
    after the module's input checks (a wrong channel count -> ValueError naming the channels,
    a non-tensor -> TypeError). compiled_devices() is now evaluated as an argument of the C
    call, before any check, so the backend error pre-empts them (and a TypeError becomes a
    ValueError)."""
    code = ("import torch, normfuse\n"
            "m = normfuse.BatchInstanceNorm1d(3)\n"
            "for bad in (torch.randn(4, 5), [1.0]):\n"
            "    try:\n"
            "        m(bad)\n"
            "    except Exception as e:\n"
            "        print('ERR', type(e).__name__, e)\n")
    ROOT = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, NORMFUSE_BACKEND="fused", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=str(ROOT))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 2, res.stdout + res.stderr[-2000:]
    assert "expected input with 3 channels" in lines[0], lines[0]
    assert lines[1].startswith("ERR TypeError"), lines[1]


@pytest.mark.parametrize("layer", ["assoc", "ilm"])
def test_parameters_replaced_by_another_thread_during_the_call(layer):
    """The C call releases the GIL around the op: the tensors it passes must be its own
    references, not pointers into the module's _parameters dict, which another thread may
    change meanwhile (m.encoder = ..., load_state_dict(assign=True)). It read the encoder
    after a swap freed it (a shape of [0] in the op's check, or garbage)."""
    import threading
    import time

    torch.manual_seed(0)
    m = (normfuse.AssocNorm(8, 64) if layer == "assoc"
         else normfuse.ILMNorm(64, num_groups=8, key_group_size=4)).eval()
    _perturb(m, 1)
    first = m.encoder.detach().clone()
    second = first * -1.7 + 0.3
    x = _input((16, 64, 48, 48), False, 2)  # an op call of some milliseconds: the window
    with torch.no_grad():
        m.encoder = torch.nn.Parameter(first.clone())
        want = [m(x)]
        m.encoder = torch.nn.Parameter(second.clone())
        want.append(m(x))
    errors, stop = [], threading.Event()

    held = []  # tensors that take the freed memory over until the next swap

    def swap():
        i = 0
        while not stop.is_set():
            m.encoder = torch.nn.Parameter((first if i % 2 else second).clone())
            held[:] = [torch.full_like(first, float("nan")) for _ in range(4)]
            i += 1
            time.sleep(0.0005)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with torch.no_grad(), normfuse.use_backend("cpu"):
                try:
                    y = m(x)
                except RuntimeError as exc:
                    errors.append(str(exc))
                    break
            if not any(torch.equal(y, w) for w in want):
                errors.append("an output of neither encoder")
                break
    finally:
        stop.set()
        swapper.join()
    assert errors == []
