"""estimate(): the plain estimator bit for bit at β = 0, the 1 − ρ² factor, bias of plug-in β."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.coefficients import OptimalCoefficient
from varred.errors import VarRedError
from varred.estimate import Estimate, estimate
from varred.testing import assert_unbiased, sample_shapes

F64 = torch.float64


def _plain(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return f.mean(0), f.std(0) / math.sqrt(f.shape[0])


@given(sample_shapes(), st.integers(2, 9), st.sampled_from([torch.float32, F64]))
def test_zero_coefficient_is_plain_bit_for_bit(out: tuple[int, ...], n: int, dtype) -> None:
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, *out, generator=g, dtype=F64).exp().to(dtype)
    c = torch.randn(n, *out, 2, generator=g, dtype=F64).to(dtype)
    mean, se = _plain(f)
    cases = [
        estimate(f),
        estimate(f, None, OptimalCoefficient()),
        estimate(f, c[..., 0], 0.0),
        estimate(f, c[..., 0], torch.zeros(out, dtype=F64)),
        estimate(f, c, 0.0),
        estimate(f, c, torch.zeros(2, dtype=dtype)),
        estimate(f, torch.full_like(f, 0.3), OptimalCoefficient(fit="batch")),  # Var(c) = 0
    ]
    for est in cases:
        assert torch.equal(est.mean, mean)
        assert torch.equal(est.stderr, se)
        assert torch.equal(est.variance, est.plain_variance)
        assert est.n == n


def test_fields_and_shapes(generator: torch.Generator) -> None:
    c = torch.randn(200, 2, 3, 2, generator=generator, dtype=F64)
    f = c.sum(-1) + 0.5 * torch.randn(200, 2, 3, generator=generator, dtype=F64)
    est = estimate(f, c, OptimalCoefficient(kind="full"))
    assert isinstance(est, Estimate)
    for name in ("mean", "stderr", "variance", "plain_variance", "variance_ratio"):
        assert getattr(est, name).shape == (2, 3)
    assert est.coefficient.shape == (2, 3, 2)
    assert est.correlation is not None and est.correlation.shape == (2, 3, 2)
    torch.testing.assert_close(est.stderr, (est.variance / 200).sqrt(), rtol=1e-14, atol=0)
    assert bool((est.variance_ratio < 1).all())
    fixed = estimate(f, c, torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close(fixed.variance, f.var(0) * 0 + (f - c.sum(-1)).var(0))


def test_batch_ratio_is_one_minus_sample_r2(generator: torch.Generator) -> None:
    # Algebraic identity for the plug-in β: Var(f - β̂c) / Var(f) = 1 - r² exactly.
    c = torch.randn(300, 4, generator=generator, dtype=F64)
    f = torch.sin(3 * c) + c**2
    est = estimate(f, c, OptimalCoefficient(fit="batch"))
    assert est.correlation is not None
    torch.testing.assert_close(est.variance_ratio, 1 - est.correlation**2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0])
def test_variance_ratio_matches_one_minus_rho2(generator: torch.Generator, s: float) -> None:
    # f = c + s z: ρ² = 1 / (1 + s²). Each of R columns is an independent repetition;
    # β is cross-fitted per column, SE from the spread over repetitions.
    n, reps = 1000, 200
    c = torch.randn(n, reps, generator=generator, dtype=F64)
    f = c + s * torch.randn(n, reps, generator=generator, dtype=F64)
    est = estimate(f, c, OptimalCoefficient(kind="diagonal", fit="crossfit"))
    rho2 = 1 / (1 + s**2)
    assert_unbiased(lambda r: est.variance_ratio[r], 1 - rho2, repetitions=reps)
    assert est.correlation is not None
    assert_unbiased(lambda r: est.correlation[r] ** 2, rho2, repetitions=reps)


def test_crossfit_unbiased_where_batch_is_biased(generator: torch.Generator) -> None:
    # f = c + c², c ~ N(0, 1), n = 8: β* = 1, residual e = c² - 1, and the plug-in bias is
    # ≈ -E[c² e] / (n Var c) = -2/n (delta method, docs/theory.md §3; measured ≈ -0.245).
    n, reps, truth = 8, 4000, 1.0
    c = torch.randn(n, reps, generator=generator, dtype=F64)
    f = c + c**2
    batch = estimate(f, c, OptimalCoefficient(fit="batch")).mean
    with pytest.raises(AssertionError, match="biased estimate"):
        assert_unbiased(lambda r: batch[r], truth, repetitions=reps)
    mean, se = batch.mean(), batch.std() / math.sqrt(reps)
    assert float(truth - mean) > 5 * float(se)  # significant downward bias
    for folds in (2, 4, 8):
        cross = estimate(f, c, OptimalCoefficient(fit="crossfit", folds=folds)).mean
        assert_unbiased(lambda r, x=cross: x[r], truth, repetitions=reps)


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
def test_running_fit_unbiased_across_calls(generator: torch.Generator, kind: str) -> None:
    # Same small-n, plug-in-biased problem; running β comes from earlier batches only.
    n, reps, truth = 8, 2000, 1.0
    coef = OptimalCoefficient(kind=kind, fit="running", decay=0.9)
    means = []
    for _ in range(3):
        c = torch.randn(n, reps, generator=generator, dtype=F64)
        means.append(estimate(f_values=c + c**2, controls=c, coefficient=coef).mean)
    for m in means[1:]:
        assert_unbiased(lambda r, x=m: x[r], truth, repetitions=reps)


def test_errors() -> None:
    f = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    bad = f.clone()
    bad[1, 1] = math.nan
    with pytest.raises(VarRedError, match="f_values: expected finite values, got 1 NaN/Inf"):
        estimate(bad)
    with pytest.raises(VarRedError, match="controls: expected finite"):
        estimate(f, bad.abs() * math.inf)
    with pytest.raises(VarRedError, match=r"f_values: expected a floating-point.*torch.int64"):
        estimate(f.long())
    with pytest.raises(VarRedError, match="controls: expected a floating-point"):
        estimate(f, f.long())
    with pytest.raises(VarRedError, match=r"n >= 2.*got \[1, 3\]"):
        estimate(f[:1])
    with pytest.raises(VarRedError, match=r"n >= 2.*got \[\]"):
        estimate(f[0, 0])
    with pytest.raises(VarRedError, match=r"controls: expected shape \[5, 3\] or \[5, 3, m\]"):
        estimate(f, f[:, :2])
    with pytest.raises(VarRedError, match=r"controls: expected shape"):
        estimate(f, f[:4])
    with pytest.raises(VarRedError, match=r"coefficient: expected a shape broadcastable to \[3\]"):
        estimate(f, f, torch.zeros(2, dtype=F64))
    with pytest.raises(
        VarRedError, match=r"coefficient: expected a shape broadcastable to \[3, 2\]"
    ):
        estimate(f, torch.stack([f, f], -1), torch.zeros(3, dtype=F64))
    with pytest.raises(VarRedError, match="coefficient: expected None without controls"):
        estimate(f, None, 0.5)
    with pytest.raises(VarRedError, match="coefficient: expected an OptimalCoefficient"):
        estimate(f, f, "optimal")  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match="coefficient: expected finite"):
        estimate(f, f, math.inf)
