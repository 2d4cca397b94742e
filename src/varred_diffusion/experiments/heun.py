"""Deterministic EDM Heun sampler for VE score models (Karras et al., 2022, Algorithm 1).

The probability-flow ODE of the VE process ``x_σ = x + σ ε`` is
``dx/dσ = −σ ∇ log p_σ(x) = −σ s(x, σ)``. Algorithm 1 integrates it from ``σ_max`` to 0
on the ρ-spaced grid ``σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``,
``σ_N = 0``, with Heun's second-order method on every step except the last (an Euler
step to σ = 0, where the score is not needed). ``2N − 1`` score evaluations.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from varred.errors import VarRedError, shape_str

__all__ = ["DEFAULT_HEUN_STEPS", "edm_sigma_steps", "heun_sample"]

DEFAULT_HEUN_STEPS = 18  # EDM's CIFAR-10 setting: 35 score evaluations


def edm_sigma_steps(
    steps: int = DEFAULT_HEUN_STEPS,
    sigma_min: float = 0.01,
    sigma_max: float = 10.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Karras et al.'s σ grid ``[steps + 1]``: ``steps`` levels from ``sigma_max`` to ``sigma_min``, then 0.

    >>> edm_sigma_steps(3, 0.01, 10.0, 1.0).tolist()
    [10.0, 5.005, 0.01, 0.0]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise VarRedError(f"steps: expected an integer >= 1, got {steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise VarRedError(
            f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}"
        )
    if not rho > 0:
        raise VarRedError(f"rho: expected > 0, got {rho}")
    if steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        grid = (hi + i * (lo - hi)) ** rho
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).to(dtype)


@torch.no_grad()
def heun_sample(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor | None = None,
    *,
    batch_size: int | None = None,
) -> Tensor:
    """Samples by EDM's deterministic Heun sampler (Karras et al., 2022, Algorithm 1).

    Args:
        score_fn: ``score_fn(x [B, ...], sigma [B]) -> ∇ log p_σ(x) [B, ...]`` (VE).
        noise: standard normal ``ε`` ``[N, ...]``; the start is ``x = σ_0 ε`` (the caller
            owns the randomness; the sampler draws nothing else).
        sigmas: decreasing grid ``[K + 1]`` ending in 0 (default ``edm_sigma_steps()``:
            18 levels in ``[0.01, 10]``, ρ = 7).
        batch_size: evaluate the ODE on this many samples at a time (``None``: all).

    Returns:
        ``[N, ...]`` samples at σ = 0, in ``noise``'s dtype and device.

    Raises:
        VarRedError: ``sigmas`` not 1-d, not decreasing, or not ending in 0; score of
            another shape than ``x``.

    >>> x = heun_sample(lambda x, s: -x / (1 + s[:, None] ** 2), torch.randn(4, 2))
    >>> x.shape
    torch.Size([4, 2])
    """
    grid = edm_sigma_steps() if sigmas is None else sigmas
    if grid.ndim != 1 or grid.shape[0] < 2 or float(grid[-1]) != 0.0:
        raise VarRedError(f"sigmas: expected a 1-d grid ending in 0, got {shape_str(grid)}")
    if bool((grid[1:] >= grid[:-1]).any()):
        raise VarRedError(f"sigmas: expected strictly decreasing values, got {grid.tolist()}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise VarRedError(f"noise: expected a batch [N, ...], got {shape_str(noise)}")
    step = noise.shape[0] if batch_size is None else int(batch_size)
    if step < 1:
        raise VarRedError(f"batch_size: expected >= 1, got {batch_size}")
    levels = [float(s) for s in grid]
    out = []
    for start in range(0, noise.shape[0], step):
        out.append(_solve(score_fn, noise[start : start + step], levels))
    return torch.cat(out)


def _solve(
    score_fn: Callable[[Tensor, Tensor], Tensor], eps: Tensor, levels: list[float]
) -> Tensor:
    n = eps.shape[0]

    def slope(x: Tensor, sigma: float) -> Tensor:  # dx/dσ = (x − D(x; σ))/σ = −σ s(x, σ)
        s = score_fn(x, torch.full((n,), sigma, dtype=x.dtype, device=x.device))
        if s.shape != x.shape:
            raise VarRedError(
                f"score_fn: expected an output of the shape of x {shape_str(x)}, got {shape_str(s)}"
            )
        return -sigma * s

    x = levels[0] * eps
    for cur, nxt in itertools.pairwise(levels):
        d = slope(x, cur)
        x_next = x + (nxt - cur) * d
        if nxt > 0:  # Heun correction (trapezoidal rule), skipped on the last step to σ = 0
            x_next = x + (nxt - cur) * 0.5 * (d + slope(x_next, nxt))
        x = x_next
    return x
