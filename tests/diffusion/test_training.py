"""Tests of ControlledDSM, the one-line controlled DSM training step."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from varred import VarRedError
from varred_diffusion import ControlledDSM, SigmaBins, dsm_loss, dsm_taylor_cv
from varred_diffusion.toy import ring8

F64 = torch.float64


class Score(nn.Module):
    """Small MLP score ``[B, 2], [B] -> [B, 2]`` on ``[x, log σ]``."""

    def __init__(
        self, generator: torch.Generator, width: int = 16, dtype: torch.dtype = F64
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 2)).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=F64))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(torch.cat([x, torch.log(sigma)[:, None].to(x.dtype)], 1))


def _batch(
    g: torch.Generator, n: int = 32, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor, Tensor]:
    x = ring8().sample(n, g).to(dtype)
    sigma = torch.exp(torch.empty(n, dtype=F64).uniform_(-5, 0, generator=g)).to(dtype)
    return x, sigma, torch.randn(n, 2, generator=g, dtype=F64).to(dtype)


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_disabled_is_bit_for_bit_plain_dsm(generator: torch.Generator) -> None:
    model = Score(generator)
    x, sigma, eps = _batch(generator)
    dsm_loss(model, x, sigma, eps).mean().backward()
    want = _grads(model)
    step = ControlledDSM(model, model.parameters(), order=1, enabled=False)
    step(x, sigma, eps)
    for a, b in zip(_grads(model), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["element", "tensor", "scalar"])
@pytest.mark.parametrize("binned", [False, True])
def test_fixed_beta_equals_backprop_of_controlled_objective(
    order: int, granularity: str, binned: bool, generator: torch.Generator
) -> None:
    """Paper's equivalence: ∇ mean(ℓ − βC) = mean ∇ℓ − β mean ∇C, in every coordinate."""
    beta = 0.7
    model = Score(generator)
    x, sigma, eps = _batch(generator)
    loss = dsm_loss(model, x, sigma, eps)
    ctrl = dsm_taylor_cv(model, x, sigma, eps, order=order)
    (loss - beta * ctrl).mean().backward()
    want = _grads(model)
    bins = SigmaBins(1e-2, 1.0, 3) if binned else None
    step = ControlledDSM(
        model, model.parameters(), order=order, coefficient=beta, granularity=granularity, bins=bins
    )
    diag = step(x, sigma, eps)
    for a, b in zip(_grads(model), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(diag["loss"], loss.detach().mean().float())


@pytest.mark.parametrize("stack", [True, False])
def test_k0_matches_separate_calls(stack: bool, generator: torch.Generator) -> None:
    model = Score(generator)
    x, sigma, eps = _batch(generator)
    w = lambda s: 1 + s  # noqa: E731
    step = ControlledDSM(model, model.parameters(), order=0, weighting=w, alpha=0.8, stack=stack)
    loss, ctrl = step.losses_and_controls(x, sigma, eps)
    torch.testing.assert_close(loss, dsm_loss(model, x, sigma, eps, weighting=w, alpha=0.8))
    torch.testing.assert_close(
        ctrl, dsm_taylor_cv(model, x, sigma, eps, order=0, weighting=w, alpha=0.8)
    )


def test_probe_expectation_uses_the_generator(generator: torch.Generator) -> None:
    model = Score(generator)
    x, sigma, eps = _batch(generator)
    step = ControlledDSM(model, model.parameters(), order=1, expectation="probe", coefficient=0.5)
    with pytest.raises(VarRedError, match="generator"):
        step(x, sigma, eps)
    step(x, sigma, eps, generator=torch.Generator().manual_seed(3))
    got = _grads(model)
    model.zero_grad()
    ctrl = dsm_taylor_cv(
        model,
        x,
        sigma,
        eps,
        order=1,
        expectation="probe",
        generator=torch.Generator().manual_seed(3),
    )
    (dsm_loss(model, x, sigma, eps) - 0.5 * ctrl).mean().backward()
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_running_training_loop_and_checkpoint(generator: torch.Generator) -> None:
    model = Score(generator)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bins = SigmaBins(1e-3, 1.0, 4)
    step = ControlledDSM(
        model, model.parameters(), order=0, bins=bins, control_kwargs={"warmup_steps": 2}
    )
    for _ in range(6):
        diag = step(*_batch(generator))
        opt.step()
    for key in ("loss", "variance_ratio", "correlation", "beta_mean"):
        assert isinstance(diag[key], Tensor) and bool(torch.isfinite(diag[key]).all()), key
    assert diag["variance_ratio_per_group"].shape == (4,)
    # after 4 steps of statistics per-element β is still noisy: the honest diagnostic may exceed 1
    assert float(diag["variance_ratio"]) >= 0
    # restoring the statistics reproduces the next step exactly
    clone = Score(generator)
    clone.load_state_dict(model.state_dict())
    other = ControlledDSM(
        clone, clone.parameters(), order=0, bins=bins, control_kwargs={"warmup_steps": 2}
    )
    other.load_state_dict(step.state_dict())
    batch = _batch(generator)
    step(*batch)
    other(*batch)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_variance_ratio_diagnostic_small_sigma(generator: torch.Generator) -> None:
    """At σ = 0.01 C^0 removes most of the gradient variance (running estimate after warm-up)."""
    model = Score(generator)
    step = ControlledDSM(model, model.parameters(), order=0, control_kwargs={"warmup_steps": 5})
    for _ in range(12):
        x, _, eps = _batch(generator)
        diag = step(x, torch.full((32,), 0.01, dtype=F64), eps)
    assert float(diag["variance_ratio"]) < 0.5


@pytest.mark.parametrize("order", [0, 1])
def test_autocast_bfloat16(order: int, generator: torch.Generator) -> None:
    model = Score(generator, dtype=torch.float32)
    x, sigma, eps = _batch(generator, dtype=torch.float32)
    step = ControlledDSM(model, model.parameters(), order=order, control_kwargs={"warmup_steps": 1})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        diag = step(x, sigma, eps)
        diag = step(x, sigma, eps)
    assert diag["loss"].dtype == torch.float32
    assert bool(torch.isfinite(diag["loss"]))
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": -1}, "order"),
        ({"order": 3, "expectation": "hutchinson"}, "hutchinson"),
        ({"expectation": "mc"}, "expectation"),
        ({"granularity": "row"}, "granularity"),
    ],
)
def test_errors(kwargs: dict, match: str, generator: torch.Generator) -> None:
    model = Score(generator)
    with pytest.raises(VarRedError, match=match):
        ControlledDSM(model, model.parameters(), **kwargs)


