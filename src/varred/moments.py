"""One centred, mergeable moment state: weighted, decayed means and (co)variances.

A :class:`Moments` holds a total weight, named means and named *normalised* (population)
covariances; every product is centred, never ``E[x²] − E[x]²`` (which cancels catastrophically
when the mean dominates). Batches are summarised by :func:`batch_moments` (two-pass, weighted),
merged by :func:`merge` (Chan, Golub & LeVeque 1979, with a forgetting factor; one sample of
weight 1 is the update of Finch 2009), and read by :func:`covariance`. All functions are pure
and sync-free; a masked merge leaves the state bit for bit unchanged. Used by
:class:`varred.GradientControl`, :class:`varred.RunningMoments`,
``varred_diffusion.GradientMoments`` and ``varred_diffusion.BlockSums``.

A *pair spec* ``{cov_name: (a, b, eq)}`` says which covariances to keep: ``eq`` is an einsum
equation over the two deviations, e.g. ``"...,...->..."`` (element-wise), ``"...i,...j->...ij"``
(outer product over the last dim) or ``"...,...->"`` (a trace: summed over every dim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from varred.errors import VarRedError

__all__ = [
    "Moments",
    "all_finite",
    "batch_moments",
    "check_decay",
    "covariance",
    "empty_moments",
    "merge",
    "merge_moments",
    "observe",
    "safe_div",
]

Tensor = torch.Tensor
PairSpec = Mapping[str, tuple[str, str, str]]


class Moments(NamedTuple):
    """Weighted centred moments.

    Attributes:
        weight: ``[*L]`` total (decayed) weight; ``L`` are leading "cell" dims (e.g. groups),
            possibly empty.
        mean: name → ``[*L, *shape]`` weighted mean.
        cov: name → normalised covariance ``Σ w (x − m_x)(y − m_y) / Σ w`` (shape from the
            pair's einsum equation, with the leading ``[*L]``).
    """

    weight: Tensor
    mean: dict[str, Tensor]
    cov: dict[str, Tensor]


def check_decay(decay: object, name: str = "decay") -> float:
    """The one valid range of a forgetting factor: a real in ``(0, 1]`` (1 = cumulative)."""
    import numbers

    ok = isinstance(decay, numbers.Real) and not isinstance(decay, bool)
    if not ok or not 0.0 < float(decay) <= 1.0:  # type: ignore[arg-type]
        raise VarRedError(f"{name}: expected a float in (0, 1], got {decay!r}")
    return float(decay)  # type: ignore[arg-type]


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > tiny``, else exactly 0 (never NaN)."""
    return torch.where(den > torch.finfo(den.dtype).tiny, num / den, 0.0)  # 0/0 not selected


def all_finite(x: Tensor) -> Tensor:
    """``[]`` bool: no NaN/Inf in ``x`` (two passes: ``x·0`` is 0 exactly where finite)."""
    return (x * 0).sum() == 0


def _lead(x: Tensor, like: Tensor) -> Tensor:
    """``[*L]`` → ``[*L, 1, …, 1]`` broadcastable against ``like`` ``[*L, *shape]``."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def _eq(eq: str, lead: int) -> str:
    """Prefix the cell dims to an einsum equation (``...`` after the cell letters)."""
    if lead == 0:
        return eq
    cells = "".join(chr(ord("A") + i) for i in range(lead))
    ins, out = eq.split("->")
    a, b = ins.split(",")
    return f"{cells}{a},{cells}{b}->{cells}{out}"


def _product(da: Tensor, db: Tensor, eq: str, lead: int) -> Tensor:
    """``einsum(eq)`` of two deviations with ``lead`` leading cell dims kept."""
    if eq == "...,...->...":  # element-wise: plain (broadcasting) product
        return da * db
    return torch.einsum(_eq(eq, lead), da, db)


def empty_moments(
    shapes: Mapping[str, Sequence[int]], pairs: PairSpec, lead: Sequence[int] = (), **kw
) -> Moments:
    """All-zero moments (weight 0) with means of ``[*lead, *shape]`` and the pairs' covs."""
    mean = {k: torch.zeros((*lead, *s), **kw) for k, s in shapes.items()}
    cov = {
        name: torch.zeros_like(_product(mean[a], mean[b], eq, len(lead)))
        for name, (a, b, eq) in pairs.items()
    }
    return Moments(torch.zeros(tuple(lead), **kw), mean, cov)


def batch_moments(
    values: Mapping[str, Tensor], pairs: PairSpec, weights: Tensor | None = None
) -> Moments:
    """Two-pass weighted moments of samples ``values[k]`` ``[n, *shape_k]`` (detached).

    Args:
        values: name → ``[n, *shape]`` samples (same ``n``).
        pairs: the covariances to compute (see the module docstring).
        weights: ``[n]`` non-negative sample weights (default 1 each).

    Returns:
        :class:`Moments` with ``weight = Σ w`` ``[]``.
    """
    x = {k: v.detach() for k, v in values.items()}
    first = next(iter(x.values()))
    n = first.shape[0]
    w = torch.ones(n, dtype=first.dtype, device=first.device) if weights is None else weights
    w = w.detach().to(first.dtype)
    tot = w.sum()
    mean = {k: safe_div(torch.einsum("n,n...->...", w, v), tot) for k, v in x.items()}
    dev = {k: v - mean[k] for k, v in x.items()}
    cov = {}
    for name, (a, b, eq) in pairs.items():
        ins, out = eq.split("->")
        ea, eb = ins.split(",")
        weq = f"n,n{ea},n{eb}->{out}" if out else f"n,n{ea},n{eb}->"
        cov[name] = safe_div(torch.einsum(weq, w, dev[a], dev[b]), tot)
    return Moments(tot, mean, cov)


def merge(
    state: Moments,
    batch: Moments,
    pairs: PairSpec,
    decay: float = 1.0,
    mask: Tensor | None = None,
) -> Moments:
    """Merge ``batch`` into ``state`` whose weight first decays by ``decay`` (Chan et al.).

    With ``f = w_b / (decay·w_s + w_b)`` and ``δ = m_b − m_s``:
    ``m ← m_s + f δ``, ``C ← (1 − f) C_s + f C_b + f(1 − f) δ_x δ_y``. ``mask`` ``[]`` (or
    ``[*L]``) false keeps ``state`` exactly (no host sync).

    Args:
        state, batch: moments with the same names; batch cells broadcast against the state's.
        pairs: the pair spec both were built with.
        decay: forgetting factor in ``(0, 1]`` (1 = cumulative).
        mask: optional bool; where false nothing changes.

    Returns:
        new :class:`Moments` (inputs untouched).
    """
    w_old = state.weight * float(decay)
    w_new = w_old + batch.weight
    f = safe_div(batch.weight, w_new)
    lead = state.weight.dim()
    delta = {k: batch.mean[k] - m for k, m in state.mean.items()}
    mean = {k: m + _lead(f, m) * delta[k] for k, m in state.mean.items()}
    cov = {}
    h = f * (1 - f)
    for name, (a, b, eq) in pairs.items():
        c = state.cov[name]
        fl, hl = _lead(f, c), _lead(h, c)
        cov[name] = (
            (1 - fl) * c + fl * batch.cov[name] + hl * _product(delta[a], delta[b], eq, lead)
        )
    out = Moments(w_new, mean, cov)
    if mask is None:
        return out

    def keep(new: Tensor, old: Tensor) -> Tensor:  # a NaN batch cannot leak through f = 0
        return torch.where(_lead(mask, new) if mask.dim() else mask, new, old)

    return Moments(
        keep(out.weight, state.weight),
        {k: keep(v, state.mean[k]) for k, v in out.mean.items()},
        {k: keep(v, state.cov[k]) for k, v in out.cov.items()},
    )


def observe(
    state: Moments,
    x: Mapping[str, Tensor],
    pairs: PairSpec,
    decay: float = 1.0,
    mask: Tensor | None = None,
) -> Moments:
    """Fold one observation ``x[k]`` ``[*L, *shape]`` of weight 1 in (Finch 2009)."""
    one = torch.ones_like(state.weight)
    cov = {k: torch.zeros_like(v) for k, v in state.cov.items()}
    return merge(state, Moments(one, dict(x), cov), pairs, decay, mask)


def covariance(m: Moments, name: str, unbiased: bool = False) -> Tensor:
    """The covariance ``name``, normalised by ``w`` (or by ``w − 1`` with ``unbiased``)."""
    c = m.cov[name]
    if not unbiased:
        return c
    w = _lead(m.weight, c)
    return safe_div(c * w, w - 1)


_GC_PAIRS = {"cov_cc": ("c", "c", "...,...->..."), "cov_cl": ("c", "l", "...,...->..."),
             "cov_ll": ("l", "l", "...,...->...")}  # fmt: skip


def merge_moments(
    state: dict[str, Tensor], weight: Tensor, batch: dict[str, Tensor], count: Tensor, decay: float
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`merge` on the flat key layout of :class:`varred.GradientControl`.

    Args:
        state, batch: ``mean_c, mean_l, cov_cc, cov_cl, cov_ll``, each ``[L, P]``
            (``mean_l``/``cov_ll`` may have ``L = 1`` and broadcast).
        weight: ``[L]`` or ``[1]`` running weight; count: the batch weight, shaped alike.
        decay: forgetting factor in ``(0, 1]``.

    Returns:
        the merged statistics and weight (new tensors).
    """

    def pack(d: dict[str, Tensor], w: Tensor) -> Moments:
        return Moments(w, {"c": d["mean_c"], "l": d["mean_l"]}, {k: d[k] for k in _GC_PAIRS})

    out = merge(pack(state, weight), pack(batch, count), _GC_PAIRS, decay)
    flat = {"mean_c": out.mean["c"], "mean_l": out.mean["l"], **out.cov}
    return flat, out.weight
