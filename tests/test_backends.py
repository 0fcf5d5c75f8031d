"""Backend selection: set_backend, use_backend, NORMFUSE_BACKEND, available_backends, auto."""

import os
import subprocess
import sys

import pytest
import torch

import oracles
from oracles import assert_close_dtype, device_for_backend, make_input

KNOWN = ("torch", "cpu", "cuda", "triton")


def _available():
    try:
        import normfuse
        return [n for n in normfuse.available_backends() if n != "auto"]
    except Exception:  # reported by the tests themselves
        return ["torch"]


BACKENDS = _available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_backend(nf):
    """Restores set_backend's setting (not get_backend(): inside conftest's use_backend block
    that is the block's, which set_backend would then make the default for later tests)."""
    before = nf.backends._state.name
    yield
    nf.set_backend(before)


def _current(nf):
    getter = getattr(nf, "get_backend", None)
    if getter is None:
        pytest.skip("normfuse.get_backend does not exist")
    return getter()


def test_available_backends(nf):
    names = nf.available_backends()
    assert isinstance(names, (list, tuple))
    assert "torch" in names
    assert all(isinstance(n, str) for n in names)
    assert set(names) <= set(KNOWN) | {"auto"}
    assert len(set(names)) == len(names)


def test_set_backend_and_resolve(nf, restore_backend):
    x = torch.randn(2, 3, 4)
    for name in BACKENDS:
        nf.set_backend(name)
        assert _current(nf) == name
        if device_for_backend(name) == "cpu":
            assert nf.resolve_backend(x) == name
    nf.set_backend("auto")
    assert _current(nf) == "auto"
    picked = nf.resolve_backend(x)
    assert picked in nf.available_backends() and picked != "auto"


def test_use_backend_restores(nf, restore_backend):
    nf.set_backend("auto")
    with nf.use_backend("torch"):
        assert _current(nf) == "torch"
        assert nf.resolve_backend(torch.randn(2, 3)) == "torch"
    assert _current(nf) == "auto"
    with pytest.raises(KeyError):
        with nf.use_backend("torch"):
            raise KeyError("boom")
    assert _current(nf) == "auto"
    # nested
    with nf.use_backend("torch"):
        with nf.use_backend("auto"):
            assert _current(nf) == "auto"
        assert _current(nf) == "torch"


def test_overlapping_blocks_in_two_threads_leave_the_setting_as_it_was(nf, restore_backend):
    """use_backend is process-wide (as torch.nn.attention.sdpa_kernel): the newest active block
    applies in every thread. Two blocks that overlap in two threads (A enters, B enters, A
    exits, B exits) each remove only their own setting, so afterwards it is set_backend's again
    (restoring "what was there on entry" left B's entry value, A's block, in place for good)."""
    import threading
    nf.set_backend("auto")
    second = "cpu" if "cpu" in BACKENDS else "auto"
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen, errors = {}, []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001  (reported below)
                errors.append(exc)
                a_inside.set(), b_inside.set(), a_done.set()
        return run

    @guarded
    def thread_a():
        with nf.use_backend("torch"):
            a_inside.set()
            assert b_inside.wait(30)
            seen["a, both inside"] = _current(nf)
        a_done.set()

    @guarded
    def thread_b():
        assert a_inside.wait(30)
        seen["b, a inside"] = _current(nf)
        with nf.use_backend(second):
            b_inside.set()
            assert a_done.wait(30)
            seen["b, a done"] = _current(nf)
        seen["b, both done"] = _current(nf)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {"b, a inside": "torch", "a, both inside": second, "b, a done": second,
                    "b, both done": "auto"}
    assert _current(nf) == "auto"


def test_a_thread_started_in_a_block_uses_it(nf, restore_backend):
    """Like autograd's device threads (a checkpointed forward recomputed in the backward)."""
    import threading
    nf.set_backend("auto")
    seen = []
    with nf.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(nf.resolve_backend(torch.randn(2, 3))))
        t.start()
        t.join(30)
    assert seen == ["torch"]


def test_set_backend_inside_a_block_sets_what_follows_it(nf, restore_backend):
    other = next((b for b in BACKENDS if b != "torch"), "auto")
    nf.set_backend("auto")
    with nf.use_backend("torch"):
        nf.set_backend(other)
        assert _current(nf) == "torch"  # the block still overrides it
    assert _current(nf) == other


