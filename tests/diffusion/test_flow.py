"""Flow matching: schedule, score ↔ velocity, FM loss = DSM form, C^k exact/zero-mean/VR, OT pairs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from varred import gauss_hermite_cubature
from varred.errors import VarRedError
from varred.taylor import taylor_terms
from varred_diffusion.coupling import ot_pair_noise
from varred_diffusion.flow import (
    RectifiedFlowSchedule,
    ScoreFromVelocity,
    flow_matching_loss,
    flow_matching_taylor_cv,
    flow_matching_weighting,
    score_to_velocity,
    velocity_to_score,
)
from varred_diffusion.losses import dsm_loss

F64 = torch.float64
D = 2


class VelocityMLP(torch.nn.Module):
    """Unpreconditioned tanh MLP ``v(x_t, t)`` on ``[x_t, t]``."""

    def __init__(self, gen: torch.Generator, width: int = 16) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(D + 1, width, generator=gen, dtype=F64) / 1.5)
        self.b1 = torch.nn.Parameter(0.3 * torch.randn(width, generator=gen, dtype=F64))
        self.w2 = torch.nn.Parameter(torch.randn(width, D, generator=gen, dtype=F64) / 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.cat([x, t[:, None]], 1) @ self.w1 + self.b1) @ self.w2


def test_schedule_and_conversions(generator: torch.Generator) -> None:
    rf = RectifiedFlowSchedule()
    t = torch.tensor([0.01, 0.3, 0.5, 0.99], dtype=F64)
    assert torch.equal(rf.alpha(t), 1 - t) and torch.equal(rf.sigma_to_t(t), t)
    assert torch.allclose(rf.log_snr(t), torch.log((1 - t) ** 2 / t**2), rtol=1e-12)
    assert torch.allclose(rf.sigma_from_log_snr(rf.log_snr(t)), t, rtol=1e-12)
    xt, v = (torch.randn(4, D, generator=generator, dtype=F64) for _ in range(2))
    assert torch.allclose(score_to_velocity(velocity_to_score(v, xt, t), xt, t), v, rtol=1e-10)
    with pytest.raises(VarRedError, match="sigma_min"):
        RectifiedFlowSchedule(0.5, 1.5)


def test_optimal_velocity_of_gaussian_data_gives_its_score() -> None:
    # x ~ N(0, c² I): x_t ~ N(0, v_t I), v_t = (1−t)²c² + t², E[ε − x | x_t] = (t − (1−t)c²)/v_t x_t
    c2 = 0.49
    t = torch.tensor([0.05, 0.4, 0.9], dtype=F64)
    vt = (1 - t) ** 2 * c2 + t**2
    xt = torch.tensor([[1.0, -2.0], [0.3, 0.1], [-1.5, 2.0]], dtype=F64)
    model = ScoreFromVelocity(lambda x, tt: ((tt - (1 - tt) * c2) / vt)[:, None] * x)
    assert torch.allclose(model(xt, t), -xt / vt[:, None], rtol=1e-12)


def test_fm_loss_equals_dsm_form(generator: torch.Generator) -> None:
    net = VelocityMLP(generator)
    x = torch.randn(32, D, generator=generator, dtype=F64)
    eps = torch.randn(32, D, generator=generator, dtype=F64)
    t = torch.rand(32, generator=generator, dtype=F64) * 0.98 + 0.01
    xt = (1 - t)[:, None] * x + t[:, None] * eps
    direct = (net(xt, t) - (eps - x)).pow(2).sum(1)
    fm = flow_matching_loss(net, x, t, eps)
    assert torch.allclose(fm, direct, rtol=1e-13)
    dsm = dsm_loss(
        ScoreFromVelocity(net), x, t, eps, alpha=1 - t, weighting=flow_matching_weighting
    )
    assert torch.allclose(dsm, fm, rtol=1e-10)
    assert flow_matching_loss(net, x, 0.0, eps).shape == (32,)  # t = 0 and 1 are allowed
    assert flow_matching_loss(net, x, 1.0, eps).shape == (32,)


def _direct_cv(v, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
    """``‖T^k v − (ε − x)‖² − E_ε[·]``, v expanded about (1 − t)x (cubature for the mean)."""
    x0 = (1 - t)[:, None] * x

    def h(e: torch.Tensor) -> torch.Tensor:
        terms = taylor_terms(lambda y: v(y, t), x0, t[:, None] * e, k)
        tv = sum(term / math.factorial(j) for j, term in enumerate(terms))
        return (tv - (e - x)).pow(2).sum(1)

    nodes, weights = gauss_hermite_cubature(D, 2 * max(k, 1))
    mean = sum(w * h(n.expand_as(x)) for n, w in zip(nodes, weights))
    return h(eps) - mean


@pytest.mark.parametrize("order", [0, 1, 2])
def test_cv_equals_direct_velocity_expansion(order: int, generator: torch.Generator) -> None:
    net = VelocityMLP(generator)
    x = torch.randn(16, D, generator=generator, dtype=F64)
    eps = torch.randn(16, D, generator=generator, dtype=F64)
    t = torch.rand(16, generator=generator, dtype=F64) * 0.9 + 0.05
    ours = flow_matching_taylor_cv(net, x, t, eps, order=order, expectation="exact")
    assert torch.allclose(ours, _direct_cv(net, x, t, eps, order), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("order", "expectation"), [(0, "exact"), (1, "exact"), (1, "hutchinson"), (2, "probe")]
)
def test_cv_zero_mean(order: int, expectation: str, generator: torch.Generator) -> None:
    net = VelocityMLP(generator)
    n = 4000
    x = torch.randn(4, D, generator=generator, dtype=F64).repeat(n // 4, 1)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=F64).repeat(n // 4)
    eps = torch.randn(n, D, generator=generator, dtype=F64)
    with torch.no_grad():
        c = flow_matching_taylor_cv(
            net, x, t, eps, order=order, expectation=expectation, generator=generator
        )
    c = c.reshape(n // 4, 4)  # per (x, t) pair
    se = c.std(0) / math.sqrt(n // 4)
    assert bool((c.mean(0).abs() < 5 * se).all()), (c.mean(0), se)


class PolyVelocity(torch.nn.Module):
    """Velocity of total degree ``deg`` in ``x_t`` (coefficients depend on t)."""

    def __init__(self, deg: int, gen: torch.Generator) -> None:
        super().__init__()
        self.deg = deg
        self.b = torch.randn(D, generator=gen, dtype=F64)
        self.a = torch.randn(D, D, generator=gen, dtype=F64)
        self.q = torch.randn(D, D, D, generator=gen, dtype=F64) / 2

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.b * (1 + t[:, None])
        if self.deg >= 1:
            out = out + (y @ self.a) * torch.cos(t)[:, None]
        if self.deg >= 2:
            out = out + torch.einsum("bi,bj,ijk->bk", y, y, self.q)
        return out


@pytest.mark.parametrize("order", [0, 1, 2])
def test_polynomial_velocity_removed_exactly(order: int, generator: torch.Generator) -> None:
    v = PolyVelocity(order, generator)
    n = 200
    x = torch.randn(1, D, generator=generator, dtype=F64).expand(n, D)
    t = torch.full((n,), 0.37, dtype=F64)
    eps = torch.randn(n, D, generator=generator, dtype=F64)
    loss = flow_matching_loss(v, x, t, eps)
    ctrl = loss - flow_matching_taylor_cv(v, x, t, eps, order=order, expectation="exact")
    nodes, weights = gauss_hermite_cubature(D, 2 * max(order, 1))
    mean = sum(w * flow_matching_loss(v, x[:1], t[:1], nd[None]) for nd, w in zip(nodes, weights))
    assert float(loss.std()) > 0.1  # the plain loss does vary
    assert torch.allclose(ctrl, mean.expand(n), rtol=1e-10, atol=1e-10)  # zero variance
    if order < 2:  # one degree too many: no longer exact
        v2 = PolyVelocity(order + 1, generator)
        c2 = flow_matching_loss(v2, x, t, eps) - flow_matching_taylor_cv(
            v2, x, t, eps, order=order, expectation="exact"
        )
        assert float(c2.std()) > 1e-3


def _grad_vr(net: torch.nn.Module, t: float, gen: torch.Generator, n: int = 1500) -> float:
    """tr Cov[∇(ℓ − C^1)] / tr Cov[∇ℓ] at one clean point, β = 1 (per-sample grads by vmap)."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    x = torch.randn(1, D, generator=gen, dtype=F64).expand(n, D)
    eps = torch.randn(n, D, generator=gen, dtype=F64)
    tt = torch.full((n,), t, dtype=F64)

    def value(p, xi, ti, ei, controlled: bool) -> torch.Tensor:
        def v(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return functional_call(net, p, (y, s))

        out = flow_matching_loss(v, xi[None], ti[None], ei[None], validate=False)
        if controlled:
            out = out - flow_matching_taylor_cv(
                v, xi[None], ti[None], ei[None], order=1, expectation="exact", validate=False
            )
        return out.sum()

    def tr_cov(controlled: bool) -> float:
        g = vmap(grad(value), in_dims=(None, 0, 0, 0, None))(params, x, tt, eps, controlled)
        flat = torch.cat([g[k].reshape(n, -1) for k in params], 1)
        return float(flat.var(0).sum())

    return tr_cov(True) / tr_cov(False)


def test_gradient_variance_ratio_falls_as_t_to_zero(generator: torch.Generator) -> None:
    net = VelocityMLP(generator)
    vr = [_grad_vr(net, t, generator) for t in (0.5, 0.1, 0.01)]
    assert vr[0] > vr[1] > vr[2], vr
    assert vr[2] < 0.01, vr


def test_bad_input_names_the_argument(generator: torch.Generator) -> None:
    net = VelocityMLP(generator)
    x = torch.randn(3, D, dtype=F64)
    eps = torch.randn(3, D, dtype=F64)
    for bad in (-0.1, 1.2, torch.tensor([0.5, 0.5, 1.5], dtype=F64)):
        with pytest.raises(VarRedError, match=r"^t: "):
            flow_matching_loss(net, x, bad, eps)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(VarRedError, match=r"^t: "):
            flow_matching_taylor_cv(net, x, bad, eps, order=1)
    with pytest.raises(VarRedError, match="noise"):
        flow_matching_loss(net, x, 0.5, eps[:2])
    with pytest.raises(VarRedError, match="velocity_fn"):
        flow_matching_loss(lambda y, t: y[:, :1], x, 0.5, eps)
    with pytest.raises(VarRedError, match="order"):
        flow_matching_taylor_cv(net, x, 0.5, eps, order=-1)
    with pytest.raises(VarRedError, match="time_input"):
        ScoreFromVelocity(net, time_input="t")  # type: ignore[arg-type]


def test_ot_pairing_is_the_optimal_permutation(generator: torch.Generator) -> None:
    pytest.importorskip("scipy")
    x = torch.randn(6, 3, generator=generator, dtype=F64)
    eps = torch.randn(6, 3, generator=generator, dtype=F64)
    paired = ot_pair_noise(x, eps)
    best = min(float((x - eps[list(p)]).pow(2).sum()) for p in itertools.permutations(range(6)))
    assert float((x - paired).pow(2).sum()) == pytest.approx(best, rel=1e-12)
    assert torch.equal(torch.sort(paired, 0).values, torch.sort(eps, 0).values)  # same rows
    with pytest.raises(VarRedError, match="max_batch"):
        ot_pair_noise(x, eps, max_batch=4)
    with pytest.raises(VarRedError, match="noise"):
        ot_pair_noise(x, eps[:5])
