"""Test setup of the Triton backend.

Without a GPU the kernels run in Triton's CPU interpreter, which is chosen when a kernel module
is imported: the root conftest (tests/conftest.py) sets ``TRITON_INTERPRET=1`` before that
happens, and this one repeats the check, for runs that do not load the root one
(normfuse.triton_kernels imports its kernel modules lazily, at the first op call, and the
kernels avoid the ``@jit`` helpers of ``triton.language.standard`` that would be fixed when
triton itself is imported).  If the kernels were already imported compiled, every CPU test is
skipped.  With a GPU the same tests run on CUDA tensors with compiled kernels.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tk_common import HAS_CUDA  # noqa: E402

if not HAS_CUDA and "normfuse.triton_kernels.moments" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import normfuse.triton_kernels as tk
    from normfuse.triton_kernels import heuristics
    _SKIP = None if HAS_CUDA or tk.interpreted() else (
        "Triton kernels were imported compiled before TRITON_INTERPRET=1 could be set")
except Exception as exc:  # pragma: no cover
    tk = heuristics = None
    _SKIP = f"normfuse.triton_kernels does not import: {exc!r}"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if _SKIP and "aot" not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=_SKIP))
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "aot: ahead-of-time compilation (no GPU needed)")


@pytest.fixture
def force_splits(monkeypatch):
    """Make the reductions split planes even for the tiny test shapes."""
    monkeypatch.setattr(heuristics, "MIN_TILES_PER_SPLIT", 1)
    monkeypatch.setattr(heuristics, "INTERPRETER_NUM_SMS", 64)
    monkeypatch.setattr(heuristics, "_cuda_sms", lambda index: 1024)
