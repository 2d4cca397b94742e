"""Property: controlled estimates are unbiased for every kind and every unbiased fit.

Each example draws a smooth function with a closed-form Gaussian expectation, builds
controls (an order-k ``TaylorCV`` stacked with a linear control, or a control from an
independent smooth function with its known mean), and checks over R independent
repetitions of n samples that the mean of the estimates is within 5 SE of the truth.
Repetitions are the columns of a ``[n, R]`` problem for per-output kinds (β never mixes
columns); ``kind="scalar"`` pools over outputs, so there crossfit loops over repetitions.
``fit="batch"`` is biased by O(1/n) by design (see tests/test_estimate.py).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.coefficients import OptimalCoefficient
from varred.control import ControlVariate, stack_controls
from varred.estimate import estimate
from varred.taylor import TaylorCV
from varred.testing import assert_unbiased, dims, orders, smooth_functions

F64 = torch.float64
N, REPS, FOLDS = 16, 200, 4
SCALAR_REPS = 50  # repetitions run one by one
kinds = st.sampled_from(["scalar", "diagonal", "full"])
fits = st.sampled_from(["crossfit", "running"])


def _check(
    f: torch.Tensor,
    c: torch.Tensor,
    warm: tuple[torch.Tensor, torch.Tensor],
    truth: float,
    kind: str,
    fit: str,
) -> None:
    """``f [N, R]``, ``c [N, R(, m)]``: unbiasedness of the controlled mean over R columns.

    ``warm`` is an independent batch shaped like ``(f, c)``: for ``fit="running"`` it is
    seen first, so the tested call applies a non-trivial β from earlier statistics only.
    """
    coef = OptimalCoefficient(kind=kind, fit=fit, folds=FOLDS, ridge=0.1 if kind == "full" else 0.0)
    if fit == "running":
        estimate(*warm, coefficient=coef)
    if kind == "scalar" and fit == "crossfit":  # pooled β couples columns: loop over a few
        means = [estimate(f[:, r], c[:, r], coef).mean for r in range(SCALAR_REPS)]
    else:
        means = list(estimate(f, c, coef).mean)
    assert_unbiased(lambda r: means[r], truth, repetitions=len(means))


def _problem(fn, controls, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(N * REPS, d, generator=g, dtype=F64)
    c = controls(eps)
    return fn(eps).reshape(N, REPS), c.reshape(N, REPS, *c.shape[1:])  # [N*R, ...] -> [N, R, ...]


@given(st.data(), dims(), orders(), kinds, fits)
def test_taylor_cv_unbiased(data: st.DataObject, d: int, k: int, kind: str, fit: str) -> None:
    sf = data.draw(smooth_functions(d), label="f")
    g = torch.Generator().manual_seed(d * 10 + k)
    controls = stack_controls([TaylorCV(sf.fn, order=k), ControlVariate(lambda e: e[:, 0], 0.0)])
    f, c = _problem(sf.fn, controls, d, g)
    warm = _problem(sf.fn, controls, d, g) if fit == "running" else (f, c)
    _check(f, c, warm, sf.expectation, kind, fit)
    _check(f, c[..., 0], (warm[0], warm[1][..., 0]), sf.expectation, kind, fit)


@given(st.data(), dims(max_dim=8), kinds, fits)
def test_known_mean_control_unbiased(data: st.DataObject, d: int, kind: str, fit: str) -> None:
    sf = data.draw(smooth_functions(d), label="f")
    other = data.draw(smooth_functions(d), label="control")
    g = torch.Generator().manual_seed(d)
    controls = ControlVariate(lambda e: sf.fn(e) + other.fn(e), sf.expectation + other.expectation)
    f, c = _problem(sf.fn, controls, d, g)
    warm = _problem(sf.fn, controls, d, g) if fit == "running" else (f, c)
    _check(f, c, warm, sf.expectation, kind, fit)


@given(st.data(), dims(max_dim=6), kinds)
def test_batch_unbiased_when_residual_is_independent(
    data: st.DataObject, d: int, kind: str
) -> None:
    # The plug-in bias is -Cov(β̂, c̄) (docs/theory.md §3). If f = a c + g(η) with η
    # independent of c, then E[β̂ - a | c] = 0 and the batch fit is exactly unbiased too.
    sf = data.draw(smooth_functions(d), label="g")
    a = data.draw(st.floats(-2.0, 2.0), label="a")
    g = torch.Generator().manual_seed(d + 100)
    c = torch.randn(N, REPS, generator=g, dtype=F64)
    eta = torch.randn(N * REPS, d, generator=g, dtype=F64)
    f = a * c + sf.fn(eta).reshape(N, REPS)
    coef = OptimalCoefficient(kind=kind, fit="batch")
    if kind == "scalar":  # pooled β would couple the columns
        means = [estimate(f[:, r], c[:, r], coef).mean for r in range(SCALAR_REPS)]
    else:
        means = list(estimate(f, c, coef).mean)
    assert_unbiased(lambda r: means[r], sf.expectation, repetitions=len(means))
