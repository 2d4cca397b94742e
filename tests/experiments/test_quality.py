"""Fréchet distance, validation loss and the Heun sampler (varred_diffusion.experiments)."""

from __future__ import annotations

import math

import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    trace_sqrt_product,
)
from varred_diffusion.experiments.heun import edm_sigma_steps, heun_sample
from varred_diffusion.experiments.validation import ValidationSet, validation_loss
from varred_diffusion.losses import dsm_loss
from varred_diffusion.models import MLPScore


def _random_cov(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_of_a_set_with_itself_is_zero(generator):
    f = torch.randn(500, 16, generator=generator, dtype=torch.float64) @ _random_cov(16, generator)
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)
    s = feature_statistics(f)
    assert frechet_distance(s.mean, s.cov, s.mean, s.cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_closed_form_commuting_and_general(generator):
    d = 6
    # Diagonal covariances: tr sqrt(Σ1 Σ2) = Σ sqrt(a_i b_i) exactly.
    a = torch.rand(d, generator=generator, dtype=torch.float64) + 0.1
    b = torch.rand(d, generator=generator, dtype=torch.float64) + 0.1
    m1, m2 = (
        torch.randn(d, generator=generator, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
    )
    want = float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-10)
    # General Σ1, Σ2: against the matrix square root computed by scipy.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    c1, c2 = _random_cov(d, generator), _random_cov(d, generator)
    ref = float(scipy_linalg.sqrtm((c1 @ c2).numpy()).real.trace())
    assert float(trace_sqrt_product(c1, c2)) == pytest.approx(ref, rel=1e-8)
    want = float((m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * ref)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=1e-8)


def test_frechet_of_gaussian_samples_matches_population(generator):
    # Samples of N(m, I) vs N(0, 4I) in d = 4: population d² = ‖m‖² + d (1 - 2)² = ‖m‖² + 4.
    d, n = 4, 40000
    m = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    f1 = m + torch.randn(n, d, generator=generator, dtype=torch.float64)
    f2 = 2 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    got = frechet_distance_features(f1, f2)
    # d² ≈ ‖Δμ‖² + Σ(σ1-σ2)²: SE from the mean (Var Δμ_k = 5/n, derivative 2Δμ_k) and the
    # covariance terms (≈ 2·sqrt(d)·sqrt(2/n)·(1 + 4)/2); a loose upper bound on the SE.
    se = math.sqrt(4 * float(m @ m) * 5 / n) + 2 * math.sqrt(d) * 5 * math.sqrt(2 / n)
    assert abs(got - (float(m @ m) + 4)) < 5 * se


def test_frechet_bad_input():
    with pytest.raises(VarRedError, match="features"):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(VarRedError, match="cov2"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(VarRedError, match="features2"):
        frechet_distance_features(torch.randn(5, 2), torch.randn(5, 3))


def _vset(seed: int) -> ValidationSet:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return ValidationSet.build(pool, torch.Generator().manual_seed(seed + 1), size=24, num_sigmas=5)


def test_validation_loss_is_deterministic_and_equals_dsm_loss(seed):
    net = MLPScore(3, width=16, depth=2, generator=torch.Generator().manual_seed(seed)).double()
    v1, v2 = _vset(seed), _vset(seed)
    assert torch.equal(v1.noise, v2.noise) and torch.equal(v1.images, v2.images)
    r1 = validation_loss(v1, net, batch_size=7)
    r2 = validation_loss(v2, net, batch_size=24)
    assert r1.per_sigma.shape == (5,)
    torch.testing.assert_close(r1.per_sigma, r2.per_sigma, rtol=1e-12, atol=0)
    assert validation_loss(v1, net, batch_size=7).mean == r1.mean  # bit for bit, same batching
    direct = []
    for j in range(5):
        sig = torch.full((24,), float(v1.sigmas[j]), dtype=torch.float64)
        with torch.no_grad():
            direct.append(dsm_loss(net, v1.images, sig, v1.noise[j]).mean())
    torch.testing.assert_close(r1.per_sigma, torch.stack(direct), rtol=1e-12, atol=0)
    assert r1.mean == pytest.approx(float(torch.stack(direct).mean()), rel=1e-12)
    assert torch.allclose(v1.sigmas, torch.logspace(-2, 1, 5, dtype=torch.float64))
    assert set(r1.as_dict()) == {"val_loss", *(f"val_loss_s{j}" for j in range(5))}


def test_validation_loss_accepts_a_general_loss_fn(seed):
    v = _vset(seed)
    r = validation_loss(v, loss_fn=lambda x, s, e: (x + s[:, None] * e).pow(2).sum(1))
    want = [(v.images + float(s) * v.noise[j]).pow(2).sum(1).mean() for j, s in enumerate(v.sigmas)]
    torch.testing.assert_close(r.per_sigma, torch.stack(want), rtol=1e-12, atol=0)
    with pytest.raises(VarRedError, match="exactly one"):
        validation_loss(v)
    with pytest.raises(VarRedError, match="loss_fn"):
        validation_loss(v, loss_fn=lambda x, s, e: x)


def test_edm_sigma_grid():
    g = edm_sigma_steps(18, 0.002, 80.0)
    assert g.shape == (19,) and g[0] == 80.0 and g[-1] == 0.0
    assert float(g[-2]) == pytest.approx(0.002, rel=1e-12)
    assert bool((g[1:] < g[:-1]).all())
    with pytest.raises(VarRedError, match="steps"):
        edm_sigma_steps(0)
    with pytest.raises(VarRedError, match="sigmas"):
        heun_sample(lambda x, s: x, torch.zeros(2, 1), torch.tensor([1.0, 0.5]))


def test_heun_reproduces_a_gaussian(generator):
    # Data N(m, s² I): VE score at σ is -(x - m)/(s² + σ²). The exact probability-flow map
    # from x_T = σ_max ε is x_0 = m + (x_T - m) s / sqrt(s² + σ_max²), so the samples are
    # N(m (1 - c), s² σ_max² c²/s²) with c = s / sqrt(s² + σ_max²) (the EDM start ignores m).
    m = torch.tensor([2.0, -1.0], dtype=torch.float64)
    s2 = 0.25
    n, smax = 20000, 10.0

    def score(x, sig):
        return -(x - m) / (s2 + sig[:, None] ** 2)

    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = heun_sample(score, eps, edm_sigma_steps(40, 0.01, smax), batch_size=7000)
    c = math.sqrt(s2 / (s2 + smax**2))
    exact = m + (smax * eps - m) * c
    err40 = float((x - exact).abs().max())
    x20 = heun_sample(score, eps[:2000], edm_sigma_steps(20, 0.01, smax))
    err20 = float((x20 - exact[:2000]).abs().max())
    assert err40 < 0.01 and err20 > 3 * float((x[:2000] - exact[:2000]).abs().max())  # 2nd order
    mean_want, var_want = m * (1 - c), smax**2 * c**2
    se_mean = math.sqrt(var_want / n)
    assert ((x.mean(0) - mean_want).abs() < 5 * se_mean).all()
    se_var = var_want * math.sqrt(2 / (n - 1))
    assert ((x.var(0) - var_want).abs() < 5 * se_var).all()
    assert abs(var_want - s2) < 0.01 * s2  # and the data variance up to the prior mismatch
