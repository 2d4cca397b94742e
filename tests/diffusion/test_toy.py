"""Gaussian-mixture toy data: exact noisy scores, sampling, score error."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred_diffusion.toy import GaussianMixture, asymmetric, ring8, score_error

MIXTURES = {"ring8": ring8, "asymmetric": asymmetric}


@pytest.mark.parametrize("name", list(MIXTURES))
@given(
    log_sigma=st.floats(min_value=-4.0, max_value=1.0),
    alpha=st.floats(min_value=0.05, max_value=1.0),
)
def test_score_is_gradient_of_log_prob(name: str, log_sigma: float, alpha: float) -> None:
    gm = MIXTURES[name]()
    g = torch.Generator().manual_seed(1)
    sigma = torch.full((16,), 10.0**log_sigma, dtype=torch.float64)
    sigma[::2] *= 0.5  # per-sample σ
    x = alpha * gm.sample(16, g) + sigma[:, None] * torch.randn(
        16, 2, generator=g, dtype=torch.float64
    )
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma, alpha).sum(), x)
    score = gm.score(x.detach(), sigma, alpha)
    scale = grad.abs().max().item() + 1.0
    assert torch.allclose(score, grad, rtol=1e-10, atol=1e-10 * scale)


def test_clean_log_prob_matches_scipy_style_formula() -> None:
    # one isotropic component: log N(x; μ, s² I) in closed form
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    gm = GaussianMixture(
        torch.ones(1, dtype=torch.float64), mu, 0.25 * torch.eye(2, dtype=torch.float64)[None]
    )
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    s2 = 0.25 + 0.3**2
    want = -((x - mu) ** 2).sum(-1) / (2 * s2) - math.log(2 * math.pi * s2)
    assert torch.allclose(gm.log_prob(x, 0.3), want, rtol=1e-13, atol=0)
    assert torch.allclose(gm.score(x, 0.3), -(x - mu) / s2, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_expected_score_is_zero(name: str, generator: torch.Generator) -> None:
    gm = MIXTURES[name]()
    n, sigma = 20000, 0.3
    x = gm.sample(n, generator) + sigma * torch.randn(
        n, 2, generator=generator, dtype=torch.float64
    )
    s = gm.score(x, sigma)
    se = s.std(0) / math.sqrt(n)
    assert (s.mean(0).abs() < 5 * se).all()


def test_sample_moments(generator: torch.Generator) -> None:
    gm = asymmetric()
    n = 20000
    x = gm.sample(n, generator)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    # second moment of x_0: E[x0²] vs covariance()[0, 0] + mean²
    m2 = x[:, 0] ** 2
    want = gm.covariance()[0, 0] + mean[0] ** 2
    assert abs(m2.mean() - want) < 5 * m2.std() / math.sqrt(n)


def test_small_sigma_is_finite_and_large_sigma_is_gaussian() -> None:
    gm = ring8()
    x = torch.tensor([[0.0, 0.0], [50.0, -50.0]], dtype=torch.float64)
    assert torch.isfinite(gm.score(x, 1e-4)).all()
    # σ → ∞: the score tends to −x/σ² (up to O(‖μ‖/σ²) terms)
    big = 1e4
    assert torch.allclose(gm.score(x, big) * big**2, -x, atol=3.0)


def test_score_error_of_true_score_is_zero(generator: torch.Generator) -> None:
    gm = ring8()
    res = score_error(lambda x, s: gm.score(x, s), gm, 64, 0.2, generator)
    assert float(res.mean) == pytest.approx(0.0, abs=1e-24)
    assert res.per_sample.shape == (64,)


def test_score_error_of_zero_score(generator: torch.Generator) -> None:
    # E‖∇log p_σ‖² for a single N(0, s² I): d/(s²+σ²)
    gm = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        torch.eye(2, dtype=torch.float64)[None],
    )
    res = score_error(
        lambda x, s: torch.zeros_like(x),
        gm,
        20000,
        torch.tensor(0.5, dtype=torch.float64),
        generator,
    )
    assert abs(float(res.mean) - 2 / 1.25) < 5 * float(res.stderr)


def test_errors() -> None:
    gm = ring8()
    with pytest.raises(VarRedError, match="x"):
        gm.score(torch.zeros(3, 3, dtype=torch.float64), 0.1)
    with pytest.raises(VarRedError, match="sigma"):
        gm.score(torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(VarRedError, match="covariances"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.eye(2)[None])
    with pytest.raises(VarRedError, match="weights"):
        GaussianMixture(-torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(VarRedError, match="sigma"):
        score_error(lambda x, s: x, gm, 4, 0.0, torch.Generator().manual_seed(0))
