"""Toy data with closed-form noisy scores: Gaussian mixtures.

A mixture ``p = Σ_k w_k N(μ_k, Σ_k)`` stays a mixture under the forward process
``X_t = α X + σ ε``: ``p_{α,σ} = Σ_k w_k N(α μ_k, α² Σ_k + σ² I)``. Its score is

.. math:: ∇ \\log p_{α,σ}(x) = -Σ_k r_k(x) C_k^{-1}(x - α μ_k),
          \\quad r_k ∝ w_k N(x; α μ_k, C_k),\\ C_k = α² Σ_k + σ² I,

with the responsibilities ``r_k`` computed by a log-sum-exp, so it is exact to
round-off at any σ (the ground truth for the toy experiments of Jeha et al., 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from varred.errors import VarRedError, check_finite, check_floating, shape_str
from varred_diffusion.schedules import per_sample

__all__ = ["GaussianMixture", "ScoreError", "asymmetric", "ring8", "score_error"]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A Gaussian mixture in ``d`` dimensions with exact (noisy) densities and scores.

    Args:
        weights: ``[K]`` non-negative mixture weights (normalised here).
        means: ``[K, d]`` component means.
        covariances: ``[K, d, d]`` symmetric positive-definite covariances.

    Example:
        >>> gm = ring8()
        >>> x = gm.sample(4, torch.Generator().manual_seed(0))
        >>> gm.score(x, torch.full((4,), 0.1)).shape
        torch.Size([4, 2])
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor

    def __post_init__(self) -> None:
        w = check_floating("weights", self.weights)
        m = check_floating("means", self.means)
        c = check_floating("covariances", self.covariances)
        if w.ndim != 1 or m.ndim != 2 or m.shape[0] != w.shape[0]:
            raise VarRedError(
                f"means: expected [K, d] with K = len(weights) = {w.shape[0] if w.ndim == 1 else '?'}, "
                f"got weights {shape_str(w)} and means {shape_str(m)}"
            )
        k, d = m.shape
        if c.shape != (k, d, d):
            raise VarRedError(f"covariances: expected shape [{k}, {d}, {d}], got {shape_str(c)}")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise VarRedError(f"weights: expected non-negative with positive sum, got {w.tolist()}")
        object.__setattr__(self, "weights", w / w.sum())

    @property
    def dim(self) -> int:
        """Data dimension ``d``."""
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return int(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """Draw ``n`` clean samples ``[n, d]`` (dtype of the parameters)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # [n]
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        chol = torch.linalg.cholesky(self.covariances)  # [K, d, d]
        return self.means[k] + torch.einsum("nij,nj->ni", chol[k], z)

    def _components(
        self, x: Tensor, sigma: float | Tensor | None, alpha: float | Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample, per-component ``log w_k N(x; α μ_k, C_k)`` ``[B, K]``, ``C_k^{-1}(x-αμ_k)`` ``[B, K, d]``."""
        check_floating("x", x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise VarRedError(f"x: expected shape [B, {self.dim}], got {shape_str(x)}")
        b, d = x.shape
        s = per_sample("sigma", sigma, b, x, 0.0)
        a = per_sample("alpha", alpha, b, x, 1.0)
        w, mu, cov = (t.to(x) for t in (self.weights, self.means, self.covariances))
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        # C[b, k] = α_b² Σ_k + σ_b² I: [B, K, d, d]
        c = a[:, None, None, None] ** 2 * cov + s[:, None, None, None] ** 2 * eye
        chol = torch.linalg.cholesky(c)
        r = x[:, None, :] - a[:, None, None] * mu  # [B, K, d]
        sol = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)  # C^{-1} r: [B, K, d]
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # [B, K]
        quad = (r * sol).sum(-1)
        logn = -0.5 * (quad + logdet + d * math.log(2 * math.pi))
        return torch.log(w) + logn, sol, c

    def log_prob(
        self, x: Tensor, sigma: float | Tensor | None = None, alpha: float | Tensor | None = None
    ) -> Tensor:
        """``log p_{α,σ}(x)`` ``[B]`` for ``x`` ``[B, d]``; ``σ = None`` (or 0) is the clean density."""
        logc, _, _ = self._components(x, sigma, alpha)
        return torch.logsumexp(logc, dim=-1)

    def score(
        self, x: Tensor, sigma: float | Tensor | None = None, alpha: float | Tensor | None = None
    ) -> Tensor:
        """Exact ``∇_x log p_{α,σ}(x)`` ``[B, d]`` of ``α X + σ ε``.

        Args:
            x: ``[B, d]`` points.
            sigma: float, 0-d or ``[B]`` noise levels (``None`` = 0: the clean score).
            alpha: float, 0-d or ``[B]`` signal scales (``None`` = 1: VE).
        """
        logc, sol, _ = self._components(x, sigma, alpha)
        resp = torch.softmax(logc, dim=-1)  # [B, K]
        return -(resp.unsqueeze(-1) * sol).sum(1)

    def covariance(self) -> Tensor:
        """Overall covariance ``[d, d]`` of the clean mixture (for σ_data choices)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        dev = self.means - mean
        return (
            self.weights[:, None, None] * (self.covariances + dev[:, :, None] * dev[:, None, :])
        ).sum(0)


def ring8(
    radius: float = 2.0, std: float = 0.1, *, num: int = 8, dtype: torch.dtype = torch.float64
) -> GaussianMixture:
    """``num`` equal isotropic Gaussians on a circle (the 8-Gaussians toy of Jeha et al., 2024)."""
    ang = torch.arange(num, dtype=dtype) * (2 * math.pi / num)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    covs = (std**2) * torch.eye(2, dtype=dtype).expand(num, 2, 2).clone()
    return GaussianMixture(torch.ones(num, dtype=dtype), means, covs)


def asymmetric(*, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """Five anisotropic, unequally weighted Gaussians along a spiral arc (no symmetry)."""
    t = torch.tensor([0.0, 0.9, 1.7, 2.6, 3.6], dtype=dtype)
    r = 0.6 + 0.45 * t
    means = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1)
    weights = torch.tensor([0.35, 0.1, 0.25, 0.05, 0.25], dtype=dtype)
    # long axis tangent to the arc, aspect ratio varying per component
    long = torch.tensor([0.30, 0.20, 0.35, 0.15, 0.40], dtype=dtype)
    short = torch.tensor([0.05, 0.08, 0.06, 0.10, 0.04], dtype=dtype)
    tang = torch.stack([-torch.sin(t), torch.cos(t)], dim=1)  # [K, 2]
    norm = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    covs = (
        long[:, None, None] ** 2 * tang[:, :, None] * tang[:, None, :]
        + short[:, None, None] ** 2 * norm[:, :, None] * norm[:, None, :]
    )
    return GaussianMixture(weights, means, covs)


class ScoreError(NamedTuple):
    """Monte Carlo estimate of ``E‖s_θ − ∇log p_σ‖²``: mean, standard error, per-sample ``[n]``."""

    mean: Tensor
    stderr: Tensor
    per_sample: Tensor


def score_error(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    mixture: GaussianMixture,
    x_samples_or_n: Tensor | int,
    sigma: float | Tensor,
    generator: torch.Generator | None,
    *,
    alpha: float | Tensor | None = None,
) -> ScoreError:
    """Estimate the exact score-matching error ``E_{x_t}‖s_θ(x_t, σ) − ∇log p_{α,σ}(x_t)‖²``.

    ``x_t = α x + σ ε`` with ``x`` drawn from ``mixture`` (or given) and fresh ``ε``.

    Args:
        score_fn: ``(x [n, d], sigma [n]) -> [n, d]``.
        mixture: the data distribution.
        x_samples_or_n: clean samples ``[n, d]`` or a count ``n`` to draw.
        sigma: float, 0-d or ``[n]`` noise levels.
        generator: source of the noise (and of the clean samples if a count is given).
        alpha: optional VP signal scale (float or ``[n]``).

    Returns:
        ``ScoreError(mean, stderr, per_sample [n])``; the score network is called without grad.
    """
    if isinstance(x_samples_or_n, int):
        x = mixture.sample(x_samples_or_n, generator)
    else:
        x = check_floating("x_samples_or_n", x_samples_or_n)
    check_finite("x_samples_or_n", x)
    n = x.shape[0]
    s = per_sample("sigma", sigma, n, x, 0.0)
    a = per_sample("alpha", alpha, n, x, 1.0)
    if bool((s <= 0).any()):
        raise VarRedError(f"sigma: expected > 0, got min {float(s.min())}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    xt = a[:, None] * x + s[:, None] * eps
    with torch.no_grad():
        err = ((score_fn(xt, s) - mixture.score(xt, s, a)) ** 2).sum(-1)  # [n]
    se = err.std() / math.sqrt(n) if n > 1 else torch.zeros((), dtype=err.dtype)
    return ScoreError(err.mean(), se, err)
