"""python -m normfuse / normfuse.info.info(): what can run here, and why not where it cannot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import normfuse
from normfuse import backends, info

ROOT = Path(__file__).resolve().parents[1]


def _run(env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "NORMFUSE_BACKEND"}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "normfuse"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_info_matches_the_backend_registry():
    d = info.info()
    assert d["normfuse"] == normfuse.__version__ and d["torch"] == torch.__version__
    available = {name for name, state in d["backends"].items() if state == "available"}
    assert available == set(normfuse.available_backends())
    for name, state in d["backends"].items():  # every other one says why, as the errors do
        assert state == "available" or state == backends._unavailable_reason(name)
    assert d["resolved"]["cpu"] == normfuse.resolve_backend(torch.empty(0))
    assert ("cuda" in d["resolved"]) == torch.cuda.is_available()
    assert len(d["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_info_follows_the_setting():
    with normfuse.use_backend("torch"):
        d = info.info()
    assert d["backend_setting"] == "torch" and d["resolved"]["cpu"] == "torch"


def test_python_m_normfuse_prints_every_backend_and_the_choice():
    res = _run()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f"  {name} " in out
    assert "backend setting 'auto'" in out
    assert f"  cuda    {backends._unavailable_reason('cuda') or 'available'}" in out
    if not torch.cuda.is_available():
        assert "GPUs: none visible" in out


def test_python_m_normfuse_reports_a_bad_setting_instead_of_failing():
    res = _run({"NORMFUSE_BACKEND": "fused"})
    assert res.returncode == 0, res.stderr
    assert "backend setting 'fused'" in res.stdout and "unknown backend 'fused'" in res.stdout


def test_python_m_normfuse_with_an_extension_built_for_another_torch():
    """_C built against another torch (_extension.REASON set, _C None): it still prints, and the
    cuda backend gives that reason, not 'built without CUDA kernels'."""
    code = ("import runpy, sys, types\n"
            "m = types.ModuleType('normfuse._build_info')\n"
            "m.TORCH_VERSION, m.WITH_CUDA, m.CUDA_ARCH_LIST = '1.0.0', True, None\n"
            "sys.modules['normfuse._build_info'] = m\n"
            "runpy.run_module('normfuse', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "built against torch 1.0.0" in out and "TORCH_CUDA_ARCH_LIST unset" in out
    cuda_line = next(line for line in out.splitlines() if line.startswith("  cuda "))
    assert "built against torch 1.0.0" in cuda_line, out


def test_python_m_normfuse_with_an_extension_but_no_build_record():
    """_C loads but normfuse/_build_info.py is missing (the .so copied alone): the report says
    so instead of 'not built', which the 'extension: ok' line below it contradicted."""
    code = ("import runpy, sys\n"
            "sys.modules['normfuse._build_info'] = None\n"  # its import raises ImportError
            "runpy.run_module('normfuse', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    from normfuse import _extension
    if _extension.HAS_CPU_KERNELS:
        assert "normfuse._C: loaded, without its build record" in res.stdout, res.stdout
        assert "not built" not in res.stdout
    else:
        assert "normfuse._C: not built" in res.stdout, res.stdout
