"""Noise-level samplers: densities integrate to 1, closed forms, unbiased reweighting (5 SE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from varred.errors import VarRedError
from varred.testing import run_distributed
from varred_diffusion.adaptive_sampler import AdaptiveSigmaSampler
from varred_diffusion.flow import RectifiedFlowSchedule
from varred_diffusion.noise_levels import EDMLogNormal, LaplaceLogSNR, LogitNormal
from varred_diffusion.objective_densities import LogUniform, Uniform, open_uniform
from varred_diffusion.schedules import VESchedule, VPSchedule

F64 = torch.float64


def _quad(g, lo: float, hi: float, panels: int = 400, nodes: int = 16, kink=None) -> float:
    """``∫_lo^hi g(σ) dσ``: composite Gauss–Legendre in log σ, or in logit σ on (0, 1).

    ``kink``: a σ where ``g`` is not smooth (Laplace's peak): split there.
    """
    if kink is not None and lo < kink < hi:
        return _quad(g, lo, kink, panels, nodes) + _quad(g, kink, hi, panels, nodes)
    x, w = (torch.as_tensor(a, dtype=F64) for a in np.polynomial.legendre.leggauss(nodes))
    if hi <= 1.0:  # σ = sigmoid(z)
        a = float(torch.logit(torch.tensor(lo, dtype=F64))) if lo > 0 else -40.0
        b = float(torch.logit(torch.tensor(hi, dtype=F64))) if hi < 1 else 40.0
        fwd, jac = torch.sigmoid, lambda z: torch.sigmoid(z) * torch.sigmoid(-z)
    else:
        a = math.log(lo) if lo > 0 else -40.0
        b = math.log(hi) if math.isfinite(hi) else 40.0
        fwd, jac = torch.exp, torch.exp
    edges = torch.linspace(a, b, panels + 1, dtype=F64)
    half, mid = 0.5 * (edges[1:] - edges[:-1]), 0.5 * (edges[1:] + edges[:-1])
    z = (mid[:, None] + half[:, None] * x).reshape(-1)  # [panels * nodes]
    s = fwd(z)
    vals = g(s) * jac(z)
    vals = torch.where(torch.isfinite(vals), vals, 0.0)
    return float((vals.reshape(panels, nodes) * w).sum(1).mul(half).sum())


def _kink(d) -> float | None:
    """Laplace's peak in σ (the density's one non-smooth point), else None."""
    if not isinstance(d, LaplaceLogSNR):
        return None
    from varred_diffusion.noise_levels import sigma_from_log_snr

    return float(sigma_from_log_snr(d.schedule, torch.tensor(d.loc, dtype=F64)))


def _density(d):
    return lambda s: torch.exp(d.log_prob(s))


def f_test(s: torch.Tensor) -> torch.Tensor:
    """A smooth test function of σ varying over the whole range."""
    return 1.0 + torch.sin(torch.log(s)) + 1.0 / (1.0 + s)


VP_COS = VPSchedule("cosine")
SAMPLERS = {
    "edm": lambda: EDMLogNormal(),
    "edm_untruncated": lambda: EDMLogNormal(sigma_min=0.0, sigma_max=math.inf),
    "logit_flow": lambda: LogitNormal(),
    "logit_flow_trunc": lambda: LogitNormal(0.3, 0.8, t_min=0.05, t_max=0.9),
    "logit_ve": lambda: LogitNormal(schedule=VESchedule(0.01, 50.0)),
    "laplace_ve": lambda: LaplaceLogSNR(sigma_min=0.002, sigma_max=80.0),
    "laplace_vp": lambda: LaplaceLogSNR(1.0, 1.0, schedule=VP_COS),
    "laplace_flow": lambda: LaplaceLogSNR(schedule=RectifiedFlowSchedule()),
    "loguniform": lambda: LogUniform(0.01, 10.0),
    "uniform": lambda: Uniform(0.0, 1.0),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_density_integrates_to_one(name: str) -> None:
    q = SAMPLERS[name]()
    lo, hi = q.support
    assert abs(_quad(_density(q), lo, hi, kink=_kink(q)) - 1.0) < 1e-7
    outside = torch.tensor([lo * 0.5 if lo > 0 else -1.0, hi * 2 if math.isfinite(hi) else -2.0])
    assert bool((q.log_prob(outside.to(F64)) == -math.inf).all())


def test_closed_forms_untruncated() -> None:
    s = torch.tensor([0.01, 0.3, 1.0, 7.0], dtype=F64)
    edm = EDMLogNormal(-1.2, 1.2, sigma_min=0.0, sigma_max=math.inf)
    z = (torch.log(s) + 1.2) / 1.2
    ref = -0.5 * z**2 - math.log(1.2 * math.sqrt(2 * math.pi)) - torch.log(s)
    assert torch.allclose(edm.log_prob(s), ref, rtol=1e-12)
    lap = LaplaceLogSNR(0.5, 0.7, sigma_min=0.0, sigma_max=math.inf)  # VE: λ = −2 log σ
    lam = -2 * torch.log(s)
    ref = -(lam - 0.5).abs() / 0.7 - math.log(1.4) + torch.log(2 / s)
    assert torch.allclose(lap.log_prob(s), ref, rtol=1e-12)
    t = torch.tensor([0.05, 0.5, 0.9], dtype=F64)
    ln = LogitNormal(0.2, 1.3)
    zt = (torch.logit(t) - 0.2) / 1.3
    ref = -0.5 * zt**2 - math.log(1.3 * math.sqrt(2 * math.pi)) - torch.log(t * (1 - t))
    assert torch.allclose(ln.log_prob(t), ref, rtol=1e-12)


def _check_unbiased(sampler, truth_density, lo: float, hi: float, gen, n: int = 40000) -> None:
    s, w = sampler.sample(n, gen, dtype=F64)
    assert s.shape == w.shape == (n,) and s.dtype == F64
    assert bool(((s >= lo) & (s <= hi)).all())
    for fn in (torch.ones_like, f_test):
        y = w * fn(s)
        truth = _quad(
            lambda v, fn=fn: truth_density(v) * fn(v),
            *truth_density.support,
            kink=_kink(truth_density.d),
        )
        se = float(y.std()) / math.sqrt(n)
        if se == 0.0:  # weights ones and f ≡ 1
            assert float(y.mean()) == pytest.approx(truth, abs=1e-7)
        else:
            assert abs(float(y.mean()) - truth) < 5 * se, (float(y.mean()), truth, se)


class _Dens:
    """A sampler's own density with its support, as the objective to compare against."""

    def __init__(self, d) -> None:
        self.d, self.support = d, d.support

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.d.log_prob(s))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_own_density_draws(name: str, generator: torch.Generator) -> None:
    q = SAMPLERS[name]()
    _check_unbiased(q, _Dens(q), *q.support, generator)
    if hasattr(q, "objective"):
        assert q.changes_objective
        assert bool((q.sample(5, generator)[1] == 1).all())


