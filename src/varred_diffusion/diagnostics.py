"""Gradient-variance diagnostics for DSM control variates at a fixed θ.

Measures what DESIGN.md calls the variance ratio,

.. math::  \\mathrm{VR} = \\frac{\\operatorname{tr}\\operatorname{Cov}[g - \\beta \\odot h]}
                               {\\operatorname{tr}\\operatorname{Cov}[g]},

with ``g = ∇_θ ℓ`` (per-sample DSM loss gradient), ``h = ∇_θ C^k`` (gradient of the Taylor
control variate of Jeha et al., 2024) and β fitted on draws INDEPENDENT of those the
variance is evaluated on. Everything streams through sufficient statistics
(:class:`GradientMoments`), so the ``[N, P]`` per-sample gradient matrix is never held.

Units: a "unit" is what one gradient estimate averages over. Per-sample units (the
default) give the per-sample VR; the leaderboard also uses antithetic pairs and whole
stratified batches as units. β may be one number (``scalar``), one per parameter element
(``element``), or one per element and σ bin (``bin``: the unit's control gradient is split
by bin, ``h = Σ_b h_b``, and ``β_b`` solves the per-element ``nb × nb`` normal equations).
``unit`` is β = 1, the paper's objective-level CV.

Every ratio comes with a standard error: a delete-one-block jackknife over the evaluation
units (:mod:`varred_diffusion.jackknife`), conditional on the fitted β.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from varred.errors import VarRedError
from varred_diffusion.gradient_moments import (
    COEFFICIENT_KINDS,
    GradientMoments,
    ValueFn,
    controlled_variance,
    fit_coefficients,
    per_sample_gradients,
    unit_gradients,
    weighted_gradients,
)
from varred_diffusion.jackknife import BlockSums, jackknife_stderr, resolve_num_blocks
from varred_diffusion.losses import dsm_loss
from varred_diffusion.taylor_cv import dsm_taylor_cv

__all__ = [
    "COEFFICIENT_KINDS",
    "GradientMoments",
    "VarianceRatio",
    "controlled_variance",
    "efficiency",
    "fit_coefficients",
    "gradient_variance_ratio",
    "per_sample_gradients",
    "time_per_call",
    "unit_gradients",
    "variance_ratio_by_sigma",
    "weighted_gradients",
]

Tensor = torch.Tensor
DrawFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class VarianceRatio:
    """Result of :func:`gradient_variance_ratio`.

    Attributes:
        variance_plain: ``tr Cov[g]`` of the per-sample DSM gradient.
        variance: ``tr Cov[g − β h]`` per coefficient kind.
        ratio: ``variance / variance_plain`` per kind.
        beta: fitted β per kind, ``[nb, P]``.
        beta_summary: scalar β, and the mean/median of per-element β.
        num_fit, num_eval: draws used to fit β and to evaluate the variances.
        ratio_stderr: jackknife standard error of ``ratio`` per kind (same keys), given
            the fitted β; NaN when no jackknife was possible (``num_eval < 3``).
        variance_stderr: the same for ``variance`` per kind.
        variance_plain_stderr: the same for ``variance_plain``.
        num_blocks: jackknife blocks ``J`` (0: none).
    """

    variance_plain: float
    variance: dict[str, float]
    ratio: dict[str, float]
    beta: dict[str, Tensor]
    beta_summary: dict[str, float]
    num_fit: int
    num_eval: int
    ratio_stderr: dict[str, float] = field(default_factory=dict)
    variance_stderr: dict[str, float] = field(default_factory=dict)
    variance_plain_stderr: float = math.nan
    num_blocks: int = 0


def _moments_from_draws(
    model: nn.Module,
    draw: DrawFn,
    units: int,
    unit_size: int,
    generator: torch.Generator,
    loss_fn: ValueFn,
    control_fn: ValueFn,
    bin_fn: Callable[[Tensor], Tensor] | None,
    num_bins: int,
    sums: BlockSums | None = None,
) -> GradientMoments:
    params = [p for p in model.parameters() if p.requires_grad]
    mom = GradientMoments(sum(p.numel() for p in params), num_bins)

    def score_fn(x: Tensor, s: Tensor) -> Tensor:
        return model(x, s)

    for _ in range(units):
        x, sigma, noise = draw(unit_size, generator)
        losses = loss_fn(score_fn, x, sigma, noise)
        controls = control_fn(score_fn, x, sigma, noise)
        idx = bin_fn(sigma) if bin_fn is not None else None
        g, h = unit_gradients(losses, controls, params, idx, num_bins)
        mom.update(g[None], h[None])
        if sums is not None:
            sums.update(g[None], h[None])
    return mom


def gradient_variance_ratio(
    model: nn.Module,
    draw: DrawFn,
    *,
    order: int = 0,
    generator: torch.Generator,
    num_fit: int = 256,
    num_eval: int = 256,
    unit_size: int = 1,
    kinds: Sequence[str] = ("unit", "scalar", "element"),
    bins: object | None = None,
    loss_fn: ValueFn | None = None,
    control_fn: ValueFn | None = None,
    expectation: str = "auto",
    num_blocks: int | None = None,
) -> VarianceRatio:
    r"""Variance ratio of the C^k-controlled per-sample DSM gradient at the current θ.

    β is fitted on ``num_fit`` units and the variances are measured on ``num_eval`` further
    independent units (Jeha et al., 2024, fig. 2 protocol with held-out coefficients). A unit
    is the mean over ``unit_size`` i.i.d. draws: its covariance is the per-sample covariance
    divided by ``unit_size``, so the ratio and the optimal β are those of the per-sample
    gradient; larger units amortise the per-call cost of expensive controls (k ≥ 1).

    Standard errors: a delete-one-block jackknife over the evaluation units. β is fixed
    before evaluation, so each unit's controlled gradient ``d_u = g_u − Σ_b β_b ⊙ h_{u,b}``
    is streamed into ``J`` block sums (:class:`~varred_diffusion.jackknife.BlockSums`,
    ``O(kinds × J × P)`` memory) and, with ``V_{−j}`` the variances without block ``j``,
    :math:`\mathrm{SE}(R) = \sqrt{\tfrac{J-1}{J}\sum_j (R_{-j} - \bar R)^2}`,
    :math:`R_{-j} = V_{-j}(d) / V_{-j}(g)`. Chosen over the delta method because it needs
    only additive sums (no fourth-moment cross terms between ``d`` and ``g``), handles the
    ratio's non-linearity and the strong correlation of numerator and denominator (both
    from the same units) automatically, and is exactly 0 in the degenerate cases (``d = 0``
    or ``d = g``). The SE describes the evaluation noise given the fitted β; the noise of
    β itself is not included (it moves the held-out ratio only to second order near the
    optimum). The point estimate ``ratio`` is computed from the moments as before.

    Args:
        model: score model ``(x [B, ...], sigma [B]) -> [B, ...]``.
        draw: ``(n, generator) -> (x [n, ...], sigma [n], noise [n, ...])``.
        order: Taylor order ``k`` of the default control ``dsm_taylor_cv``.
        generator: the only randomness (draws, and probes of the control).
        num_fit, num_eval: numbers of units for fitting β and for evaluation.
        unit_size: draws per unit.
        kinds: coefficient kinds among ``COEFFICIENT_KINDS`` (``varred.vocabulary.BetaLayout``
            names; ``"full"`` is accepted for ``"bin"``); "bin" needs ``bins``.
        bins: object with ``index(sigma) -> LongTensor[B]`` and ``num_bins`` (``SigmaBins``).
        loss_fn, control_fn: override ``dsm_loss`` / ``dsm_taylor_cv(order=order)``.
        expectation: passed to ``dsm_taylor_cv``.
        num_blocks: jackknife blocks ``J`` (default ``min(16, num_eval)``; no SE, i.e.
            NaN, when ``num_eval < 3``).

    Returns:
        :class:`VarianceRatio`.

    Raises:
        VarRedError: "bin" without ``bins``; an unknown kind; ``num_blocks`` not an integer
            in ``[2, num_eval]`` that leaves ≥ 2 units when a block is deleted.

    >>> vr = gradient_variance_ratio(model, draw, order=0, generator=g)  # doctest: +SKIP
    >>> vr.ratio["element"]  # doctest: +SKIP
    """
    if any(k in ("bin", "full") for k in kinds) and bins is None:
        raise VarRedError("bins: kind 'bin' needs a SigmaBins-like object, got None")
    blocks = resolve_num_blocks(num_blocks, num_eval)
    if loss_fn is None or control_fn is None:

        def default_loss(score_fn, x, sigma, noise):  # type: ignore[no-untyped-def]
            return dsm_loss(score_fn, x, sigma, noise, validate=False)

        loss_fn = loss_fn or default_loss

        def default_control(score_fn, x, sigma, noise):  # type: ignore[no-untyped-def]
            return dsm_taylor_cv(
                score_fn, x, sigma, noise, order=order, expectation=expectation, generator=generator
            )

        control_fn = control_fn or default_control
    bin_fn = bins.index if bins is not None else None  # type: ignore[attr-defined]
    nb = int(bins.num_bins) if bins is not None else 1  # type: ignore[attr-defined]
    args = (unit_size, generator, loss_fn, control_fn, bin_fn, nb)
    fit = _moments_from_draws(model, draw, num_fit, *args)
    betas = fit_coefficients(fit, kinds)  # no randomness: the evaluation draws are unchanged
    sums = None
    if blocks is not None:
        num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sums = BlockSums([None, *betas.values()], num_params, num_eval, blocks)
    ev = _moments_from_draws(model, draw, num_eval, *args, sums=sums)
    plain = controlled_variance(ev)
    variance = {k: controlled_variance(ev, b) for k, b in betas.items()}
    ratio = {k: v / plain if plain > 0 else math.nan for k, v in variance.items()}
    plain_se = math.nan
    variance_se = {k: math.nan for k in betas}
    ratio_se = {k: math.nan for k in betas}
    if sums is not None:
        loo = sums.leave_one_out()  # [1 + kinds, J]: row 0 is the plain gradient
        den = torch.where(loo[0] > 0, loo[0], torch.full_like(loo[0], math.nan))
        plain_se = jackknife_stderr(loo[0])
        for i, k in enumerate(betas, start=1):
            variance_se[k] = jackknife_stderr(loo[i])
            ratio_se[k] = jackknife_stderr(loo[i] / den)
    summary: dict[str, float] = {}
    if "scalar" in betas:
        summary["scalar"] = float(betas["scalar"].flatten()[0])
    if "element" in betas:
        summary["element_mean"] = float(betas["element"][0].mean())
        summary["element_median"] = float(betas["element"][0].median())
    return VarianceRatio(
        plain, variance, ratio, betas, summary, num_fit, num_eval,
        ratio_stderr=ratio_se, variance_stderr=variance_se, variance_plain_stderr=plain_se,
        num_blocks=blocks or 0,
    )  # fmt: skip


def variance_ratio_by_sigma(
    model: nn.Module,
    sample_x: Callable[[int, torch.Generator], Tensor],
    sigmas: Sequence[float],
    *,
    order: int = 0,
    generator: torch.Generator,
    **kwargs: Any,
) -> dict[float, VarianceRatio]:
    """:func:`gradient_variance_ratio` at each fixed noise level (Jeha et al., 2024, fig. 2).

    Args:
        model: score model ``(x [B, ...], sigma [B]) -> [B, ...]``.
        sample_x: ``(n, generator) -> x [n, ...]`` clean data.
        sigmas: the noise levels.
        order: Taylor order ``k``.
        generator: the only randomness.
        **kwargs: further arguments of :func:`gradient_variance_ratio`.

    Returns:
        ``{σ: VarianceRatio}``.

    >>> out = variance_ratio_by_sigma(model, mix.sample, [1e-2, 1e-1], generator=g)  # doctest: +SKIP
    """
    out: dict[float, VarianceRatio] = {}
    for sigma in sigmas:

        def draw(
            n: int, g: torch.Generator, sigma: float = float(sigma)
        ) -> tuple[Tensor, Tensor, Tensor]:
            x = sample_x(n, g)
            s = torch.full((n,), sigma, dtype=x.dtype, device=x.device)
            e = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            return x, s, e

        out[float(sigma)] = gradient_variance_ratio(
            model, draw, order=order, generator=generator, **kwargs
        )
    return out


def time_per_call(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, clock: str = "wall"
) -> float:
    """Median time (seconds) of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    ``clock``: ``"wall"`` (``time.perf_counter``, CUDA synchronised) or ``"cpu"`` (this
    process's CPU time, ``time.process_time``: on a CPU run it counts the work done, not the
    other processes sharing the cores, so ratios of two such times survive a loaded machine;
    with several torch threads it sums their time). ``"cpu"`` cannot time GPU work.
    """
    if clock not in ("wall", "cpu"):
        raise VarRedError(f"clock: expected 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.is_available() and clock == "wall"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(now() - t0)
    times.sort()
    return times[len(times) // 2]


def efficiency(var_plain: float, t_plain: float, var: float, t: float) -> float:
    """Efficiency ``(Var_plain · t_plain) / (Var · t)``: > 1 means the technique pays for itself."""
    den = var * t
    return (var_plain * t_plain) / den if den > 0 else math.inf
