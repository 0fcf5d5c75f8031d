"""Shared setup for tests/csrc: makes tests/cuda_shim importable (shim_build) for shim tests."""
import sys
from pathlib import Path

_SHIM = Path(__file__).resolve().parents[1] / "cuda_shim"
if str(_SHIM) not in sys.path:
    sys.path.insert(0, str(_SHIM))