REWEIGHTED = {
    "edm_to_loguniform": lambda: EDMLogNormal(objective=LogUniform(0.01, 10.0)),
    "logit_to_uniform": lambda: LogitNormal(
        0.0, 1.0, t_min=0.02, t_max=0.98, objective=Uniform(0.02, 0.98)
    ),
    "logit_ve_to_loguniform": lambda: LogitNormal(
        schedule=VESchedule(0.01, 50.0), t_min=0.05, objective=LogUniform(0.05, 40.0)
    ),
    "laplace_to_loguniform": lambda: LaplaceLogSNR(
        0.0, 1.5, sigma_min=0.002, sigma_max=80.0, objective=LogUniform(0.1, 10.0)
    ),
    "laplace_vp_to_edm": lambda: LaplaceLogSNR(
        0.0, 2.0, schedule=VP_COS, objective=EDMLogNormal(-1.0, 0.5, 0.05, 0.9)
    ),
    "edm_defensive": lambda: EDMLogNormal(objective=LogUniform(0.002, 80.0), defensive=0.2),
    "laplace_flow_defensive": lambda: LaplaceLogSNR(
        0.0, 0.5, schedule=RectifiedFlowSchedule(), objective=Uniform(0.0, 1.0), defensive=0.1
    ),
}


@pytest.mark.parametrize("name", list(REWEIGHTED))
def test_weights_keep_the_objective(name: str, generator: torch.Generator) -> None:
    q = REWEIGHTED[name]()
    assert not q.changes_objective
    _check_unbiased(q, _Dens(q.objective), *q.support, generator)
    if q.defensive > 0:  # the mixture is a density, and bounds the weights by 1/δ
        assert abs(_quad(_density(q), *q.support, kink=_kink(q)) - 1.0) < 1e-7
        assert float(q.sample(20000, generator, dtype=F64)[1].max()) <= 1 / q.defensive + 1e-9


