"""varred.testing: strategies produce valid functions with correct expectations; assert_unbiased."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred.estimate import estimate
from varred.testing import (
    SmoothFunction,
    _ExpLinear,
    _Polynomial,
    _Trig,
    assert_unbiased,
    dims,
    orders,
    sample_shapes,
    smooth_functions,
)

F64 = torch.float64


@given(dims(), orders(), sample_shapes())
def test_simple_strategies(d: int, k: int, shape: tuple[int, ...]) -> None:
    assert 1 <= d <= 16 and 0 <= k <= 4
    assert isinstance(shape, tuple) and len(shape) <= 2 and all(1 <= s <= 4 for s in shape)


def test_closed_forms() -> None:
    assert (
        _Polynomial(((2.0, (0, 0, 0, 0)), (1.0, (0, 0, 1, 1)), (5.0, (1, 1, 1)))).expectation()
        == 7.0
    )
    assert _Polynomial(((1.5, ()),)).expectation() == 1.5
    assert _ExpLinear((0.3, 0.4), 0.1).expectation() == pytest.approx(math.exp(0.1 + 0.125))
    assert _Trig((0.6, 0.8), 0.2, True).expectation() == pytest.approx(
        math.sin(0.2) * math.exp(-0.5)
    )
    assert _Trig((0.6, 0.8), 0.2, False).expectation() == pytest.approx(
        math.cos(0.2) * math.exp(-0.5)
    )
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64)
    want = 2 * x[:, 0] ** 4 + x[:, 0] ** 2 * x[:, 1] ** 2 + 5 * x[:, 1] ** 3
    poly = _Polynomial(((2.0, (0, 0, 0, 0)), (1.0, (0, 0, 1, 1)), (5.0, (1, 1, 1))))
    torch.testing.assert_close(poly(x), want, rtol=1e-15, atol=0)


@given(st.data())
def test_smooth_function_expectations_by_monte_carlo(data: st.DataObject) -> None:
    d = data.draw(dims(max_dim=8))
    sf = data.draw(smooth_functions(d))
    assert isinstance(sf, SmoothFunction) and sf.d == d and math.isfinite(sf.expectation)
    g = torch.Generator().manual_seed(d)
    n, reps = 200, 100
    vals = sf.fn(torch.randn(n * reps, d, generator=g, dtype=F64)).reshape(reps, n)  # [R, n]
    assert vals.dtype == F64 and bool(torch.isfinite(vals).all())
    means = vals.mean(1)
    assert_unbiased(lambda r: means[r], sf.expectation, repetitions=reps)
    assert sf.fn(torch.zeros(3, d, dtype=torch.float32)).shape == (3,)


@given(st.data())
def test_polynomial_only(data: st.DataObject) -> None:
    d = data.draw(dims(max_dim=4))
    sf = data.draw(smooth_functions(d, polynomial_only=True, max_degree=3))
    assert sf.degree is not None and 0 <= sf.degree <= 3
    assert "SmoothFunction" in repr(sf)


def test_assert_unbiased_passes_and_fails(generator: torch.Generator) -> None:
    x = torch.randn(500, 2, generator=generator, dtype=F64) + torch.tensor([1.0, -2.0], dtype=F64)
    mean, se = assert_unbiased(lambda r: x[r], [1.0, -2.0], repetitions=500)
    assert mean.shape == se.shape == (2,)
    assert bool((se > 0).all())
    with pytest.raises(AssertionError, match=r"biased estimate at flat index 1 .*truth -1.5"):
        assert_unbiased(lambda r: x[r], torch.tensor([1.0, -1.5]), repetitions=500)
    # Estimate objects are accepted through their .mean
    est = estimate(torch.randn(10, 3, generator=generator, dtype=F64))
    assert_unbiased(lambda r: est, est.mean, repetitions=2)


def test_assert_unbiased_zero_se_is_exact() -> None:
    assert_unbiased(lambda r: torch.tensor(0.1 + 0.2, dtype=F64), 0.3, repetitions=3)
    with pytest.raises(AssertionError, match="SE 0"):
        assert_unbiased(lambda r: 0.3 + 1e-9, 0.3, repetitions=3)


def test_errors() -> None:
    with pytest.raises(VarRedError, match="repetitions: expected an integer >= 2, got 1"):
        assert_unbiased(lambda r: 0.0, 0.0, repetitions=1)
    with pytest.raises(VarRedError, match="z: expected a positive threshold"):
        assert_unbiased(lambda r: 0.0, 0.0, repetitions=3, z=0.0)
    with pytest.raises(VarRedError, match="d: expected a positive integer, got 0"):
        smooth_functions(0)


def _rank_one_fails(rank: int, world_size: int, outdir: str) -> None:
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)  # the group works on both ranks ...
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")  # ... then one rank fails


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_run_distributed_reports_a_failing_rank(tmp_path) -> None:
    """The harness's fast exit after success must not hide a rank whose ``fn`` raised."""
    import torch.distributed as dist

    from varred.testing import run_distributed

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    with pytest.raises(AssertionError, match="exited with codes") as info:
        run_distributed(_rank_one_fails, 2, str(tmp_path), timeout=60)
    codes = re.search(r"codes \[(-?\d+), (-?\d+)\]", str(info.value))
    assert codes is not None and int(codes.group(2)) != 0  # rank 1 reported as failed
