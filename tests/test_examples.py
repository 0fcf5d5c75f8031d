"""The examples run as the README says: ``examples/train_digits.py`` trains its small CNN with
every normalization it lists past the accuracy the README states (> 95% on the held-out digits).

The run is deterministic for a given machine and torch (fixed seed, CPU, one process), ~7 s.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import normfuse

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_reaches_the_readme_accuracy(capsys):
    example = _load("train_digits")
    before = normfuse.get_backend()
    try:  # main() sets the process-wide backend from its --backend
        assert example.main(["--backend", "auto", "--min-accuracy", "0.95"]) == 0, \
            capsys.readouterr().out
    finally:
        normfuse.set_backend(before)
    out = capsys.readouterr().out
    for variant in example.VARIANTS:  # every variant trained and reported a row
        assert any(line.startswith(variant) for line in out.splitlines()), out
