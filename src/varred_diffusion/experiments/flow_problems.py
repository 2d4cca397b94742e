"""Flow-matching problems for the leaderboard: velocity networks at fixed θ, toy and MNIST.

A velocity network ``v_θ(x_t, t)`` (``MLPScore`` / ``SmallUNet`` with ``preconditioning=
"none"``, so the raw output is the velocity) is briefly trained with the plain conditional
flow-matching loss on the rectified-flow path ``x_t = (1 − t) x + t ε``, ``t ~ U[t_min, t_max]``,
then wrapped in ``ScoreFromVelocity`` so that every recipe part (samplers, weightings,
``FlowTaylorControl``) runs through the same ``TrainingStep`` as DSM, with ``α = 1 − t`` and
λ = ``flow_matching_weighting`` (the step's loss is then ``‖v_θ − (ε − x)‖²`` exactly).
``t`` stays inside ``[1e-3, 1 − 1e-3]``: the score ``−(x_t + (1 − t) v)/t`` divides by ``t``,
and the float32 Taylor control loses digits as ``t → 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from varred_diffusion.experiments.common import Context
from varred_diffusion.experiments.mnist import MnistSettings, mnist_images
from varred_diffusion.experiments.problem import Problem
from varred_diffusion.experiments.toysetup import ToyConfig, make_mixture
from varred_diffusion.flow import RectifiedFlowSchedule, ScoreFromVelocity, flow_matching_weighting
from varred_diffusion.models import MLPScore, SmallUNet
from varred_diffusion.objective_densities import Uniform
from varred_diffusion.recipe import Recipe

__all__ = ["T_MAX", "T_MIN", "mnist_flow_problem", "plain_flow_recipe", "toy_flow_problem",
           "train_velocity"]  # fmt: skip

Tensor = torch.Tensor
T_MIN, T_MAX = 1e-3, 1.0 - 1e-3


def plain_flow_recipe(t_min: float = T_MIN, t_max: float = T_MAX) -> Recipe:
    """Plain conditional flow matching: ``t ~ U[t_min, t_max]``, the FM loss, no control."""
    return Recipe(sampler=Uniform(t_min, t_max), weighting=flow_matching_weighting,
                  name="uniform t (plain flow matching)")  # fmt: skip


def train_velocity(
    model: torch.nn.Module, sample_x: Callable[[int, torch.Generator], Tensor], *,
    steps: int, batch: int, lr: float, generator: torch.Generator, device: str = "cpu",
) -> ScoreFromVelocity:  # fmt: skip
    """Train ``model`` (a velocity network) ``steps`` Adam steps of plain flow matching.

    Returns the trained network wrapped as a score, ``ScoreFromVelocity(model)``.
    """
    sf = ScoreFromVelocity(model)
    alpha = RectifiedFlowSchedule().alpha
    step = plain_flow_recipe().build(sf, model.parameters(), alpha=alpha, validate=False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):  # batches drawn on the CPU from one generator, then moved
        b = step.prepare(sample_x(batch, generator), generator=generator)
        opt.zero_grad(set_to_none=True)
        step(b.x.to(device), b.sigma.to(device), b.noise.to(device))
        opt.step()
    return sf


def toy_flow_problem(ctx: Context) -> Problem:
    """The toy flow problem: an ``MLPScore`` velocity net trained 300 steps on the 2-D mixture."""
    cfg = ToyConfig(dataset=str(ctx.extra.get("dataset", "ring8")), device=ctx.device)
    steps = 300
    if ctx.quick:
        cfg, steps = replace(cfg, width=16, depth=2, batch=16), 5
    mixture = make_mixture(cfg.dataset)

    def sample_x(n: int, g: torch.Generator) -> Tensor:
        return mixture.sample(n, g).to(cfg.dtype)

    net = MLPScore(2, cfg.width, cfg.depth, cfg.activation, preconditioning="none",
                   generator=ctx.generator("flow-toy-init"))  # fmt: skip
    net = net.to(device=cfg.device, dtype=cfg.dtype)
    sf = train_velocity(net, sample_x, steps=steps, batch=cfg.batch, lr=cfg.lr,
                        generator=ctx.generator("flow-toy-train"), device=ctx.device)  # fmt: skip
    return Problem(
        name=f"toy-{cfg.dataset}-flow", model=sf, sample_x=sample_x, device=ctx.device,
        sigma_min=T_MIN, sigma_max=T_MAX, dtype=cfg.dtype, process="flow",
        batch=8 if ctx.quick else 32, orders=(0, 1) if ctx.quick else (0, 1, 2),
        units=6 if ctx.quick else 96, units_high=3 if ctx.quick else 24, expectation="exact",
        timing_repeats=1 if ctx.quick else 5,
    )  # fmt: skip


def mnist_flow_problem(ctx: Context) -> Problem:
    """The MNIST flow problem: a ``SmallUNet`` velocity net trained 100 steps (MNIST's sizes).

    Raises:
        VarRedError: no MNIST IDX data found (the caller skips the problem with a note).
    """
    s = MnistSettings()
    steps = 3 if ctx.quick else 100
    if ctx.quick:
        s = replace(s, base=8, batch=4, limit=64)
    images = mnist_images(ctx, s.limit)

    def sample_x(n: int, g: torch.Generator) -> Tensor:
        return images[torch.randint(images.shape[0], (n,), generator=g)]

    net = SmallUNet(1, base=s.base, preconditioning="none",
                    generator=ctx.generator("flow-mnist-init")).to(ctx.device)  # fmt: skip
    sf = train_velocity(net, sample_x, steps=steps, batch=s.batch, lr=s.lr,
                        generator=ctx.generator("flow-mnist-train"), device=ctx.device)  # fmt: skip
    return Problem(
        name="mnist-flow", model=sf, sample_x=sample_x, device=ctx.device,
        sigma_min=T_MIN, sigma_max=T_MAX, dtype=torch.float32, process="flow",
        batch=4 if ctx.quick else 16, orders=(0, 1) if not ctx.quick else (0,),
        units=3 if ctx.quick else 24, units_high=2 if ctx.quick else 8, expectation="hutchinson",
        timing_repeats=1 if ctx.quick else 5,
    )  # fmt: skip
