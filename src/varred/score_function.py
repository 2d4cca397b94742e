r"""Score-function (REINFORCE) gradients with a leave-one-out baseline.

For ``x_i ~ p_θ`` i.i.d., :math:`\nabla_\theta \mathbb{E}[f(x)] \approx
\frac1n \sum_i (f_i - b_i)\, \nabla_\theta \log p_\theta(x_i)` with
:math:`b_i = \frac{1}{n-1}\sum_{j \ne i} f_j`. The baseline of sample ``i`` does not
depend on ``x_i``, so the estimator stays unbiased (Kool, van Hoof, Welling 2019,
"Buy 4 REINFORCE samples, get a baseline for free!"; Mohamed et al. 2020, §5).
"""

from __future__ import annotations

import torch

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["loo_baseline", "score_function_surrogate"]


def loo_baseline(values: torch.Tensor) -> torch.Tensor:
    r"""Leave-one-out means: ``b_i = (Σ_j v_j − v_i) / (n − 1)``.

    Args:
        values: ``[n, ...]`` per-sample values, ``n >= 2``.

    Returns:
        ``[n, ...]``, same dtype; entry ``i`` is the mean of the other ``n − 1`` rows.

    Raises:
        VarRedError: non-floating ``values`` or ``n < 2``.

    Example:
        >>> loo_baseline(torch.tensor([1.0, 2.0, 6.0]))
        tensor([4.0000, 3.5000, 1.5000])
    """
    check_floating("values", values)
    if values.ndim < 1 or values.shape[0] < 2:
        raise VarRedError(
            f"values: expected shape [n, ...] with n >= 2 for a leave-one-out mean, got {shape_str(values)}"
        )
    n = values.shape[0]
    return (values.sum(0, keepdim=True) - values) / (n - 1)


def score_function_surrogate(
    f_values: torch.Tensor, log_probs: torch.Tensor, baseline: str | None = "loo"
) -> torch.Tensor:
    r"""Per-sample surrogate whose gradient is the REINFORCE estimator.

    .. math:: s_i = \operatorname{sg}(f_i - b_i)\,\log p_\theta(x_i) + f_i - \operatorname{sg}(f_i)

    ``∇ mean(s)`` is ``(1/n) Σ (f_i − b_i) ∇ log p(x_i)`` plus the pathwise term
    ``∇ f_i`` if ``f_values`` depends on θ directly. Only the gradient is meaningful;
    the value is not an estimate of anything.

    Args:
        f_values: ``[n, *out]`` per-sample objective values (any grad is kept as the
            pathwise term; the score term uses them detached).
        log_probs: ``[n]`` (or ``[n, *out]``, one independent problem per entry)
            differentiable ``log p_θ(x_i)`` of the samples (``x_i`` itself detached).
        baseline: ``"loo"`` (leave-one-out, needs ``n >= 2``) or ``None``.

    Returns:
        ``[n, *out]`` surrogate; reduce with ``.mean(0)`` and backpropagate.

    Raises:
        VarRedError: bad dtypes, shapes or ``baseline``.

    Example:
        >>> mu = torch.tensor(1.0, requires_grad=True)
        >>> x = (mu + torch.randn(16)).detach()
        >>> logp = -0.5 * (x - mu) ** 2
        >>> score_function_surrogate(x**2, logp).mean().backward()
        >>> mu.grad.shape
        torch.Size([])
    """
    check_floating("f_values", f_values)
    check_floating("log_probs", log_probs)
    if baseline not in ("loo", None):
        raise VarRedError(f"baseline: expected 'loo' or None, got {baseline!r}")
    if f_values.ndim < 1 or not (
        log_probs.shape == f_values.shape
        or (log_probs.ndim == 1 and log_probs.shape[0] == f_values.shape[0])
    ):
        raise VarRedError(
            f"log_probs: expected shape [n] or the shape of f_values {shape_str(f_values)}, "
            f"got {shape_str(log_probs)}"
        )
    f = f_values.detach()
    advantage = f - loo_baseline(f) if baseline == "loo" else f  # [n, *out]
    lp = log_probs.reshape(-1, *([1] * (f_values.ndim - 1))) if log_probs.ndim == 1 else log_probs
    return advantage * lp + (f_values - f)  # [n] -> [n, 1, ...] broadcast above
