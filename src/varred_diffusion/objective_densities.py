"""Objective densities over σ on an interval (log-uniform, uniform) and their samplers.

An *objective density* is anything with ``log_prob(sigma [B]) -> [B]`` (and optionally
``support = (σ_min, σ_max)``): the ``p`` whose expectation ``E_{σ~p}[ℓ(σ)]`` a noise-level
sampler's importance weights keep (:mod:`varred_diffusion.noise_levels`,
:mod:`varred_diffusion.adaptive_sampler`). :class:`LogUniform` is the library's default
objective (the density of ``sampling.log_uniform_sigma``); :class:`Uniform` is flow
matching's ``t ~ U[0, 1]``. Both follow the sampler protocol too (weights ones).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating

__all__ = ["LogUniform", "ObjectiveDensity", "Uniform", "check_sigma_interval", "open_uniform"]

F64 = torch.float64


class ObjectiveDensity(Protocol):
    """A density over σ: ``log_prob(sigma [B]) -> [B]`` (−inf outside its support)."""

    def log_prob(self, sigma: Tensor) -> Tensor: ...


def open_uniform(n: int, generator: torch.Generator | None, device: Any = None) -> Tensor:
    """Uniforms in the open interval ``(0, 1)`` ``[n]`` (float64: ``rand + 2^-54``, never 0 or 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VarRedError(f"n: expected a positive integer, got {n!r}")
    return torch.rand(n, generator=generator, dtype=F64, device=device) + 2.0**-54


def check_sigma_interval(lo: float, hi: float, *, allow_zero: bool = False) -> tuple[float, float]:
    """``(σ_min, σ_max)`` as floats, or VarRedError unless ``0 < σ_min < σ_max`` (``0 ≤`` with ``allow_zero``)."""
    ok = (lo >= 0 if allow_zero else lo > 0) and lo < hi
    if not ok or math.isnan(lo) or math.isnan(hi):
        bound = "0 <=" if allow_zero else "0 <"
        raise VarRedError(
            f"sigma_min, sigma_max: expected {bound} sigma_min < sigma_max, got {lo}, {hi}"
        )
    return float(lo), float(hi)


def _inside(sigma: Tensor, lo: float, hi: float) -> Tensor:
    return (sigma >= lo) & (sigma <= hi)


class _Interval:
    """An interval density's support and the protocol's ``sample``."""

    sigma_min: float
    sigma_max: float
    changes_objective: bool

    @property
    def support(self) -> tuple[float, float]:
        """``(σ_min, σ_max)``."""
        return self.sigma_min, self.sigma_max

    def _from_unit(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(
        self,
        n: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``σ ~ p`` ``[n]`` and weights (ones) ``[n]``."""
        s = self._from_unit(open_uniform(n, generator))
        s = s.clamp(self.sigma_min, self.sigma_max)
        return s.to(dtype=dtype, device=device), torch.ones(n, dtype=dtype, device=device)


class LogUniform(_Interval):
    """Log-uniform density on ``[σ_min, σ_max]``: ``p(σ) = 1/(σ log(σ_max/σ_min))``.

    The library's default objective (the density of ``log_uniform_sigma(u, σ_min, σ_max)``
    and of ``ImportanceSigmaSampler``'s target); as a sampler its weights are ones and
    ``changes_objective`` is ``False``.

    Example:
        >>> p = LogUniform(0.01, 100.0)
        >>> round(float(p.log_prob(torch.tensor([1.0], dtype=torch.float64)).exp()), 6)  # 1/log(1e4)
        0.108574
    """

    changes_objective = False

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        self.sigma_min, self.sigma_max = check_sigma_interval(sigma_min, sigma_max)
        self._log_norm = math.log(math.log(self.sigma_max / self.sigma_min))

    def log_prob(self, sigma: Tensor) -> Tensor:
        """``log p(σ)`` ``[B]`` (float64; −inf outside ``[σ_min, σ_max]``)."""
        s = check_floating("sigma", sigma).to(F64)
        lp = -torch.log(s) - self._log_norm
        return torch.where(_inside(s, self.sigma_min, self.sigma_max), lp, -math.inf)

    def _from_unit(self, u: Tensor) -> Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + u * (hi - lo))


class Uniform(_Interval):
    """Uniform density on ``[σ_min, σ_max]`` (σ_min may be 0): e.g. flow matching's ``t ~ U[0, 1]``.

    As a sampler its weights are ones; ``changes_objective`` is ``True`` (it is not the
    log-uniform default); as ``objective=`` it makes another sampler estimate the uniform-t
    objective.
    """

    changes_objective = True

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 1.0) -> None:
        self.sigma_min, self.sigma_max = check_sigma_interval(sigma_min, sigma_max, allow_zero=True)
        if math.isinf(self.sigma_max):
            raise VarRedError(f"sigma_max: expected a finite value, got {sigma_max}")

    def log_prob(self, sigma: Tensor) -> Tensor:
        """``log p(σ) = −log(σ_max − σ_min)`` ``[B]`` inside, −inf outside (float64)."""
        s = check_floating("sigma", sigma).to(F64)
        lp = torch.full_like(s, -math.log(self.sigma_max - self.sigma_min))
        return torch.where(_inside(s, self.sigma_min, self.sigma_max), lp, -math.inf)

    def _from_unit(self, u: Tensor) -> Tensor:
        return self.sigma_min + u * (self.sigma_max - self.sigma_min)
