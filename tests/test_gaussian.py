"""Gaussian moments: double factorials, Isserlis pairings, exact Gauss–Hermite cubature."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred.gaussian import (
    double_factorial,
    gauss_hermite_cubature,
    gaussian_polynomial_expectation,
    isserlis_pairings,
)


def gaussian_moment_1d(p: int) -> int:
    """``E[z^p]`` for ``z ~ N(0, 1)``: ``(p − 1)!!`` for even ``p``, 0 for odd."""
    return 0 if p % 2 else double_factorial(p - 1)


def test_double_factorial_values() -> None:
    assert [double_factorial(n) for n in range(-1, 9)] == [1, 1, 1, 2, 3, 8, 15, 48, 105, 384]


@pytest.mark.parametrize("bad", [-2, 1.5, True, "3"])
def test_double_factorial_rejects(bad: object) -> None:
    with pytest.raises(VarRedError, match="n"):
        double_factorial(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("j", range(9))
def test_isserlis_pairings_count_and_validity(j: int) -> None:
    pairings = isserlis_pairings(j)
    if j % 2:
        assert pairings == []
        return
    assert len(pairings) == double_factorial(j - 1)
    assert len(set(pairings)) == len(pairings)
    for pairing in pairings:
        flat = sorted(i for pair in pairing for i in pair)
        assert flat == list(range(j))
        assert all(a < b for a, b in pairing)


def test_isserlis_pairings_reproduce_moments() -> None:
    """E[z_{i1} ⋯ z_{i4}] = Σ_pairings Π δ, against products of 1-D moments."""
    d = 3
    for idx in itertools.product(range(d), repeat=4):
        wick = sum(all(idx[a] == idx[b] for a, b in p) for p in isserlis_pairings(4))
        direct = math.prod(gaussian_moment_1d(idx.count(i)) for i in range(d))
        assert wick == direct


@given(d=st.integers(1, 4), degree=st.integers(0, 7))
def test_cubature_exact_on_all_monomials(d: int, degree: int) -> None:
    nodes, weights = gauss_hermite_cubature(d, degree)
    assert nodes.shape == ((degree // 2 + 1) ** d, d)
    assert weights.shape == (nodes.shape[0],)
    assert nodes.dtype == weights.dtype == torch.float64
    assert bool((weights > 0).all())
    for powers in itertools.product(range(degree + 1), repeat=d):
        if sum(powers) > degree:
            continue
        got = float((weights * torch.prod(nodes ** torch.tensor(powers), dim=1)).sum())
        want = math.prod(gaussian_moment_1d(p) for p in powers)
        assert got == pytest.approx(want, abs=1e-12 * max(1, want)), powers


def test_cubature_not_exact_beyond_degree() -> None:
    """The rule is no better than claimed: E[z^4] = 3 is missed by the degree-3 rule (can fail)."""
    nodes, weights = gauss_hermite_cubature(1, 3)
    assert abs(float((weights * nodes[:, 0] ** 4).sum()) - 3.0) > 0.5


def test_cubature_dtype_device_and_limits() -> None:
    nodes, weights = gauss_hermite_cubature(2, 2, dtype=torch.float32, device="cpu")
    assert nodes.dtype == weights.dtype == torch.float32
    with pytest.raises(VarRedError, match="max_nodes"):
        gauss_hermite_cubature(20, 4)  # 3^20 nodes
    with pytest.raises(VarRedError, match="max_nodes"):
        gauss_hermite_cubature(3, 2, max_nodes=7)  # 2^3 = 8 nodes
    with pytest.raises(VarRedError, match="d"):
        gauss_hermite_cubature(0, 2)
    with pytest.raises(VarRedError, match="degree"):
        gauss_hermite_cubature(2, -1)
    with pytest.raises(VarRedError, match="dtype"):
        gauss_hermite_cubature(2, 2, dtype=torch.int64)


def test_polynomial_expectation_closed_form(generator: torch.Generator) -> None:
    """E[(aᵀε)^4 + b ε_0 ε_1 + c] = 3|a|⁴ + c, vector output, gradient flows to a."""
    a = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)

    def fn(e: torch.Tensor) -> torch.Tensor:  # [M, 3] -> [M, 2]
        s = e @ a
        return torch.stack([s**4 + 2.0 * e[:, 0] * e[:, 1] + 1.0, s**2], dim=1)

    got = gaussian_polynomial_expectation(fn, 3, 4)
    norm2 = (a * a).sum()
    want = torch.stack([3 * norm2**2 + 1.0, norm2])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got[0], a)
    torch.testing.assert_close(g, 12 * norm2 * a, rtol=1e-12, atol=1e-12)


def test_polynomial_expectation_rejects_bad_fn() -> None:
    with pytest.raises(VarRedError, match="fn"):
        gaussian_polynomial_expectation(lambda e: 1.0, 2, 2)  # type: ignore[arg-type,return-value]
    with pytest.raises(VarRedError, match="fn"):
        gaussian_polynomial_expectation(lambda e: e.sum(), 2, 2)
    with pytest.raises(VarRedError, match="fn"):
        gaussian_polynomial_expectation(lambda e: e[:1], 2, 2)
