"""The torch versions normfuse supports, and what a build is tied to.

CI runs this file on the pinned torch (README) and on the lowest supported one
(.ci/lowest_torch.sh): every backend that can run registers on both, and a build refuses to load
under a torch it was not compiled against, with a message instead of an undefined symbol.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import normfuse
from normfuse import _extension

ROOT = Path(__file__).resolve().parents[1]


def declared_range() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^\[tool\.normfuse\][^\[]*?^torch\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert m, "pyproject.toml must declare [tool.normfuse] torch = '<range>'"
    return m.group(1)


def supported_range() -> SpecifierSet:
    return SpecifierSet(declared_range())


def test_declared_range_covers_the_gpu_machines_and_the_pin():
    spec = supported_range()
    assert Version("2.11.0") in spec and Version("2.14.1") in spec
    assert f"torch {declared_range()}" in (ROOT / "README.md").read_text(), "README states the range"


def test_running_torch_is_supported():
    assert Version(Version(torch.__version__).base_version) in supported_range(), torch.__version__


def test_every_backend_that_can_run_registers():
    backends = normfuse.available_backends()
    assert "torch" in backends
    if (ROOT / "normfuse" / "_build_info.py").exists():  # a build of this tree exists
        assert "cpu" in backends, _extension.REASON
    gpu = torch.cuda.is_available()
    if gpu or os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it without a GPU
        assert "triton" in backends, normfuse.backends._unavailable_reason("triton")
    if gpu and _extension.HAS_CUDA_KERNELS:
        assert "cuda" in backends


def test_build_matches_running_torch():
    info = pytest.importorskip("normfuse._build_info", reason="normfuse._C was not built here")
    assert info.TORCH_VERSION == torch.__version__
    assert _extension.HAS_CPU_KERNELS, _extension.REASON


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    info = pytest.importorskip("normfuse._build_info", reason="normfuse._C was not built here")
    monkeypatch.setattr(info, "TORCH_VERSION", "2.0.0+cu117")
    reason = _extension._built_for_other_torch()
    assert "built against torch 2.0.0+cu117" in reason and torch.__version__ in reason
    assert "rebuild" in reason


def test_installed_metadata_pins_the_build_torch():
    """A wheel (or an editable install) requires exactly the torch it was compiled against."""
    try:
        requires = importlib.metadata.requires("normfuse") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("normfuse is not pip-installed here")
    torch_reqs = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert len(torch_reqs) == 1, requires
    (spec,) = list(torch_reqs[0].specifier)
    assert spec.operator == "==" and Version(spec.version) in supported_range(), requires