def _warm(sam: AdaptiveSigmaSampler, gen: torch.Generator, steps: int = 30) -> None:
    for _ in range(steps):
        s, _ = sam.sample(256, gen, dtype=F64)
        noise = torch.rand(256, generator=gen, dtype=F64)
        sam.update(s, (s**2 + 0.05) * (0.5 + noise))  # E[ℓ | σ] = σ² + 0.05


@pytest.mark.parametrize("objective", ["loguniform", "edm"])
def test_adaptive_sampler_unbiased_and_proportional(objective: str, generator) -> None:
    obj = None if objective == "loguniform" else EDMLogNormal(-0.5, 1.0, 0.01, 10.0)
    sam = AdaptiveSigmaSampler(12, 0.01, 10.0, objective=obj, decay=0.9, floor=0.2)
    assert not sam.changes_objective
    assert torch.allclose(sam.probabilities(), sam.objective_mass)  # before warm-up: q_b = P_b
    _warm(sam, generator)
    p_b, m = sam.objective_mass, sam.mean_losses()
    m = torch.where(torch.isnan(m), m.nan_to_num(-1.0).max(), m)  # unseen: largest mean
    expect = 0.8 * p_b * m / (p_b * m).sum() + 0.2 * p_b
    assert torch.allclose(sam.probabilities(), expect, rtol=1e-12)
    hi_bin = int(sam.bins.index(torch.tensor([5.0], dtype=F64)))
    assert float(sam.probabilities()[hi_bin]) > 2 * float(p_b[hi_bin])  # moved towards large loss
    _check_unbiased(sam, _Dens(sam.objective), 0.01, 10.0, generator)
    if obj is None:  # log-uniform objective: the floor bounds every weight by 1/f
        _, w = sam.sample(4000, generator, dtype=F64)
        assert float(w.max()) <= 1 / 0.2 * (1 + 1e-9)


def test_adaptive_unseen_bins_are_optimistic() -> None:
    sam = AdaptiveSigmaSampler(4, 0.1, 10.0, floor=0.5)
    assert not sam.warmed_up()
    sam.update(torch.tensor([0.15, 0.2], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64))
    # bin 0 has mean 2, bins 1-3 take 2 too: q stays uniform; then bin 3 learns 6
    assert torch.allclose(sam.probabilities(), torch.full((4,), 0.25, dtype=F64))
    sam.update(torch.tensor([9.0], dtype=F64), torch.tensor([6.0], dtype=F64))
    q = sam.probabilities()  # means (2, 6, 6, 6) · 1/4 → (1/10, 3/10, 3/10, 3/10), floor 1/2
    assert torch.allclose(q, 0.5 * torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=F64) + 0.125)


def test_adaptive_loguniform_weights_match_bin_ratio(generator: torch.Generator) -> None:
    sam = AdaptiveSigmaSampler(5, 0.1, 10.0, floor=0.5)
    _warm(sam, generator, steps=3)
    s, w = sam.sample(100, generator, dtype=F64)
    q = sam.probabilities()[sam.bins.index(s)]
    assert torch.allclose(w, (1 / 5) / q, rtol=1e-9)  # = ImportanceSigmaSampler's (1/K)/p(b)


