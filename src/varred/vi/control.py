r"""Controlled ELBO gradients for a ``torch.optim`` loop, with one β per parameter block.

Per block ``b ∈ {mean, scale}`` the controlled per-sample gradient is
``y_i = f_i − β_bᵀ c_i`` with ``f`` the reparameterisation (or STL) gradient and ``c`` the
stacked zero-mean controls (Taylor order 1/2, Miller et al. 2017; the entropy's score term,
Roeder et al. 2017, for the fitted STL blend). β comes from :class:`varred.OptimalCoefficient`
(cross-fitted within the batch or from earlier steps, never from the samples it is applied to),
so the step gradient stays unbiased. ``.grad`` receives ``−mean_i y_i`` (minimise −ELBO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from varred.coefficients import OptimalCoefficient
from varred.errors import VarRedError
from varred.estimate import estimate
from varred.vi.families import GaussianFamily
from varred.vi.gradient import elbo_grads, score_control, stl_grads, taylor_controls

__all__ = ["ELBOControl"]

STL_MODES = ("none", "stl", "blend")
BLOCKS = ("mean", "scale")


class ELBOControl:
    r"""Fill ``loc.grad`` and ``raw_scale.grad`` with a controlled −ELBO gradient.

    Args:
        family: the :class:`GaussianFamily` being fitted.
        log_p: batched unnormalised log density ``[n, d] -> [n]``.
        order: Taylor control order: 0 (none), 1 or 2.
        stl: ``"none"`` (full reparameterisation gradient), ``"stl"`` (drop the score term,
            β = 1) or ``"blend"`` (the score term as one more control with a fitted β:
            β = 0 is the full gradient, β = 1 STL).
        coefficient: template :class:`OptimalCoefficient`; each block gets its own copy
            (default: ``kind="scalar"``, one β per control and block, ``fit="crossfit"``).
            ``fit="batch"`` is refused (it biases the step).
        expectation, probes: how the Taylor controls' means are computed (see
            :func:`taylor_controls`).

    Example:
        >>> q = GaussianFamily(torch.zeros(2, dtype=torch.float64), 1.0)
        >>> ctrl = ELBOControl(q, lambda z: -0.5 * (z**2).sum(1), order=1)
        >>> opt = torch.optim.SGD(q.parameters(), lr=0.1)
        >>> info = ctrl.step(8, torch.Generator().manual_seed(0)); opt.step()
        >>> float(info["variance_ratio_mean"]) < 1e-12
        True
    """

    def __init__(
        self,
        family: GaussianFamily,
        log_p: Callable[[torch.Tensor], torch.Tensor],
        *,
        order: int = 1,
        stl: str = "none",
        coefficient: OptimalCoefficient | None = None,
        expectation: str = "auto",
        probes: int = 8,
    ) -> None:
        if not isinstance(family, GaussianFamily):
            raise VarRedError(f"family: expected a GaussianFamily, got {type(family).__name__}")
        if not callable(log_p):
            raise VarRedError(f"log_p: expected a callable [n, d] -> [n], got {log_p!r}")
        if isinstance(order, bool) or order not in (0, 1, 2):
            raise VarRedError(f"order: expected 0, 1 or 2, got {order!r}")
        if stl not in STL_MODES:
            raise VarRedError(f"stl: expected one of {STL_MODES}, got {stl!r}")
        coef = coefficient or OptimalCoefficient(kind="scalar", fit="crossfit", folds=2)
        if not isinstance(coef, OptimalCoefficient):
            raise VarRedError(f"coefficient: expected an OptimalCoefficient, got {coef!r}")
        if coef.fit == "batch":
            raise VarRedError(
                "coefficient: expected fit='crossfit' or 'running' (unbiased), got fit='batch'"
            )
        self.family, self.log_p, self.order, self.stl = family, log_p, order, stl
        self.expectation, self.probes = expectation, probes
        self.coefficients = {b: dataclasses.replace(coef) for b in BLOCKS}  # fresh state each

    def per_sample(
        self, eps: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-sample gradients and stacked controls per block (ascent direction).

        Args:
            eps: base noise ``[n, d]``.
            generator: randomness of probe-based control means.

        Returns:
            ``{"mean": (f [n, d], c [n, d, m] or None), "scale": (f [n, P], c [n, P, m] or
            None)}`` with ``P = raw_scale.numel()``.
        """
        q = self.family
        fm, fs = (stl_grads if self.stl == "stl" else elbo_grads)(q, self.log_p, eps)
        cms: list[torch.Tensor] = []
        css: list[torch.Tensor] = []
        if self.order > 0:
            cm, cs = taylor_controls(
                q, self.log_p, eps, self.order, expectation=self.expectation,
                probes=self.probes, generator=generator,
            )  # fmt: skip
            cms.append(cm)
            css.append(cs)
        if self.stl == "blend":
            cm, cs = score_control(q, eps)
            cms.append(cm)
            css.append(cs)
        n = eps.shape[0]
        fs = fs.reshape(n, -1)  # [n, *raw] -> [n, P]
        c_mean = torch.stack(cms, -1) if cms else None
        c_scale = torch.stack([c.reshape(n, -1) for c in css], -1) if css else None
        return {"mean": (fm, c_mean), "scale": (fs, c_scale)}

    def step(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw ``n`` samples, write ``−(controlled mean gradient)`` into each ``.grad``.

        Args:
            n: samples per step (``≥ 2``; ``≥ 2 · folds`` for cross-fitting is advisable).
            generator: the only randomness (noise and probes).

        Returns:
            diagnostics (detached): ``elbo`` ``[]`` (plain MC estimate), per block ``b``
            ``variance_ratio_b`` ``[]`` (``tr Var[y] / tr Var[f]`` within the batch) and
            ``beta_b`` (the coefficient fitted on the whole batch, shape as
            :meth:`OptimalCoefficient.beta`).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise VarRedError(f"n: expected an integer >= 2, got {n!r}")
        q = self.family
        eps = q.sample_noise(n, generator)
        parts = self.per_sample(eps, generator)
        info: dict[str, torch.Tensor] = {}
        grads = {}
        for b, (f, c) in parts.items():
            coef = self.coefficients[b] if c is not None else None
            est = estimate(f, c, coefficient=coef)
            grads[b] = est.mean
            num, den = est.variance.sum(), est.plain_variance.sum()
            info[f"variance_ratio_{b}"] = torch.where(den > 0, num / den.clamp_min(1e-300), 1.0)
            info[f"beta_{b}"] = est.coefficient
        with torch.no_grad():
            z = q.transform_noise(eps)
            info["elbo"] = self.log_p(z).mean() + q.entropy()
        for p, g in ((q.loc, grads["mean"]), (q.raw_scale, grads["scale"])):
            p.grad = (-g).reshape(p.shape).to(p.dtype)
        return info
