"""Building blocks shared by the 2-D experiments (toy, grid, optimizers, leaderboard).

A 2-D Gaussian mixture with a closed-form noisy score, an ``MLPScore`` network, log-uniform
σ training, plain or C^k-controlled DSM steps (the step of :func:`control_recipe`), and the
evaluation of the DSM loss and the exact score error on a fixed held-out set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from varred.errors import VarRedError
from varred.layout import CoefficientLayout
from varred_diffusion.bins import SigmaBins
from varred_diffusion.controls import TaylorControl
from varred_diffusion.diagnostics import DrawFn, gradient_variance_ratio
from varred_diffusion.experiments.common import Context, TrainJob, optimizer_step
from varred_diffusion.losses import dsm_loss
from varred_diffusion.models import MLPScore
from varred_diffusion.recipe import Recipe
from varred_diffusion.sampling import log_uniform_sigma
from varred_diffusion.toy import GaussianMixture, asymmetric, ring8

__all__ = [
    "ToyConfig",
    "build_toy_job",
    "control_recipe",
    "draw_fn",
    "make_bins",
    "make_mixture",
    "make_model",
    "sample_sigma",
    "variance_ratios",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class ToyConfig:
    """Settings of a 2-D DSM training run."""

    dataset: str = "ring8"
    width: int = 128
    depth: int = 3
    activation: str = "silu"
    batch: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    sigma_min: float = 1e-3
    sigma_max: float = 1.0
    order: int = 0
    num_bins: int = 4
    eval_size: int = 1024
    dtype: torch.dtype = torch.float64
    device: str = "cpu"


def make_mixture(name: str) -> GaussianMixture:
    """The toy data: "ring8" (8 Gaussians on a ring, as in the paper) or "asymmetric"."""
    if name == "ring8":
        return ring8()
    if name == "asymmetric":
        return asymmetric()
    raise VarRedError(f"dataset: expected 'ring8' or 'asymmetric', got {name!r}")


def make_model(cfg: ToyConfig, generator: torch.Generator) -> torch.nn.Module:
    """``MLPScore(2, width, depth, activation)`` initialised from ``generator``."""
    return MLPScore(2, cfg.width, cfg.depth, cfg.activation, generator=generator).to(
        device=cfg.device, dtype=cfg.dtype
    )


def sample_sigma(
    n: int, generator: torch.Generator, lo: float, hi: float, dtype: torch.dtype
) -> Tensor:
    """Log-uniform σ on ``[lo, hi]``: ``[n]`` (``varred_diffusion.log_uniform_sigma``)."""
    return log_uniform_sigma(torch.rand(n, generator=generator, dtype=dtype), lo, hi).to(dtype)


def make_bins(cfg: ToyConfig) -> SigmaBins | None:
    """``SigmaBins`` over the training σ range (``None`` for one bin)."""
    return SigmaBins(cfg.sigma_min, cfg.sigma_max, cfg.num_bins) if cfg.num_bins > 1 else None


def control_recipe(cfg: ToyConfig) -> Recipe:
    """The controlled toy step: C^k (exact means), running per-element β per σ bin."""
    bins = make_bins(cfg)
    layout = CoefficientLayout("element", groups=1 if bins is None else bins)
    return Recipe(
        control=TaylorControl(order=cfg.order, expectation="exact"),
        layout=layout,
        name=f"C^{cfg.order}, per-element β" + (f" per σ bin ({bins.num_bins})" if bins else ""),
    )


def draw_fn(mixture: GaussianMixture, cfg: ToyConfig, sigma: float | None = None) -> DrawFn:
    """``(n, generator) -> (x [n, 2], sigma [n], noise [n, 2])``; σ fixed or log-uniform.

    Drawn on the CPU from ``generator`` (reproducible), then moved to ``cfg.device``.
    """

    def draw(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        x = mixture.sample(n, g).to(cfg.dtype)
        if sigma is None:
            s = sample_sigma(n, g, cfg.sigma_min, cfg.sigma_max, cfg.dtype)
        else:
            s = torch.full((n,), float(sigma), dtype=cfg.dtype)
        e = torch.randn(x.shape, generator=g, dtype=cfg.dtype)
        return x.to(cfg.device), s.to(cfg.device), e.to(cfg.device)

    return draw


def _optimizer(cfg: ToyConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    raise VarRedError(f"optimizer: expected 'adam' or 'sgd', got {cfg.optimizer!r}")


def build_toy_job(
    ctx: Context,
    cfg: ToyConfig,
    *,
    controlled: bool,
    seed_tag: object,
    snapshot_every: int = 0,
    eval_every: int = 0,
) -> Callable[[], TrainJob]:
    """A factory for a plain or C^k-controlled toy training job (see ``run_job``)."""

    def build() -> TrainJob:
        mixture = make_mixture(cfg.dataset)
        model = make_model(cfg, ctx.generator("init", seed_tag))
        opt = _optimizer(cfg, model)
        data_g = ctx.generator("data", seed_tag, controlled)
        evg = ctx.generator("eval-set", seed_tag)
        x_ev, s_ev, e_ev = draw_fn(mixture, cfg)(cfg.eval_size, evg)

        def score_fn(x: Tensor, s: Tensor) -> Tensor:
            return model(x, s)

        stateful: dict[str, Any] = {}
        step_helper = None
        if controlled:
            step_helper = control_recipe(cfg).build(score_fn, model.parameters())
            stateful["control"] = step_helper

        def step(i: int) -> dict[str, float]:
            x, s, e = draw_fn(mixture, cfg)(cfg.batch, data_g)
            kw = {"generator": data_g} if step_helper is not None else {}
            return optimizer_step(opt, step_helper, score_fn, x, s, e, **kw)

        def evaluate(i: int) -> dict[str, float]:
            with torch.no_grad():
                loss = dsm_loss(score_fn, x_ev, s_ev, e_ev, validate=False)
                xt = x_ev + s_ev[:, None] * e_ev
                err = ((model(xt, s_ev) - mixture.score(xt, s_ev)) ** 2).sum(-1) * s_ev**2
            return {"dsm_loss": float(loss.mean()), "score_error": float(err.mean())}

        return TrainJob(
            model=model,
            optimizer=opt,
            step_fn=step,
            eval_fn=evaluate if eval_every else None,
            eval_every=eval_every,
            generators={"data": data_g},
            stateful=stateful,
            snapshot_every=snapshot_every,
        )

    return build


def variance_ratios(
    ctx: Context,
    model: torch.nn.Module,
    cfg: ToyConfig,
    *,
    orders: tuple[int, ...],
    sigma: float | None,
    num: int,
    tag: object,
    unit_size: int = 1,
    kinds: tuple[str, ...] = ("unit", "scalar", "element"),
) -> list[dict[str, float]]:
    """One row per order: VR per coefficient kind, its standard error and fitted β at θ.

    Columns: ``order``, ``var_plain``, ``vr_<kind>``, ``beta_<…>``, then the jackknife
    standard errors ``vr_<kind>_se`` and ``var_plain_se`` (NaN with < 3 evaluation units).
    """
    mixture = make_mixture(cfg.dataset)
    bins = make_bins(cfg) if sigma is None else None
    use = kinds + (("bin",) if bins is not None else ())
    rows = []
    for k in orders:
        vr = gradient_variance_ratio(
            model, draw_fn(mixture, cfg, sigma), order=k, generator=ctx.generator("vr", tag, k),
            num_fit=num, num_eval=num, unit_size=unit_size if k > 0 else 1, kinds=use, bins=bins,
            expectation="exact",
        )  # fmt: skip
        row: dict[str, float] = {"order": float(k), "var_plain": vr.variance_plain}
        row.update({f"vr_{kk}": v for kk, v in vr.ratio.items()})
        row.update({f"beta_{kk}": v for kk, v in vr.beta_summary.items()})
        row.update({f"vr_{kk}_se": v for kk, v in vr.ratio_stderr.items()})
        row["var_plain_se"] = vr.variance_plain_stderr
        rows.append(row)
    return rows
