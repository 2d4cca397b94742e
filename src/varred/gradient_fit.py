"""Coefficient fits of :class:`varred.GradientControl`: pooling by layout, and the fit strategies.

Everything here is a pure function of flat statistics (``[L, P]`` over the ``P`` parameter
entries, ``L`` = groups or folds × groups), so each strategy is testable alone:

- :func:`fixed_beta`: a given number for every group (the paper's objective-level CV).
- :func:`running_beta`: β from the running statistics of earlier steps (after a warmup).
- :func:`per_sample_fit`: batch moments of per-sample gradients, and β either from earlier
  batches (``folds = 1``) or cross-fitted over ``folds`` folds of this batch.

β ``= Cov(g_c, g_ℓ) / Var(g_c)`` pooled per element, per tensor or over all entries, with
optional shrinkage of per-element β toward the tensor's (Jeha et al. 2024, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch

from varred.moments import all_finite, safe_div

__all__ = ["FlatPool", "fixed_beta", "per_sample_fit", "running_beta"]

Tensor = torch.Tensor
Reduce = Callable[[list[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class FlatPool:
    """Pools flat ``[L, P]`` ratios by granularity over parameter tensors of ``lengths`` entries.

    Args:
        lengths: ``[npar]`` int64 entries per parameter tensor (on the statistics' device).
        granularity: ``"element"``, ``"tensor"`` or ``"scalar"``.
        shrinkage: κ ≥ 0 (per-element only).
        reduce: sums a list of pooled sums over ranks (sharded parameters: each rank holds
            a shard of every tensor); ``None``: no communication.
        totals: ``[npar]`` entries per whole tensor when ``lengths`` count local shards.
    """

    lengths: Tensor
    granularity: str
    shrinkage: float
    reduce: Reduce | None = None
    totals: Tensor | None = None

    def pool(self, num: Tensor, den: Tensor, weight: Tensor | None = None) -> Tensor:
        """Flat ``Σ num / Σ den`` pooled by granularity: ``[L, P]`` → ``[L, P | npar | 1]``.

        Per element with ``shrinkage`` κ > 0 and the statistics' ``weight`` ``[L]`` (or
        ``[1]``): ``β_e = (num_e + a β_t) / (den_e + a)`` with ``a = κ · mean_t(den) / weight``,
        i.e. κ pseudo-observations of the per-tensor β_t of e's tensor t, fading as
        ``weight`` grows (a normal prior centred on β_t, scaled to the tensor's variance).
        """
        gran, kappa = self.granularity, float(self.shrinkage)
        if gran == "element" and (kappa == 0.0 or weight is None):
            return safe_div(num, den)
        if gran == "scalar":
            sn, sd = num.sum(1, keepdim=True), den.sum(1, keepdim=True)
            return safe_div(*(self.reduce([sn, sd]) if self.reduce else (sn, sd)))
        lengths = self.lengths.expand(num.shape[0], -1)  # deterministic segmented sums
        sn = torch.segment_reduce(num, "sum", lengths=lengths, axis=1)  # [L, npar]
        sd = torch.segment_reduce(den, "sum", lengths=lengths, axis=1)
        if self.reduce is not None:  # shards → whole tensors
            sn, sd = self.reduce([sn, sd])
        beta_t = safe_div(sn, sd)
        if gran == "tensor":
            return beta_t
        assert weight is not None
        count = self.lengths if self.totals is None else self.totals
        prior = kappa * (sd / count) / weight.clamp(min=1.0).reshape(-1, 1)  # [L, npar]
        a, b = self.expand(prior, num.shape[1]), self.expand(beta_t, num.shape[1])  # [L, P]
        return safe_div(num + a * b, den + a)

    def expand(self, beta: Tensor, numel: int) -> Tensor:
        """Compact β ``[L, P | npar | 1]`` → broadcastable against ``[L, P]``."""
        if beta.shape[1] == numel or beta.shape[1] == 1:
            return beta
        return beta.repeat_interleave(self.lengths, dim=1, output_size=numel)


def fixed_beta(value: float, num_groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed β for every group: ``[G, 1]``."""
    return torch.full((num_groups, 1), float(value), dtype=dtype, device=device)


def running_beta(pool: FlatPool, stats: dict[str, Tensor], weight: Tensor, ready: Tensor) -> Tensor:
    """β from running statistics (``cov_cl``/``cov_cc`` ``[G, P]``), 0 until ``ready`` ``[]``."""
    beta = pool.pool(stats["cov_cl"], stats["cov_cc"], weight)
    return torch.where(ready, beta, 0.0)


def per_sample_fit(
    gl: Tensor,
    gc: Tensor,
    groups: Tensor,
    num_groups: int,
    folds: int,
    bad: Tensor,
    pool: FlatPool,
    earlier_beta: Callable[[], Tensor],
    reduce: Reduce,
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[dict[str, Tensor], Tensor]]:
    """Per-sample gradients → per (fold, group) centred batch moments → β and the step's grads.

    Args:
        gl, gc: ``[B, P]`` per-sample loss / control gradients (statistics dtype).
        groups: ``[B]`` int64 group of each sample.
        num_groups: ``G``; folds: ``K`` (1: β from earlier batches, ``earlier_beta()``).
        bad: ``[]`` count of non-finite losses/controls on this rank.
        pool: the layout's pooling; reduce: sums a list of tensors over ranks (identity
            without a process group).

    Returns:
        ``g_l [P]``, ``g_c [L, P]`` (per fold×group sums over the global batch size),
        compact β ``[L, ·]``, ``finite`` ``[]`` and the batch moments ``(dict, n_g [G])`` to
        merge (``L = K·G``).
    """
    ng, k, dtype = num_groups, folds, gl.dtype
    member = groups[None, :] == torch.arange(ng, device=groups.device)[:, None]  # [G, B]
    rank = (member.cumsum(1) - 1).gather(0, groups[None, :])[0]  # [B]: index within own group
    idx = (rank % k) * ng + groups  # [B], fold-major cell index; folds alternate within groups
    oh = torch.nn.functional.one_hot(idx, k * ng).T.to(dtype)  # [L, B]

    def gsum(x: Tensor) -> Tensor:  # [L, P] -> [G, P], sums over folds (L = K·G fold-major)
        return einops.reduce(x, "(k g) p -> g p", "sum", k=k)

    def m2(s2: Tensor, s1x: Tensor, s1y: Tensor, cnt: Tensor) -> Tensor:
        return s2 - safe_div(s1x * s1y, cnt[:, None])

    n, bad, sc, sl = reduce([oh.sum(1), bad.to(dtype).view(1), oh @ gc, oh @ gl])
    n_g = n.view(k, ng).sum(0)  # [G]
    ncol, total = n_g[:, None], n.sum()
    mc, ml = safe_div(gsum(sc), ncol), safe_div(gsum(sl), ncol)  # [G, P] batch means
    dc, dl = gc - mc[groups], gl - ml[groups]  # [B, P], centred at the global group mean
    s1c, s1l, s2cc, s2cl, s2ll = reduce(
        [oh @ dc, oh @ dl, oh @ (dc * dc), oh @ (dc * dl), oh @ (dl * dl)]
    )
    a, c = gsum(s1c), gsum(s1l)
    batch = {
        "mean_c": mc + safe_div(a, ncol),
        "mean_l": ml + safe_div(c, ncol),
        "cov_cc": safe_div(m2(gsum(s2cc), a, a, n_g), ncol),
        "cov_cl": safe_div(m2(gsum(s2cl), a, c, n_g), ncol),
        "cov_ll": safe_div(m2(gsum(s2ll), c, c, n_g), ncol),
    }
    if k == 1:
        beta = earlier_beta()
    else:  # fold j uses the statistics of the other folds of this batch
        n_o = (n_g[None] - n.view(k, ng)).reshape(-1)  # [L]

        def other(x: Tensor) -> Tensor:  # [L, P] -> [L, P], sums over the other folds
            per_fold = einops.rearrange(x, "(k g) p -> k g p", k=k)
            return einops.rearrange(gsum(x)[None] - per_fold, "k g p -> (k g) p")

        cl = m2(other(s2cl), other(s1c), other(s1l), n_o)
        cc = m2(other(s2cc), other(s1c), other(s1c), n_o)
        beta = pool.pool(cl, cc, n_o)
    finite = (bad[0] == 0) & all_finite(sc) & all_finite(sl)
    return sl.sum(0) / total, sc / total, beta, finite, (batch, n_g)
