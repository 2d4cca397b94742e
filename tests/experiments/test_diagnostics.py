"""Variance-ratio harness (varred_diffusion.diagnostics): analytic truths and the toy claim."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from varred_diffusion.diagnostics import (
    GradientMoments,
    controlled_variance,
    efficiency,
    fit_coefficients,
    gradient_variance_ratio,
    per_sample_gradients,
    unit_gradients,
    variance_ratio_by_sigma,
)
from varred_diffusion.models import MLPScore
from varred_diffusion.toy import ring8


def _direct_var(y: torch.Tensor) -> float:
    return float(y.var(0, unbiased=True).sum())


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(3, 20))
def test_streaming_variance_equals_direct(s, nb, n):
    g0 = torch.Generator().manual_seed(s)
    g = torch.randn(n, 5, generator=g0, dtype=torch.float64)
    h = torch.randn(n, nb, 5, generator=g0, dtype=torch.float64) + 0.5 * g[:, None]
    beta = torch.randn(nb, 5, generator=g0, dtype=torch.float64)
    mom = GradientMoments(5, nb)
    mom.update(g[:2], h[:2])
    mom.update(g[2:], h[2:])
    direct = _direct_var(g - (beta * h).sum(1))
    assert abs(controlled_variance(mom, beta) - direct) <= 1e-10 * max(1.0, direct)
    assert abs(controlled_variance(mom) - _direct_var(g)) <= 1e-10 * max(1.0, _direct_var(g))


def test_fitted_coefficients_match_regressions(generator):
    n = 200
    g = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    h = (2.0 * g + 0.1 * torch.randn(n, 4, generator=generator, dtype=torch.float64))[:, None]
    mom = GradientMoments(4, 1)
    mom.update(g, h)
    betas = fit_coefficients(mom, ("unit", "scalar", "element", "bin"))
    gc, hc = g - g.mean(0), h[:, 0] - h[:, 0].mean(0)
    torch.testing.assert_close(betas["element"][0], (gc * hc).sum(0) / (hc * hc).sum(0))
    torch.testing.assert_close(betas["scalar"][0, 0], (gc * hc).sum() / (hc * hc).sum())
    torch.testing.assert_close(betas["bin"], betas["element"])  # one bin: same regression
    assert torch.equal(betas["unit"], torch.ones(1, 4, dtype=torch.float64))
    # the fitted β minimises the in-sample variance
    best = controlled_variance(mom, betas["element"])
    assert best <= controlled_variance(mom, betas["element"] * 1.01)
    assert best <= controlled_variance(mom, betas["element"] * 0.99)


def test_zero_control_gives_zero_beta(generator):
    mom = GradientMoments(3, 2)
    mom.update(torch.randn(10, 3, generator=generator, dtype=torch.float64), torch.zeros(10, 2, 3))
    for kind, beta in fit_coefficients(mom, ("scalar", "element", "bin")).items():
        assert torch.equal(beta, torch.zeros_like(beta)), kind


def _mlp(generator: torch.Generator) -> MLPScore:
    return MLPScore(2, width=16, depth=2, generator=generator).double()


def _draw(sigma: float):
    mix = ring8()

    def draw(n, g):
        x = mix.sample(n, g)
        return (
            x,
            torch.full((n,), sigma, dtype=x.dtype),
            torch.randn(n, 2, generator=g, dtype=x.dtype),
        )

    return draw


def _loss(score_fn, x, s, e):
    return ((s[:, None] * score_fn(x + s[:, None] * e, s) + e) ** 2).sum(-1)


def test_per_sample_gradients_vmap_equals_batched(generator):
    model = _mlp(generator)
    x, s, e = _draw(0.1)(6, generator)
    a = per_sample_gradients(model, _loss, x, s, e, method="vmap")
    b = per_sample_gradients(model, _loss, x, s, e, method="batched")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    for i in range(6):
        gi, _ = unit_gradients(
            _loss(lambda u, v: model(u, v), x[i : i + 1], s[i : i + 1], e[i : i + 1]), None, params
        )
        torch.testing.assert_close(gi, a[i], rtol=1e-10, atol=1e-12)


def test_control_equal_to_loss_gives_zero_variance(generator):
    """Analytic truth: a control whose gradient equals the loss gradient removes all variance."""
    model = _mlp(generator)
    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=_loss, num_fit=8, num_eval=8)  # fmt: skip
    assert vr.ratio["unit"] < 1e-20
    assert abs(vr.beta_summary["scalar"] - 1.0) < 1e-12


def test_zero_control_gives_ratio_one(generator):
    model = _mlp(generator)

    def zero(score_fn, x, s, e):
        return 0.0 * score_fn(x, s).sum(-1)

    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=zero, num_fit=8, num_eval=8)  # fmt: skip
    assert vr.ratio["scalar"] == 1.0 and vr.ratio["element"] == 1.0


def test_toy_c0_sigma_001_per_element_at_init(generator):
    """The paper's toy claim: at σ = 0.01, C^0 with per-element β removes > 99% of the variance."""
    model = MLPScore(2, width=64, depth=3, generator=generator).double()
    vr = gradient_variance_ratio(model, _draw(0.01), order=0, generator=generator,
                                 num_fit=128, num_eval=128, kinds=("element",))  # fmt: skip
    assert vr.ratio["element"] < 1e-2


def test_efficiency():
    assert efficiency(1.0, 1.0, 0.25, 2.0) == 2.0


def test_c0_ratio_by_sigma_small_at_small_sigma(generator):
    """k = 0 removes the σ^{-1} noise term: the ratio is far below 1 at σ ≤ 0.1 (at init)."""
    model = MLPScore(2, width=32, depth=2, generator=generator).double()
    mix = ring8()
    out = variance_ratio_by_sigma(model, mix.sample, [1e-3, 1e-1], generator=generator,
                                  num_fit=64, num_eval=64, kinds=("unit", "element"))  # fmt: skip
    assert set(out) == {1e-3, 1e-1}
    for vr in out.values():
        assert vr.ratio["unit"] < 0.1 and vr.num_eval == 64
