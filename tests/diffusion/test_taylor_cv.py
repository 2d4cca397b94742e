"""Tests of the DSM Taylor control variates C^k (Jeha et al., 2024)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacfwd

from varred import VarRedError, gauss_hermite_cubature
from varred_diffusion import dsm_loss, dsm_taylor_cv
from varred_diffusion.taylor_cv import resolve_expectation
from varred_diffusion.toy import ring8

F64 = torch.float64
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "silu": F.silu}


class PerSampleMLP:
    """MLP score ``s(y [N, d], σ [N]) -> [N, d]`` on ``[y, log σ]``, one weight copy per sample.

    Row ``r`` of any (stacked) batch uses copy ``r mod n``, so one backward of
    ``values.sum()`` gives the exact per-sample gradients ``∇_θ values_i`` ``[n, P]``,
    through the stacked cubature/probe evaluations of ``dsm_taylor_cv`` too.
    """

    def __init__(
        self,
        d: int,
        width: int,
        depth: int,
        activation: str,
        n: int,
        generator: torch.Generator,
        dtype: torch.dtype = F64,
    ) -> None:
        sizes = [d + 1] + [width] * depth + [d]
        self.n = n
        self.act = ACTIVATIONS[activation]
        self.params: list[Tensor] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            w = torch.randn(fan_out, fan_in, generator=generator, dtype=F64) / math.sqrt(fan_in)
            b = 0.3 * torch.randn(fan_out, generator=generator, dtype=F64)
            for t in (w, b):
                self.params.append(t.to(dtype).expand(n, *t.shape).clone().requires_grad_())

    def __call__(self, y: Tensor, sigma: Tensor) -> Tensor:
        idx = torch.arange(y.shape[0], device=y.device) % self.n
        h = torch.cat([y.reshape(y.shape[0], -1), torch.log(sigma)[:, None].to(y.dtype)], 1)
        layers = len(self.params) // 2
        for i in range(layers):
            w, b = self.params[2 * i][idx], self.params[2 * i + 1][idx]
            h = torch.einsum("rij,rj->ri", w, h) + b
            if i < layers - 1:
                h = self.act(h)
        return h.reshape(y.shape)

    def per_sample_grads(self, values: Tensor) -> Tensor:
        """``[n] -> [n, P]``: row ``i`` is ``∇_θ values_i``."""
        grads = torch.autograd.grad(values.sum(), self.params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(self.n, -1)
                for g, p in zip(grads, self.params)
            ],
            1,
        )


def bonferroni_z(num: int, alpha: float = 1e-5) -> float:
    """Two-sided normal threshold with family-wise level ``alpha`` over ``num`` z-scores."""
    return float(torch.special.ndtri(torch.tensor(1 - alpha / (2 * num), dtype=F64)))


def assert_zero_mean(values: Tensor) -> None:
    """Columns of ``values`` ``[n, P]`` have mean zero: max |z| under the Bonferroni bound.

    Columns that are identically zero must have mean exactly zero (ReLU dead units).
    """
    n = values.shape[0]
    mean, se = values.mean(0), values.std(0) / math.sqrt(n)
    const = se == 0
    assert bool((mean[const] == 0).all()), "a constant column has non-zero mean"
    z = (mean[~const] / se[~const]).abs()
    if z.numel():
        bound = bonferroni_z(int(z.numel()))
        assert float(z.max()) < bound, f"max |z| = {float(z.max()):.2f} >= {bound:.2f}"


def draw(n: int, g: torch.Generator, d: int = 2) -> tuple[Tensor, Tensor]:
    """Clean ring8 data ``[n, 2]`` and noise ``[n, 2]``."""
    x = ring8().sample(n, g) if d == 2 else torch.randn(n, d, generator=g, dtype=F64)
    return x, torch.randn(n, d, generator=g, dtype=F64)


# ------------------------------------------------------------------ analytic truths


def _net(g: torch.Generator, activation: str = "tanh", n: int = 1) -> PerSampleMLP:
    return PerSampleMLP(2, 8, 2, activation, n, g)


def test_c0_is_the_closed_form_for_every_expectation(generator: torch.Generator) -> None:
    net = _net(generator)
    x, eps = draw(16, generator)
    sigma = torch.rand(16, generator=generator, dtype=F64) + 0.05
    lam = 0.5 + sigma
    s0 = net(x, sigma)
    want = lam * (2 * (eps * s0).sum(1) / sigma + ((eps**2).sum(1) - 2) / sigma**2)
    for method in ("auto", "exact", "probe", "hutchinson"):
        got = dsm_taylor_cv(
            net, x, sigma, eps, order=0, weighting=lambda s: 0.5 + s, expectation=method
        )
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def _explicit(net: PerSampleMLP, x0: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """s(x0) [B, d], J [B, d, d], H [B, d, d, d] of the first copy, by jacfwd per sample."""

    def s1(y: Tensor, s: Tensor) -> Tensor:
        return net(y[None], s[None])[0]

    s0 = torch.stack([s1(y, s) for y, s in zip(x0, sigma)])
    jac = torch.stack([jacfwd(s1)(y, s) for y, s in zip(x0, sigma)])
    hes = torch.stack([jacfwd(jacfwd(s1))(y, s) for y, s in zip(x0, sigma)])
    return s0, jac, hes


def _h(
    s0: Tensor, jac: Tensor, hes: Tensor, sigma: Tensor, lam: Tensor, e: Tensor, k: int
) -> Tensor:
    """(λ/σ²)‖σ T^k + ε‖² with T^k = s0 + σJε + σ²/2 H[ε,ε]: [B] for ε [B, d]."""
    t = s0.clone()
    if k >= 1:
        t = t + sigma[:, None] * torch.einsum("bij,bj->bi", jac, e)
    if k >= 2:
        t = t + 0.5 * sigma[:, None] ** 2 * torch.einsum("bijk,bj,bk->bi", hes, e, e)
    return lam / sigma**2 * ((sigma[:, None] * t + e) ** 2).sum(1)


def test_c1_exact_mean_equals_closed_form(generator: torch.Generator) -> None:
    net = _net(generator)
    x, eps = draw(8, generator)
    sigma = torch.rand(8, generator=generator, dtype=F64) + 0.05
    alpha = 0.7
    s0, jac, hes = _explicit(net, alpha * x, sigma)
    lam = sigma**2
    tr = torch.diagonal(jac, dim1=1, dim2=2).sum(1)
    fro = (jac**2).sum((1, 2))
    mean = lam / sigma**2 * (sigma**2 * (s0**2).sum(1) + 2 + 2 * sigma**2 * tr + sigma**4 * fro)
    want = _h(s0, jac, hes, sigma, lam, eps, 1) - mean
    got = dsm_taylor_cv(net, x, sigma, eps, order=1, alpha=alpha, expectation="exact")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_c2_exact_mean_equals_cubature_of_explicit_polynomial(generator: torch.Generator) -> None:
    net = _net(generator, "silu")
    x, eps = draw(6, generator)
    sigma = torch.rand(6, generator=generator, dtype=F64) + 0.05
    s0, jac, hes = _explicit(net, x, sigma)
    lam = torch.ones(6, dtype=F64)
    nodes, weights = gauss_hermite_cubature(2, 6)  # more nodes than dsm_taylor_cv uses
    mean = sum(
        w * _h(s0, jac, hes, sigma, lam, node.expand(6, 2), 2) for node, w in zip(nodes, weights)
    )
    want = _h(s0, jac, hes, sigma, lam, eps, 2) - mean
    got = dsm_taylor_cv(net, x, sigma, eps, order=2, weighting=lambda s: torch.ones_like(s))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_exact_mean_is_zero_under_an_independent_cubature(
    order: int, generator: torch.Generator
) -> None:
    """C^k is a polynomial of degree 2k in ε: a finer rule integrates it to zero exactly."""
    net = _net(generator, "tanh")
    nodes, weights = gauss_hermite_cubature(2, 2 * order + 2)
    m = nodes.shape[0]
    x = ring8().sample(3, generator)
    sigma = torch.tensor([0.03, 0.3, 1.5], dtype=F64)
    xs, ss = x.repeat_interleave(m, 0), sigma.repeat_interleave(m)
    c = dsm_taylor_cv(net, xs, ss, nodes.repeat(3, 1), order=order, expectation="exact")
    mean = (c.reshape(3, m) * weights).sum(1)
    scale = c.reshape(3, m).abs().max(1).values
    assert bool((mean.abs() <= 1e-12 * scale).all()), mean


def test_any_sample_shape_gives_the_flat_result(generator: torch.Generator) -> None:
    net = PerSampleMLP(4, 8, 1, "tanh", 1, generator)
    x = torch.randn(5, 1, 2, 2, generator=generator, dtype=F64)
    eps = torch.randn(5, 1, 2, 2, generator=generator, dtype=F64)
    sigma = torch.full((5,), 0.2, dtype=F64)
    for k in (0, 1, 2):
        a = dsm_taylor_cv(net, x, sigma, eps, order=k, expectation="exact")
        b = dsm_taylor_cv(
            net, x.reshape(5, 4), sigma, eps.reshape(5, 4), order=k, expectation="exact"
        )
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_score_kwargs_are_tiled_over_stacked_evaluations(generator: torch.Generator) -> None:
    net = _net(generator)
    emb = torch.randn(3, 2, generator=generator, dtype=F64)
    x, eps = draw(6, generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sigma = torch.full((6,), 0.3, dtype=F64)

    def cond(y: Tensor, s: Tensor, label: Tensor) -> Tensor:
        return net(y, s) + emb[label]

    got = dsm_taylor_cv(cond, x, sigma, eps, order=2, score_kwargs={"label": labels})
    for i in range(6):
        want = dsm_taylor_cv(
            lambda y, s, i=i: net(y, s) + emb[labels[i]],
            x[i : i + 1],
            sigma[i : i + 1],
            eps[i : i + 1],
            order=2,
        )
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ unbiasedness


@given(
    width=st.sampled_from([4, 8, 16]),
    depth=st.integers(1, 2),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    order=st.integers(0, 2),
    method=st.sampled_from(["exact", "probe", "hutchinson"]),
    sigma=st.sampled_from([0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_zero_mean_value_and_gradient(
    width: int, depth: int, activation: str, order: int, method: str, sigma: float, seed: int
) -> None:
    """E[C^k] = 0 (|z| < 5) and E[∇_θ C^k] = 0: max |z| over parameters < Bonferroni bound (α = 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    n = 1500
    net = PerSampleMLP(2, width, depth, activation, n, g)
    x, eps = draw(n, g)
    s = torch.full((n,), sigma, dtype=F64)
    c = dsm_taylor_cv(net, x, s, eps, order=order, expectation=method, generator=g)
    z = c.detach().mean() / (c.detach().std() / math.sqrt(n))
    assert abs(float(z)) < 5
    assert_zero_mean(net.per_sample_grads(c))


def test_a_biased_control_is_caught(generator: torch.Generator) -> None:
    """The zero-mean check has power: C^1 with a wrong probe law (2ε' for ε') is caught."""
    n = 1500
    net = PerSampleMLP(2, 8, 1, "tanh", n, generator)
    x, eps = draw(n, generator)
    s = torch.full((n,), 0.3, dtype=F64)
    probe = 2 * torch.randn(n, 2, generator=generator, dtype=F64)
    biased = dsm_taylor_cv(net, x, s, eps, order=1, expectation="probe", probe_noise=probe)
    with pytest.raises(AssertionError):
        assert_zero_mean(net.per_sample_grads(biased))


# ------------------------------------------------------------------ variance reduction


def _vr(order: int, sigma: float, seed: int, method: str = "exact", n: int = 2000) -> float:
    """tr Var[∇ℓ − β⊙∇C] / tr Var[∇ℓ], per-parameter β fitted on an independent draw."""
    g = torch.Generator().manual_seed(seed)
    net = PerSampleMLP(2, 16, 2, "tanh", n, g)
    out = []
    for _ in range(2):
        x, eps = draw(n, g)
        s = torch.full((n,), sigma, dtype=F64)
        gl = net.per_sample_grads(dsm_loss(net, x, s, eps))
        gc = net.per_sample_grads(
            dsm_taylor_cv(net, x, s, eps, order=order, expectation=method, generator=g)
        )
        out.append((gl, gc))
    (gl_a, gc_a), (gl_b, gc_b) = out
    ca = gc_a - gc_a.mean(0)
    beta = (ca * (gl_a - gl_a.mean(0))).sum(0) / (ca * ca).sum(0).clamp_min(1e-300)
    return float((gl_b - beta * gc_b).var(0).sum() / gl_b.var(0).sum())


@pytest.mark.parametrize("order", [0, 1, 2])
def test_variance_ratio_below_one_at_small_sigma(order: int, seed: int) -> None:
    for sigma in (0.1, 0.01):
        vr = _vr(order, sigma, seed)
        assert vr < 1, (order, sigma, vr)


def test_c0_variance_ratio_falls_as_sigma_falls(seed: int) -> None:
    vrs = [_vr(0, s, seed) for s in (0.1, 0.01, 0.001)]
    assert vrs[0] > vrs[1] > vrs[2], vrs


# ------------------------------------------------------------------ float32, small σ


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("method", ["exact", "probe", "hutchinson"])
def test_float32_tiny_sigma_is_finite(order: int, method: str, generator: torch.Generator) -> None:
    n = 64
    net = PerSampleMLP(2, 16, 2, "silu", n, generator, dtype=torch.float32)
    x, eps = (t.float() for t in draw(n, generator))
    s = torch.full((n,), 1e-4)
    loss = dsm_loss(net, x, s, eps)
    c = dsm_taylor_cv(net, x, s, eps, order=order, expectation=method, generator=generator)
    assert c.dtype == torch.float32
    grads = net.per_sample_grads(loss - c)
    for t in (loss, c, grads):
        assert bool(torch.isfinite(t).all())


# ------------------------------------------------------------------ errors


def _args(g: torch.Generator) -> tuple[PerSampleMLP, Tensor, Tensor, Tensor]:
    net = _net(g)
    x, eps = draw(4, g)
    return net, x, torch.full((4,), 0.1, dtype=F64), eps


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sigma": torch.zeros(4, dtype=F64)}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": torch.full((3,), 0.1, dtype=F64)}, "sigma"),
        ({"sigma": torch.tensor([0.1, float("nan"), 0.1, 0.1], dtype=F64)}, "sigma"),
        ({"sigma": torch.tensor([0.1, float("inf"), 0.1, 0.1], dtype=F64)}, "sigma"),
        ({"x": torch.full((4, 2), float("nan"), dtype=F64)}, "x"),
        ({"x": torch.ones(4, dtype=F64)}, "x"),
        ({"x": torch.ones(4, 2, dtype=torch.int64)}, "x"),
        ({"noise": torch.ones(4, 3, dtype=F64)}, "noise"),
        ({"order": -1}, "order"),
        ({"order": 1.5}, "order"),
        ({"order": True}, "order"),
        ({"order": 3, "expectation": "hutchinson"}, "hutchinson"),
        ({"expectation": "mc"}, "expectation"),
        ({"order": 1, "expectation": "probe"}, "generator"),
        (
            {"order": 1, "expectation": "probe", "probe_noise": torch.ones(4, 1, dtype=F64)},
            "probe_noise",
        ),
        (
            {"order": 2, "expectation": "hutchinson", "probe_noise": torch.ones(4, 2, dtype=F64)},
            "probe_noise",
        ),
        ({"weighting": lambda s: s[:2]}, "weighting"),
        ({"alpha": torch.ones(3, dtype=F64)}, "alpha"),
    ],
)
def test_errors(change: dict, match: str, generator: torch.Generator) -> None:
    net, x, sigma, eps = _args(generator)
    kw = {"x": x, "sigma": sigma, "noise": eps, "order": 0, **change}
    with pytest.raises(VarRedError, match=match):
        dsm_taylor_cv(net, **kw)


@pytest.mark.parametrize("order", [0, 2])
def test_score_of_the_wrong_shape(order: int, generator: torch.Generator) -> None:
    net, x, sigma, eps = _args(generator)
    with pytest.raises(VarRedError, match="score_fn"):
        dsm_taylor_cv(lambda y, s: net(y, s)[:, :1], x, sigma, eps, order=order)


def test_auto_resolution() -> None:
    assert resolve_expectation("auto", 0, 10**6) == "exact"
    assert resolve_expectation("auto", 1, 2) == "exact"
    assert resolve_expectation("auto", 2, 2) == "exact"
    assert resolve_expectation("auto", 1, 784) == "hutchinson"
    assert resolve_expectation("auto", 2, 784) == "hutchinson"
    assert resolve_expectation("auto", 3, 784) == "probe"
