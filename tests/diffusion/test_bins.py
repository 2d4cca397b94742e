"""Noise-level bins: log-σ, log-SNR and quantile layouts; the grouping protocol; VP balance."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred_diffusion.bins import LogSNRBins, QuantileBins, SigmaBins, log_snr, sigma_from_log_snr


def test_edges_and_centers() -> None:
    b = SigmaBins(0.01, 100.0, 4)
    assert torch.allclose(
        b.edges, torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64), rtol=1e-14
    )
    assert torch.allclose(
        b.centers,
        torch.tensor([10**-1.5, 10**-0.5, 10**0.5, 10**1.5], dtype=torch.float64),
        rtol=1e-14,
    )
    assert b.edges[0] == 0.01 and b.edges[-1] == 100.0


@given(
    log_sigma=st.lists(st.floats(min_value=-12.0, max_value=8.0), min_size=1, max_size=20),
    k=st.integers(min_value=1, max_value=50),
)
def test_index_matches_edges(log_sigma: list[float], k: int) -> None:
    b = SigmaBins(1e-4, 80.0, k)
    sigma = torch.exp(torch.tensor(log_sigma, dtype=torch.float64))
    idx = b.index(sigma)
    assert idx.dtype == torch.long and idx.shape == sigma.shape
    assert bool(((idx >= 0) & (idx < k)).all())
    le = b.log_edges
    ls = torch.log(sigma)
    inside = (ls >= le[0]) & (ls < le[-1])
    # σ inside the range lies in its bin (up to one ulp at an edge)
    lo, hi = le[idx], le[idx + 1]
    tol = 1e-12
    assert bool(((ls >= lo - tol) & (ls <= hi + tol) | ~inside).all())
    assert bool((idx[ls < le[0]] == 0).all()) and bool((idx[ls >= le[-1]] == k - 1).all())


def test_counts_and_float32() -> None:
    b = SigmaBins(0.01, 100.0, 4)
    s = torch.tensor([0.02, 0.03, 0.5, 50.0], dtype=torch.float32)
    assert b.counts(s).tolist() == [2, 1, 0, 1]
    assert b.index(b.centers.float()).tolist() == [0, 1, 2, 3]


def test_errors() -> None:
    with pytest.raises(VarRedError, match="sigma_min"):
        SigmaBins(1.0, 1.0, 3)
    with pytest.raises(VarRedError, match="num_bins"):
        SigmaBins(0.1, 1.0, 0)
    with pytest.raises(VarRedError, match="sigma"):
        SigmaBins(0.1, 1.0, 2).index(torch.tensor([1, 2]))
    assert math.isclose(float(SigmaBins(0.1, 1.0, 1).centers[0]), math.sqrt(0.1))


def _ddpm_alphas_cumprod() -> torch.Tensor:
    """diffusers' ``DDPMScheduler(num_train_timesteps=1000)`` table, float32 as diffusers builds it."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vp_uniform_timesteps_balance(dtype: torch.dtype) -> None:
    # issue 14.1: uniform integer t over DDPM linear: every timestep once = the exact distribution
    ac = _ddpm_alphas_cumprod()
    sigma = (1 - ac.to(dtype)) ** 0.5  # diffusers' add_noise σ_t
    lo, hi = float(sigma.min()), float(sigma.max())
    assert SigmaBins(lo, hi, 4).counts(sigma).tolist() == [6, 21, 71, 902]  # the regression
    quant = QuantileBins.from_timesteps(ac, 4)
    assert quant.counts(sigma).tolist() == [250, 250, 250, 250]
    assert torch.equal(quant.index(sigma), torch.arange(1000) // 250)  # equal timestep ranges
    snr = LogSNRBins.from_timesteps(ac, 4)
    assert snr.counts(sigma).tolist() == [31, 272, 419, 278]
    assert QuantileBins.from_timesteps(ac, 7).counts(sigma).tolist() == [
        143,
        143,
        143,
        142,
        143,
        143,
        143,
    ]


def test_weighted_timesteps_equal_mass() -> None:
    # non-uniform timestep sampling (p_t ∝ t + 1): each bin carries 1/K of the mass up to one step
    ac = _ddpm_alphas_cumprod()
    w = torch.arange(1, 1001, dtype=torch.float64)
    p = w / w.sum()
    bins = QuantileBins.from_timesteps(ac, 5, weights=w)
    idx = bins.index(torch.sqrt(1 - ac.double()))
    mass = torch.zeros(5, dtype=torch.float64).index_add_(0, idx, p)
    assert float((mass - 0.2).abs().max()) <= float(p.max()) / 2 + 1e-12


def test_quantiles_of_draws_and_held_out_balance() -> None:
    g = torch.Generator().manual_seed(3)
    # EDM log-normal sampler: ln σ ~ N(−1.2, 1.2²)
    draw = torch.exp(-1.2 + 1.2 * torch.randn(4000, generator=g, dtype=torch.float64))
    bins = QuantileBins.from_samples(draw, 8)
    assert bins.counts(draw).tolist() == [500] * 8
    assert bins.counts(draw.float()).tolist() == [500] * 8  # float32 σ: still never on an edge
    held = torch.exp(-1.2 + 1.2 * torch.randn(8000, generator=g, dtype=torch.float64))
    c = bins.counts(held).double()
    se = math.sqrt(8000 * (1 / 8) * (7 / 8))
    assert float((c - 1000).abs().max()) < 5 * se
    assert torch.allclose(bins.centers, torch.sqrt(bins.edges[1:] * bins.edges[:-1]))


def test_log_snr_bins_match_their_edges() -> None:
    s = torch.logspace(-3, 1, 200, dtype=torch.float64)
    assert torch.equal(
        LogSNRBins(1e-3, 10.0, 5, process="ve").index(s), SigmaBins(1e-3, 10.0, 5).index(s)
    )
    for process in ("vp", "flow"):
        bins = LogSNRBins(1e-3, 0.999, 6, process=process)
        u = torch.linspace(1e-3, 0.999, 500, dtype=torch.float64)
        lam_e = bins.log_snr_edges  # decreasing
        expect = ((lam_e[0] - log_snr(u, process)) / (lam_e[0] - lam_e[-1]) * 6).floor().clamp(0, 5)
        assert torch.equal(bins.index(u), expect.long())
        assert torch.allclose(sigma_from_log_snr(log_snr(u, process), process), u, rtol=1e-12)
        assert bins.index(torch.tensor([1e-6, 1.0])).tolist() == [0, 5]  # clamped
        assert torch.allclose(log_snr(bins.edges, process), lam_e, rtol=1e-10)


def test_grouping_protocol_through_the_step() -> None:
    from varred_diffusion.training import ControlledDSM

    net = torch.nn.Linear(2, 2)
    bins_list = [
        SigmaBins(0.01, 1.0, 3),
        LogSNRBins(0.01, 0.99, 3),
        QuantileBins(torch.tensor([0.01, 0.1, 0.5, 1.0])),
    ]
    for bins in bins_list:
        assert bins.num_groups == bins.num_bins == 3
        step = ControlledDSM(lambda y, s: net(y), net.parameters(), bins=bins)
        assert step.control.config.num_groups == 3
        x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.02, 0.05, 0.2, 0.3, 0.7, 0.9])
        assert bins.index(sigma).dtype == torch.long
        step(x, sigma, torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))


def test_new_bins_errors() -> None:
    with pytest.raises(VarRedError, match="num_bins"):
        QuantileBins.from_samples(torch.tensor([0.1, 0.1, 0.2]), 3)  # two distinct values
    with pytest.raises(VarRedError, match="sigma"):
        QuantileBins.from_samples(torch.tensor([0.0, 0.1]), 1)
    with pytest.raises(VarRedError, match="weights"):
        QuantileBins.from_samples(torch.tensor([0.1, 0.2]), 1, weights=torch.tensor([1.0]))
    with pytest.raises(VarRedError, match="edges"):
        QuantileBins(torch.tensor([0.1, 0.1, 0.3]))
    with pytest.raises(VarRedError, match="process"):
        LogSNRBins(0.1, 0.5, 2, process="edm")
    with pytest.raises(VarRedError, match="sigma_max"):
        LogSNRBins(0.1, 2.0, 2, process="vp")
    with pytest.raises(VarRedError, match="alphas_cumprod"):
        QuantileBins.from_timesteps(torch.tensor([1.0, 0.5]), 1)
