"""GradientControl under torch.distributed (gloo, CPU, 2 ranks) equals one process on the union."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from varred.gradient import GradientControl
from varred.testing import run_distributed

F64 = torch.float64
SHARDS = ((0, 3), (3, 8))  # unequal local batch sizes: 3 and 5 of 8
STEPS = 6
MODES = ("running", "per_sample", "running+ddp")


def _train(
    mode: str, lo: int, hi: int, process_group, ddp: bool = False
) -> dict[str, torch.Tensor]:
    """A few SGD steps of a tiny float64 MLP on samples ``lo:hi`` of each global batch.

    ``ddp``: the forward runs through a ``DistributedDataParallel`` wrapper inside
    ``no_sync()`` (the documented way to keep DDP from all-reducing gradients a second time).
    """
    torch.manual_seed(0)  # model init, identical on every rank
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(F64)
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    quiet = model.no_sync if ddp else contextlib.nullcontext
    ctrl = GradientControl(
        net.parameters(), coefficient=mode, num_groups=2, warmup_steps=2, decay=0.9,
        process_group=process_group,
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(123)
    for _ in range(STEPS):
        x = torch.randn(8, 2, generator=gen, dtype=F64)
        eps = torch.randn(8, 2, generator=gen, dtype=F64)
        groups = torch.randint(0, 2, (8,), generator=gen)
        x, eps, groups = x[lo:hi], eps[lo:hi], groups[lo:hi]
        with quiet():
            out = model(x + 0.3 * eps).squeeze(1)
            losses = (out - x[:, 0]) ** 2  # [b]
            controls = (
                model(x + 0.3 * eps).squeeze(1) * eps[:, 0]
                - model(x - 0.3 * eps).squeeze(1) * eps[:, 0]
            )
            ctrl.backward(losses, controls, groups)
        opt.step()
    res = {f"param.{i}": p.detach().clone() for i, p in enumerate(net.parameters())}
    res.update({f"grad.{i}": p.grad.clone() for i, p in enumerate(net.parameters())})
    res.update({f"beta.{i}": b.clone() for i, b in enumerate(ctrl.coefficients())})
    return res


def _worker(rank: int, world_size: int, outdir: str) -> None:
    lo, hi = SHARDS[rank]
    for mode in MODES:
        res = _train(mode.split("+")[0], lo, hi, "default", ddp=mode.endswith("+ddp"))
        torch.save(res, os.path.join(outdir, f"{mode}.{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_two_rank_gloo_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_worker, 2, str(tmp_path), timeout=60)
    for mode in MODES:
        ref = _train(mode.split("+")[0], 0, 8, None)
        for rank in range(2):
            got = torch.load(tmp_path / f"{mode}.{rank}.pt", weights_only=True)
            assert set(got) == set(ref)
            for key, value in ref.items():
                torch.testing.assert_close(
                    got[key], value, rtol=1e-12, atol=1e-14, msg=f"{mode} {key}"
                )
        assert any(bool((ref[k] != 0).any()) for k in ref if k.startswith("beta."))
