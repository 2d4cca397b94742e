"""The diffusion training step under FSDP2 fully_shard: 2 gloo ranks equal one process.

``ControlledDSM`` on an ``MLPScore`` wrapped by ``fully_shard``: its ``GradientControl`` sees
sharded ``DTensor`` parameters and switches to backward passes with statistics per local
shard (``varred.gradient_shards``). Each rank holds half of every global batch (σ stratified
over the global batch); gathered gradients, parameters and per-σ-bin per-element β after a few
SGD steps must equal one process on the full batch to float64 round-off, for Taylor orders 0
and 1 (the order-1 control's ``jvp`` runs through the FSDP-unsharded weights).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from varred.testing import run_distributed
from varred_diffusion import (
    ControlledDSM,
    MLPScore,
    SigmaBins,
    log_uniform_sigma,
    low_discrepancy_uniform,
    ring8,
)

F64 = torch.float64
WORLD, BATCH, STEPS = 2, 8, 4
ORDERS = (0, 1)


def _train(order: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """SGD steps on this rank's half of each global batch; ``world == 1``: the full batch."""
    net = MLPScore(2, width=8, depth=1, generator=torch.Generator().manual_seed(0)).to(F64)
    sharded = world > 1
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net)
    step = ControlledDSM(
        net, net.parameters(), order=order, coefficient="running", expectation="exact",
        bins=SigmaBins(1e-2, 1.0, 2), decay=0.9, control_kwargs={"warmup_steps": 2},
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(123)  # the same global draw on every rank
    data, local = ring8(dtype=F64), BATCH // world
    sl = slice(rank * local, (rank + 1) * local)
    for _ in range(STEPS):
        u = low_discrepancy_uniform(local, gen, rank=rank, world_size=world)
        sigma = log_uniform_sigma(u, 1e-2, 1.0)  # [local], stratified over the global batch
        x = data.sample(BATCH, gen)[sl]
        eps = torch.randn(BATCH, 2, generator=gen, dtype=F64)[sl]
        step(x, sigma, eps)
        opt.step()
    params = list(net.parameters())
    res = {f"grad.{i}": p.grad.full_tensor() if sharded else p.grad for i, p in enumerate(params)}
    res.update({f"param.{i}": p.full_tensor() if sharded else p for i, p in enumerate(params)})
    res.update({f"beta.{i}": b for i, b in enumerate(step.control.coefficients())})  # local
    return {k: v.detach().clone() for k, v in res.items()}


def _worker(rank: int, world_size: int, outdir: str) -> None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        with open(os.path.join(outdir, "skip"), "w") as f:
            f.write(f"torch.distributed.fsdp.fully_shard unavailable: {err}")
        return
    for order in ORDERS:
        torch.save(_train(order, rank, world_size), os.path.join(outdir, f"{order}.{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_fsdp_controlled_dsm_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_worker, WORLD, str(tmp_path), timeout=60)
    if (tmp_path / "skip").exists():
        pytest.skip((tmp_path / "skip").read_text())
    for order in ORDERS:
        ref = _train(order, 0, 1)
        got = [torch.load(tmp_path / f"{order}.{r}.pt", weights_only=True) for r in range(WORLD)]
        for key, want in ref.items():
            if key.startswith("beta."):  # per-element β: local shards along the param's dim 0
                value = torch.cat([g[key] for g in got], dim=1)
            else:
                value = got[0][key]
                torch.testing.assert_close(got[1][key], value, rtol=0, atol=0)
            torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12, msg=f"k={order} {key}")
        assert any(bool((ref[k] != 0).any()) for k in ref if k.startswith("beta."))
