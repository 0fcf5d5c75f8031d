"""Shared constants of the Triton backend tests (a uniquely named module: ``conftest`` is not
importable reliably when several test folders have one)."""
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