def test_no_parameters() -> None:
    with pytest.raises(VarRedError, match="params"):
        ControlledDSM(lambda x, s: x, [])


@pytest.mark.parametrize("order", [1, 2])
def test_higher_order_with_bins_runs(order: int, generator: torch.Generator) -> None:
    """k ≥ 1 with σ-bins (group backward through forward-mode AD) gives finite gradients."""
    model = Score(generator)
    bins = SigmaBins(1e-2, 1.0, 3)
    step = ControlledDSM(
        model, model.parameters(), order=order, bins=bins, control_kwargs={"warmup_steps": 1}
    )
    for _ in range(3):
        diag = step(*_batch(generator, n=16))
    assert diag["variance_ratio_per_group"].shape == (3,)
    for p in model.parameters():
        assert bool(torch.isfinite(p.grad).all())


class LabelScore(Score):
    """``Score`` with a per-sample keyword (a class label shifting the output)."""

    def forward(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:  # type: ignore[override]
        out = super().forward(x, sigma)
        return out if label is None else out + 0.1 * label[:, None].to(out.dtype)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("coefficient", ["running", "per_sample"])
@pytest.mark.parametrize("granularity", ["element", "scalar"])
def test_split_group_forward_equals_joint(
    order: int, coefficient: str, granularity: str, generator: torch.Generator
) -> None:
    """``group_forward="split"`` (one forward per σ bin) gives the joint path's gradients, β
    and diagnostics, with per-sample keyword tensors, a per-sample α and an empty bin."""
    model = LabelScore(generator)
    ref = LabelScore(generator)
    ref.load_state_dict(model.state_dict())
    bins = SigmaBins(1e-3, 1.0, 5)  # 5e-4 falls below the range: clamped into bin 0
    alpha = lambda s: 1.0 / torch.sqrt(1.0 + s**2)  # noqa: E731
    kw = {"order": order, "coefficient": coefficient, "granularity": granularity, "bins": bins}
    kw |= {"alpha": alpha, "expectation": "exact", "control_kwargs": {"warmup_steps": 2}}
    split = ControlledDSM(model, model.parameters(), group_forward="split", **kw)
    joint = ControlledDSM(ref, ref.parameters(), group_forward="joint", **kw)
    opt_s = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_j = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(4):
        x, sigma, eps = _batch(generator, 24)
        sigma[:3] = 5e-4  # bin 0 present in this step
        label = torch.randint(0, 3, (24,), generator=generator)
        d_s = split(x, sigma, eps, score_kwargs={"label": label})
        d_j = joint(x, sigma, eps, score_kwargs={"label": label})
        for a, b in zip(_grads(model), _grads(ref)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for key in ("loss", "variance_ratio", "beta_mean", "grad_norm_control"):
            torch.testing.assert_close(d_s[key], d_j[key], rtol=1e-10, atol=1e-12)
        opt_s.step()
        opt_j.step()
    for a, b in zip(split.control.coefficients(), joint.control.coefficients()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert any(bool((b != 0).any()) for b in split.control.coefficients())


def test_split_group_forward_bad_groups(generator: torch.Generator) -> None:
    model = Score(generator)
    step = ControlledDSM(model, model.parameters(), bins=SigmaBins(1e-3, 1.0, 3))
    assert step.group_forward == "split"
    x, sigma, eps = _batch(generator, 8)
    with pytest.raises(
        VarRedError, match=r"groups: expected values in \[0, 3\), got min 0 and max 3"
    ):
        step(x, sigma, eps, groups=torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))
    with pytest.raises(VarRedError, match=r"groups: expected values in \[0, 3\), got min -1"):
        step(x, sigma, eps, groups=torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]))
    with pytest.raises(VarRedError, match="group_forward: expected 'auto', 'split' or 'joint'"):
        ControlledDSM(model, model.parameters(), group_forward="vmap")
    fast = ControlledDSM(model, model.parameters(), bins=SigmaBins(1e-3, 1.0, 3), validate=False)
    assert fast.group_forward == "joint"  # sync-free by default when nothing is validated


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("group_forward", ["split", "joint"])
def test_grad_scaler_step(enabled: bool, group_forward: str, generator: torch.Generator) -> None:
    """``step(..., scaler=)`` writes S × the unscaled gradient (plain or controlled, any
    group_forward), ready for ``scaler.step``."""
    model = Score(generator)
    x, sigma, eps = _batch(generator, 16)
    kw = {"bins": SigmaBins(1e-3, 1.0, 3), "coefficient": 0.8, "enabled": enabled}
    step = ControlledDSM(model, model.parameters(), group_forward=group_forward, **kw)
    step(x, sigma, eps)
    want = _grads(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step(x, sigma, eps, scaler=scaler)
    for a, b in zip(_grads(model), want):
        torch.testing.assert_close(a, b * 2.0**8, rtol=1e-12, atol=1e-12)
