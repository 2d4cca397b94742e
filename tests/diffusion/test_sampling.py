"""σ sampling: strata, rank slices, uniform marginals (KS), antithetic pairs, importance weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from varred.errors import VarRedError
from varred.testing import run_distributed
from varred_diffusion.sampling import (
    ImportanceSigmaSampler,
    antithetic_noise,
    log_uniform_sigma,
    low_discrepancy_uniform,
    stratified_uniform,
)

SAMPLERS = [stratified_uniform, low_discrepancy_uniform]


def _ks_uniform_rejects(u: torch.Tensor, alpha: float = 1e-5) -> bool:
    """One-sample KS test against U[0, 1) at level ``alpha`` (asymptotic Kolmogorov quantile)."""
    x, _ = torch.sort(u.double())
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - x, x - (i - 1) / n).max()
    crit = math.sqrt(-0.5 * math.log(alpha / 2))
    return bool(math.sqrt(n) * d > crit)


@pytest.mark.parametrize("fn", SAMPLERS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_one_point_per_stratum_and_union_over_ranks(fn: object, world_size: int, seed: int) -> None:
    batch = 7
    n = batch * world_size
    parts = [
        fn(batch, torch.Generator().manual_seed(seed), rank=r, world_size=world_size)  # type: ignore[operator]
        for r in range(world_size)
    ]
    union = torch.cat(parts)
    single = fn(n, torch.Generator().manual_seed(seed))  # type: ignore[operator]
    assert torch.equal(union, single)
    assert bool(((union >= 0) & (union < 1)).all())
    assert torch.equal(torch.sort(torch.floor(union * n).long()).values, torch.arange(n))


def test_stratified_marginals_ks(generator: torch.Generator) -> None:
    # within its stratum each point is uniform: N u_i − i ~ U[0, 1)
    n, reps = 8, 2000
    u = torch.stack([stratified_uniform(n, generator) for _ in range(reps)])  # [reps, n]
    within = u * n - torch.arange(n, dtype=torch.float64)
    assert not _ks_uniform_rejects(within.flatten())
    assert not _ks_uniform_rejects(u.flatten())  # the point at a random index is uniform
    assert _ks_uniform_rejects(u[:, 3])  # sanity: the KS helper rejects a non-uniform sample


def test_low_discrepancy_marginals_ks(generator: torch.Generator) -> None:
    reps = 3000
    u = torch.stack(
        [low_discrepancy_uniform(5, generator, rank=1, world_size=2) for _ in range(reps)]
    )
    for j in range(5):
        assert not _ks_uniform_rejects(u[:, j])
    # equally spaced (mod 1) with gap 1/N
    gaps = torch.remainder(u[:, 1:] - u[:, :-1], 1.0)
    assert torch.allclose(gaps, torch.full_like(gaps, 0.1), atol=1e-14)


def test_log_uniform_sigma() -> None:
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = log_uniform_sigma(u, 0.01, 100.0)
    assert torch.allclose(s, torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64), rtol=1e-14)
    with pytest.raises(VarRedError, match="sigma_min"):
        log_uniform_sigma(u, 1.0, 0.1)


def test_antithetic_noise(generator: torch.Generator) -> None:
    e = antithetic_noise(6, (2, 3), generator, dtype=torch.float64)
    assert e.shape == (6, 2, 3)
    assert torch.equal(e[3:], -e[:3])
    with pytest.raises(VarRedError, match="batch"):
        antithetic_noise(5, (2,), generator)


def _fill(sampler: ImportanceSigmaSampler, per_bin: torch.Tensor) -> None:
    """Feed ``history`` copies of loss ``per_bin[b]`` at each bin centre."""
    c = sampler.bins.centers
    for _ in range(sampler.history):
        sampler.update(c, per_bin)


def test_importance_uniform_until_warm(generator: torch.Generator) -> None:
    smp = ImportanceSigmaSampler(4, 0.01, 10.0, history=3)
    s, w = smp.sample(64, generator, dtype=torch.float64)
    assert torch.equal(w, torch.ones(64, dtype=torch.float64))
    assert bool(((s >= 0.01) & (s <= 10.0)).all())
    smp.update(smp.bins.centers[:3], torch.ones(3, dtype=torch.float64))  # last bin empty
    assert not smp.warmed_up()
    assert torch.equal(smp.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))


def test_importance_probabilities_floor_and_history() -> None:
    k, f = 4, 0.2
    smp = ImportanceSigmaSampler(k, 0.01, 10.0, history=5, uniform_floor=f)
    per_bin = torch.tensor([1.0, 2.0, 3.0, 1000.0], dtype=torch.float64)
    _fill(smp, per_bin)
    p = smp.probabilities()
    want = (1 - f) * per_bin / per_bin.sum() + f / k
    assert torch.allclose(p, want, rtol=1e-14)
    assert bool((p >= f / k).all()) and math.isclose(float(p.sum()), 1.0)
    # only the last `history` losses count: refill with equal losses -> uniform
    _fill(smp, torch.ones(k, dtype=torch.float64))
    assert torch.allclose(p.new_full((k,), 1 / k), smp.probabilities(), rtol=1e-14)
    # sqrt of the second moment, not the mean: losses {0, 2} vs {1, 1}
    smp2 = ImportanceSigmaSampler(2, 0.1, 1.0, history=2, uniform_floor=0.0)
    c = smp2.bins.centers
    smp2.update(
        torch.stack([c[0], c[0], c[1], c[1]]),
        torch.tensor([0.0, 2.0, 1.0, 1.0], dtype=torch.float64),
    )
    assert torch.allclose(
        smp2.probabilities(),
        torch.tensor([math.sqrt(2), 1.0], dtype=torch.float64) / (1 + math.sqrt(2)),
    )


def test_importance_weights_unbiased_exactly_and_mc(generator: torch.Generator) -> None:
    k, a, b = 6, 0.01, 10.0
    smp = ImportanceSigmaSampler(k, a, b, history=4, uniform_floor=0.1)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return torch.log(s) ** 2

    # warm up with the loss at a log-uniform grid
    grid = log_uniform_sigma((torch.arange(k * 4, dtype=torch.float64) + 0.5) / (k * 4), a, b)
    smp.update(grid, loss(grid))
    assert smp.warmed_up()
    p = smp.probabilities()
    assert not torch.allclose(p, p.new_full((k,), 1 / k))  # genuinely non-uniform
    # exact: Σ_b p(b) w(b) E[ℓ | b] = (1/K) Σ_b E[ℓ | b]; E[(log σ)² | b] in closed form
    le = smp.bins.log_edges
    cond = (le[1:] ** 3 - le[:-1] ** 3) / (3 * (le[1:] - le[:-1]))
    w_bins = smp.weights_for(smp.bins.centers)
    assert torch.allclose((p * w_bins * cond).sum(), cond.mean(), rtol=1e-14)
    # Monte Carlo: mean of w ℓ within 5 SE of the log-uniform objective
    lo, hi = math.log(a), math.log(b)
    exact = (hi**3 - lo**3) / (3 * (hi - lo))
    s, w = smp.sample(40000, generator, dtype=torch.float64)
    assert torch.equal(w, smp.weights_for(s))
    y = w * loss(s)
    assert abs(float(y.mean()) - exact) < 5 * float(y.std()) / math.sqrt(y.numel())


def test_importance_state_round_trip(generator: torch.Generator) -> None:
    smp = ImportanceSigmaSampler(3, 0.1, 10.0, history=2)
    _fill(smp, torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
    other = ImportanceSigmaSampler(3, 0.1, 10.0, history=2)
    other.load_state_dict(smp.state_dict())
    assert torch.equal(other.probabilities(), smp.probabilities())
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for x, y in zip(smp.sample(10, g1), other.sample(10, g2), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(VarRedError, match="state"):
        ImportanceSigmaSampler(4, 0.1, 10.0, history=2).load_state_dict(smp.state_dict())


def test_importance_errors() -> None:
    with pytest.raises(VarRedError, match="uniform_floor"):
        ImportanceSigmaSampler(3, 0.1, 1.0, uniform_floor=1.5)
    with pytest.raises(VarRedError, match="history"):
        ImportanceSigmaSampler(3, 0.1, 1.0, history=0)
    smp = ImportanceSigmaSampler(3, 0.1, 1.0)
    with pytest.raises(VarRedError, match="losses"):
        smp.update(torch.ones(3), torch.ones(2))


def test_importance_process_group_single_rank(tmp_path: object) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        smp = ImportanceSigmaSampler(2, 0.1, 1.0, history=1, process_group="default")
        ref = ImportanceSigmaSampler(2, 0.1, 1.0, history=1)
        c = smp.bins.centers
        losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
        smp.update(c, losses)
        ref.update(c, losses)
        assert torch.equal(smp.probabilities(), ref.probabilities())
    finally:
        dist.destroy_process_group()


_RANK_BATCH = (5, 3)  # unequal per-rank batch sizes (e.g. the last batch of an epoch)


def _sampler_worker(rank: int, world_size: int, outdir: str) -> None:
    smp = ImportanceSigmaSampler(3, 0.1, 10.0, history=2, process_group="default")
    g = torch.Generator().manual_seed(100 + rank)  # a different local batch per rank
    for _ in range(4):
        s = torch.exp(torch.rand(_RANK_BATCH[rank], generator=g, dtype=torch.float64) * 4.6 - 2.3)
        smp.update(s, torch.log(s) ** 2 + rank)
    torch.save(smp.state_dict(), f"{outdir}/sampler.{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_importance_two_ranks_share_the_distribution(tmp_path: object) -> None:
    """Two gloo ranks with batches of 5 and 3 hold the state of one process that saw both."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_sampler_worker, 2, str(tmp_path), timeout=60)
    got = [torch.load(f"{tmp_path}/sampler.{r}.pt", weights_only=True) for r in range(2)]
    ref = ImportanceSigmaSampler(3, 0.1, 10.0, history=2)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):  # rank 0's samples first
        s = [
            torch.exp(torch.rand(_RANK_BATCH[r], generator=g, dtype=torch.float64) * 4.6 - 2.3)
            for r, g in enumerate(gens)
        ]
        ref.update(torch.cat(s), torch.cat([torch.log(s[r]) ** 2 + r for r in range(2)]))
    for state in got:
        assert torch.equal(state["buffer"], ref.state_dict()["buffer"])
        assert torch.equal(state["counts"], ref.state_dict()["counts"])
    assert not torch.equal(ref.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
