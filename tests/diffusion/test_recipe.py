"""The recipe: TrainingStep composes sampler, weighting, target and control.

Old-vs-new equivalence: each recipe's gradients equal the 0.1 composition written out by hand
(``dsm_loss`` + ``dsm_taylor_cv`` + ``GradientControl.backward``) over several steps of
running β, to round-off.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import varred_diffusion as vd
from varred import GradientControl, VarRedError
from varred.layout import CoefficientLayout

F64 = torch.float64


class LabelScore(nn.Module):
    """Small MLP score on ``[x, log σ]`` with an optional per-sample label shift."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2)).to(F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))

    def forward(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        out = self.net(torch.cat([x, torch.log(sigma)[:, None].to(x.dtype)], 1))
        return out if label is None else out + 0.1 * label[:, None].to(out.dtype)


def _x(g: torch.Generator, n: int) -> Tensor:
    return vd.ring8().sample(n, g).to(F64)


def _sigma(g: torch.Generator, n: int) -> Tensor:
    return torch.exp(torch.empty(n, dtype=F64).uniform_(-5, 0, generator=g))


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _pair(seed: int = 0) -> tuple[LabelScore, LabelScore]:
    a, b = LabelScore(seed), LabelScore(seed)
    return a, b


def test_plain_recipe_is_bit_for_bit_plain_dsm(generator: torch.Generator) -> None:
    model = LabelScore(0)
    x, sigma = _x(generator, 16), _sigma(generator, 16)
    eps = torch.randn(16, 2, generator=generator, dtype=F64)
    vd.dsm_loss(model, x, sigma, eps).mean().backward()
    want = _grads(model)
    step = vd.Recipe().build(model, model.parameters())
    diag = step(x, sigma, eps)
    for a, b in zip(_grads(model), want):
        assert torch.equal(a, b)
    assert set(diag) == {"loss", "sigma"}


CONFIGS = {
    "k0 element": ({"order": 0}, {"granularity": "element"}, False),
    "k1 scalar": ({"order": 1, "expectation": "exact"}, {"granularity": "scalar"}, False),
    "k0 bins split": ({"order": 0}, {"granularity": "element", "shrinkage": 0.0}, True),
    "k1 bins joint tensor": (
        {"order": 1, "expectation": "exact", "group_forward": "joint"},
        {"granularity": "tensor"},
        True,
    ),
    "k0 bins shrunk": ({"order": 0}, {"granularity": "element", "shrinkage": 100.0}, True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe_equals_hand_composition(name: str, generator: torch.Generator) -> None:
    """New TrainingStep == 0.1 composition (dsm_loss, dsm_taylor_cv, GradientControl)."""
    ctl, lay, binned = CONFIGS[name]
    bins = vd.SigmaBins(1e-2, 1.0, 3)
    layout = CoefficientLayout(groups=bins if binned else 1, **lay)
    new, old = _pair()
    recipe = vd.Recipe(
        control=vd.TaylorControl(**ctl), layout=layout, coefficient_options={"warmup_steps": 2}
    )
    step = recipe.build(new, new.parameters())
    ref = GradientControl(old.parameters(), layout=layout, warmup_steps=2)
    opt_n = torch.optim.SGD(new.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(old.parameters(), lr=0.05)
    for _ in range(4):
        x, sigma = _x(generator, 24), _sigma(generator, 24)
        eps = torch.randn(24, 2, generator=generator, dtype=F64)
        d_new = step(x, sigma, eps)
        loss = vd.dsm_loss(old, x, sigma, eps)
        kw = {k: v for k, v in ctl.items() if k != "group_forward"}
        c = vd.dsm_taylor_cv(old, x, sigma, eps, **kw)
        d_old = ref.backward(loss, c, groups=bins.index(sigma) if binned else None)
        for a, b in zip(_grads(new), _grads(old)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d_new["variance_ratio"], d_old["variance_ratio"])
        opt_n.step()
        opt_o.step()
    assert any(bool((b != 0).any()) for b in step.coefficients.coefficients())


def test_importance_sigma_recipe_weights_loss_and_control(generator: torch.Generator) -> None:
    """Importance σ + C^0: losses and controls both carry the sampler's weight."""
    new, old = _pair()
    sampler = vd.ImportanceSigmaSampler(4, 1e-2, 1.0, history=2)
    recipe = vd.Recipe(sampler=sampler, control=vd.TaylorControl(0), coefficient=0.6)
    step = recipe.build(new, new.parameters())
    ref_sampler = vd.ImportanceSigmaSampler(4, 1e-2, 1.0, history=2)
    for i in range(4):
        x = _x(generator, 16)
        eps = torch.randn(16, 2, generator=generator, dtype=F64)
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        step(x, noise=eps, generator=g1)
        sigma, w = ref_sampler.sample(16, g2, dtype=F64)
        loss = vd.dsm_loss(old, x, sigma, eps)
        c = vd.dsm_taylor_cv(old, x, sigma, eps, order=0)
        old.zero_grad()
        (w * (loss - 0.6 * c)).mean().backward()
        ref_sampler.update(sigma, loss.detach())
        for a, b in zip(_grads(new), _grads(old)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert step.sampler.warmed_up()
    torch.testing.assert_close(step.sampler.probabilities(), ref_sampler.probabilities())


@pytest.mark.parametrize("stratified", [False, True])
def test_antithetic_recipe_pairs_rows(stratified: bool, generator: torch.Generator) -> None:
    """AntitheticPairs: rows i and i + B/2 share x and σ and get ε, −ε (plain gradient)."""
    new, old = _pair()
    sampler = vd.StratifiedSigma(1e-2, 1.0) if stratified else vd.LogUniformSigma(1e-2, 1.0)
    step = vd.Recipe(sampler=sampler, control=vd.AntitheticPairs()).build(new, new.parameters())
    assert step.coefficients is None
    x = _x(generator, 16)
    step(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma, _ = sampler.sample(8, g, dtype=F64)
    eps = vd.antithetic_noise(16, (2,), g, dtype=F64)
    xx, ss = torch.cat([x[:8], x[:8]]), torch.cat([sigma, sigma])
    vd.dsm_loss(old, xx, ss, eps).mean().backward()
    for a, b in zip(_grads(new), _grads(old)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("order", [0, 1])
def test_split_path_splits_every_per_sample_argument(
    order: int, generator: torch.Generator
) -> None:
    """Issue 13: with σ bins the split path takes a per-sample weighting tensor, a ``[B]`` α
    and per-sample keyword tensors row by row (an empty bin among them): same as joint."""
    a_model, b_model = _pair()
    bins = vd.SigmaBins(1e-3, 2.0, 5)
    sigma = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 0.03, 0.3], dtype=F64)
    w = torch.rand(10, generator=generator, dtype=F64) * sigma**2
    alpha = 1.0 / torch.sqrt(1.0 + sigma**2)
    label = torch.randint(0, 3, (10,), generator=generator)
    assert int(bins.counts(sigma).eq(0).sum()) >= 1  # an empty bin
    kw = {"order": order, "weighting": w, "alpha": alpha, "bins": bins, "expectation": "exact"}
    kw |= {"coefficient": 0.7}
    split = vd.ControlledDSM(a_model, a_model.parameters(), group_forward="split", **kw)
    joint = vd.ControlledDSM(b_model, b_model.parameters(), group_forward="joint", **kw)
    x = _x(generator, 10)
    eps = torch.randn(10, 2, generator=generator, dtype=F64)
    d_s = split(x, sigma, eps, score_kwargs={"label": label})
    d_j = joint(x, sigma, eps, score_kwargs={"label": label})
    for a, b in zip(_grads(a_model), _grads(b_model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_s["loss"], d_j["loss"])
    loss = vd.dsm_loss(
        b_model, x, sigma, eps, weighting=w, alpha=alpha, score_kwargs={"label": label}
    )
    torch.testing.assert_close(d_s["loss"], loss.mean().float())


def test_user_groups_pass_through(generator: torch.Generator) -> None:
    """Issue 14.2: the caller's own groups (count in the layout, index per call)."""
    model = LabelScore(0)
    step = vd.ControlledDSM(model, model.parameters(), control_kwargs={"num_groups": 4})
    x, sigma = _x(generator, 16), _sigma(generator, 16)
    eps = torch.randn(16, 2, generator=generator, dtype=F64)
    diag = step(x, sigma, eps, groups=torch.arange(16) % 4)
    assert diag["variance_ratio_per_group"].shape == (4,)
    with pytest.raises(VarRedError, match="num_groups=4 conflicts with bins"):
        vd.ControlledDSM(
            model, model.parameters(), bins=vd.SigmaBins(1e-2, 1.0, 3),
            control_kwargs={"num_groups": 4},
        )  # fmt: skip
    with pytest.raises(VarRedError, match="granularity"):
        vd.ControlledDSM(model, model.parameters(), control_kwargs={"granularity": "tensor"})


def test_target_and_learned_weighting_parts(generator: torch.Generator) -> None:
    """A target part replaces ε in the residual; a weighting's regulariser adds to the loss."""
    model = LabelScore(0)
    x, sigma = _x(generator, 8), _sigma(generator, 8)
    eps = torch.randn(8, 2, generator=generator, dtype=F64)

    def half_target(x, sigma, noise, alpha, xt):  # any ε̃ [B, ...]
        return 0.5 * noise

    class Reg:
        def __call__(self, s: Tensor) -> Tensor:
            return 2 * s**2

        def regulariser(self, s: Tensor) -> Tensor:
            return torch.log(s)

    step = vd.TrainingStep(model, model.parameters(), target=half_target, weighting=Reg())
    batch = step.prepare(x, sigma, eps)
    score = model(x + sigma[:, None] * eps, sigma)
    want = 2 * ((sigma[:, None] * score + 0.5 * eps) ** 2).sum(1) + torch.log(sigma)
    torch.testing.assert_close(step.losses(batch), want)


def test_errors(generator: torch.Generator) -> None:
    model = LabelScore(0)
    x = _x(generator, 8)
    step = vd.TrainingStep(model, model.parameters())
    with pytest.raises(VarRedError, match="sigma: expected noise levels"):
        step(x)
    with pytest.raises(VarRedError, match="noise: expected"):
        step(x, torch.full((8,), 0.1, dtype=F64))
    with pytest.raises(VarRedError, match="stack"):
        vd.TaylorControl(order=1, stack=True)
    with pytest.raises(VarRedError, match="group_forward"):
        vd.TaylorControl(group_forward="vmap")
    with pytest.raises(VarRedError, match="control"):
        vd.Recipe(control="c0")
    with pytest.raises(VarRedError, match="coefficient_options"):
        vd.Recipe(control=vd.TaylorControl(), coefficient_options={"num_groups": 3})
    bins = vd.SigmaBins(1e-2, 1.0, 3)
    with pytest.raises(VarRedError, match="stack"):
        vd.Recipe(
            control=vd.TaylorControl(stack=True), layout=CoefficientLayout(groups=bins)
        ).build(model, model.parameters())
    with pytest.raises(VarRedError, match="even batch"):
        vd.TrainingStep(model, model.parameters(), control=vd.AntitheticPairs())(
            x[:7], torch.full((7,), 0.1, dtype=F64), generator=generator
        )


def test_mean_method_is_the_core_name_of_expectation(generator: torch.Generator) -> None:
    """One vocabulary: ``mean_method`` (core) and ``expectation`` (0.1) name the same choice."""
    model = LabelScore(0)
    x, sigma = _x(generator, 8), _sigma(generator, 8)
    eps = torch.randn(8, 2, generator=generator, dtype=F64)
    a = vd.dsm_taylor_cv(model, x, sigma, eps, order=1, mean_method="exact")
    b = vd.dsm_taylor_cv(model, x, sigma, eps, order=1, expectation="exact")
    assert torch.equal(a, b)
    assert vd.TaylorControl(1, mean_method="hutchinson").expectation == "hutchinson"
    with pytest.raises(VarRedError, match="mean_method: 'exact' contradicts"):
        vd.TaylorControl(1, expectation="probe", mean_method="exact")
    with pytest.raises(VarRedError, match="mean_method"):
        vd.dsm_taylor_cv(model, x, sigma, eps, order=1, expectation="probe", mean_method="exact")


@pytest.mark.parametrize("order", [0, 1])
def test_flow_matching_recipe_equals_hand_composition(
    order: int, generator: torch.Generator
) -> None:
    """Rectified flow as a recipe: ScoreFromVelocity, α = 1 − t, λ = t²/(1 − t)² make the step's
    loss the FM loss; FlowTaylorControl's gradient is subtracted with the fixed β."""
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(F64)
    with torch.no_grad():  # the project's rule: randomness from a generator, never the global RNG
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=F64))

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([x, t[:, None].to(x.dtype)], 1))

    sf = vd.ScoreFromVelocity(velocity)
    x = _x(generator, 12)
    t = torch.empty(12, dtype=F64).uniform_(0.05, 0.95, generator=generator)
    eps = torch.randn(12, 2, generator=generator, dtype=F64)
    recipe = vd.Recipe(
        weighting=vd.flow_matching_weighting,
        control=vd.FlowTaylorControl(order, mean_method="exact"),
        coefficient=0.5,
    )
    step = recipe.build(sf, net.parameters(), alpha=lambda s: 1 - s)
    batch = step.prepare(x, t, eps)
    want_loss = vd.flow_matching_loss(velocity, x, t, eps)
    torch.testing.assert_close(step.losses(batch), want_loss)
    step(x, t, eps)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    c = vd.flow_matching_taylor_cv(velocity, x, t, eps, order=order, expectation="exact")
    (vd.flow_matching_loss(velocity, x, t, eps) - 0.5 * c).mean().backward()
    for a, b in zip(got, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
