"""python -m normfuse / normfuse.info(): what can run here, and why not where it cannot."""
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
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
    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in out and "GPUs: none visible" in out


def test_python_m_normfuse_reports_a_bad_setting_instead_of_failing():
    res = _run({"NORMFUSE_BACKEND": "fused"})
    assert res.returncode == 0, res.stderr
    assert "backend setting 'fused'" in res.stdout and "unknown backend 'fused'" in res.stdout
