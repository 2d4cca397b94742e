"""ControlVariate and stack_controls: values, known means, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from varred.control import ControlVariate, stack_controls
from varred.errors import VarRedError
from varred.testing import sample_shapes


def test_subtracts_known_mean_exactly() -> None:
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    cv = ControlVariate(lambda s: s**2, mean=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.equal(cv(x), x**2 - torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.equal(ControlVariate(lambda s: s, 2.5)(x), x - 2.5)


@given(sample_shapes())
def test_any_trailing_shape_and_broadcast_mean(out: tuple[int, ...]) -> None:
    x = torch.ones(3, *out, dtype=torch.float64)
    mean = torch.full(out[-1:], 0.5, dtype=torch.float64)
    assert ControlVariate(lambda s: 2 * s, mean)(x).shape == x.shape
    assert torch.equal(ControlVariate(lambda s: 2 * s, mean)(x), torch.full_like(x, 1.5))


def test_zero_mean_in_expectation(generator: torch.Generator) -> None:
    # E[x^2] = 1 for x ~ N(0, 1): the control's sample mean is within 5 SE of 0.
    x = torch.randn(20000, generator=generator, dtype=torch.float64)
    c = ControlVariate(lambda s: s**2, 1.0)(x)
    assert abs(float(c.mean())) < 5 * float(c.std()) / math.sqrt(c.numel())


def test_stack_controls_shape_and_order() -> None:
    x = torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(5, 2)
    c1 = ControlVariate(lambda s: s, 0.0)
    c2 = ControlVariate(lambda s: s**2, 1.0)
    stacked = stack_controls([c1, c2])
    v = stacked(x)
    assert v.shape == (5, 2, 2)
    assert torch.equal(v[..., 0], c1(x))
    assert torch.equal(v[..., 1], c2(x))
    assert stacked.mean == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fn": 3.0, "mean": 0.0}, "fn: expected a callable"),
        ({"fn": abs, "mean": "0"}, "mean: expected a float"),
        ({"fn": abs, "mean": True}, "mean: expected a float"),
        ({"fn": abs, "mean": math.nan}, "mean: expected a finite"),
        ({"fn": abs, "mean": torch.tensor([1, 2])}, "mean: expected a floating-point"),
        ({"fn": abs, "mean": torch.tensor([math.inf])}, "mean: expected finite"),
    ],
)
def test_construction_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(VarRedError, match=match):
        ControlVariate(**kwargs)


def test_call_errors() -> None:
    x = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(VarRedError, match=r"mean: .*broadcastable.*\[3\].*\[2\]"):
        ControlVariate(lambda s: s, torch.zeros(2, dtype=torch.float64))(x)
    with pytest.raises(VarRedError, match="fn\\(samples\\): expected a floating-point"):
        ControlVariate(lambda s: s.long(), 0.0)(x)
    with pytest.raises(VarRedError, match="fn\\(samples\\): expected per-sample"):
        ControlVariate(lambda s: s.sum(), 0.0)(x)


def test_stack_errors() -> None:
    x = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(VarRedError, match="at least one"):
        stack_controls([])
    with pytest.raises(VarRedError, match=r"controls\[1\]: expected a callable"):
        stack_controls([abs, 1.0])  # type: ignore[list-item]
    with pytest.raises(VarRedError, match="expected a sequence"):
        stack_controls(ControlVariate(abs, 0.0))  # type: ignore[arg-type]
    bad = stack_controls([lambda s: s, lambda s: s[:, :2]])
    with pytest.raises(VarRedError, match=r"controls\[1\]: expected output shape \[4, 3\]"):
        bad(x)