def test_adaptive_state_roundtrip_and_errors(generator: torch.Generator) -> None:
    sam = AdaptiveSigmaSampler(4, 0.1, 10.0)
    _warm(sam, generator, steps=2)
    other = AdaptiveSigmaSampler(4, 0.1, 10.0)
    other.load_state_dict(sam.state_dict())
    assert torch.equal(other.probabilities(), sam.probabilities())
    with pytest.raises(VarRedError, match="floor"):
        AdaptiveSigmaSampler(4, 0.1, 10.0, floor=0.0)
    with pytest.raises(VarRedError, match="decay"):
        AdaptiveSigmaSampler(4, 0.1, 10.0, decay=1.0)
    with pytest.raises(VarRedError, match="objective"):
        AdaptiveSigmaSampler(4, 0.1, 10.0, objective=LogUniform(0.01, 10.0))
    with pytest.raises(VarRedError, match="losses"):
        sam.update(torch.ones(3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(VarRedError, match="losses"):
        sam.update(torch.ones(2, dtype=F64), torch.tensor([1.0, math.nan], dtype=F64))
    with pytest.raises(VarRedError, match="state"):
        sam.load_state_dict({"sums": torch.zeros(3), "counts": torch.zeros(3)})


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(VarRedError, match="p_std"):
        EDMLogNormal(p_std=0.0)
    with pytest.raises(VarRedError, match="p_std"):
        EDMLogNormal(p_std=-1.0)
    with pytest.raises(VarRedError, match="std"):
        LogitNormal(std=0.0)
    with pytest.raises(VarRedError, match="t_min"):
        LogitNormal(t_min=-0.1)
    with pytest.raises(VarRedError, match="t_min"):
        LogitNormal(t_max=1.5)
    with pytest.raises(VarRedError, match="scale"):
        LaplaceLogSNR(scale=0.0)
    with pytest.raises(VarRedError, match="sigma_min"):
        LaplaceLogSNR()  # VE without a range
    with pytest.raises(VarRedError, match="sigma_min"):
        LogUniform(1.0, 0.1)
    with pytest.raises(VarRedError, match="objective"):  # wider support: biased
        EDMLogNormal(sigma_min=0.01, objective=LogUniform(0.001, 1.0))
    with pytest.raises(VarRedError, match="objective"):
        EDMLogNormal(objective=object())  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match="n"):
        open_uniform(0, None)
    with pytest.raises(VarRedError, match="defensive"):
        EDMLogNormal(defensive=0.1)  # no objective to mix with
    with pytest.raises(VarRedError, match="defensive"):
        EDMLogNormal(objective=LogUniform(0.01, 1.0), defensive=1.0)


def test_open_uniform_and_dtype(generator: torch.Generator) -> None:
    u = open_uniform(1000, generator)
    assert bool(((u > 0) & (u < 1)).all())
    s, w = LogitNormal().sample(8, generator)
    assert s.dtype == w.dtype == torch.float32 and bool(((s > 0) & (s < 1)).all())


_RANK_BATCH = (7, 3)  # unequal per-rank batch sizes


def _rank_draw(rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.exp(torch.rand(_RANK_BATCH[rank], generator=gen, dtype=F64) * 6.9 - 4.6)
    return s, s**2 + rank + torch.rand(s.shape, generator=gen, dtype=F64)


def _adaptive_worker(rank: int, world_size: int, outdir: str) -> None:
    sam = AdaptiveSigmaSampler(6, 0.01, 10.0, decay=0.8, process_group="default")
    gen = torch.Generator().manual_seed(200 + rank)  # a different local batch per rank
    for _ in range(5):
        sam.update(*_rank_draw(rank, gen))
    bad = torch.tensor([1.0, math.nan, 2.0][: 3 - 2 * rank], dtype=F64)  # NaN on rank 0 only
    before = sam.state_dict()
    try:
        sam.update(torch.full(bad.shape, 0.5, dtype=F64), bad)
        raised = False
    except VarRedError:
        raised = True
    same = all(torch.equal(before[k], sam.state_dict()[k]) for k in before)
    torch.save({**sam.state_dict(), "raised": raised, "same": same}, f"{outdir}/ad.{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_adaptive_two_ranks_hold_the_global_state(tmp_path: object) -> None:
    """Two gloo ranks (batches 7 and 3) hold one process's state; a NaN on one rank raises on both."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_adaptive_worker, 2, str(tmp_path), timeout=60)
    got = [torch.load(f"{tmp_path}/ad.{r}.pt", weights_only=True) for r in range(2)]
    ref = AdaptiveSigmaSampler(6, 0.01, 10.0, decay=0.8)
    gens = [torch.Generator().manual_seed(200 + r) for r in range(2)]
    for _ in range(5):
        draws = [_rank_draw(r, g) for r, g in enumerate(gens)]
        ref.update(torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]))
    for state in got:  # float64 sums in another order: equal to rounding
        assert torch.allclose(state["sums"], ref.state_dict()["sums"], rtol=1e-13, atol=0)
        assert torch.equal(state["counts"], ref.state_dict()["counts"])
        assert state["raised"] and state["same"]  # no rank went on alone, none half-updated
    assert not torch.allclose(ref.probabilities(), ref.objective_mass)  # the state is informative
