"""Leave-one-out baseline and the REINFORCE surrogate: exact values, unbiased gradients."""

from __future__ import annotations

import math

import pytest
import torch

from varred.errors import VarRedError
from varred.score_function import loo_baseline, score_function_surrogate
from varred.testing import assert_unbiased

F64 = torch.float64


def test_loo_baseline_exact() -> None:
    v = torch.tensor([[1.0, 0.0], [2.0, 4.0], [6.0, 8.0]], dtype=F64)
    want = torch.tensor([[4.0, 6.0], [3.5, 4.0], [1.5, 2.0]], dtype=F64)
    assert torch.equal(loo_baseline(v), want)
    assert torch.equal(loo_baseline(v[:2, 0]), torch.tensor([2.0, 1.0], dtype=F64))


def _gradients(mu: float, n: int, reps: int, baseline: str | None, g: torch.Generator):
    # x ~ N(μ, 1), f = x²: ∇_μ E f = 2μ. One column per independent repetition.
    theta = torch.full((reps,), mu, dtype=F64, requires_grad=True)
    x = (theta.detach() + torch.randn(n, reps, generator=g, dtype=F64)).detach()
    log_p = -0.5 * (x - theta) ** 2
    score_function_surrogate(x**2, log_p, baseline=baseline).mean(0).sum().backward()
    assert theta.grad is not None
    return theta.grad  # [R]


@pytest.mark.parametrize("baseline", ["loo", None])
def test_gradient_unbiased(generator: torch.Generator, baseline: str | None) -> None:
    mu = 1.5
    grads = _gradients(mu, 6, 4000, baseline, generator)
    assert_unbiased(lambda r: grads[r], 2 * mu, repetitions=4000)


def test_loo_reduces_variance(generator: torch.Generator) -> None:
    mu, n, reps = 1.5, 6, 4000
    state = generator.get_state()
    plain = _gradients(mu, n, reps, None, generator)
    generator.set_state(state)  # same samples for both
    loo = _gradients(mu, n, reps, "loo", generator)
    d = (plain - plain.mean()) ** 2 - (loo - loo.mean()) ** 2  # [R]
    se = float(d.std()) / math.sqrt(reps)
    assert float(d.mean()) > 5 * se, (float(d.mean()), se)


def test_pathwise_term_and_one_dim_log_probs() -> None:
    theta = torch.tensor(2.0, dtype=F64, requires_grad=True)
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    f = (theta * x)[:, None] * torch.ones(3, 2, dtype=F64)  # [n, 2], depends on θ directly
    log_p = -0.5 * (x - theta) ** 2  # [n]
    s = score_function_surrogate(f, log_p, baseline="loo")
    assert s.shape == (3, 2)
    s.mean(0).sum().backward()
    fd = f.detach()
    score = x - 2.0
    want = 2 * (x.mean() + ((fd[:, 0] - loo_baseline(fd[:, 0])) * score).mean())
    torch.testing.assert_close(theta.grad, want, rtol=1e-12, atol=1e-12)


def test_errors() -> None:
    v = torch.zeros(4, dtype=F64)
    with pytest.raises(
        VarRedError, match=r"values: expected shape \[n, \.\.\.\] with n >= 2.*\[1\]"
    ):
        loo_baseline(v[:1])
    with pytest.raises(VarRedError, match="values: expected a floating-point"):
        loo_baseline(v.long())
    with pytest.raises(VarRedError, match="baseline: expected 'loo' or None"):
        score_function_surrogate(v, v, baseline="mean")
    with pytest.raises(VarRedError, match=r"log_probs: expected shape \[n\] or.*\[4\].*got \[3\]"):
        score_function_surrogate(v, v[:3])
    with pytest.raises(VarRedError, match="log_probs: expected a floating-point"):
        score_function_surrogate(v, v.long())
