"""GradientControl under FSDP2 fully_shard (gloo, CPU, 2 ranks) equals one process on the union.

Each rank holds a shard of every parameter and half of every batch (or 3 and 5 of 8 samples);
β, statistics and gradients live on the local shards. Gathered gradients, parameters after SGD
steps and β (local shards concatenated along dim 0, FSDP's sharding) must match one process
on the full batch with the same init to round-off (float64).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.testing import run_distributed

F64 = torch.float64
STEPS = 5
BATCH = 8
NAN_STEP = 2  # the "nan" case: a NaN input on rank 1 at this step (nonfinite="zero")
# name: (granularity, num_groups, shrinkage, coefficient, split controls, rank 0's samples)
CASES = {
    "element": ("element", 2, 0.0, "running", False, 4),
    "element-uneven": ("element", 2, 0.0, "running", False, 3),
    "element-shrunk-split": ("element", 2, 100.0, "running", True, 4),
    "tensor": ("tensor", 2, 0.0, "running", False, 4),
    "scalar": ("scalar", 1, 0.0, "running", False, 4),
    "fixed": ("element", 1, 0.0, 0.5, False, 4),
    "nan": ("element", 2, 0.0, "running", False, 4),
}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)  # identical init on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        F64
    )


def _control(
    net: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``[n]`` control of the selected ``rows``: odd in ε (ε → −ε flips its sign), so zero mean."""
    up, down = net(x[rows] + 0.3 * eps[rows]), net(x[rows] - 0.3 * eps[rows])
    return (up + down).sum(1) * eps[rows, 0]


def _train(case: str, net: torch.nn.Module, rank: int | None) -> dict[str, torch.Tensor]:
    """SGD steps with a zero-mean control on ``rank``'s samples; ``None`` = the full batch."""
    gran, ng, kappa, coef, split, cut = CASES[case]
    lo, hi = (0, BATCH) if rank is None else ((0, cut), (cut, BATCH))[rank]
    ctrl = GradientControl(
        list(net.parameters()), granularity=gran, num_groups=ng, shrinkage=kappa,
        coefficient=coef, warmup_steps=2, decay=0.9, nonfinite="zero",
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(123)
    for step in range(STEPS):
        x = torch.randn(BATCH, 2, generator=gen, dtype=F64)
        eps = torch.randn(BATCH, 2, generator=gen, dtype=F64)
        groups = torch.randint(0, ng, (BATCH,), generator=gen)
        if case == "nan" and step == NAN_STEP:
            x[BATCH - 1, 0] = float("nan")  # rank 1's sample: both ranks must skip the step
        if step == 0:
            groups[cut:] = 0  # group 1 empty on rank 1: its passes must still run there
        order = torch.argsort(groups[lo:hi], stable=True) + lo  # group 0's samples first
        x, eps, groups = x[order], eps[order], groups[order]
        losses = (net(x + 0.3 * eps).sum(1) - x[:, 0]) ** 2  # [b]
        if split:
            chunks = [_control(net, x, eps, groups == j) for j in range(ng)]
            ctrl.backward(losses, chunks)
        else:
            ctrl.backward(losses, _control(net, x, eps, groups >= 0), groups)
        opt.step()
    full = rank is not None
    res = {
        f"grad.{i}": p.grad.full_tensor() if full else p.grad
        for i, p in enumerate(net.parameters())
    }
    res.update(
        {
            f"param.{i}": (p.full_tensor() if full else p).detach()
            for i, p in enumerate(net.parameters())
        }
    )
    res.update({f"beta.{i}": b for i, b in enumerate(ctrl.coefficients())})
    res["num_updates"] = ctrl.num_updates
    return {k: v.detach().clone() for k, v in res.items()}


def _refusals(net: torch.nn.Module) -> list[str]:
    params = list(net.parameters())
    out = []
    for kw in ({"process_group": "default"}, {"coefficient": "per_sample"}):
        try:
            GradientControl(params, **kw)
        except VarRedError as err:
            out.append(str(err))
    return out


def _worker(rank: int, world_size: int, outdir: str) -> None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:
        with open(os.path.join(outdir, f"skip.{rank}"), "w") as f:
            f.write(f"torch.distributed.fsdp.fully_shard unavailable: {err}")
        return
    for case in CASES:
        net = _net()
        try:
            for layer in (net[0], net[2], net):
                fully_shard(layer)
        except Exception as err:  # any failure to shard: unsupported here
            with open(os.path.join(outdir, f"skip.{rank}"), "w") as f:
                f.write(f"fully_shard failed on CPU/gloo: {type(err).__name__}: {err}")
            return
        torch.save(_train(case, net, rank), os.path.join(outdir, f"{case}.{rank}.pt"))
    with open(os.path.join(outdir, f"refusals.{rank}"), "w") as f:
        f.write("\n".join(_refusals(net)))


def _gathered_beta(case: str, parts: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    if CASES[case][0] == "element" and isinstance(CASES[case][3], str):
        return torch.cat([p[key] for p in parts], dim=1)  # [G, *local] → [G, *shape]
    torch.testing.assert_close(parts[0][key], parts[1][key], rtol=0, atol=0)  # pooled: one β
    return parts[0][key]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_fsdp_two_ranks_equal_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    run_distributed(_worker, 2, str(tmp_path), timeout=90)
    if (tmp_path / "skip.0").exists():
        pytest.skip((tmp_path / "skip.0").read_text())
    for case in CASES:
        ref = _train(case, _net(), None)
        parts = [torch.load(tmp_path / f"{case}.{r}.pt", weights_only=True) for r in range(2)]
        assert int(ref["num_updates"]) == STEPS - (case == "nan")
        for key, want in ref.items():
            if key.startswith("beta."):
                got = _gathered_beta(case, parts, key)
            else:
                got = parts[0][key]
                torch.testing.assert_close(parts[1][key], got, rtol=0, atol=0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{case} {key}")
        if CASES[case][3] == "running":
            assert any(bool((ref[k] != 0).any()) for k in ref if k.startswith("beta."))
    msgs = (tmp_path / "refusals.0").read_text().split("\n")
    assert len(msgs) == 2
    assert "process_group" in msgs[0] and "FSDP" in msgs[0]
    assert "coefficient" in msgs[1] and "per_sample" in msgs[1]


def test_backward_mode_refuses_unsharded_params_and_unknown_modes():
    net = torch.nn.Linear(2, 1)
    with pytest.raises(VarRedError, match=r"params\[0\].*fully_shard"):
        GradientControl(net.parameters(), gradient_mode="backward")
    with pytest.raises(VarRedError, match="gradient_mode"):
        GradientControl(net.parameters(), gradient_mode="fsdp")
