"""antithetic_estimate: exactness for odd functions, calibrated stderr from pair means."""

from __future__ import annotations

import math

import pytest
import torch

from varred.antithetic import antithetic_estimate
from varred.errors import VarRedError
from varred.testing import assert_unbiased

F64 = torch.float64


def test_odd_function_is_exact(generator: torch.Generator) -> None:
    eps = torch.randn(64, 3, generator=generator, dtype=F64)
    est = antithetic_estimate(lambda e: torch.sin(e[:, 0]) + e[:, 1] ** 3 - 2 * e[:, 2], eps)
    assert float(est.mean) == 0.0
    assert float(est.stderr) == 0.0 and float(est.variance) == 0.0
    assert float(est.variance_ratio) == 0.0
    assert est.n == 64


def test_odd_plus_constant_is_exact(generator: torch.Generator) -> None:
    # Dyadic samples so that ε³ + 2ε + 3 is computed without rounding: pair means are 3.
    eps = torch.round(torch.randn(32, 2, generator=generator, dtype=F64) * 64) / 64
    est = antithetic_estimate(lambda e: e[:, 0] ** 3 + 2 * e[:, 1] + 3.0, eps)
    assert float(est.mean) == 3.0
    assert float(est.stderr) == 0.0


def test_from_values_matches_callable(generator: torch.Generator) -> None:
    eps = torch.randn(20, 2, generator=generator, dtype=F64)

    def f(e: torch.Tensor) -> torch.Tensor:
        return torch.exp(e)

    a = antithetic_estimate(f, eps)
    b = antithetic_estimate(f(eps), f_negated=f(-eps))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.stderr, b.stderr)
    assert a.mean.shape == (2,)
    pairs = 0.5 * (f(eps) + f(-eps))
    assert torch.equal(a.stderr, pairs.std(0) / math.sqrt(20))


def test_stderr_is_calibrated(generator: torch.Generator) -> None:
    # f = ε₀ε₁ + 2 sin(ε₀) + ε₁, E f = 0. The pair means are the even part ε₀ε₁, whose law
    # is symmetric, so z = (mean - truth)/stderr is symmetric with mean 0 and (Student t)
    # variance (n-1)/(n-3). R columns are independent repetitions of n pairs.
    n, reps, truth = 100, 2000, 0.0

    def f(e: torch.Tensor) -> torch.Tensor:  # [n, R, 2] -> [n, R]
        return e[..., 0] * e[..., 1] + 2 * torch.sin(e[..., 0]) + e[..., 1]

    eps = torch.randn(n, reps, 2, generator=generator, dtype=F64)
    est = antithetic_estimate(f, eps)
    assert_unbiased(lambda r: est.mean[r], truth, repetitions=reps)
    z = (est.mean - truth) / est.stderr
    assert_unbiased(lambda r: z[r], 0.0, repetitions=reps)
    assert_unbiased(lambda r: z[r] ** 2, (n - 1) / (n - 3), repetitions=reps)
    # The naive stderr from the 2n correlated values is badly miscalibrated here.
    both = torch.cat([f(eps), f(-eps)])  # [2n, R]
    naive = (est.mean - truth) / (both.std(0) / math.sqrt(2 * n))
    with pytest.raises(AssertionError):
        assert_unbiased(lambda r: naive[r] ** 2, (n - 1) / (n - 3), repetitions=reps)
    # Per evaluation antithetic wins: Var f_e = 1 < Var f / 2 = 1 + (1 - e^-2). Both
    # variance fields are unbiased estimates of these (their ratio is only consistent).
    assert_unbiased(lambda r: est.variance[r], 1.0, repetitions=reps)
    assert_unbiased(lambda r: est.plain_variance[r], 2 - math.exp(-2), repetitions=reps)
    assert float(est.variance_ratio.mean()) < 1


def test_errors() -> None:
    eps = torch.zeros(4, 2, dtype=F64)
    vals = torch.zeros(4, dtype=F64)
    with pytest.raises(VarRedError, match="eps: expected base samples"):
        antithetic_estimate(lambda e: e)
    with pytest.raises(VarRedError, match=r"eps: expected base samples.*f_negated as well"):
        antithetic_estimate(lambda e: e, eps, f_negated=vals)
    with pytest.raises(VarRedError, match=r"f_negated: expected the values f\(-eps\)"):
        antithetic_estimate(vals)
    with pytest.raises(VarRedError, match=r"f_negated: expected the values.*eps as well"):
        antithetic_estimate(vals, eps, f_negated=vals)
    with pytest.raises(VarRedError, match=r"f_negated: expected the shape of f\(eps\) \[4\]"):
        antithetic_estimate(vals, f_negated=vals[:3])
    with pytest.raises(VarRedError, match="n >= 2 pairs"):
        antithetic_estimate(vals[:1], f_negated=vals[:1])
    with pytest.raises(VarRedError, match="f: expected a callable or a tensor"):
        antithetic_estimate(3.0, eps)  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match="eps: expected a floating-point"):
        antithetic_estimate(lambda e: e, eps.long())
    with pytest.raises(VarRedError, match=r"f\(-eps\): expected finite"):
        antithetic_estimate(vals, f_negated=vals / 0)