def test_compiled_code_follows_use_backend(nf, restore_backend):
    """torch.compile guards on the thread's setting: a compiled module called under another
    use_backend block recompiles and runs that backend (its ops are in the graph)."""
    from torch._dynamo.testing import EagerAndRecordGraphs
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled cpu backend")
    nf.set_backend("auto")
    torch._dynamo.reset()
    graphs = EagerAndRecordGraphs()
    m = nf.BatchInstanceNorm2d(4)
    f = torch.compile(m, backend=graphs, fullgraph=True)
    x = torch.randn(2, 4, 3, 3)
    m(x)  # eager once: lazily set module globals (guarded on too) settle before compiling

    def normfuse_ops(graph):  # the layer's ops sit in autograd_function_apply's subgraphs
        return any("normfuse" in str(n.target) for sub in graph.modules()
                   if isinstance(sub, torch.fx.GraphModule) for n in sub.graph.nodes)

    with nf.use_backend("torch"):
        y_torch = f(x)
    with nf.use_backend("cpu"):
        y_cpu = f(x)
    with nf.use_backend("torch"):
        f(x)
    assert [normfuse_ops(g) for g in graphs.graphs] == [False, True]  # the third reused the first
    torch.testing.assert_close(y_cpu, y_torch)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["bogus", "TORCH ", "", "gpu"])
def test_unknown_backend_lists_available(nf, restore_backend, name):
    before = _current(nf)
    for call in (lambda: nf.set_backend(name), lambda: nf.use_backend(name).__enter__()):
        with pytest.raises((ValueError, RuntimeError)) as info:
            call()
        msg = str(info.value)
        for avail in nf.available_backends():
            assert avail in msg, f"error should list available backend {avail!r}: {msg!r}"
        assert _current(nf) == before, "a failed set_backend must not change the setting"


@pytest.mark.parametrize("name", [n for n in KNOWN])
def test_unavailable_backend_raises(nf, restore_backend, name):
    """A known backend that cannot run here is refused (no silent fallback)."""
    if name in nf.available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises((ValueError, RuntimeError)) as info:
        nf.set_backend(name)
        # if setting is lazy, the first call must raise
        nf.BatchInstanceNorm2d(3)(torch.randn(2, 3, 4, 4))
    msg = str(info.value)
    for avail in nf.available_backends():
        assert avail in msg, msg


@pytest.mark.parametrize("name", BACKENDS)
def test_named_backend_refuses_foreign_device(nf, restore_backend, name):
    """A backend asked for explicitly never hands the work to another one: a GPU backend on a
    CPU tensor raises instead of falling back."""
    if device_for_backend(name) == "cpu":
        pytest.skip("backend runs on the CPU")
    with nf.use_backend(name):
        with pytest.raises(RuntimeError):
            nf.BatchInstanceNorm2d(3)(torch.randn(2, 3, 4, 4))


def test_auto_matches_resolved_backend(nf, restore_backend, seed):
    x = make_input((3, 4, 5, 2), seed)
    with nf.use_backend("auto"):
        name = nf.resolve_backend(x)
        m = nf.BatchInstanceNorm2d(4)
        with torch.no_grad():
            m.gate.uniform_(0, 1)
        ya = m(x)
    with nf.use_backend(name):
        yb = m(x)
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    exp = oracles.module_step(m, x)
    assert_close_dtype(ya, exp.y, torch.float32, "auto output")


def test_auto_float64_cpu_is_supported(nf, restore_backend, seed):
    with nf.use_backend("auto"):
        x = make_input((2, 3, 4), seed, torch.float64)
        assert nf.resolve_backend(x) in nf.available_backends()
        y = nf.BatchInstanceNorm1d(3).double()(x)
        assert y.dtype == torch.float64


def _run_py(code, env_value):
    env = dict(os.environ)
    if env_value is None:
        env.pop("NORMFUSE_BACKEND", None)
    else:
        env["NORMFUSE_BACKEND"] = env_value
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


_CODE = ("import torch, normfuse as nf\n"
         "y = nf.BatchInstanceNorm2d(3)(torch.randn(2, 3, 4, 4))\n"
         "print('resolved=' + nf.resolve_backend(torch.randn(2, 3)))\n"
         "print('setting=' + str(getattr(nf, 'get_backend', lambda: '?')()))\n")


def test_env_variable_selects_backend():
    r = _run_py(_CODE, "torch")
    assert r.returncode == 0, r.stderr
    assert "resolved=torch" in r.stdout and "setting=torch" in r.stdout


def test_env_variable_unknown_backend_raises():
    r = _run_py(_CODE, "no-such-backend")
    assert r.returncode != 0, "an unknown NORMFUSE_BACKEND must not fall back silently"
    err = r.stderr
    assert "no-such-backend" in err and "NORMFUSE_BACKEND" in err, err[-2000:]
    assert "torch" in err.splitlines()[-1] or "torch" in err, err[-2000:]
