"""Faults in a controlled step: NaN data, NaN losses, Inf controls, a NaN parameter.

The step must refuse (``raise_on_nonfinite=True``: ``VarRedError``; ``nonfinite="propagate"``:
a non-finite gradient and ``finite=False``; ``"zero"``: an exactly zero gradient), leave the
coefficient statistics unchanged bit for bit, and the next finite step must give exactly what
it gives when the bad step never happened. The same for ``ImportanceSigmaSampler.update``.
"""

from __future__ import annotations

import pytest
import torch

from varred import VarRedError
from varred_diffusion import ControlledDSM, ImportanceSigmaSampler, MLPScore, ring8

F64 = torch.float64
FAULTS = ("nan_x", "nan_loss", "inf_control", "nan_param")
POLICIES = ("raise", "propagate", "zero")
MODES = ("running", "per_sample")
B = 12


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = ring8().sample(B, gen)
        sigma = torch.exp(torch.empty(B, dtype=F64).uniform_(-5, 0, generator=gen))
        out.append((x, sigma, torch.randn(B, 2, generator=gen, dtype=F64)))
    return out


def _make(seed: int, mode: str, policy: str) -> tuple[MLPScore, ControlledDSM]:
    net = MLPScore(2, width=8, depth=1, generator=torch.Generator().manual_seed(seed)).to(F64)
    kw = {"warmup_steps": 1}
    if policy == "raise":
        kw["raise_on_nonfinite"] = True
    else:
        kw["nonfinite"] = policy
    return net, ControlledDSM(net, net.parameters(), order=0, coefficient=mode, control_kwargs=kw)


def _bad_step(net: MLPScore, step: ControlledDSM, batch, fault: str) -> dict:
    """One step with ``fault`` injected (the model is restored afterwards)."""
    x, sigma, eps = batch
    spike = torch.zeros(B, dtype=F64)
    if fault == "nan_x":
        x = x.clone()
        x[3, 1] = float("nan")
        return step(x, sigma, eps)
    if fault == "nan_param":
        p = next(net.parameters())
        keep = p.detach().clone()
        with torch.no_grad():
            p.view(-1)[0] = float("nan")
        try:
            return step(x, sigma, eps)
        finally:
            with torch.no_grad():
                p.copy_(keep)
    loss, ctrl = step.losses_and_controls(x, sigma, eps)
    # one sample's value non-finite through the graph (so its gradient is too)
    spike[5] = float("nan") if fault == "nan_loss" else float("inf")
    if fault == "nan_loss":
        loss = loss * (1 + spike)
    else:
        ctrl = ctrl * (1 + spike)
    return step.control.backward(loss, ctrl)


def _snapshot(net: MLPScore, step: ControlledDSM) -> dict[str, torch.Tensor]:
    out = {f"grad.{i}": p.grad.clone() for i, p in enumerate(net.parameters())}
    out.update({f"param.{i}": p.detach().clone() for i, p in enumerate(net.parameters())})
    out.update({f"beta.{i}": b.clone() for i, b in enumerate(step.control.coefficients())})
    out.update({k: v for k, v in step.state_dict().items() if torch.is_tensor(v)})
    return out


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train(net, step, batches, fault: str | None, policy: str) -> dict[str, torch.Tensor]:
    """Steps on ``batches``, with the fault injected after the first two; SGD skips bad steps."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    for i, batch in enumerate(batches):
        if i == 2 and fault is not None:
            before = _snapshot(net, step)
            if policy == "raise":
                with pytest.raises(VarRedError, match="NaN/Inf"):
                    _bad_step(net, step, batch, fault)
                _assert_bitwise_equal(_snapshot(net, step), before)  # grads untouched too
            else:
                diag = _bad_step(net, step, batch, fault)
                assert not bool(diag["finite"])
                grads = [p.grad for p in net.parameters()]
                if policy == "zero":
                    assert all(bool((g == 0).all()) for g in grads)
                else:
                    assert not all(bool(torch.isfinite(g).all()) for g in grads)
                after = _snapshot(net, step)
                for key in before:  # statistics, β and parameters: bit for bit unchanged
                    if not key.startswith("grad."):
                        assert torch.equal(after[key], before[key]), key
        diag = step(*batch)
        assert bool(diag["finite"])
        opt.step()
    return _snapshot(net, step)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_refused_and_forgotten(seed, mode, policy, fault):
    """A faulty step changes no statistic; training continues as if it never happened."""
    batches = _batches(seed, 4)
    ref = _train(*_make(seed, mode, policy), batches, None, policy)
    got = _train(*_make(seed, mode, policy), batches, fault, policy)
    _assert_bitwise_equal(got, ref)
    assert any(bool((ref[k] != 0).any()) for k in ref if k.startswith("beta."))


def test_nan_loss_value_with_finite_gradient_is_flagged(seed):
    """``propagate``: a NaN loss value whose gradient is finite is flagged only by ``finite``."""
    net, step = _make(seed, "running", "propagate")
    batches = _batches(seed, 2)
    step(*batches[0])
    before = step.state_dict()
    loss, ctrl = step.losses_and_controls(*batches[1])
    spike = torch.zeros(B, dtype=F64)
    spike[0] = float("nan")
    diag = step.control.backward(loss + spike, ctrl)  # the constant NaN has zero gradient
    assert not bool(diag["finite"])
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    after = step.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v))


@pytest.mark.parametrize("order", [1, 2])
def test_nan_x_rejected_by_validation_for_higher_orders(seed, order):
    """For k ≥ 1, ``dsm_taylor_cv`` validates x: NaN data raises before any statistic changes."""
    net = MLPScore(2, width=8, depth=1, generator=torch.Generator().manual_seed(seed)).to(F64)
    step = ControlledDSM(net, net.parameters(), order=order, expectation="exact")
    x, sigma, eps = _batches(seed, 1)[0]
    before = step.state_dict()
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(VarRedError, match="x"):
        step(x, sigma, eps)
    after = step.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.is_tensor(v))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sigma_sampler_refuses_nonfinite_losses(bad):
    """A non-finite loss must not enter the importance sampler's history."""
    sampler = ImportanceSigmaSampler(2, 1e-2, 1.0, history=2)
    sigma = torch.tensor([0.02, 0.5, 0.03, 0.6], dtype=F64)
    sampler.update(sigma, torch.ones(4, dtype=F64))
    before = sampler.state_dict()
    try:
        with pytest.raises(VarRedError, match="losses"):
            sampler.update(sigma, torch.tensor([bad, 1.0, 1.0, 1.0], dtype=F64))
    finally:
        after = sampler.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    sampler.update(sigma, 2 * torch.ones(4, dtype=F64))  # next finite update: as if none bad
    ref = ImportanceSigmaSampler(2, 1e-2, 1.0, history=2)
    ref.update(sigma, torch.ones(4, dtype=F64))
    ref.update(sigma, 2 * torch.ones(4, dtype=F64))
    assert all(torch.equal(sampler.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_sigma_sampler_state_unchanged_by_rejected_shapes():
    """A malformed update (shape mismatch) raises and leaves the sampler state bit for bit."""
    sampler = ImportanceSigmaSampler(2, 1e-2, 1.0, history=2)
    sigma = torch.tensor([0.02, 0.5], dtype=F64)
    sampler.update(sigma, torch.ones(2, dtype=F64))
    before = sampler.state_dict()
    with pytest.raises(VarRedError, match="losses"):
        sampler.update(sigma, torch.ones(3, dtype=F64))
    assert all(torch.equal(sampler.state_dict()[k], v) for k, v in before.items())
