r"""Controlled Monte Carlo estimates: mean, standard error and variance diagnostics.

The controlled estimator of :math:`\mu = \mathbb{E} f` is
:math:`\hat\mu = \frac1n \sum_i \big(f_i - \beta^\top c_i\big)` with zero-mean
controls :math:`c_i` (Owen 2013, §8.9; Glasserman 2004, §4.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from varred.coefficients import OptimalCoefficient, apply_coefficient, flatten_controls
from varred.errors import VarRedError, check_broadcastable, check_finite, check_floating, shape_str

__all__ = ["Estimate", "estimate"]


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate with its diagnostics (all tensors detached).

    Attributes:
        mean: ``[*out]`` the (controlled) sample mean.
        stderr: ``[*out]`` its standard error ``std / sqrt(n)``.
        variance: ``[*out]`` unbiased per-sample variance of the controlled values.
        plain_variance: ``[*out]`` the same for the uncontrolled values.
        variance_ratio: ``[*out]`` ``variance / plain_variance`` (< 1 is good; 1 where
            both are zero, ``inf`` where only the plain one is).
        coefficient: β applied (shape as ``OptimalCoefficient.beta``); zeros ``[*out]``
            without controls.
        n: number of samples.
        correlation: ``[*out]`` (or ``[*out, m]``) Pearson correlation of f with each
            control; ``None`` without controls.
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    variance: torch.Tensor
    plain_variance: torch.Tensor
    variance_ratio: torch.Tensor
    coefficient: torch.Tensor
    n: int
    correlation: torch.Tensor | None = None


def ratio_or_inf(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0/0 = 1 and x/0 = inf."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(
        den > 0,
        num / safe,
        torch.where(num > 0, torch.full_like(num, math.inf), torch.ones_like(num)),
    )


def _correlation(f2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """Pearson correlation ``[n, P], [n, P, m] -> [P, m]`` (0 where a variance is 0)."""
    f = f2.double() - f2.double().mean(0)
    c = c3.double() - c3.double().mean(0)
    cov = (c * f.unsqueeze(-1)).sum(0)
    den = ((c * c).sum(0) * (f * f).sum(0).unsqueeze(-1)).sqrt()
    return torch.where(den > 0, cov / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def sample_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over dim 0, in at least float32."""
    y = y.to(torch.promote_types(y.dtype, torch.float32)).contiguous()
    return y.mean(0), y.var(0, correction=1)


def standard_error(y: torch.Tensor) -> torch.Tensor:
    """``std(y) / sqrt(n)`` over dim 0 (the textbook formula, bit for bit)."""
    y = y.to(torch.promote_types(y.dtype, torch.float32)).contiguous()
    return y.std(0, correction=1) / math.sqrt(y.shape[0])


def estimate(
    f_values: torch.Tensor,
    controls: torch.Tensor | None = None,
    coefficient: OptimalCoefficient | float | torch.Tensor | None = None,
) -> Estimate:
    r"""Controlled estimate of ``E f`` from per-sample values.

    Args:
        f_values: ``[n, *out]`` values ``f(ω_i)``, ``n >= 2``.
        controls: ``None``, ``[n, *out]`` or ``[n, *out, m]`` zero-mean control values.
        coefficient: an :class:`OptimalCoefficient` (default ``OptimalCoefficient()``:
            diagonal, cross-fitted), a fixed β (float, or tensor broadcastable to
            ``[*out]`` / ``[*out, m]``), or ``None`` for the default. β = 0 reproduces
            the plain estimator bit for bit. A ``fit="running"`` coefficient applies β from
            its earlier calls and then folds these samples into its statistics.

    Returns:
        :class:`Estimate` with fields in at least float32.

    Raises:
        VarRedError: non-floating or non-finite inputs, ``n < 2``, shapes that do not
            match, or a fixed β of the wrong shape.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(1000, generator=g, dtype=torch.float64)
        >>> est = estimate(torch.exp(x), x)  # E[x] = 0 is the control
        >>> bool(est.variance_ratio < 0.5)
        True
    """
    check_finite("f_values", check_floating("f_values", f_values))
    if f_values.ndim < 1 or f_values.shape[0] < 2:
        raise VarRedError(
            f"f_values: expected shape [n, *out] with n >= 2 (for a standard error), got {shape_str(f_values)}"
        )
    n = f_values.shape[0]
    out = f_values.shape[1:]
    with torch.no_grad():
        f = f_values.detach()
        plain_mean, plain_var = sample_moments(f)
        if controls is None:
            if coefficient is not None and not isinstance(coefficient, OptimalCoefficient):
                raise VarRedError(
                    f"coefficient: expected None without controls, got {coefficient!r}"
                )
            return Estimate(
                mean=plain_mean,
                stderr=standard_error(f),
                variance=plain_var,
                plain_variance=plain_var,
                variance_ratio=ratio_or_inf(plain_var, plain_var),
                coefficient=torch.zeros(out, dtype=plain_mean.dtype, device=f.device),
                n=n,
            )
        c = check_finite("controls", check_floating("controls", controls.detach()))
        f2, c3, _, stacked = flatten_controls(f, c)
        if coefficient is None:
            coefficient = OptimalCoefficient()
        if isinstance(coefficient, OptimalCoefficient):
            y, beta = coefficient.controlled(f, c)
        else:
            beta = _fixed_beta(coefficient, c3.shape[-1], out, stacked, f.device)
            b = beta if stacked else beta.unsqueeze(-1)  # [*out, m]
            b = b.broadcast_to((*out, c3.shape[-1])).reshape(c3.shape[1:])  # -> [P, m]
            y = apply_coefficient(f2, c3, b).reshape(f.shape)
        mean, var = sample_moments(y)
        corr = _correlation(f2, c3).reshape(*out, c3.shape[-1])
        return Estimate(
            mean=mean,
            stderr=standard_error(y),
            variance=var,
            plain_variance=plain_var,
            variance_ratio=ratio_or_inf(var, plain_var),
            coefficient=beta,
            n=n,
            correlation=corr if stacked else corr.squeeze(-1),
        )


def _fixed_beta(
    coefficient: object, m: int, out: torch.Size, stacked: bool, device: torch.device
) -> torch.Tensor:
    """Validate a fixed β: float, or tensor broadcastable to ``[*out]`` / ``[*out, m]``."""
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float, torch.Tensor)):
        raise VarRedError(
            "coefficient: expected an OptimalCoefficient, a float or a tensor, "
            f"got {type(coefficient).__name__}"
        )
    beta = torch.as_tensor(coefficient, dtype=torch.float64, device=device)
    if isinstance(coefficient, torch.Tensor):
        check_floating("coefficient", coefficient)
    check_finite("coefficient", beta)
    target = (*out, m) if stacked else tuple(out)
    check_broadcastable("coefficient", beta, target, "[*out, m]" if stacked else "[*out]")
    return beta.detach()
