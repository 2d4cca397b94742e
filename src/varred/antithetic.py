r"""Antithetic variates: average each sample with its mirror image, ``(f(ε) + f(−ε)) / 2``.

For a symmetric base distribution (here ``ε ~ N(0, I)``) the pair mean has the same
expectation as ``f`` and variance ``(Var f + Cov(f(ε), f(−ε))) / 2``; the odd part of
``f`` cancels exactly. The standard error is computed from the ``n`` independent pair
means, never from the ``2n`` correlated values. Reference: Owen (2013), §8.2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from varred.errors import VarRedError, check_finite, check_floating, shape_str
from varred.estimate import Estimate, ratio_or_inf, sample_moments, standard_error

__all__ = ["antithetic_estimate"]


def antithetic_estimate(
    f: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    eps: torch.Tensor | None = None,
    *,
    f_negated: torch.Tensor | None = None,
) -> Estimate:
    r"""Antithetic estimate of ``E f(ε)`` from ``n`` pairs ``(ε_i, −ε_i)``.

    .. math:: \hat\mu = \frac1n \sum_i \tfrac12\big(f(\varepsilon_i) + f(-\varepsilon_i)\big)

    Args:
        f: batched function ``[n, d] -> [n, *out]`` (then ``eps`` is required), or the
            values ``f(ε) [n, *out]`` (then ``f_negated`` is required).
        eps: ``[n, ...]`` base samples (symmetric distribution), ``n >= 2``.
        f_negated: values ``f(−ε) [n, *out]``, paired row by row with ``f``.

    Returns:
        :class:`Estimate` over the ``n`` pair means: ``mean`` and ``stderr`` (from the
        pairs), ``variance`` = variance of a pair mean, ``plain_variance`` = ``Var f / 2``
        (a mean of two independent draws, the same cost), so ``variance_ratio`` compares
        equal numbers of function evaluations. ``coefficient`` is zeros.

    Raises:
        VarRedError: missing/extra arguments, shape mismatch, non-finite values, ``n < 2``.

    Example:
        >>> eps = torch.randn(64, 1, dtype=torch.float64)
        >>> est = antithetic_estimate(lambda e: e[:, 0] ** 3, eps)
        >>> float(est.stderr)
        0.0
    """
    if isinstance(f, torch.Tensor):
        if eps is not None or f_negated is None:
            raise VarRedError(
                "f_negated: expected the values f(-eps) when f is a tensor of values "
                "(and eps=None), got " + ("eps as well" if eps is not None else "None")
            )
        plus, minus = f, f_negated
    else:
        if not callable(f):
            raise VarRedError(f"f: expected a callable or a tensor, got {type(f).__name__}")
        if eps is None or f_negated is not None:
            raise VarRedError(
                "eps: expected base samples [n, ...] (and f_negated=None) when f is callable, got "
                + ("None" if eps is None else "f_negated as well")
            )
        check_floating("eps", eps)
        plus, minus = f(eps), f(-eps)
    check_finite("f(eps)", check_floating("f(eps)", plus))
    check_finite("f(-eps)", check_floating("f(-eps)", minus))
    if plus.shape != minus.shape:
        raise VarRedError(
            f"f_negated: expected the shape of f(eps) {shape_str(plus)}, got {shape_str(minus)}"
        )
    if plus.ndim < 1 or plus.shape[0] < 2:
        raise VarRedError(
            f"f(eps): expected shape [n, *out] with n >= 2 pairs, got {shape_str(plus)}"
        )
    n = plus.shape[0]
    with torch.no_grad():
        pairs = 0.5 * (plus.detach() + minus.detach())  # [n, *out]
        mean, var = sample_moments(pairs)
        plain_var = 0.5 * (sample_moments(plus.detach())[1] + sample_moments(minus.detach())[1])
        return Estimate(
            mean=mean,
            stderr=standard_error(pairs),
            variance=var,
            plain_variance=0.5 * plain_var,
            variance_ratio=ratio_or_inf(var, 0.5 * plain_var),
            coefficient=torch.zeros_like(mean),
            n=n,
        )
