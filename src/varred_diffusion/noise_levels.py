"""Noise-level samplers of the literature, as importance samplers that keep your objective.

Every sampler draws σ from its proposal density ``q`` on ``[σ_min, σ_max]`` and returns the
importance weight ``w = p(σ)/q(σ)`` of the *objective* density ``p`` you pass as
``objective=`` (anything with ``log_prob(sigma) -> [B]``, e.g. ``LogUniform``, the
density of ``sampling.log_uniform_sigma``), so that ``E_q[w ℓ(σ)] = E_p[ℓ(σ)]`` exactly.
With ``objective=None`` the sampler's own density *is* the objective: the weights are ones
and ``changes_objective`` is ``True`` (you then train a different objective than the
log-uniform default, which is what the papers do).

The samplers follow the recipe's sampler protocol: ``sample(n, generator, *, dtype,
device) -> (sigma [n], weight [n])`` and ``changes_objective``. Truncation to
``[σ_min, σ_max]`` is part of the density: ``q`` is renormalised by the base
distribution's mass on the interval and draws are made by inverse CDF on it (no rejection).
Densities are over σ; a sampler defined in another coordinate ``z = g(σ)`` (log σ, logit t,
log-SNR) carries the Jacobian ``|dz/dσ|`` (computed by autograd through ``g``).

- :class:`EDMLogNormal`: ``log σ ~ N(P_mean, P_std²)`` (Karras et al., 2022).
- :class:`LogitNormal`: ``logit t ~ N(m, s²)``, σ = σ(t) (Esser et al., 2024, SD3).
- :class:`LaplaceLogSNR`: ``log-SNR ~ Laplace(μ, b)`` (Hang et al., 2025).
Objective densities (``LogUniform``, ``Uniform``) live in
:mod:`varred_diffusion.objective_densities`; the adaptive Kingma–Gao proposal lives in :mod:`varred_diffusion.adaptive_sampler`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating
from varred_diffusion.objective_densities import (
    ObjectiveDensity,
    check_sigma_interval,
    open_uniform,
)

__all__ = ["EDMLogNormal", "LaplaceLogSNR", "LogitNormal", "sigma_from_log_snr"]

F64 = torch.float64


def sigma_from_log_snr(schedule: Any, lam: Tensor) -> Tensor:
    """σ with ``schedule.log_snr(σ) = λ`` ``[B]``: the schedule's own inverse, or VE's ``e^{−λ/2}``.

    ``schedule=None`` (or a ``VESchedule``, which has no inverse method) means VE, ``α = 1``.
    """
    inv = getattr(schedule, "sigma_from_log_snr", None)
    if inv is not None:
        return inv(lam)
    return torch.exp(-0.5 * lam)


def _check_positive(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise VarRedError(f"{name}: expected a finite number > 0, got {v!r}")
    return float(v)


def _inside(sigma: Tensor, lo: float, hi: float) -> Tensor:
    return (sigma >= lo) & (sigma <= hi)


# -- base distributions on z (closed-form CDFs and inverses, float64) ----------------
def _normal_log_pdf(z: Tensor, loc: float, scale: float) -> Tensor:
    return -0.5 * ((z - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def _normal_cdf(z: Tensor, loc: float, scale: float) -> Tensor:
    return torch.special.ndtr((z - loc) / scale)


def _normal_icdf(p: Tensor, loc: float, scale: float) -> Tensor:
    return loc + scale * torch.special.ndtri(p)


def _laplace_log_pdf(z: Tensor, loc: float, scale: float) -> Tensor:
    return -(z - loc).abs() / scale - math.log(2 * scale)


def _laplace_cdf(z: Tensor, loc: float, scale: float) -> Tensor:
    y = (z - loc) / scale
    return torch.where(y < 0, 0.5 * torch.exp(y.clamp(max=0)), 1 - 0.5 * torch.exp(-y.clamp(min=0)))


def _laplace_icdf(p: Tensor, loc: float, scale: float) -> Tensor:
    return torch.where(
        p < 0.5, loc + scale * torch.log(2 * p), loc - scale * torch.log(2 * (1 - p))
    )


_BASES = {
    "normal": (_normal_log_pdf, _normal_cdf, _normal_icdf),
    "laplace": (_laplace_log_pdf, _laplace_cdf, _laplace_icdf),
}


class _Reparameterised:
    """A base distribution (normal/laplace) on ``z = g(σ)``, truncated to ``[σ_min, σ_max]``.

    Subclasses set ``_base``, ``loc``, ``scale``, ``sigma_min``, ``sigma_max`` and implement
    ``_z(sigma)`` (monotone) and ``_sigma(z)`` (its inverse); then call ``_setup``.
    """

    _base: str
    loc: float
    scale: float
    sigma_min: float
    sigma_max: float
    objective: ObjectiveDensity | None

    def _z(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _setup(self, objective: ObjectiveDensity | None, defensive: float = 0.0) -> None:
        _, cdf, _ = _BASES[self._base]
        ends = self._z(torch.tensor([self.sigma_min, self.sigma_max], dtype=F64))
        self._z_lo, self._z_hi = float(ends.min()), float(ends.max())
        f = cdf(torch.tensor([self._z_lo, self._z_hi], dtype=F64), self.loc, self.scale)
        self._f_lo, self._f_hi = float(f[0]), float(f[1])
        mass = self._f_hi - self._f_lo
        if not mass > 0:
            raise VarRedError(
                f"sigma_min, sigma_max: the interval [{self.sigma_min}, {self.sigma_max}] holds "
                f"no mass of the proposal (loc={self.loc}, scale={self.scale}); widen it"
            )
        self._log_mass = math.log(mass)
        if objective is not None:
            if not callable(getattr(objective, "log_prob", None)):
                raise VarRedError(
                    f"objective: expected a density with log_prob(sigma), got {type(objective).__name__}"
                )
            sup = getattr(objective, "support", None)
            if sup is not None and not (
                sup[0] >= self.sigma_min * (1 - 1e-12) and sup[1] <= self.sigma_max * (1 + 1e-12)
            ):
                raise VarRedError(
                    f"objective: its support {tuple(sup)} must lie inside the sampler's "
                    f"[{self.sigma_min}, {self.sigma_max}] (else the reweighting is biased)"
                )
        if not 0.0 <= defensive < 1.0:
            raise VarRedError(f"defensive: expected a value in [0, 1), got {defensive}")
        if defensive > 0 and not callable(getattr(objective, "sample", None)):
            raise VarRedError(
                "defensive: a mixture with the objective needs an objective with sample() "
                f"(e.g. LogUniform), got {type(objective).__name__}"
            )
        self.objective = objective
        self.defensive = float(defensive)

    @property
    def changes_objective(self) -> bool:
        """``True`` iff ``objective is None`` (the proposal's own density is the objective)."""
        return self.objective is None

    @property
    def support(self) -> tuple[float, float]:
        """``(σ_min, σ_max)``."""
        return self.sigma_min, self.sigma_max

    def log_prob(self, sigma: Tensor) -> Tensor:
        """``log q(σ)`` ``[B]`` of the proposal (float64; −inf outside the support).

        ``log q_0(σ) = log f(g(σ)) + log|g'(σ)| − log(F(z_hi) − F(z_lo))`` (``g'`` by
        autograd); with ``defensive = δ > 0`` the proposal is ``(1 − δ) q_0 + δ p``.
        """
        lq = self._log_prob_base(sigma)
        if self.defensive == 0.0:
            return lq
        assert self.objective is not None
        lp = self.objective.log_prob(sigma).to(F64).to(lq.device)
        return torch.logaddexp(lq + math.log1p(-self.defensive), lp + math.log(self.defensive))

    def _log_prob_base(self, sigma: Tensor) -> Tensor:
        s = check_floating("sigma", sigma).detach().to(F64)
        inside = _inside(s, self.sigma_min, self.sigma_max)
        safe = torch.where(inside, s, 0.5 * (self.sigma_min + min(self.sigma_max, 1e300)))
        with torch.inference_mode(False), torch.enable_grad():
            leaf = safe.clone().requires_grad_(True)
            z = self._z(leaf)
            (dz,) = torch.autograd.grad(z.sum(), leaf)
        log_pdf, _, _ = _BASES[self._base]
        lp = log_pdf(z.detach(), self.loc, self.scale) + torch.log(dz.abs()) - self._log_mass
        return torch.where(inside, lp, -math.inf)

    def weights_for(self, sigma: Tensor) -> Tensor:
        """Importance weights ``p_objective(σ)/q(σ)`` ``[B]`` (float64; ones without objective)."""
        if self.objective is None:
            return torch.ones(sigma.shape, dtype=F64, device=sigma.device)
        lp = self.objective.log_prob(sigma).to(F64)
        return torch.exp(lp - self.log_prob(sigma).to(lp.device))

    def sample(
        self,
        n: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``σ ~ q`` ``[n]`` (inverse CDF on the truncated range) and weights ``p(σ)/q(σ)`` ``[n]``."""
        _, _, icdf = _BASES[self._base]
        u = open_uniform(n, generator)
        z = icdf(self._f_lo + u * (self._f_hi - self._f_lo), self.loc, self.scale)
        z = z.clamp(self._z_lo, self._z_hi)
        s = self._sigma(z).clamp(self.sigma_min, self.sigma_max)
        if self.defensive > 0:  # defensive mixture: a draw of the objective with prob. δ
            assert self.objective is not None
            pick = open_uniform(n, generator) < self.defensive
            alt = self.objective.sample(n, generator, dtype=F64)[0]  # type: ignore[attr-defined]
            s = torch.where(pick, alt.cpu(), s)
        w = self.weights_for(s)
        return s.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)


class EDMLogNormal(_Reparameterised):
    """EDM's training σ: ``log σ ~ N(P_mean, P_std²)`` truncated to ``[σ_min, σ_max]``.

    Karras et al. (2022), "Elucidating the design space of diffusion-based generative
    models", Table 1 (``P_mean = −1.2``, ``P_std = 1.2``). EDM itself does not truncate:
    pass ``sigma_min=0, sigma_max=math.inf`` for its exact draw.

    Args:
        p_mean, p_std: mean and standard deviation of ``log σ`` (``p_std > 0``).
        sigma_min, sigma_max: truncation (``0 ≤ σ_min < σ_max ≤ ∞``).
        objective: density with ``log_prob`` whose expectation the weights keep (e.g.
            ``LogUniform(σ_min, σ_max)``), or ``None``: the log-normal is the objective,
            weights are ones and ``changes_objective`` is ``True``.
        defensive: ``δ ∈ [0, 1)``: draw from ``(1 − δ) q + δ p`` instead (defensive
            importance sampling, Hesterberg 1995), which bounds every weight by ``1/δ``;
            needs an objective with ``sample`` (``LogUniform``, ``Uniform``). Reweighting to
            a wide objective without it can have enormous weight variance (docs).

    Raises:
        VarRedError: ``p_std ≤ 0``, a bad interval, an objective whose support is wider,
            ``defensive`` outside ``[0, 1)`` or without a samplable objective.

    Example:
        >>> s, w = EDMLogNormal().sample(4, torch.Generator().manual_seed(0))
        >>> s.shape, bool((w == 1).all())
        (torch.Size([4]), True)
    """

    _base = "normal"

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        objective: ObjectiveDensity | None = None,
        defensive: float = 0.0,
    ) -> None:
        self.loc = float(p_mean)
        self.scale = _check_positive("p_std", p_std)
        self.sigma_min, self.sigma_max = check_sigma_interval(sigma_min, sigma_max, allow_zero=True)
        self._setup(objective, defensive)

    def _z(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma)

    def _sigma(self, z: Tensor) -> Tensor:
        return torch.exp(z)


class LogitNormal(_Reparameterised):
    """SD3's timesteps: ``t = sigmoid(z)``, ``z ~ N(m, s²)``, truncated to ``[t_min, t_max]``; σ = σ(t).

    Esser et al. (2024), "Scaling rectified flow transformers for high-resolution image
    synthesis" (SD3), §3.1 (``m = 0``, ``s = 1``). With ``schedule=None`` σ = t (rectified
    flow, :class:`varred_diffusion.flow.RectifiedFlowSchedule`); otherwise σ =
    ``schedule.t_to_sigma(t)`` for a continuous schedule with an increasing map on ``[0, 1]``
    (``VESchedule``, continuous ``VPSchedule``), and the density over σ carries ``dt/dσ``.

    Args:
        mean, std: ``m`` and ``s`` of ``logit t`` (``std > 0``).
        t_min, t_max: truncation in t, ``0 ≤ t_min < t_max ≤ 1``.
        schedule: ``None`` (σ = t) or an object with ``t_to_sigma`` and ``sigma_to_t``.
        objective, defensive: as for :class:`EDMLogNormal` (``Uniform(0, 1)`` is flow
            matching's uniform-t objective).
    """

    _base = "normal"

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        schedule: Any = None,
        objective: ObjectiveDensity | None = None,
        defensive: float = 0.0,
    ) -> None:
        self.loc = float(mean)
        self.scale = _check_positive("std", std)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise VarRedError(
                f"t_min, t_max: expected 0 <= t_min < t_max <= 1, got {t_min}, {t_max}"
            )
        self.schedule = schedule
        ends = self._t_to_sigma(torch.tensor([t_min, t_max], dtype=F64))
        self.sigma_min, self.sigma_max = float(ends[0]), float(ends[1])
        if not self.sigma_min < self.sigma_max:
            raise VarRedError(
                f"schedule: expected t_to_sigma increasing on [t_min, t_max], got "
                f"sigma {self.sigma_min} at t_min and {self.sigma_max} at t_max"
            )
        self._setup(objective, defensive)

    def _t_to_sigma(self, t: Tensor) -> Tensor:
        return t if self.schedule is None else self.schedule.t_to_sigma(t)

    def _z(self, sigma: Tensor) -> Tensor:
        t = sigma if self.schedule is None else self.schedule.sigma_to_t(sigma)
        return torch.logit(t)

    def _sigma(self, z: Tensor) -> Tensor:
        return self._t_to_sigma(torch.sigmoid(z))


class LaplaceLogSNR(_Reparameterised):
    """Laplace noise schedule: ``log-SNR λ ~ Laplace(μ, b)``, truncated to ``σ ∈ [σ_min, σ_max]``.

    Hang et al. (2025), "Improved noise schedule for diffusion training" (Laplace with
    ``μ = 0``, ``b = 0.5``). ``λ = schedule.log_snr(σ) = log(α²/σ²)``; VE (``schedule=None``):
    ``λ = −2 log σ``; VP: ``log(1 − σ²) − 2 log σ``; rectified flow: ``2 log((1 − t)/t)``.

    Args:
        loc, scale: ``μ`` and ``b > 0``.
        schedule: ``None`` (VE) or a schedule with ``log_snr`` (and ``sigma_from_log_snr``
            unless VE).
        sigma_min, sigma_max: truncation; ``None`` takes the schedule's (flow: 0 and 1).
        objective, defensive: as for :class:`EDMLogNormal`.
    """

    _base = "laplace"

    def __init__(
        self,
        loc: float = 0.0,
        scale: float = 0.5,
        schedule: Any = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        objective: ObjectiveDensity | None = None,
        defensive: float = 0.0,
    ) -> None:
        self.loc = float(loc)
        self.scale = _check_positive("scale", scale)
        self.schedule = schedule
        lo = getattr(schedule, "sigma_min", None) if sigma_min is None else sigma_min
        hi = getattr(schedule, "sigma_max", None) if sigma_max is None else sigma_max
        if lo is None or hi is None:
            raise VarRedError(
                "sigma_min, sigma_max: expected numbers (the schedule has none), got None"
            )
        self.sigma_min, self.sigma_max = check_sigma_interval(float(lo), float(hi), allow_zero=True)
        self._setup(objective, defensive)

    def _z(self, sigma: Tensor) -> Tensor:
        if self.schedule is None:
            return -2 * torch.log(sigma)
        return self.schedule.log_snr(sigma)

    def _sigma(self, z: Tensor) -> Tensor:
        return sigma_from_log_snr(self.schedule, z)
