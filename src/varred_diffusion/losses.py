"""Per-sample denoising score matching (Vincent, 2011; Song & Ermon, 2019).

.. math:: ℓ_θ(x, ε) = λ(σ) ‖s_θ(α x + σ ε, σ) + ε/σ‖²
                   = \\frac{λ(σ)}{σ²} ‖σ s_θ(α x + σ ε, σ) + ε‖²,

the second form being what is computed: ``σ s`` and ``ε`` are O(1) at every σ, so
σ = 1e-4 in float32 neither overflows nor cancels badly. The default ``λ = σ²`` gives
the factor 1 exactly (no ``σ²/σ²`` round-off).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_finite, check_floating, shape_str
from varred_diffusion.broadcast import append_dims, per_sample

__all__ = ["Weighting", "as_sigma", "dsm_loss", "dsm_residual_loss", "loss_weights", "perturb"]

#: λ(σ): ``None`` (σ²), a float, a 0-d or ``[B]`` tensor, or a callable ``sigma [B] -> [B]``.
Weighting = Callable[[Tensor], Tensor] | Tensor | float | None


def as_sigma(
    sigma: float | Tensor, x: Tensor, name: str = "sigma", *, validate: bool = True
) -> Tensor:
    """Per-sample noise levels ``[B]`` in ``x``'s dtype/device.

    A Python float or a 0-d tensor is broadcast to ``[B]``; any other shape than ``[B]``
    raises. ``validate`` also checks finiteness and ``σ > 0`` (one host sync).
    """
    s = per_sample(name, sigma, x.shape[0], x)
    if validate:
        check_finite(name, s)
        if bool((s <= 0).any()):
            raise VarRedError(f"{name}: expected > 0, got min {float(s.min())}")
    return s


def loss_weights(weighting: Weighting, sigma: Tensor) -> Tensor:
    """λ(σ) per sample ``[B]`` in ``sigma``'s dtype: the one contract of ``weighting``.

    ``None`` gives ``σ²`` (the DSM default); a float or 0-d tensor is broadcast; a ``[B]``
    tensor is used as given; a callable gets ``sigma [B]`` and may return a float, a 0-d or
    a ``[B]`` tensor.

    Raises:
        VarRedError: any other type, or a shape other than ``[]`` / ``[B]``.
    """
    if weighting is None:
        return sigma * sigma
    if callable(weighting):
        lam = weighting(sigma)
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            return torch.full_like(sigma, float(lam))
        if not isinstance(lam, Tensor):
            raise VarRedError(
                f"weighting: expected the callable to return a float or a tensor of shape "
                f"{shape_str(sigma)}, got {type(lam).__name__}"
            )
        if lam.ndim == 0:
            lam = lam.expand_as(sigma)
        if lam.shape != sigma.shape:
            raise VarRedError(
                f"weighting: expected the callable to return shape {shape_str(sigma)}, "
                f"got {shape_str(lam)}"
            )
        return lam.to(sigma.dtype)
    return per_sample("weighting", weighting, sigma.shape[0], sigma)


def dsm_residual_loss(score: Tensor, target: Tensor, sigma: Tensor, lam: Tensor | None) -> Tensor:
    """``(λ/σ²) ‖σ s + ε̃‖²`` ``[B]`` from a computed score: the unchecked core of :func:`dsm_loss`.

    Args:
        score: ``s_θ(x_t, σ)`` ``[B, ...]``.
        target: the regression target ``ε̃`` ``[B, ...]`` (``ε`` for plain DSM).
        sigma: ``[B]``.
        lam: λ ``[B]`` or ``None`` (λ = σ², the factor 1 exactly).

    The residual and its squared norm are computed in at least float32 (autocast off).
    """
    dtype = torch.promote_types(score.dtype, torch.float32)
    dtype = torch.promote_types(dtype, target.dtype)
    with torch.autocast(device_type=score.device.type, enabled=False):
        sd = append_dims(sigma.to(dtype), score.ndim)
        resid = sd * score.to(dtype) + target.to(dtype)  # σ s + ε̃: O(1)
        sq = resid.pow(2).flatten(1).sum(1) if score.ndim > 1 else resid.pow(2)  # [B]
        if lam is None:
            return sq
        return (lam.to(dtype) / sigma.to(dtype) ** 2) * sq


def perturb(
    x: Tensor, sigma: float | Tensor, noise: Tensor, alpha: float | Tensor | None = None
) -> Tensor:
    """The forward process ``α x + σ ε`` ``[B, ...]`` (``alpha=None``: VE, α = 1).

    Args:
        x: clean data ``[B, ...]``.
        sigma: ``[B]`` (or a scalar, broadcast).
        noise: ``ε`` ``[B, ...]``, same shape as ``x``.
        alpha: ``[B]``, a scalar, or ``None``.
    """
    s = append_dims(as_sigma(sigma, x, validate=False), x.ndim)
    if noise.shape != x.shape:
        raise VarRedError(f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}")
    if alpha is None:
        return x + s * noise
    a = append_dims(as_sigma(alpha, x, "alpha", validate=False), x.ndim)
    return a * x + s * noise


def dsm_loss(
    score_fn: Callable[..., Tensor],
    x: Tensor,
    sigma: float | Tensor,
    noise: Tensor,
    *,
    weighting: Weighting = None,
    alpha: float | Tensor | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Tensor:
    """Per-sample DSM loss ``[B]``: ``λ(σ) ‖s_θ(α x + σ ε, σ) + ε/σ‖²`` summed over non-batch dims.

    The target ``−ε/σ`` is ``∇ log N(x_t; α x, σ² I)`` in both VE and VP. Under
    ``torch.autocast`` the residual and its squared norm are computed in (at least) float32.

    Args:
        score_fn: ``score_fn(x_t [B, ...], sigma [B], **score_kwargs) -> [B, ...]``.
        x: clean data ``[B, ...]``, floating point.
        sigma: ``[B]`` noise levels, or a Python float / 0-d tensor used for every sample.
        noise: ``ε`` ``[B, ...]`` (the caller owns the randomness).
        weighting: λ(σ): ``None`` (σ²), a float, a ``[B]`` tensor or a callable
            ``sigma [B] -> [B]`` (see :func:`loss_weights`; the contract of ``dsm_taylor_cv``).
        alpha: VP signal scale ``[B]`` or scalar (``None``: VE).
        score_kwargs: extra conditioning for ``score_fn`` (e.g. class labels).
        validate: check finiteness and positivity of inputs (host syncs; turn off in hot loops).

    Returns:
        ``[B]`` losses in ``x``'s dtype (float32 if ``x`` is lower precision).

    Raises:
        VarRedError: non-floating or non-finite ``x``; ``σ ≤ 0``, non-finite or not ``[B]``;
            ``noise`` or the score of another shape than ``x``; ``weighting`` not ``[B]``.

    Example:
        >>> x, eps = torch.zeros(4, 2), torch.ones(4, 2)
        >>> dsm_loss(lambda xt, s: -xt / s[:, None] ** 2, x, torch.full((4,), 0.5), eps)
        tensor([0., 0., 0., 0.])
    """
    check_floating("x", x)
    if x.ndim < 1:
        raise VarRedError(f"x: expected a batch [B, ...], got shape {shape_str(x)}")
    check_floating("noise", noise)
    if validate:
        check_finite("x", x)
    s = as_sigma(sigma, x, validate=validate)
    xt = perturb(x, s, noise, alpha)
    score = score_fn(xt, s, **dict(score_kwargs or {}))
    if not isinstance(score, Tensor) or score.shape != x.shape:
        raise VarRedError(
            f"score_fn: expected an output of the shape of x {shape_str(x)}, got {shape_str(score)}"
        )
    lam = None if weighting is None else loss_weights(weighting, s)
    return dsm_residual_loss(score, noise, s, lam)
