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
from varred_diffusion.jackknife import BlockSums, jackknife_stderr, resolve_num_blocks

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

COEFFICIENT_KINDS = ("unit", "scalar", "element", "bin")
Tensor = torch.Tensor
DrawFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor, Tensor]]
ValueFn = Callable[[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor, Tensor], Tensor]


def weighted_gradients(
    values: Tensor, params: Sequence[Tensor], weights: Tensor, *, retain_graph: bool = True
) -> Tensor:
    """Gradients of ``Σ_i weights[k, i] · values[i]`` for every row ``k``.

    One batched backward (``torch.autograd.grad(..., is_grads_batched=True)``); falls back
    to a loop of backwards if an operation has no batching rule.

    Args:
        values: ``[B]`` differentiable per-sample values.
        params: the parameters to differentiate (``P`` elements in total).
        weights: ``[K, B]``; ``torch.eye(B)`` gives per-sample gradients.

    Returns:
        ``[K, P]`` flattened gradients (float64); parameters outside the graph give zeros.
    """
    params = list(params)
    w = weights.to(values.dtype)
    try:
        grads = torch.autograd.grad(
            values, params, grad_outputs=w, is_grads_batched=True,
            retain_graph=retain_graph, allow_unused=True,
        )  # fmt: skip
    except RuntimeError:
        rows = [
            torch.autograd.grad(
                values, params, grad_outputs=w[k], retain_graph=True, allow_unused=True
            )
            for k in range(w.shape[0])
        ]
        grads = tuple(
            torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
            for j, p in enumerate(params)
        )
    k = w.shape[0]
    flat = [
        (
            g if g is not None else torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device)
        ).reshape(k, -1)
        for g, p in zip(grads, params)
    ]
    return torch.cat(flat, dim=1).double()  # [K, P]


def per_sample_gradients(
    model: nn.Module,
    value_fn: ValueFn,
    x: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    method: str = "auto",
) -> Tensor:
    """Per-sample gradients ``∇_θ value_fn(model, x_i, σ_i, ε_i)`` as ``[B, P]`` (float64).

    ``method="vmap"``: ``torch.func.functional_call`` + ``vmap(grad(...))`` over samples
    (each sample evaluated as a batch of one); ``"batched"``: one forward on the whole batch
    and a batched backward (:func:`weighted_gradients` with the identity); ``"auto"`` tries
    vmap and falls back to batched (e.g. when ``value_fn`` validates its inputs with
    data-dependent Python control flow, which vmap cannot trace).

    Args:
        model: score model, ``model(x [B, ...], sigma [B]) -> [B, ...]``.
        value_fn: ``(score_fn, x, sigma, noise) -> [B]`` per-sample values, e.g.
            ``varred_diffusion.dsm_loss``.
        x, noise: ``[B, ...]``; sigma: ``[B]``.
        method: "auto", "vmap" or "batched".

    Returns:
        ``[B, P]`` gradients, parameters flattened in ``model.named_parameters()`` order.
    """
    if method not in ("auto", "vmap", "batched"):
        raise VarRedError(f"method: expected 'auto', 'vmap' or 'batched', got {method!r}")
    named = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if method in ("auto", "vmap"):
        from torch.func import functional_call, grad, vmap

        def one(params: dict[str, Tensor], xi: Tensor, si: Tensor, ei: Tensor) -> Tensor:
            def score_fn(xx: Tensor, ss: Tensor) -> Tensor:
                return functional_call(model, params, (xx, ss))

            return value_fn(score_fn, xi[None], si[None], ei[None]).sum()

        detached = {k: v.detach() for k, v in named.items()}
        try:
            g = vmap(grad(one), in_dims=(None, 0, 0, 0))(detached, x, sigma, noise)
            return torch.cat([g[k].reshape(x.shape[0], -1) for k in named], dim=1).double()
        except Exception:
            if method == "vmap":
                raise
    values = value_fn(lambda xx, ss: model(xx, ss), x, sigma, noise)
    eye = torch.eye(x.shape[0], dtype=values.dtype, device=values.device)
    return weighted_gradients(values, list(named.values()), eye, retain_graph=False)


class GradientMoments:
    """Streaming sums of unit gradients ``g [P]`` and binned control gradients ``h [nb, P]``.

    Holds ``n``, ``Σg``, ``Σh_b``, ``Σg²``, ``Σg h_b`` and ``Σh_b h_b'`` per element, in
    float64: enough for ``tr Cov[g − Σ_b β_b ⊙ h_b]`` with any β.
    """

    def __init__(self, num_params: int, num_bins: int = 1) -> None:
        self.num_bins = int(num_bins)
        p, nb = int(num_params), self.num_bins
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.sg, self.sgg = z(p), z(p)
        self.sh, self.sgh = z(nb, p), z(nb, p)
        self.shh = z(nb, nb, p)

    def update(self, g: Tensor, h: Tensor | None = None) -> None:
        """Add units: ``g [U, P]``, ``h [U, nb, P]`` (or ``None``: no control); kept on the CPU."""
        g = g.detach().double().cpu()
        self.n += g.shape[0]
        self.sg += g.sum(0)
        self.sgg += (g * g).sum(0)
        if h is not None:
            h = h.detach().double().cpu()
            self.sh += h.sum(0)
            self.sgh += torch.einsum("up,ubp->bp", g, h)
            self.shh += torch.einsum("ubp,ucp->bcp", h, h)

    def covariances(self) -> tuple[Tensor, Tensor, Tensor]:
        """Unbiased ``Var g [P]``, ``Cov(g, h_b) [nb, P]``, ``Cov(h_b, h_c) [nb, nb, P]``."""
        if self.n < 2:
            raise VarRedError(f"moments: need at least 2 units, got {self.n}")
        n = self.n
        mg, mh = self.sg / n, self.sh / n
        c = n / (n - 1)
        vg = (self.sgg / n - mg * mg) * c
        cgh = (self.sgh / n - mh * mg) * c
        chh = (self.shh / n - mh[:, None] * mh[None, :]) * c
        return vg, cgh, chh


