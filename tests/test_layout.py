"""Tests of varred.layout.CoefficientLayout and GradientControl(layout=...)."""

from __future__ import annotations

import pytest
import torch

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.layout import CoefficientLayout

F64 = torch.float64


class Halves:
    """A grouping by sign: index 0 for values < 0, 1 otherwise."""

    num_groups = 2

    def index(self, values):
        return (values >= 0).long()


def test_num_groups_from_int_and_grouping():
    assert CoefficientLayout().num_groups == 1
    assert CoefficientLayout("tensor", groups=3).num_groups == 3
    assert CoefficientLayout("scalar", groups=Halves()).num_groups == 2


def test_default_shrinkage_is_100_for_grouped_per_element_beta_only():
    assert CoefficientLayout("element", groups=8).shrinkage == 100.0
    assert CoefficientLayout("element").shrinkage == 0.0
    assert CoefficientLayout("tensor", groups=8).shrinkage == 0.0
    assert CoefficientLayout("element", groups=8, shrinkage=0).shrinkage == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "row"}, "granularity: .*got 'row'"),
        ({"groups": 0}, r"groups: expected an integer >= 1 \(number of groups\), got 0"),
        ({"groups": True}, "groups: .*got True"),
        ({"groups": "bins"}, "groups: .*got 'bins'"),
        ({"shrinkage": -1.0}, "shrinkage: expected a finite float >= 0, got -1.0"),
        ({"shrinkage": float("inf")}, "shrinkage: .*got inf"),
    ],
)
def test_layout_errors(kwargs, match):
    with pytest.raises(VarRedError, match=match):
        CoefficientLayout(**kwargs)


def test_layout_and_keywords_conflict():
    p = torch.nn.Parameter(torch.ones(3, dtype=F64))
    with pytest.raises(
        VarRedError, match="layout: expected either layout= or the keywords num_groups"
    ):
        GradientControl([p], layout=CoefficientLayout(groups=2), num_groups=2)
    with pytest.raises(VarRedError, match=r"layout: expected a varred\.layout\.CoefficientLayout"):
        GradientControl([p], layout="element")


def test_layout_equals_keywords(generator):
    """Same statistics and gradients whether the layout comes as an object or as keywords."""
    p1 = torch.nn.Parameter(torch.randn(4, generator=generator, dtype=F64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    lay = CoefficientLayout("tensor", groups=Halves(), shrinkage=0.0)
    a = GradientControl([p1], layout=lay, warmup_steps=1)
    b = GradientControl([p2], granularity="tensor", num_groups=2, warmup_steps=1)
    assert a.layout is lay and b.layout == CoefficientLayout("tensor", 2, 0.0)
    for _ in range(3):
        x = torch.randn(6, 4, generator=generator, dtype=F64)
        z = torch.randn(6, 4, generator=generator, dtype=F64)
        s = torch.randn(6, generator=generator, dtype=F64)
        a.backward((x @ p1) ** 2, (z @ p1) * z[:, 0], s)  # σ-like values, grouped by the layout
        b.backward((x @ p2) ** 2, (z @ p2) * z[:, 0], (s >= 0).long())
        assert torch.equal(p1.grad, p2.grad)
    for u, v in zip(a.coefficients(), b.coefficients()):
        assert torch.equal(u, v)


def test_one_beta_layout_vocabulary(generator):
    """BetaLayout names work in OptimalCoefficient, CoefficientLayout and fit_coefficients."""
    from varred.coefficients import OptimalCoefficient
    from varred.vocabulary import BetaLayout
    from varred_diffusion.gradient_moments import GradientMoments, fit_coefficients

    f = torch.randn(30, 2, generator=generator, dtype=F64)
    c = f + torch.randn(30, 2, generator=generator, dtype=F64)
    for old, new in (("diagonal", BetaLayout.ELEMENT), ("full", "full"), ("scalar", "scalar")):
        a = OptimalCoefficient(kind=old, fit="batch").beta(f, c)
        assert torch.equal(a, OptimalCoefficient(kind=new, fit="batch").beta(f, c))
    assert CoefficientLayout(BetaLayout.TENSOR).granularity == "tensor"
    mom = GradientMoments(2, 2)
    mom.update(f, torch.stack([c, -c], 1))
    betas = fit_coefficients(mom, ("bin", "full", BetaLayout.ELEMENT))
    assert torch.equal(betas["bin"], betas["full"]) and set(betas) == {"bin", "full", "element"}
    with pytest.raises(VarRedError, match="granularity: expected one of 'element', 'tensor'"):
        CoefficientLayout("full")
