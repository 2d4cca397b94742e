"""DSM loss: naive formula, closed-form expectation, small σ in float32, autocast, errors."""

from __future__ import annotations

import math

import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.losses import dsm_loss, perturb
from varred_diffusion.models import MLPScore


def _net(generator: torch.Generator) -> MLPScore:
    return MLPScore(3, width=16, depth=2, generator=generator).double()


def test_equals_naive_formula(generator: torch.Generator) -> None:
    net = _net(generator)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    sigma = torch.rand(8, generator=generator, dtype=torch.float64) + 0.05
    naive = sigma**2 * ((net(x + sigma[:, None] * eps, sigma) + eps / sigma[:, None]) ** 2).sum(1)
    assert torch.allclose(dsm_loss(net, x, sigma, eps), naive, rtol=1e-12, atol=0)
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731
    naive_w = lam(sigma) * ((net(x + sigma[:, None] * eps, sigma) + eps / sigma[:, None]) ** 2).sum(
        1
    )
    assert torch.allclose(dsm_loss(net, x, sigma, eps, weighting=lam), naive_w, rtol=1e-12, atol=0)
    # VP: α x + σ ε
    alpha = torch.sqrt(1 - (sigma / 2) ** 2)
    xt = alpha[:, None] * x + (sigma / 2)[:, None] * eps
    naive_vp = (sigma / 2) ** 2 * ((net(xt, sigma / 2) + eps / (sigma / 2)[:, None]) ** 2).sum(1)
    assert torch.allclose(
        dsm_loss(net, x, sigma / 2, eps, alpha=alpha), naive_vp, rtol=1e-12, atol=0
    )


def test_zero_score_gives_noise_norm_exactly(generator: torch.Generator) -> None:
    x = torch.randn(5, 2, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=generator, dtype=torch.float64)
    loss = dsm_loss(lambda xt, s: torch.zeros_like(xt), x, 0.3, eps)
    assert torch.equal(loss, (eps**2).flatten(1).sum(1))


def test_expectation_for_true_gaussian_score(generator: torch.Generator) -> None:
    # x ~ N(0, s² I_d), true score of x_t: −x_t/(s²+σ²); E ℓ = d s²/(s²+σ²)
    n, d, s, sigma = 40000, 3, 0.7, 0.4
    x = s * torch.randn(n, d, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, d, generator=generator, dtype=torch.float64)
    loss = dsm_loss(lambda xt, sg: -xt / (s**2 + sg[:, None] ** 2), x, sigma, eps)
    want = d * s**2 / (s**2 + sigma**2)
    assert abs(float(loss.mean()) - want) < 5 * float(loss.std()) / math.sqrt(n)


def test_score_kwargs_passed_through(generator: torch.Generator) -> None:
    x = torch.zeros(3, 2, dtype=torch.float64)
    eps = torch.ones(3, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    seen = {}

    def fn(xt: torch.Tensor, s: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        seen["y"] = y
        return torch.zeros_like(xt)

    dsm_loss(fn, x, 1.0, eps, score_kwargs={"y": labels})
    assert seen["y"] is labels


def test_small_sigma_float32(generator: torch.Generator) -> None:
    net = MLPScore(3, width=16, depth=2, generator=generator)
    x = torch.randn(16, 3, generator=generator)
    eps = torch.randn(16, 3, generator=generator)
    sigma = torch.full((16,), 1e-4)
    loss32 = dsm_loss(net, x, sigma, eps)
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32).all()
    loss64 = dsm_loss(net.double(), x.double(), sigma.double(), eps.double())
    assert torch.allclose(loss32.double(), loss64, rtol=1e-4, atol=0)
    lw = dsm_loss(net.float(), x, sigma, eps, weighting=lambda s: torch.ones_like(s))
    assert torch.isfinite(lw).all()


def test_autocast_norm_in_float32(generator: torch.Generator) -> None:
    net = MLPScore(3, width=16, depth=2, generator=generator)
    x = torch.randn(8, 3, generator=generator)
    eps = torch.randn(8, 3, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dsm_loss(net, x, torch.full((8,), 1e-3), eps)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_perturb() -> None:
    x = torch.ones(2, 3, dtype=torch.float64)
    e = torch.full((2, 3), 2.0, dtype=torch.float64)
    s = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.equal(perturb(x, s, e), torch.tensor([[2.0] * 3, [3.0] * 3], dtype=torch.float64))
    assert torch.equal(
        perturb(x, s, e, alpha=0.5), torch.tensor([[1.5] * 3, [2.5] * 3], dtype=torch.float64)
    )


def test_errors() -> None:
    x = torch.zeros(4, 2)
    e = torch.zeros(4, 2)
    zero = lambda xt, s: torch.zeros_like(xt)  # noqa: E731
    with pytest.raises(VarRedError, match="sigma"):
        dsm_loss(zero, x, torch.tensor([1.0, 1.0, 0.0, 1.0]), e)
    with pytest.raises(VarRedError, match="sigma"):
        dsm_loss(zero, x, -1.0, e)
    with pytest.raises(VarRedError, match=r"sigma: expected shape \[4\]"):
        dsm_loss(zero, x, torch.ones(4, 1), e)
    with pytest.raises(VarRedError, match="sigma"):
        dsm_loss(zero, x, torch.tensor([1.0, float("nan"), 1.0, 1.0]), e)
    with pytest.raises(VarRedError, match="x"):
        dsm_loss(zero, torch.full((4, 2), float("inf")), 1.0, e)
    with pytest.raises(VarRedError, match="noise"):
        dsm_loss(zero, x, 1.0, torch.zeros(4, 3))
    with pytest.raises(VarRedError, match="score_fn"):
        dsm_loss(lambda xt, s: xt[:, :1], x, 1.0, e)
    with pytest.raises(VarRedError, match="x"):
        dsm_loss(zero, torch.zeros(4, 2, dtype=torch.long), 1.0, e)
    with pytest.raises(VarRedError, match="weighting"):
        dsm_loss(zero, x, 1.0, e, weighting=lambda s: s[:2])


def test_weighting_contract_shared_with_the_taylor_cv() -> None:
    """Issue 15 defect 2: ``dsm_loss`` takes λ as a float, a ``[B]`` tensor or a callable
    returning a float or a tensor, as ``dsm_taylor_cv`` does; anything else is refused."""
    import varred_diffusion as vd
    from varred import VarRedError

    g = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(4, 2, generator=g, dtype=torch.float64),
        torch.randn(4, 2, generator=g, dtype=torch.float64),
    )
    sigma = torch.tensor([0.1, 0.2, 0.5, 1.0], dtype=torch.float64)
    score = lambda xt, s: -xt  # noqa: E731
    plain = vd.dsm_loss(score, x, sigma, eps)  # λ = σ²
    want = 2.0 * plain / sigma**2
    for w in (
        2.0,
        torch.full((4,), 2.0, dtype=torch.float64),
        lambda s: 2.0,
        lambda s: torch.tensor(2.0),
    ):
        torch.testing.assert_close(vd.dsm_loss(score, x, sigma, eps, weighting=w), want)
    with pytest.raises(VarRedError, match="weighting"):
        vd.dsm_loss(score, x, sigma, eps, weighting="sigma2")
    with pytest.raises(VarRedError, match="weighting"):
        vd.dsm_loss(score, x, sigma, eps, weighting=lambda s: "x")
