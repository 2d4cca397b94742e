"""DDP of the diffusion training step: 2 gloo ranks on shards equal one process on the union.

Each rank holds half of every global batch; σ is stratified over the GLOBAL batch with
``low_discrepancy_uniform(rank=, world_size=)`` from a generator seeded identically on every
rank; ``ControlledDSM`` runs on the plain module (no DDP wrapper: ``GradientControl`` with
``process_group="default"`` all-reduces gradient sums and counts itself). After a few optimizer
steps, parameters, gradients, β, the coefficient statistics and the ``ImportanceSigmaSampler``
state must equal a single process on the concatenated batch to float64 round-off.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from varred.testing import run_distributed
from varred_diffusion import (
    ControlledDSM,
    ImportanceSigmaSampler,
    MLPScore,
    SigmaBins,
    dsm_loss,
    log_uniform_sigma,
    low_discrepancy_uniform,
    ring8,
)

F64 = torch.float64
WORLD = 2
LOCAL = 4  # samples per rank; global batch WORLD * LOCAL
STEPS = 4
CASES = (("running", 0), ("running", 1), ("per_sample", 0))  # (coefficient, order)


def _train(coefficient: str, order: int, rank: int, world: int, pg: str | None) -> dict:
    """``STEPS`` Adam steps of a float64 ``MLPScore`` on this rank's shard of each global batch."""
    net = MLPScore(2, width=8, depth=1, generator=torch.Generator().manual_seed(0)).to(F64)
    step = ControlledDSM(
        net,
        net.parameters(),
        order=order,
        coefficient=coefficient,
        expectation="exact",
        bins=SigmaBins(1e-2, 1.0, 2),
        decay=0.9,
        control_kwargs={"process_group": pg, "warmup_steps": 2},
    )
    sampler = ImportanceSigmaSampler(2, 1e-2, 1.0, history=3, process_group=pg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(123)  # shared seed: the same global draw on every rank
    data = ring8(dtype=F64)
    batch = LOCAL * WORLD // world  # this process's share of the global batch
    sl = slice(rank * batch, (rank + 1) * batch)
    for _ in range(STEPS):
        u = low_discrepancy_uniform(batch, gen, rank=rank, world_size=world)
        sigma = log_uniform_sigma(u, 1e-2, 1.0)  # [batch], stratified over the global batch
        x = data.sample(LOCAL * WORLD, gen)[sl]
        eps = torch.randn(LOCAL * WORLD, 2, generator=gen, dtype=F64)[sl]
        diag = step(x, sigma, eps)
        with torch.no_grad():
            sampler.update(sigma, dsm_loss(net, x, sigma, eps))  # all-gathered under DDP
        opt.step()
    res = {f"param.{i}": p.detach().clone() for i, p in enumerate(net.parameters())}
    res.update({f"grad.{i}": p.grad.clone() for i, p in enumerate(net.parameters())})
    res.update({f"beta.{i}": b.clone() for i, b in enumerate(step.control.coefficients())})
    res.update({f"state.{k}": v for k, v in step.state_dict().items() if torch.is_tensor(v)})
    res.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
    res["variance_ratio"] = diag["variance_ratio"].clone()
    res["sigma"] = sigma.clone()
    return res


def _worker(rank: int, world_size: int, outdir: str) -> None:
    for coefficient, order in CASES:
        res = _train(coefficient, order, rank, world_size, "default")
        torch.save(res, os.path.join(outdir, f"{coefficient}-{order}.{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_two_rank_controlled_dsm_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_worker, WORLD, str(tmp_path), timeout=45)
    for coefficient, order in CASES:
        ref = _train(coefficient, order, 0, 1, None)
        got = [
            torch.load(tmp_path / f"{coefficient}-{order}.{r}.pt", weights_only=True)
            for r in range(WORLD)
        ]
        # the ranks' σ are the two halves of the single-process stratified draw
        torch.testing.assert_close(torch.cat([g["sigma"] for g in got]), ref["sigma"])
        for rank in range(WORLD):
            assert set(got[rank]) == set(ref)
            for key, value in ref.items():
                if key == "sigma":
                    continue
                torch.testing.assert_close(
                    got[rank][key], value, rtol=1e-10, atol=1e-12,
                    msg=f"{coefficient} k={order} rank {rank} {key}",
                )  # fmt: skip
        # β left its warmup and is not trivially zero, so the comparison exercises it
        assert any(bool((ref[k] != 0).any()) for k in ref if k.startswith("beta."))
