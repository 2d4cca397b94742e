"""Weightings: Min-SNR-γ against the paper's x0-space definition in every form, EDM, EDM2 u(σ)."""

from __future__ import annotations

import math

import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.adapters import ScoreFromEps, ScoreFromV, ScoreFromX0
from varred_diffusion.flow import RectifiedFlowSchedule, ScoreFromVelocity
from varred_diffusion.losses import dsm_loss
from varred_diffusion.schedules import VESchedule, VPSchedule
from varred_diffusion.weightings import (
    EDMWeighting,
    LearnedUncertainty,
    MinSNRWeighting,
    lambda_from_form_weight,
)

F64 = torch.float64
B, D = 64, 3


class Net(torch.nn.Module):
    """A small nonlinear network ``(x_t, σ) -> [B, D]`` (any parameterisation's output)."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(D + 1, 16, generator=gen, dtype=F64) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(16, D, generator=gen, dtype=F64) / 4)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.cat([x, torch.log(s)[:, None]], 1) @ self.w1)
        return h @ self.w2


def _data(gen: torch.Generator, lo: float, hi: float):
    x = torch.randn(B, D, generator=gen, dtype=F64)
    eps = torch.randn(B, D, generator=gen, dtype=F64)
    sigma = lo + (hi - lo) * torch.rand(B, generator=gen, dtype=F64)
    return x, eps, sigma


def _sq(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).sum(1)


CASES = {  # schedule, σ range, adapter of each form
    "ve": (None, 0.01, 5.0),
    "vp": (VPSchedule("cosine"), 0.02, 0.999),
    "flow": (RectifiedFlowSchedule(), 0.01, 0.99),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_equals_paper_definition_in_every_form(case: str, gamma: float, generator) -> None:
    schedule, lo, hi = CASES[case]
    x, eps, sigma = _data(generator, lo, hi)
    alpha = torch.ones_like(sigma) if schedule is None else schedule.alpha(sigma)
    a, s = alpha[:, None], sigma[:, None]
    xt = a * x + s * eps
    snr = alpha**2 / sigma**2
    clip = torch.minimum(snr, torch.tensor(gamma, dtype=F64))
    weighting = MinSNRWeighting(gamma, schedule)
    net = Net(generator)
    out = net(xt, sigma)

    # x0 form: the paper's definition, min(SNR, γ) ‖x̂0 − x‖²
    paper = clip * _sq(out - x)
    ours = dsm_loss(ScoreFromX0(net, schedule), x, sigma, eps, alpha=alpha, weighting=weighting)
    assert torch.allclose(ours, paper, rtol=1e-10)
    assert torch.allclose(weighting.loss_weight(sigma, "sample"), clip, rtol=1e-12)

    # ε form: the implied x̂0 = (x_t − σ ε̂)/α under the paper's definition = min/SNR ‖ε̂ − ε‖²
    paper = clip * _sq((xt - s * out) / a - x)
    direct = clip / snr * _sq(out - eps)
    ours = dsm_loss(ScoreFromEps(net, schedule), x, sigma, eps, alpha=alpha, weighting=weighting)
    assert torch.allclose(direct, paper, rtol=1e-10)
    assert torch.allclose(ours, paper, rtol=1e-10)
    assert torch.allclose(weighting.loss_weight(sigma, "epsilon"), clip / snr, rtol=1e-12)

    # v form: VP v-prediction (x̂0 = α x_t − σ v̂) or flow velocity (x̂0 = x_t − t v̂)
    if case == "vp":
        x0_hat, v_true, adapter = a * xt - s * out, a * eps - s * x, ScoreFromV(net, schedule)
        form_weight = clip / (snr + 1)  # the paper's v-form weight
    elif case == "flow":
        x0_hat, v_true, adapter = xt - s * out, eps - x, ScoreFromVelocity(net)
        form_weight = clip * sigma**2
    else:
        return
    paper = clip * _sq(x0_hat - x)
    direct = form_weight * _sq(out - v_true)
    ours = dsm_loss(adapter, x, sigma, eps, alpha=alpha, weighting=weighting)
    assert torch.allclose(direct, paper, rtol=1e-10)
    assert torch.allclose(ours, paper, rtol=1e-10)
    assert torch.allclose(weighting.loss_weight(sigma, "v_prediction"), form_weight, rtol=1e-12)
    # the ε-form weight put on the v-MSE is a different objective (larger by 1/α²)
    slip = clip / snr * _sq(out - v_true)
    assert torch.allclose(slip, paper / alpha**2, rtol=1e-10)
    assert not torch.allclose(slip, paper, rtol=1e-3)


def test_min_snr_values_and_form_conversion() -> None:
    w = MinSNRWeighting(5.0)
    s = torch.tensor([0.1, 1.0, 3.0], dtype=F64)  # VE: SNR = 100, 1, 1/9
    assert torch.allclose(w(s), torch.tensor([0.01 * 5 / 100, 1.0, 9.0], dtype=F64), rtol=1e-14)
    alpha = torch.tensor([0.8, 0.6, 0.3], dtype=F64)
    for form in ("epsilon", "sample", "v_prediction"):
        sch = VPSchedule("cosine")
        sig = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
        mw = MinSNRWeighting(2.0, sch)
        lam = lambda_from_form_weight(mw.loss_weight(sig, form), sig, sch.alpha(sig), form)
        assert torch.allclose(lam, mw(sig), rtol=1e-12)
    with pytest.raises(VarRedError, match="prediction"):
        lambda_from_form_weight(s, s, alpha, "x0")


@pytest.mark.parametrize("schedule", [None, VPSchedule("linear")])
def test_edm_weighting_equals_edm_loss(schedule, generator) -> None:
    x, eps, sigma = _data(generator, 0.02, 0.99 if schedule else 20.0)
    alpha = torch.ones_like(sigma) if schedule is None else schedule.alpha(sigma)
    net = Net(generator)
    xt = alpha[:, None] * x + sigma[:, None] * eps
    st = sigma / alpha  # VE-equivalent σ̃
    lam_edm = (st**2 + 0.25) / (st * 0.5) ** 2
    paper = lam_edm * _sq(net(xt, sigma) - x)  # EDM Eq. 8 with D = the x0 output
    w = EDMWeighting(0.5, schedule)
    ours = dsm_loss(ScoreFromX0(net, schedule), x, sigma, eps, alpha=alpha, weighting=w)
    assert torch.allclose(ours, paper, rtol=1e-10)
    assert torch.allclose(w.loss_weight(sigma), lam_edm, rtol=1e-12)
    if schedule is None:
        assert torch.allclose(w(sigma), sigma**2 * (sigma**2 + 0.25) / 0.25, rtol=1e-14)


def test_learned_uncertainty_loss_and_optimum(generator) -> None:
    base = EDMWeighting(0.5)
    lu = LearnedUncertainty(base=base, channels=32, generator=generator).double()
    sigma = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 40, dtype=F64))
    assert torch.allclose(lu(sigma), base(sigma))  # u = 0 at init
    assert torch.equal(lu.regulariser(sigma), torch.zeros_like(sigma))
    x, eps, _ = _data(generator, 0.1, 1.0)
    s = torch.rand(B, generator=generator, dtype=F64) + 0.1
    net = Net(generator)
    with torch.no_grad():
        lu.linear.weight.normal_(0, 0.1, generator=generator)
    plain = dsm_loss(ScoreFromX0(net), x, s, eps, weighting=base)
    u = lu.log_variance(s)
    total = dsm_loss(ScoreFromX0(net), x, s, eps, weighting=lu) + lu.regulariser(s)
    assert torch.allclose(total, plain / torch.exp(u) + u, rtol=1e-12)  # ℓ/e^u + u
    lu_d = LearnedUncertainty(channels=4, numel=7).double()
    assert torch.allclose(lu_d.regulariser(s), 7 * lu_d.log_variance(s))

    # trained on a known mean loss E[ℓ | σ] = g(σ), e^{u} → g (the minimiser of E[ℓ/e^u + u])
    fit = LearnedUncertainty(channels=32, generator=generator).double()
    g = 0.3 + sigma**0.5
    opt = torch.optim.LBFGS(fit.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (g * torch.exp(-fit.log_variance(sigma)) + fit.regulariser(sigma)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    err = (fit.log_variance(sigma) - torch.log(g)).abs().max().detach()
    assert float(err) < 0.02


def test_bad_arguments() -> None:
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(VarRedError, match="gamma"):
            MinSNRWeighting(bad)
    with pytest.raises(VarRedError, match="sigma_data"):
        EDMWeighting(0.0)
    with pytest.raises(VarRedError, match="prediction"):
        MinSNRWeighting(5.0).loss_weight(torch.ones(2), "x0")
    with pytest.raises(VarRedError, match="channels"):
        LearnedUncertainty(channels=0)
    with pytest.raises(VarRedError, match="numel"):
        LearnedUncertainty(numel=0)
    ve = VESchedule(0.01, 10.0)
    s = torch.tensor([0.02, 1.0], dtype=F64)
    assert torch.allclose(MinSNRWeighting(5.0, ve)(s), MinSNRWeighting(5.0)(s))
