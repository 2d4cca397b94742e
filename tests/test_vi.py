"""varred.vi: exact zeros on quadratic/cubic log p, Isserlis means, unbiasedness, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from varred.coefficients import OptimalCoefficient
from varred.errors import VarRedError
from varred.estimate import estimate
from varred.gaussian import gauss_hermite_cubature, isserlis_pairings
from varred.vi.control import ELBOControl
from varred.vi.families import GaussianFamily
from varred.vi.gradient import elbo_grads, score_control, stl_grads, taylor_controls

F64 = torch.float64
FAMILIES = [("meanfield", "log"), ("meanfield", "softplus"), ("fullrank", "log")]


def _family(d: int, kind: str, transform: str, g: torch.Generator) -> GaussianFamily:
    loc = torch.randn(d, generator=g, dtype=F64) * 0.5
    if kind == "fullrank":
        scale = torch.tril(torch.randn(d, d, generator=g, dtype=F64) * 0.2, -1)
        scale = scale + torch.diag(0.5 + torch.rand(d, generator=g, dtype=F64))
    else:
        scale = 0.5 + torch.rand(d, generator=g, dtype=F64)
    return GaussianFamily(loc, scale, kind=kind, transform=transform)


@pytest.mark.parametrize(("kind", "transform"), FAMILIES)
def test_quadratic_order1_gives_exact_zero_variance(kind, transform, generator):
    d = 4
    a = torch.randn(d, d, generator=generator, dtype=F64)
    prec = a @ a.T + torch.eye(d, dtype=F64)
    m = torch.randn(d, generator=generator, dtype=F64)

    def log_p(z):
        r = z - m
        return -0.5 * torch.einsum("ni,ij,nj->n", r, prec, r)

    q = _family(d, kind, transform, generator)
    eps = q.sample_noise(256, generator)
    gm, gs = elbo_grads(q, log_p, eps)
    cm, cs = taylor_controls(q, log_p, eps, 1)
    for f, c in ((gm, cm), (gs, cs)):
        y = f - c  # β = 1
        rel = y.var(0).sum() / f.var(0).sum()
        assert float(rel) < 1e-12
    # and the constant equals the exact expected gradient: mean block ∇log p(μ)
    torch.testing.assert_close((gm - cm)[0], -prec @ (q.loc.detach() - m), rtol=1e-12, atol=1e-12)


def _cubic(d: int, g: torch.Generator):
    t = torch.randn(d, d, d, generator=g, dtype=F64) * 0.3
    t = sum(t.permute(*p) for p in itertools.permutations(range(3))) / 6  # symmetric
    b = torch.randn(d, generator=g, dtype=F64)

    def log_p(z):
        return torch.einsum("ijk,ni,nj,nk->n", t, z, z, z) / 6 - 0.5 * (z**2).sum(1) + z @ b

    def grad(z):  # [n, d]
        return 0.5 * torch.einsum("ijk,nj,nk->ni", t, z, z) - z + b

    return log_p, grad, t, b


@pytest.mark.parametrize(("kind", "transform"), FAMILIES)
def test_order2_means_exact_against_isserlis_on_cubic(kind, transform, generator):
    d = 3
    log_p, gradf, t, b = _cubic(d, generator)
    q = _family(d, kind, transform, generator)
    mu, s = q.loc.detach(), q.scale_matrix()
    cov = s @ s.T
    # Isserlis: E[ε_j ε_k] = Σ over pairings of δ → E[(Sε)_j (Sε)_k] = Σ_jk
    (pairing,) = isserlis_pairings(2)
    assert pairing == ((0, 1),)
    exact_mean = (
        0.5 * torch.einsum("ijk,j,k->i", t, mu, mu)
        + 0.5 * torch.einsum("ijk,jk->i", t, cov)
        - mu
        + b
    )
    nodes, w = gauss_hermite_cubature(d, 3)
    gm, gs = elbo_grads(q, log_p, nodes)
    cm, cs = taylor_controls(q, log_p, nodes, 2, expectation="exact")
    torch.testing.assert_close(w @ gm, exact_mean, rtol=1e-12, atol=1e-12)
    for c in (cm, cs):  # controls of mean zero, exactly (cubature is exact to degree 3)
        assert float((w[:, None] * c.reshape(len(w), -1)).sum(0).abs().max()) < 1e-12
    # order 2 reproduces the cubic's gradient integrand: zero variance at β = 1
    eps = q.sample_noise(64, generator)
    gm, gs = elbo_grads(q, log_p, eps)
    cm, cs = taylor_controls(q, log_p, eps, 2, expectation="exact")
    torch.testing.assert_close(gm - cm, exact_mean.expand(64, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm, gradf(q.transform_noise(eps)))
    assert float((gs - cs).reshape(64, -1).var(0).max()) < 1e-20


def _logreg(g: torch.Generator, n: int = 20, d: int = 2):
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(x @ torch.ones(d, dtype=F64))
    sgn = 2 * y.to(F64) - 1

    def log_p(z):  # [m, d] -> [m]
        return torch.nn.functional.logsigmoid(sgn * (z @ x.T)).sum(1) - 0.5 * (z**2).sum(1)

    return log_p


def _zmax(reps: list[torch.Tensor], truth: torch.Tensor) -> float:
    r = torch.stack(reps)
    se = r.std(0) / math.sqrt(len(reps))
    return float(((r.mean(0) - truth).abs() / se.clamp_min(1e-12)).max())


@pytest.mark.parametrize(("kind", "transform"), [("meanfield", "log"), ("fullrank", "softplus")])
def test_every_controlled_gradient_is_unbiased_on_logistic_regression(kind, transform, generator):
    log_p = _logreg(generator)
    q = _family(2, kind, transform, generator)
    nodes, w = gauss_hermite_cubature(2, 79)  # 40² nodes: truth to ~1e-13 (smooth integrand)
    tm, ts = elbo_grads(q, log_p, nodes)
    truth = torch.cat([w @ tm, w @ ts.reshape(len(w), -1)])
    reps_n, batch = 200, 8
    eps = q.sample_noise(reps_n * batch, generator)
    for order, stl in [(1, "none"), (2, "none"), (0, "stl"), (1, "blend"), (2, "stl")]:
        for fit in ("crossfit", "running"):
            coef = OptimalCoefficient(kind="scalar", fit=fit, folds=2)
            ctrl = ELBOControl(q, log_p, order=order, stl=stl, coefficient=coef)
            parts = ctrl.per_sample(eps)  # exact means: batches of 8 are independent reps
            reps = []
            for r in range(reps_n):
                sl = slice(r * batch, (r + 1) * batch)
                means = []
                for b, (f, c) in parts.items():
                    cb = None if c is None else c[sl]
                    means.append(
                        estimate(f[sl], cb, ctrl.coefficients[b] if cb is not None else None).mean
                    )
                reps.append(torch.cat(means))
            assert _zmax(reps, truth) < 5, (order, stl, fit)
    # probe-estimated control means: fresh probes every step (the ELBOControl.step path)
    ctrl = ELBOControl(q, log_p, order=2, stl="blend", expectation="probe", probes=2)
    reps = []
    for _ in range(60):
        ctrl.step(batch, generator)
        reps.append(-torch.cat([q.loc.grad, q.raw_scale.grad.reshape(-1)]))
    assert _zmax(reps, truth) < 5


@pytest.mark.parametrize(("kind", "transform"), FAMILIES)
def test_stl_is_zero_variance_at_the_exact_posterior(kind, transform, generator):
    q = _family(3, kind, transform, generator)
    mu, s = q.loc.detach(), q.scale_matrix()
    prec = torch.linalg.inv(s @ s.T)

    def log_p(z):
        r = z - mu
        return -0.5 * torch.einsum("ni,ij,nj->n", r, prec, r)

    eps = q.sample_noise(64, generator)
    for f in stl_grads(q, log_p, eps):
        assert float(f.abs().max()) < 1e-10  # the gradient at the optimum is exactly 0
    gm, gs = elbo_grads(q, log_p, eps)
    assert float(gs.var(0).sum()) > 1e-3  # the full gradient is noisy there
    cm, cs = score_control(q, eps)  # ... and all of its noise is the score term
    torch.testing.assert_close((gm - cm, gs - cs), stl_grads(q, log_p, eps))


def test_training_loop_reaches_the_gaussian_posterior(generator):
    m = torch.tensor([1.0, -2.0], dtype=F64)
    sd = torch.tensor([0.5, 1.5], dtype=F64)
    q = GaussianFamily(torch.zeros(2, dtype=F64), 1.0)
    ctrl = ELBOControl(q, lambda z: -0.5 * (((z - m) / sd) ** 2).sum(1), order=1)
    opt = torch.optim.SGD(q.parameters(), lr=0.2)  # order 1 on a Gaussian: exact gradients
    for _ in range(100):
        opt.zero_grad()
        ctrl.step(4, generator)
        opt.step()
    torch.testing.assert_close(q.loc.detach(), m, atol=1e-3, rtol=0)
    torch.testing.assert_close(q.scale_diag(), sd, atol=1e-3, rtol=0)


def test_bad_inputs_name_the_argument():
    q = GaussianFamily(torch.zeros(2, dtype=F64), 1.0)
    eps = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(VarRedError, match="log_p: expected shape \\[4\\]"):
        elbo_grads(q, lambda z: z, eps)
    with pytest.raises(VarRedError, match="log_p: expected finite"):
        elbo_grads(q, lambda z: z.sum(1) * float("nan"), eps)
    with pytest.raises(VarRedError, match="log_p: expected dtype"):
        elbo_grads(q, lambda z: z.sum(1).float(), eps)
    with pytest.raises(VarRedError, match="scale: expected positive"):
        GaussianFamily(torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(VarRedError, match="scale: expected a positive finite"):
        GaussianFamily(torch.zeros(2, dtype=F64), -1.0)
    with pytest.raises(VarRedError, match="scale: expected dtype"):
        GaussianFamily(torch.zeros(2, dtype=F64), torch.ones(2))
    with pytest.raises(VarRedError, match="eps: expected dtype"):
        elbo_grads(q, lambda z: z.sum(1), eps.float())
    with pytest.raises(VarRedError, match="eps: expected shape"):
        elbo_grads(q, lambda z: z.sum(1), torch.zeros(4, 3, dtype=F64))
    with pytest.raises(VarRedError, match="order"):
        taylor_controls(q, lambda z: z.sum(1), eps, 3)
    with pytest.raises(VarRedError, match="coefficient"):
        ELBOControl(q, lambda z: z.sum(1), coefficient=OptimalCoefficient(fit="batch"))
    with pytest.raises(VarRedError, match="stl"):
        ELBOControl(q, lambda z: z.sum(1), stl="yes")
    with pytest.raises(VarRedError, match="scale: expected a lower-triangular"):
        GaussianFamily(torch.zeros(2, dtype=F64), torch.ones(2, 2, dtype=F64), kind="fullrank")