def fit_coefficients(
    moments: GradientMoments, kinds: Sequence[str] = COEFFICIENT_KINDS, *, ridge: float = 1e-12
) -> dict[str, Tensor]:
    """Variance-minimising β of each kind, as ``[nb, P]`` tensors (no gradient).

    ``unit``: 1; ``scalar``: ``Σ_p Cov(g, h) / Σ_p Var(h)`` with ``h = Σ_b h_b``;
    ``element``: the same per element; ``bin``: per element, ``β = Σ_hh^{-1} Cov(h, g)``
    over bins (``ridge`` × trace added to the diagonal; empty bins get β = 0).
    """
    _, cgh, chh = moments.covariances()
    nb, p = cgh.shape
    cov_tot = cgh.sum(0)  # Cov(g, Σ_b h_b): [P]
    var_tot = chh.sum((0, 1))  # Var(Σ_b h_b): [P]
    out: dict[str, Tensor] = {}
    for kind in kinds:
        if kind == "unit":
            beta = torch.ones(nb, p, dtype=torch.float64)
        elif kind == "scalar":
            den = var_tot.sum()
            b = cov_tot.sum() / den if den > 0 else torch.zeros((), dtype=torch.float64)
            beta = b.expand(nb, p).clone()
        elif kind == "element":
            b = torch.where(
                var_tot > 0, cov_tot / var_tot.clamp_min(1e-300), torch.zeros_like(var_tot)
            )
            beta = b.expand(nb, p).clone()
        elif kind == "bin":
            a = chh.permute(2, 0, 1)  # [P, nb, nb]
            diag = torch.diagonal(a, dim1=1, dim2=2)
            scale = diag.sum(-1, keepdim=True).clamp_min(1e-300)
            empty = diag <= 0
            a = a + torch.diag_embed(torch.where(empty, torch.ones_like(diag), ridge * scale))
            beta = torch.linalg.solve(a, cgh.T.unsqueeze(-1)).squeeze(-1).T  # [nb, P]
            beta = torch.where(empty.T, torch.zeros_like(beta), beta)
        else:
            raise VarRedError(f"kinds: expected entries of {COEFFICIENT_KINDS}, got {kind!r}")
        out[kind] = beta
    return out


def controlled_variance(moments: GradientMoments, beta: Tensor | None = None) -> float:
    """``tr Cov[g − Σ_b β_b ⊙ h_b]`` over the units in ``moments`` (``β = None``: plain)."""
    vg, cgh, chh = moments.covariances()
    if beta is None:
        return float(vg.sum())
    beta = beta.double()
    var = vg - 2 * (beta * cgh).sum(0) + torch.einsum("bp,bcp,cp->p", beta, chh, beta)
    return float(var.sum())


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


def _flat_grad(value: Tensor, params: Sequence[Tensor], retain: bool) -> Tensor:
    grads = torch.autograd.grad(value, list(params), retain_graph=retain, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    ).double()


def unit_gradients(
    losses: Tensor,
    controls: Tensor | None,
    params: Sequence[Tensor],
    bin_index: Tensor | None = None,
    num_bins: int = 1,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of one unit's estimates: ``g = ∇ Σ w_i ℓ_i`` and ``h_b = ∇ Σ_{i∈b} w_i c_i``.

    Args:
        losses, controls: ``[m]`` per-sample values of the unit (differentiable);
            ``controls=None`` gives ``h = 0``.
        params: parameters (``P`` elements).
        bin_index: ``LongTensor[m]`` σ bin of each sample (``None``: one bin).
        num_bins: number of bins ``nb``.
        weights: ``[m]`` (default ``1/m``: the unit's mean).

    Returns:
        ``g [P]`` and ``h [nb, P]`` (float64); absent bins are zero.
    """
    m = losses.shape[0]
    w = (
        torch.full((m,), 1.0 / m, dtype=losses.dtype)
        if weights is None
        else weights.to(losses.dtype)
    )
    idx = torch.zeros(m, dtype=torch.long) if bin_index is None else bin_index.long()
    present = sorted(set(idx.tolist()))
    g = _flat_grad((w * losses).sum(), params, retain=controls is not None)
    h = torch.zeros(num_bins, g.shape[0], dtype=torch.float64, device=g.device)
    if controls is None:
        return g, h
    for j, b in enumerate(present):
        mask = (idx == b).to(controls)
        h[b] = _flat_grad((w * mask * controls).sum(), params, retain=j < len(present) - 1)
    return g, h


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
        kinds: coefficient kinds among ``COEFFICIENT_KINDS``; "bin" needs ``bins``.
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
    if "bin" in kinds and bins is None:
        raise VarRedError("bins: kind 'bin' needs a SigmaBins-like object, got None")
    blocks = resolve_num_blocks(num_blocks, num_eval)
    if loss_fn is None or control_fn is None:
        from varred_diffusion.losses import dsm_loss
        from varred_diffusion.taylor_cv import dsm_taylor_cv

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


def time_per_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def efficiency(var_plain: float, t_plain: float, var: float, t: float) -> float:
    """Efficiency ``(Var_plain · t_plain) / (Var · t)``: > 1 means the technique pays for itself."""
    den = var * t
    return (var_plain * t_plain) / den if den > 0 else math.inf
