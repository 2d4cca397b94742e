"""The VI and finance example scripts run (small sizes) and report sensible numbers."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in ("vi_common", "vi_logistic_regression", "vi_eight_schools", "finance_options"):
        sys.modules.pop(name, None)


def test_finance_example_hits_the_truth(examples_path, capsys):
    out = importlib.import_module("finance_options").main(["--n", "20000"])
    for name, row in out.items():
        mean, se = row["controlled"]
        assert abs(mean - row["truth"]) < 5 * se + (5 * 2e-3 if "Asian" in name else 0), name
    assert out["European call"]["vr"] < 0.3
    assert out["Asian (arith.)"]["vr"] < 0.01
    assert "Kemna" in capsys.readouterr().out


def test_eight_schools_example(examples_path, capsys):
    out = importlib.import_module("vi_eight_schools").main(
        ["--reps", "6", "--batch", "8", "--fit-steps", "30"]
    )
    assert out["order 1 (Miller)"]["mean"][0] < 1.0
    assert all(r["cost"] > 0 for r in out.values())
    assert "jackknife" in capsys.readouterr().out


def test_logistic_regression_example(examples_path, capsys):
    pytest.importorskip("sklearn", reason="the [examples] extra (scikit-learn) is not installed")
    out = importlib.import_module("vi_logistic_regression").main(
        ["--reps", "4", "--batch", "8", "--fit-steps", "20", "--kind", "fullrank"]
    )
    assert out["order 1 (Miller)"]["mean"][0] < 1.0
    assert "VR mean block" in capsys.readouterr().out
