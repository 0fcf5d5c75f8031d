"""Shared fixtures of the normfuse test suite.

* ``backend``: parametrized over every concrete backend in ``normfuse.available_backends()``
  (so kernel backends are tested as soon as they are built), active through
  ``normfuse.use_backend`` for the duration of the test.
* ``device``: the device the active backend runs on ("cuda" for the GPU backends).
* ``seed``: a per-test seed (a stable hash of the test id), also applied to torch's global RNG.
* the helpers (``make_input``, ``assert_close_dtype``, ...) are in tests/oracles.py.

Markers: ``slow`` (expensive combinations, e.g. Triton through its CPU interpreter; deselect
with ``-m "not slow"``).  ``NORMFUSE_TEST_BACKENDS=torch,cpu`` restricts the backends tested.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Helpers live in tests/oracles.py (imported by name from the test files): "conftest" is not
# a unique module name once tests/csrc etc. have their own conftest.py.
from oracles import device_for_backend  # noqa: E402

try:
    import normfuse  # noqa: E402
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - reported by every test that needs it
    normfuse = None
    _IMPORT_ERROR = exc


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: expensive combination (deselect with -m 'not slow')")


def _backend_names():
    if normfuse is None:
        return ["torch"]
    try:
        names = [n for n in normfuse.available_backends() if n != "auto"]
    except Exception:  # pragma: no cover
        names = ["torch"]
    only = os.environ.get("NORMFUSE_TEST_BACKENDS")
    if only:
        names = [n for n in names if n in only.split(",")]
    return names or ["torch"]


BACKENDS = _backend_names()


def _backend_param(name):
    # Triton on the CPU runs through its interpreter (numpy, ~0.5 s a test): mark it slow.
    if name == "triton" and device_for_backend(name) == "cpu":
        return pytest.param(name, marks=pytest.mark.slow)
    return name


@pytest.fixture(params=[_backend_param(n) for n in BACKENDS])
def backend(request):
    if normfuse is None:
        pytest.fail(f"normfuse does not import: {_IMPORT_ERROR!r}")
    with normfuse.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return device_for_backend(backend)


@pytest.fixture
def nf():
    if normfuse is None:
        pytest.fail(f"normfuse does not import: {_IMPORT_ERROR!r}")
    return normfuse


@pytest.fixture(autouse=True)
def seed(request):
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


