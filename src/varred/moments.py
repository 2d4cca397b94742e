"""Running moments for gradient control variates: stable weighted updates and pooled ratios.

Means and *centred* (co)variances are updated with the weighted formulas of Finch (2009) and
the pairwise merge of Chan et al. (1979), never as ``E[x²] − E[x]²``; a masked update is an
exact no-op, so a non-finite step leaves the statistics bit for bit unchanged without a host
sync. Used by :class:`varred.GradientControl`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_moments", "moment_step", "pooled_ratio"]

Tensor = torch.Tensor


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > tiny``, else exactly 0 (never NaN)."""
    return torch.where(den > torch.finfo(den.dtype).tiny, num / den, 0.0)  # 0/0 not selected


def all_finite(x: Tensor) -> Tensor:
    """``[]`` bool: no NaN/Inf in ``x`` (two passes: ``x·0`` is 0 exactly where finite)."""
    return (x * 0).sum() == 0


def lead(x: Tensor, n: int) -> Tensor:
    """View a ``[L]`` tensor as ``[L, 1, ..., 1]`` with ``n`` trailing singleton dims."""
    return x.reshape(x.shape + (1,) * n)


def pooled_ratio(num: Sequence[Tensor], den: Sequence[Tensor], granularity: str) -> list[Tensor]:
    """Coefficients ``Σ num / Σ den`` pooled per element, per tensor or over all tensors.

    Args:
        num: per parameter, covariances ``Cov(g_c, g_ℓ)`` of shape ``[L, *p.shape]``.
        den: per parameter, variances ``Var(g_c)`` of the same shapes.
        granularity: ``"element"`` (no pooling), ``"tensor"`` (sum over each tensor's
            elements) or ``"scalar"`` (sum over all elements of all tensors).

    Returns:
        per parameter, β of shape ``[L, *p.shape]`` (element) or ``[L, 1, ..., 1]``; 0 where
        the pooled variance is 0.
    """
    if granularity == "element":
        return [safe_div(n, d) for n, d in zip(num, den)]
    sn = [n.flatten(1).sum(1) for n in num]  # [L, *p] -> [L]
    sd = [d.flatten(1).sum(1) for d in den]
    if granularity == "scalar":
        total = safe_div(torch.stack(sn).sum(0), torch.stack(sd).sum(0))
        return [lead(total, n.dim() - 1) for n in num]
    return [lead(safe_div(a, b), n.dim() - 1) for a, b, n in zip(sn, sd, num)]


def merge_moments(
    state: dict[str, Tensor],
    weight: Tensor,
    batch: dict[str, Tensor],
    count: Tensor,
    decay: float,
) -> tuple[dict[str, Tensor], Tensor]:
    """Merge batch moments into exponentially weighted running moments (Chan et al. 1979).

    Running weights decay by ``decay`` and the batch enters with weight ``count``; with
    ``count = 1`` and zero batch covariance this is the weighted update of Finch (2009),
    ``C ← (1-α)(C + α δ_x δ_y)``. Means and covariances are normalised (population) ones.

    Args:
        state: ``mean_c, mean_l, cov_cc, cov_cl, cov_ll`` of one parameter, each ``[L, *p]``
            (``mean_l``/``cov_ll`` may have ``L = 1`` and broadcast).
        weight: ``[L]`` or ``[1]`` (shared) running total weight.
        batch: the same keys for the batch (its means and covariances).
        count: shaped like ``weight``, the batch weight (number of samples, or 1 per step).
        decay: forgetting factor in ``(0, 1]`` (1 = plain cumulative moments).

    Returns:
        the merged state and weight (new tensors).
    """
    n = state["mean_c"].dim() - 1
    w_old = weight * decay
    w_new = w_old + count
    f = lead(safe_div(count, w_new), n)  # fraction of the merged weight that is new
    dc = batch["mean_c"] - state["mean_c"]
    dl = batch["mean_l"] - state["mean_l"]
    g = f * (1 - f)
    out = {
        "mean_c": state["mean_c"] + f * dc,
        "mean_l": state["mean_l"] + f * dl,
        "cov_cc": (1 - f) * state["cov_cc"] + f * batch["cov_cc"] + g * dc * dc,
        "cov_cl": (1 - f) * state["cov_cl"] + f * batch["cov_cl"] + g * dc * dl,
    }
    out["cov_ll"] = (1 - f) * state["cov_ll"] + f * batch["cov_ll"] + g * dl * dl
    return out, w_new


def moment_step(
    weight: Tensor, ok: Tensor, means: list[tuple[Tensor, Tensor]],
    covs: list[tuple[Tensor, int, int]], decay: float,
) -> Tensor:  # fmt: skip
    """In-place weighted update of running means and centred (co)variances by one sample.

    ``m ← m + f δ``, ``C_xy ← (1-f) C_xy + f(1-f) δ_x δ_y`` with ``f = 1 / w``,
    ``w ← decay·w + 1`` (Finch 2009); ``ok`` false: ``f = 0`` and ``δ = 0``, so nothing
    changes (bit for bit, no sync). ``covs`` name the two ``means`` entries (by index)
    whose deltas they multiply; a cov may be a ``[]`` trace (then ``δ_x·δ_y`` is summed).

    Returns:
        the new weight.
    """
    w_new = weight * float(decay) + 1
    f = torch.where(ok, 1 / w_new, 0.0).reshape(())  # weight is [1] here
    deltas = [torch.where(ok, x - m, 0.0) for m, x in means]
    h = f * (1 - f)
    for m, d in zip(means, deltas):
        m[0].addcmul_(d, f)
    for c, i, j in covs:
        c.mul_(1 - f)
        if c.dim() == 0:
            c.add_((h * deltas[i] * deltas[j]).sum())
        else:
            c.addcmul_(deltas[i] * h, deltas[j])
    return torch.where(ok, w_new, weight)
