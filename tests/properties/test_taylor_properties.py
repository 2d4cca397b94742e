"""Property tests for TaylorCV over dimensions 1..16 and orders 0..4 (cheap f, small n)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import jacfwd

from varred.gaussian import cubature_size, isserlis_pairings
from varred.taylor import TaylorCV

DT = torch.float64
Fn = Callable[[torch.Tensor], torch.Tensor]

dims = st.integers(1, 16)
orders = st.integers(0, 4)
seeds = st.integers(0, 2**31 - 1)


def setup(
    d: int, seed: int, n: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(d, generator=g, dtype=DT)
    L = torch.tril(0.2 * torch.randn(d, d, generator=g, dtype=DT), -1) + torch.eye(d, dtype=DT)
    eps = torch.randn(n, d, generator=g, dtype=DT)
    return mu, L, eps, g


def random_polynomial(d: int, k: int, g: torch.Generator) -> Fn:
    """Σ_{j≤k} Π_{t<j} (w_{jt}ᵀ x): total degree k, ``[n, d] -> [n]``."""
    w = torch.randn(k + 1, max(k, 1), d, generator=g, dtype=DT) / math.sqrt(d)
    c = float(torch.randn((), generator=g, dtype=DT))

    def f(x: torch.Tensor) -> torch.Tensor:
        out = c + 0.0 * x[:, 0]  # a constant that still depends (trivially) on x
        for j in range(1, k + 1):
            forms = x @ w[j, :j].T  # [n, j]
            term = forms[:, 0]
            for t in range(1, j):
                term = term * forms[:, t]
            out = out + term
        return out

    return f


def smooth(d: int, g: torch.Generator) -> Fn:
    a = torch.randn(d, generator=g, dtype=DT) / math.sqrt(d)
    return lambda x: torch.tanh(x @ a) + 0.5 * torch.sin(x).sum(1)


@given(d=dims, k=orders, seed=seeds)
def test_polynomials_of_degree_k_have_zero_variance(d: int, k: int, seed: int) -> None:
    mu, L, eps, g = setup(d, seed)
    f = random_polynomial(d, k, g)
    cv = TaylorCV(f, k, mean=mu, scale_tril=L)
    fx = f(mu + eps @ L.T)
    scale = 1.0 + float(fx.abs().max())
    torch.testing.assert_close(cv.remainder(eps), torch.zeros_like(fx), rtol=0, atol=1e-11 * scale)
    controlled = fx - cv(eps)  # constant = E f
    mean = cv.expectation()
    torch.testing.assert_close(
        controlled, mean.expand_as(controlled), rtol=1e-10, atol=1e-10 * scale
    )


@given(d=dims, k=orders, seed=seeds)
def test_routes_agree_when_both_affordable(d: int, k: int, seed: int) -> None:
    mu, L, _, g = setup(d, seed)
    f = smooth(d, g)
    lap = TaylorCV(f, k, mean=mu, scale_tril=L, exact_method="laplacian").expectation()
    if cubature_size(d, k) <= 300:
        cub = TaylorCV(f, k, mean=mu, scale_tril=L, exact_method="cubature").expectation()
        torch.testing.assert_close(lap, cub, rtol=1e-10, atol=1e-12)
    auto = TaylorCV(f, k, mean=mu, scale_tril=L).expectation()
    torch.testing.assert_close(auto, lap, rtol=1e-10, atol=1e-12)


@given(d=st.integers(1, 3), seed=seeds)
def test_exact_mean_is_the_isserlis_sum_of_derivative_tensors(d: int, seed: int) -> None:
    """E[T⁴ f̃] = f̃(0) + Σ_pairings D²/2! + Σ_pairings D⁴/4!, tensors from jacfwd (independent route)."""
    mu, L, _, g = setup(d, seed)
    f = smooth(d, g)

    def ft(e: torch.Tensor) -> torch.Tensor:  # [d] -> [] in ε-space
        return f((mu + L @ e)[None])[0]

    zero = torch.zeros(d, dtype=DT)
    want = ft(zero)
    for j in (2, 4):
        tensor = ft
        for _ in range(j):
            tensor = jacfwd(tensor)
        T = tensor(zero)  # [d] * j
        wick = sum(
            T[idx]
            for p in isserlis_pairings(j)
            for idx in itertools.product(range(d), repeat=j)
            if all(idx[a] == idx[b] for a, b in p)
        )
        want = want + wick / math.factorial(j)
    got = TaylorCV(f, 4, mean=mu, scale_tril=L).expectation()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@given(d=dims, k=orders, seed=seeds)
def test_polynomial_plus_remainder_is_f(d: int, k: int, seed: int) -> None:
    mu, L, eps, g = setup(d, seed)
    f = smooth(d, g)
    cv = TaylorCV(f, k, mean=mu, scale_tril=L)
    torch.testing.assert_close(cv.polynomial(eps) + cv.remainder(eps), f(mu + eps @ L.T))


@given(d=dims, k=orders, seed=seeds, num_probes=st.integers(1, 3))
def test_probe_minus_exact_depends_only_on_probes(
    d: int, k: int, seed: int, num_probes: int
) -> None:
    """cv_probe − cv_exact = E_even − probe_even(ε′): the same for any ε given the probes."""
    mu, L, eps, g = setup(d, seed)
    other = torch.randn(eps.shape, generator=g, dtype=DT)
    probes = torch.randn(num_probes, *eps.shape, generator=g, dtype=DT)
    f = smooth(d, g)
    exact = TaylorCV(f, k, mean=mu, scale_tril=L)
    probe = TaylorCV(f, k, mean=mu, scale_tril=L, expectation="probe", num_probes=num_probes)
    diff1 = probe(eps, probe_noise=probes) - exact(eps)
    diff2 = probe(other, probe_noise=probes) - exact(other)
    torch.testing.assert_close(diff1, diff2, rtol=1e-10, atol=1e-12)
    if k < 2:
        assert bool((diff1 == 0).all())  # nothing is estimated below order 2
