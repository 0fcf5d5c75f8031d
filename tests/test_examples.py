"""The examples run as the README says: ``examples/train_digits.py`` trains its small CNN with
every normalization it lists past the accuracy the README states (> 95% on the held-out digits);
``examples/dp_sgd_digits.py`` checks its per-sample gradients against a loop and trains with
DP-SGD past 85%.

The run is deterministic for a given machine and torch (fixed seed, CPU, one process), ~7 s.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import normfuse

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, monkeypatch):
    # examples/ on the path, as when run as a script: dp_sgd_digits imports train_digits
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_reaches_the_readme_accuracy(capsys, monkeypatch):
    example = _load("train_digits", monkeypatch)
    before = normfuse.get_backend()
    try:  # main() sets the process-wide backend from its --backend
        assert example.main(["--backend", "auto", "--min-accuracy", "0.95"]) == 0, \
            capsys.readouterr().out
    finally:
        normfuse.set_backend(before)
    out = capsys.readouterr().out
    for variant in example.VARIANTS:  # every variant trained and reported a row
        assert any(line.startswith(variant) for line in out.splitlines()), out


def test_dp_sgd_digits_checks_its_gradients_and_trains(capsys, monkeypatch):
    example = _load("dp_sgd_digits", monkeypatch)
    assert example.main(["--min-accuracy", "0.85"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "per-sample gradients vs a loop" in out
    for variant in ("GroupNorm", "AssocNorm"):
        assert any(line.startswith(variant) for line in out.splitlines()), out
