"""OptimalCoefficient and RunningMoments: closed forms, fold structure, running causality, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.coefficients import OptimalCoefficient, RunningMoments
from varred.errors import VarRedError

F64 = torch.float64


def _data(generator: torch.Generator, n: int = 50, p: int = 3, m: int = 2):
    c = torch.randn(n, p, m, generator=generator, dtype=F64)
    z = torch.randn(n, p, generator=generator, dtype=F64)
    w = torch.tensor([[1.0, -0.5], [0.3, 2.0], [0.0, 1.0]], dtype=F64)[:p, :m]
    f = (c * w).sum(-1) + 0.2 * c[..., 0] ** 2 + z
    return f, c


def _np_cov(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - a.mean()) * (b - b.mean())))


def test_diagonal_batch_matches_closed_form(generator: torch.Generator) -> None:
    f, c = _data(generator)
    beta = OptimalCoefficient(kind="diagonal", fit="batch").beta(f, c)
    assert beta.shape == (3, 2)
    for p in range(3):
        for j in range(2):
            a, b = c[:, p, j].numpy(), f[:, p].numpy()
            assert float(beta[p, j]) == pytest.approx(_np_cov(a, b) / _np_cov(a, a), rel=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_full_matches_ridge_regression(generator: torch.Generator, ridge: float) -> None:
    f, c = _data(generator)
    beta = OptimalCoefficient(kind="full", fit="batch", ridge=ridge).beta(f, c)
    for p in range(3):
        x = c[:, p].numpy() - c[:, p].numpy().mean(0)
        y = f[:, p].numpy() - f[:, p].numpy().mean()
        cov = x.T @ x / len(x)
        want = np.linalg.solve(cov + ridge * np.diag(np.diag(cov)), x.T @ y / len(x))
        np.testing.assert_allclose(beta[p].numpy(), want, rtol=1e-10)


def test_scalar_pools_over_outputs(generator: torch.Generator) -> None:
    f, c = _data(generator)
    beta = OptimalCoefficient(kind="scalar", fit="batch").beta(f, c)
    assert beta.shape == (2,)
    x = c.numpy() - c.numpy().mean(0)  # [n, P, m]
    y = f.numpy() - f.numpy().mean(0)  # [n, P]
    a = np.einsum("npi,npj->ij", x, x)
    b = np.einsum("npi,np->i", x, y)
    np.testing.assert_allclose(beta.numpy(), np.linalg.solve(a, b), rtol=1e-10)
    # unstacked: one scalar
    b1 = OptimalCoefficient(kind="scalar", fit="batch").beta(f, c[..., 0])
    assert b1.shape == ()
    assert float(b1) == pytest.approx(
        float((x[..., 0] * y).sum() / (x[..., 0] ** 2).sum()), rel=1e-10
    )


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("fit", ["crossfit", "batch", "running"])
@pytest.mark.parametrize("const", [0.0, 0.1, -3.7])
def test_constant_control_gives_exact_zero_beta(kind: str, fit: str, const: float) -> None:
    f = torch.linspace(-1, 2, 21, dtype=F64).reshape(7, 3) ** 3
    c = torch.full((7, 3, 2), const, dtype=F64)
    coef = OptimalCoefficient(kind=kind, fit=fit, folds=3)
    for _ in range(2):  # running: the second call uses statistics of the first
        y, beta = coef.controlled(f, c)
        assert torch.equal(beta, torch.zeros_like(beta))
        assert torch.equal(y, f)


@pytest.mark.parametrize("kind", ["diagonal", "full"])
def test_constant_column_does_not_spoil_the_other(generator: torch.Generator, kind: str) -> None:
    f, c = _data(generator)
    c = c.clone()
    c[..., 1] = 0.25
    beta = OptimalCoefficient(kind=kind, fit="batch").beta(f, c)
    want = OptimalCoefficient(kind="diagonal", fit="batch").beta(f, c[..., 0])
    assert torch.equal(beta[..., 1], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(beta[..., 0], want, rtol=1e-10, atol=0)


def test_collinear_controls_in_full_are_finite(generator: torch.Generator) -> None:
    f, c = _data(generator)
    c2 = torch.stack([c[..., 0], 2 * c[..., 0]], -1)
    y, beta = OptimalCoefficient(kind="full", fit="batch").controlled(f, c2)
    assert bool(torch.isfinite(beta).all())
    yd, _ = OptimalCoefficient(kind="diagonal", fit="batch").controlled(f, c[..., 0])
    torch.testing.assert_close(y, yd, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fit", ["crossfit", "batch", "running"])
def test_beta_is_not_differentiated(generator: torch.Generator, fit: str) -> None:
    f0, c0 = _data(generator)
    f = f0.clone().requires_grad_(True)
    c = c0.clone().requires_grad_(True)
    coef = OptimalCoefficient(kind="full", fit=fit, folds=5)
    coef.controlled(f0, c0)  # running: make β non-zero
    y, beta = coef.controlled(f, c)
    assert not beta.requires_grad
    y.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))
    if fit != "crossfit":  # one β for all samples: dy/dc = -β exactly
        assert torch.equal(c.grad, -beta.expand_as(c))


def test_crossfit_fold_uses_beta_from_other_folds(generator: torch.Generator) -> None:
    f, c = _data(generator, n=23)
    coef = OptimalCoefficient(kind="full", fit="crossfit", folds=4)
    y, beta = coef.controlled(f, c)
    torch.testing.assert_close(beta, coef.beta(f, c), rtol=1e-12, atol=0)
    bounds = [(k * 23) // 4 for k in range(5)]
    for a, b in itertools.pairwise(bounds):
        keep = torch.cat([torch.arange(0, a), torch.arange(b, 23)])
        bk = coef.beta(f[keep], c[keep])
        want = f[a:b] - (bk * c[a:b]).sum(-1)
        torch.testing.assert_close(y[a:b], want, rtol=1e-12, atol=1e-12)


def test_running_beta_comes_only_from_earlier_calls(generator: torch.Generator) -> None:
    c1 = torch.randn(40, 2, generator=generator, dtype=F64)
    c2 = torch.randn(40, 2, generator=generator, dtype=F64)
    c3 = torch.randn(40, 2, generator=generator, dtype=F64)
    coef = OptimalCoefficient(kind="diagonal", fit="running", decay=0.5)
    y1, b1 = coef.controlled(2.0 * c1, c1)
    assert torch.equal(b1, torch.zeros(2, dtype=F64))
    assert torch.equal(y1, 2.0 * c1)  # first call: β = 0, plain values
    # Batch 2 alone would give β = -3; the applied β must be batch 1's β = 2.
    y2, b2 = coef.controlled(-3.0 * c2, c2)
    torch.testing.assert_close(b2, torch.full((2,), 2.0, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(y2, -5.0 * c2, rtol=1e-12, atol=1e-12)
    # Third call: β from decayed statistics of batches 1 and 2 only.
    rm = RunningMoments(decay=0.5)
    rm.update(2.0 * c1, c1)
    rm.update(-3.0 * c2, c2)
    _, b3 = coef.controlled(torch.zeros_like(c3), c3)
    torch.testing.assert_close(b3, rm.beta("diagonal"), rtol=1e-12, atol=0)
    assert bool((b3 < 2.0).all()) and bool((b3 > -3.0).all())


def test_running_moments_state_dict_round_trip(generator: torch.Generator) -> None:
    f, c = _data(generator)
    rm = RunningMoments(decay=0.9)
    assert rm.weight == 0.0
    rm.update(f, c)
    rm.update(f[:10], c[:10])
    assert rm.weight == pytest.approx(0.9 * 50 + 10)
    state = rm.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = RunningMoments()
    other.load_state_dict(state)
    for kind in ("scalar", "diagonal", "full"):
        assert torch.equal(other.beta(kind, 0.1), rm.beta(kind, 0.1))
    other.update(f, c)
    rm.update(f, c)
    assert torch.equal(other.beta("full"), rm.beta("full"))
    empty = RunningMoments()
    empty.load_state_dict(RunningMoments(0.3).state_dict())
    assert empty.decay == 0.3 and empty.weight == 0.0


@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_low_precision_statistics_in_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    c = torch.randn(64, 3, generator=g).to(dtype)
    f = (1.5 * c.double() + 0.1 * torch.randn(64, 3, generator=g, dtype=F64)).to(dtype)
    coef = OptimalCoefficient(kind="diagonal", fit="batch")
    y, beta = coef.controlled(f, c)
    assert beta.dtype == F64
    assert y.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(beta, coef.beta(f.double(), c.double()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "block"}, "kind: expected one of"),
        ({"fit": "online"}, "fit: expected one of"),
        ({"folds": 1}, "folds: expected an integer >= 2"),
        ({"folds": 2.0}, "folds: expected an integer >= 2"),
        ({"ridge": -0.1}, "ridge: expected a finite float >= 0"),
        ({"ridge": float("inf")}, "ridge: expected a finite float >= 0"),
        ({"decay": 1.5}, "decay: expected a float in"),
        ({"decay": -0.1, "fit": "running"}, "decay: expected a float in"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(VarRedError, match=match):
        OptimalCoefficient(**kwargs)


def test_fit_errors() -> None:
    f = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(VarRedError, match=r"folds: expected at most n = 4 folds.*got 5"):
        OptimalCoefficient(folds=5).controlled(f, f)
    with pytest.raises(VarRedError, match=r"at least 2 samples.*n = 1"):
        OptimalCoefficient(fit="batch").controlled(f[:1], f[:1])
    with pytest.raises(VarRedError, match=r"at least 2 samples.*n = 1"):
        OptimalCoefficient().beta(f[:1], f[:1])
    with pytest.raises(
        VarRedError, match=r"controls: expected shape \[4, 3\] or \[4, 3, m\].*\[4, 2\]"
    ):
        OptimalCoefficient().controlled(f, f[:, :2])
    with pytest.raises(VarRedError, match="controls: expected a floating-point"):
        OptimalCoefficient().controlled(f, f.long())
    with pytest.raises(VarRedError, match=r"f_values: expected a torch.Tensor"):
        OptimalCoefficient().controlled(f.tolist(), f)  # type: ignore[arg-type]
    coef = OptimalCoefficient(fit="running")
    coef.controlled(f, f)
    with pytest.raises(VarRedError, match="layout of earlier calls"):
        coef.controlled(f, f.unsqueeze(-1))
    with pytest.raises(VarRedError, match=r"call update\(\) first"):
        RunningMoments().beta()
    with pytest.raises(VarRedError, match="decay: expected a float in"):
        RunningMoments(decay=2.0)
    with pytest.raises(VarRedError, match="kind: expected one of"):
        RunningMoments().beta("block")
