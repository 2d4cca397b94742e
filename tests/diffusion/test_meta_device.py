"""Device discipline without a GPU: the gradient diagnostics run on the meta device (issue 15, defect 1).

A tensor created on the CPU where the inputs' device was meant (the old default weights of
``unit_gradients``) fails here exactly as it does for CUDA losses: "Expected all tensors to be
on the same device". On the meta device every kernel runs shape-only, so each function must get
as far as its first host read (``float(...)``), and no further.
"""

from __future__ import annotations

import pytest
import torch

from varred.taylor import iterated_laplacian
from varred_diffusion.diagnostics import gradient_variance_ratio, variance_ratio_by_sigma
from varred_diffusion.gradient_moments import per_sample_gradients, unit_gradients

META = torch.device("meta")
HOST_READ = r"(item\(\)|cannot be called on meta|meta tensors)"  # the first float(...) of a result


class Score(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, device=META, dtype=torch.float64)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([x, sigma[:, None]], 1))


def _draw(n: int, g: torch.Generator):
    x = torch.empty(n, 2, device=META, dtype=torch.float64)
    return x, torch.empty(n, device=META, dtype=torch.float64), torch.empty_like(x)


def _loss(score_fn, x, sigma, noise):  # the DSM loss, written out (dsm_loss enters autocast)
    return sigma**2 * (
        (score_fn(x + sigma[:, None] * noise, sigma) + noise / sigma[:, None]) ** 2
    ).sum(1)


def _control(score_fn, x, sigma, noise):
    return (score_fn(x, sigma) * noise).sum(1) / sigma  # zero-mean in ε, differentiable in θ


class Bins:
    num_bins = 2

    def index(self, sigma):
        return torch.zeros_like(sigma, dtype=torch.long)


def test_unit_and_per_sample_gradients_stay_on_meta():
    model = Score()
    x, sigma, noise = _draw(4, torch.Generator())
    params = list(model.parameters())
    score = lambda a, s: model(a, s)  # noqa: E731
    g, h = unit_gradients(_loss(score, x, sigma, noise), _control(score, x, sigma, noise), params,
                          torch.zeros(4, dtype=torch.long, device=META), num_bins=2)  # fmt: skip
    assert g.device == META and h.device == META and h.shape == (2, 8)
    for method in ("vmap", "batched"):
        rows = per_sample_gradients(model, _loss, x, sigma, noise, method=method)
        assert rows.device == META and rows.shape == (4, 8)


def test_iterated_laplacian_stays_on_meta():
    w = torch.empty(3, device=META, dtype=torch.float64)
    lap = iterated_laplacian(
        lambda x: (x**4 * w).sum(1), torch.empty(3, device=META, dtype=torch.float64), 2
    )
    assert lap.device == META


@pytest.mark.parametrize("kinds", [("unit", "scalar", "element"), ("bin",)])
def test_variance_ratios_reach_the_first_host_read(kinds):
    """All gradients, moments, β fits and jackknife sums run on the model's device."""
    kw = {"num_fit": 3, "num_eval": 3, "loss_fn": _loss, "control_fn": _control, "kinds": kinds,
          "bins": Bins()}  # fmt: skip
    with pytest.raises((RuntimeError, NotImplementedError), match=HOST_READ):
        gradient_variance_ratio(Score(), _draw, generator=torch.Generator(), **kw)

    def sample_x(n, g):
        return torch.empty(n, 2, device=META, dtype=torch.float64)

    with pytest.raises((RuntimeError, NotImplementedError), match=HOST_READ):
        variance_ratio_by_sigma(Score(), sample_x, [0.1], generator=torch.Generator(), **kw)
