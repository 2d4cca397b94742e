"""TaylorCV: exact polynomials, Isserlis means by both routes, unbiasedness, remainder, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from varred.errors import VarRedError
from varred.gaussian import double_factorial, gaussian_polynomial_expectation
from varred.taylor import TaylorCV, iterated_laplacian, taylor_terms

DT = torch.float64
ROUTES = ["cubature", "laplacian"]


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=DT)


def mean_and_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output sample mean and its standard error over the first dimension."""
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


def gaussian_params(generator: torch.Generator, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean ``[d]`` and a lower-triangular scale ``[d, d]`` with positive diagonal."""
    mu = 0.3 * randn(generator, d)
    L = torch.tril(0.3 * randn(generator, d, d), -1) + torch.diag(
        0.5 + torch.rand(d, generator=generator, dtype=DT)
    )
    return mu, L


def exp_taylor_mean(s2: float, k: int) -> float:
    """``E[T^k exp](0)`` for ``exp(aᵀε)``: ``Σ_{even j≤k} |a|^j (j − 1)!! / j!`` with ``s2 = |a|²``."""
    return sum(
        s2 ** (j // 2) * double_factorial(j - 1) / math.factorial(j) for j in range(0, k + 1, 2)
    )


def test_taylor_terms_exp_closed_form(generator: torch.Generator) -> None:
    a, x0, v = randn(generator, 3), randn(generator, 4, 3), randn(generator, 4, 3)
    terms = taylor_terms(lambda x: torch.exp(x @ a), x0, v, 4)
    for j, t in enumerate(terms):
        torch.testing.assert_close(t, torch.exp(x0 @ a) * (v @ a) ** j)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("k", range(6))
def test_exact_mean_exp_closed_form(generator: torch.Generator, route: str, k: int) -> None:
    """E[T^k f̃] for f = exp(aᵀx), x = μ + Lε: exp(aᵀμ) Σ_{even j} |Lᵀa|^j (j−1)!!/j!."""
    d = 3
    a = randn(generator, d)
    mu, L = gaussian_params(generator, d)
    cv = TaylorCV(lambda x: torch.exp(x @ a), k, mean=mu, scale_tril=L, exact_method=route)
    want = math.exp(float(a @ mu)) * exp_taylor_mean(float(((L.T @ a) ** 2).sum()), k)
    assert float(cv.expectation()) == pytest.approx(want, rel=1e-12)


def polynomial_f(
    generator: torch.Generator, d: int, k: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """A random polynomial ``[n, d] -> [n, 2]`` of total degree exactly ``k`` (parameters returned)."""
    w = randn(generator, k + 1, k, d)  # per degree j: j linear forms
    c = randn(generator, 2)

    def f(x: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, 2]
        out = torch.zeros(x.shape[0], dtype=x.dtype) + c[0]
        for j in range(1, k + 1):
            forms = x @ w[j, :j].T  # [n, j]: a product of j linear forms
            term = forms[:, 0]
            for t in range(1, j):
                term = term * forms[:, t]
            out = out + term
        return torch.stack([out, c[1] + x[:, 0] ** k], dim=1)

    return f, w


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("k", range(5))
def test_polynomial_of_degree_k_is_removed_exactly(
    generator: torch.Generator, route: str, k: int
) -> None:
    """Degree ≤ k: remainder ≡ 0 and f − cv ≡ E f (zero variance with β = 1)."""
    d, n = 3, 50
    f, _ = polynomial_f(generator, d, k)
    mu, L = gaussian_params(generator, d)
    cv = TaylorCV(f, k, mean=mu, scale_tril=L, exact_method=route)
    eps = randn(generator, n, d)
    fx = f(mu + eps @ L.T)  # [n, 2]
    scale = float(fx.abs().max())
    torch.testing.assert_close(cv.remainder(eps), torch.zeros_like(fx), rtol=0, atol=1e-12 * scale)
    exact = gaussian_polynomial_expectation(lambda e: f(mu + e @ L.T), d, k)  # [2]
    torch.testing.assert_close(cv.expectation(), exact, rtol=1e-11, atol=1e-12 * scale)
    controlled = fx - cv(eps)
    torch.testing.assert_close(controlled, exact.expand(n, 2), rtol=1e-11, atol=1e-11 * scale)


@pytest.mark.parametrize("k", range(5))
def test_remainder_scales_like_h_to_the_k_plus_1(generator: torch.Generator, k: int) -> None:
    """log|R^k(h v)| against log h has slope k + 1.

    f = exp(aᵀx) + 0.5 sin(bᵀx) with |a| = 1, |b| = 0.3 and v = ±a: the leading
    coefficient e^{aᵀμ}(±1)^{k+1} + 0.5 sin^{(k+1)}(bᵀμ)(bᵀv)^{k+1} is bounded away
    from zero, and h ranges over a decade where R ≥ 1e-10 (far above round-off).
    """
    d = 3
    a, b = randn(generator, d), randn(generator, d)
    a, b = a / a.norm(), 0.3 * b / b.norm()
    mu = 0.2 * randn(generator, d)
    cv = TaylorCV(lambda x: torch.exp(x @ a) + 0.5 * torch.sin(x @ b), k, mean=mu)
    v = torch.stack([a, -a])  # [2, d]
    h_min = max(1e-3, 10 ** (-8 / (k + 1)))
    hs = np.geomspace(h_min, 10 * h_min, 8)
    rem = np.stack([cv.remainder(h * v).abs().numpy() for h in hs])  # [H, 2]
    for col in range(rem.shape[1]):
        slope = np.polyfit(np.log(hs), np.log(rem[:, col]), 1)[0]
        assert abs(slope - (k + 1)) < 0.2, (col, slope)


def closed_form_cases(
    generator: torch.Generator, d: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f, E f) pairs with x = μ + Lε: exp, sin, cos of aᵀx and a quadratic Gaussian moment."""
    a = 0.5 * randn(generator, d)
    mu, L = gaussian_params(generator, d)
    m, s2 = float(a @ mu), float(((L.T @ a) ** 2).sum())
    cov = L @ L.T

    def f(x: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, 4]
        t = x @ a
        return torch.stack([torch.exp(t), torch.sin(t), torch.cos(t), x[:, 0] * x[:, -1]], dim=1)

    want = torch.tensor(
        [
            math.exp(m + s2 / 2),
            math.sin(m) * math.exp(-s2 / 2),
            math.cos(m) * math.exp(-s2 / 2),
            float(cov[0, -1] + mu[0] * mu[-1]),
        ],
        dtype=DT,
    )
    return f, mu, L, want


UNBIASED_CASES = [
    (expectation, probes, k)
    for expectation, probes in [
        ("exact", "gaussian"),
        ("probe", "gaussian"),
        ("probe", "rademacher"),
    ]
    for k in range(4 if probes == "rademacher" else 5)  # rademacher refused at order 4
]


@pytest.mark.parametrize(("expectation", "probes", "k"), UNBIASED_CASES)
def test_unbiased_against_closed_forms(
    generator: torch.Generator, expectation: str, probes: str, k: int
) -> None:
    """E[cv] = 0 and E[f − cv] = E f within 5 SE (exact and probe means, with μ and L)."""
    d, n = 3, 4000
    f, mu, L, want = closed_form_cases(generator, d)
    cv = TaylorCV(
        f,
        k,
        mean=mu,
        scale_tril=L,
        expectation=expectation,
        num_probes=2,
        probe_distribution=probes,
    )
    eps = randn(generator, n, d)
    c = cv(eps, generator=generator)
    if k == 0:  # T⁰f̃ = f(μ) is its own mean: the control is exactly 0, not just mean zero
        assert torch.equal(c, torch.zeros_like(c))
    else:
        m, se = mean_and_se(c)
        assert bool(se.min() > 0) and bool((m.abs() < 5 * se).all()), (m, se)
    m, se = mean_and_se(f(mu + eps @ L.T) - c)
    assert bool(((m - want).abs() < 5 * se + 1e-14).all()), (m, want, se)


@pytest.mark.parametrize("probes", ["gaussian", "rademacher"])
def test_probe_and_exact_means_agree(generator: torch.Generator, probes: str) -> None:
    """cv_probe − cv_exact = E_even − probe_even: zero mean (5 SE), independent of ε."""
    d, n, k = 4, 4000, 3 if probes == "rademacher" else 4
    a = randn(generator, d)
    f = lambda x: torch.exp(0.5 * x @ a) + (x**2).sum(1) * torch.tanh(x[:, 0])  # noqa: E731
    exact = TaylorCV(f, k)
    probe = TaylorCV(f, k, mean_method="probe", num_probes=3, probe_distribution=probes)
    eps = randn(generator, n, d)
    diff = probe(eps, generator=generator) - exact(eps)
    m, se = mean_and_se(diff)
    assert abs(float(m)) < 5 * float(se)
    assert float(se) > 0  # the probe estimate is random


def test_odd_orders_are_never_probed(generator: torch.Generator) -> None:
    """For an odd polynomial the probe CV equals the exact CV bit for bit: no probe noise added."""
    d, n = 3, 6
    a, b = randn(generator, d), randn(generator, d)
    f = lambda x: (x @ a) ** 3 + x @ b  # noqa: E731
    eps = randn(generator, n, d)
    probe = TaylorCV(f, 3, mean_method="probe", num_probes=2)(eps, generator=generator)
    torch.testing.assert_close(probe, TaylorCV(f, 3)(eps), rtol=1e-13, atol=1e-13)


def test_rademacher_is_biased_at_order_four(generator: torch.Generator) -> None:
    """Why order 4 refuses Rademacher probes: for f = (aᵀx)⁴, a = 1, the probe mean of
    the order-4 term is E(aᵀz)⁴ = 3|a|⁴ − 2Σa_i⁴ = 21 instead of 3|a|⁴ = 27."""
    d, n = 3, 4000
    f = lambda x: x.sum(1) ** 4  # noqa: E731
    with pytest.raises(VarRedError, match="rademacher"):
        TaylorCV(f, 4, expectation="probe", probe_distribution="rademacher")
    signs = 2.0 * torch.randint(0, 2, (1, n, d), generator=generator).to(DT) - 1
    eps = randn(generator, n, d)
    diff = TaylorCV(f, 4, expectation="probe")(eps, probe_noise=signs) - TaylorCV(f, 4)(eps)
    m, se = mean_and_se(diff)  # E[diff] = E_gauss − E_rademacher = 27 − 21
    assert abs(float(m) - 6.0) < 5 * float(se)
    assert abs(float(m)) > 5 * float(se)


def test_routes_agree_and_auto_choice(generator: torch.Generator) -> None:
    d = 4
    w = randn(generator, d)
    f = lambda x: torch.sin(x @ w) * torch.exp(0.3 * x[:, 0]) + x[:, 1] ** 6  # noqa: E731
    mu, L = gaussian_params(generator, d)
    for k in range(6):
        got = [TaylorCV(f, k, mean=mu, scale_tril=L, exact_method=r).expectation() for r in ROUTES]
        torch.testing.assert_close(got[0], got[1], rtol=1e-11, atol=1e-12)
    assert TaylorCV(f, 2).exact_route(2) == "laplacian"  # 2 rows (depth 2) vs 2^2 nodes (depth 2)
    assert TaylorCV(f, 2).exact_route(1) == "laplacian"
    assert TaylorCV(f, 2, exact_method="cubature").exact_route(3) == "cubature"
    assert TaylorCV(f, 2).exact_route(10_000) == "laplacian"
    with pytest.raises(VarRedError, match="probe"):
        TaylorCV(f, 4).exact_route(1000)  # 500,500 rows
    with pytest.raises(VarRedError, match="probe"):
        TaylorCV(f, 4, exact_method="cubature").exact_route(20)


def test_iterated_laplacian_closed_form() -> None:
    """Δ^m Σ x_i^{2m} = (2m)! d and Δ² of |x|⁴ = 8 d (d + 2) at 0."""
    d = 5
    zero = torch.zeros(d, dtype=DT)
    for m in range(4):
        got = iterated_laplacian(lambda x, m=m: (x ** (2 * m)).sum(1), zero, m, chunk_size=3)
        assert float(got) == pytest.approx(math.factorial(2 * m) * d, rel=1e-12)
    got = iterated_laplacian(lambda x: (x**2).sum(1) ** 2, zero, 2)
    assert float(got) == pytest.approx(8 * d * (d + 2), rel=1e-12)


def test_shapes_and_gradients_flow(generator: torch.Generator) -> None:
    """Vector outputs keep their shape; the mean is recomputed and differentiable in θ."""
    d, n = 3, 7
    a = randn(generator, d).requires_grad_(True)
    B = randn(generator, 2, 5)
    f = lambda x: torch.exp(x @ a)[:, None, None] * B  # noqa: E731  [n, d] -> [n, 2, 5]
    eps = randn(generator, n, d)
    for expectation in ("exact", "probe"):
        cv = TaylorCV(f, 3, expectation=expectation)
        assert cv(eps, generator=generator).shape == (n, 2, 5)
    cv = TaylorCV(lambda x: torch.exp(x @ a), 2)
    (g,) = torch.autograd.grad(cv.expectation(d=d), a)
    torch.testing.assert_close(g, a.detach())  # d/da (1 + |a|²/2)
    with torch.no_grad():
        a.mul_(2.0)
    assert float(cv.expectation(d=d).detach()) == pytest.approx(
        1 + float((a.detach() ** 2).sum()) / 2, rel=1e-12
    )
    cv(eps).sum().backward()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


def test_probe_noise_reproduces_generator(generator: torch.Generator, seed: int) -> None:
    d, n = 3, 5
    f = lambda x: torch.exp(x.sum(1))  # noqa: E731
    cv = TaylorCV(f, 2, expectation="probe", num_probes=4)
    eps = randn(generator, n, d)
    probes = torch.randn(4, n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)
    torch.testing.assert_close(
        cv(eps, generator=torch.Generator().manual_seed(seed)), cv(eps, probe_noise=probes)
    )
    # order ≤ 1 needs no probes: exact, deterministic
    torch.testing.assert_close(TaylorCV(f, 1, expectation="probe")(eps), TaylorCV(f, 1)(eps))


def _bad_numpy(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.exp(x.detach().numpy())).sum(1)


@pytest.mark.parametrize(
    ("f", "match"),
    [
        (lambda x: x.detach().sum(1), "differentiabl"),
        (_bad_numpy, "differentiabl"),
        (lambda x: x.sum(), "f: expected an output of shape"),
        (lambda x: x.sum(1)[:-1], "f: expected an output of shape"),
        (lambda x: 3.0, "torch.Tensor"),
    ],
)
def test_errors_on_bad_f(generator: torch.Generator, f: object, match: str) -> None:
    with pytest.raises(VarRedError, match=match):
        TaylorCV(f, 2)(randn(generator, 4, 3))  # type: ignore[arg-type]


def test_jvp_failure_is_reraised(generator: torch.Generator) -> None:
    """A function that passes the reverse-mode check but breaks under forward AD."""

    def f(x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return torch.from_numpy(x.numpy()).sum(1)  # torch raises inside jvp
        return x.sum(1)

    with pytest.raises(VarRedError, match="jvp") as info:
        TaylorCV(f, 2)(randn(generator, 4, 3))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_errors_on_bad_arguments(generator: torch.Generator) -> None:
    f = lambda x: x.sum(1)  # noqa: E731
    for order in (-1, 1.0, True, "2"):
        with pytest.raises(VarRedError, match="order"):
            TaylorCV(f, order)  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match="expectation"):
        TaylorCV(f, 2, expectation="mc")
    with pytest.raises(VarRedError, match="probe_distribution"):
        TaylorCV(f, 2, probe_distribution="uniform")
    with pytest.raises(VarRedError, match="exact_method"):
        TaylorCV(f, 2, exact_method="tensor")
    with pytest.raises(VarRedError, match="num_probes"):
        TaylorCV(f, 2, num_probes=0)
    with pytest.raises(VarRedError, match="f"):
        TaylorCV(3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match=r"mean: expected shape \[d\]"):
        TaylorCV(f, 2, mean=torch.zeros(2, 3, dtype=DT))
    with pytest.raises(VarRedError, match="scale_tril"):
        TaylorCV(f, 2, scale_tril=torch.eye(3, 2, dtype=DT))
    with pytest.raises(VarRedError, match="scale_tril"):
        TaylorCV(f, 2, mean=torch.zeros(2, dtype=DT), scale_tril=torch.eye(3, dtype=DT))
    cv = TaylorCV(f, 2, mean=torch.zeros(3, dtype=DT))
    with pytest.raises(VarRedError, match=r"eps: expected shape \[n, d\], got \[4\]"):
        cv(torch.zeros(4, dtype=DT))
    with pytest.raises(VarRedError, match=r"eps: expected shape \[n, 3\].*got \[4, 2\]"):
        cv(torch.zeros(4, 2, dtype=DT))
    with pytest.raises(VarRedError, match="eps: expected a floating"):
        cv(torch.zeros(4, 3, dtype=torch.long))
    bad = torch.zeros(4, 3, dtype=DT)
    bad[1, 2] = float("nan")
    with pytest.raises(VarRedError, match="eps: expected finite"):
        cv(bad)
    with pytest.raises(VarRedError, match="d: expected 3"):
        cv.expectation(d=4)
    with pytest.raises(VarRedError, match="d: expected the dimension"):
        TaylorCV(f, 2).expectation()
    probe = TaylorCV(f, 2, expectation="probe", num_probes=2)
    with pytest.raises(VarRedError, match="generator"):
        probe(torch.zeros(4, 3, dtype=DT))
    with pytest.raises(VarRedError, match=r"probe_noise: expected shape \[2, 4, 3\]"):
        probe(torch.zeros(4, 3, dtype=DT), probe_noise=torch.zeros(1, 4, 3, dtype=DT))
