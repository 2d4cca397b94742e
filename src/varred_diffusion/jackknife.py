r"""Delete-one-block jackknife standard errors of streamed gradient variances and their ratios.

For fixed coefficients β (fitted beforehand on other draws), each evaluation unit ``u``
gives a controlled gradient :math:`d_u = g_u - \sum_b \beta_b \odot h_{u,b}` (``β = None``:
the plain :math:`d_u = g_u`). Units are split into ``J`` contiguous blocks; per block and
column we keep the centred moments of :math:`d_u` (its mean ``[P]`` and the trace of its
covariance, :mod:`varred.moments`), so :math:`\operatorname{tr}\operatorname{Cov}(d)` is
available on all units and with any one block deleted (a merge of the other blocks). The
jackknife standard error of a statistic :math:`T` of these variances is
:math:`\sqrt{\tfrac{J-1}{J} \sum_j (T_{-j} - \bar T)^2}` (Efron & Stein, 1981;
Künsch, 1989 for blocks; Shao & Tu, 1995). Memory is ``columns × (J + 1 + nb) × P``
float64; per-unit gradients are never stored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from varred.errors import VarRedError
from varred.moments import Moments, batch_moments, covariance, empty_moments, merge

__all__ = ["BlockSums", "jackknife_stderr", "resolve_num_blocks"]

Tensor = torch.Tensor
DEFAULT_BLOCKS = 16


def resolve_num_blocks(num_blocks: object, num_units: int, name: str = "num_blocks") -> int | None:
    """Number of jackknife blocks ``J`` for ``num_units`` units.

    ``None`` gives ``min(16, num_units)``, or ``None`` (no standard error) when
    ``num_units < 3``: with fewer units a deleted block leaves < 2 units and no variance.

    Raises:
        VarRedError: an explicit ``num_blocks`` that is not an integer in
            ``[2, num_units]`` leaving ≥ 2 units when its largest block is deleted.
    """
    n = int(num_units)
    if num_blocks is None:
        return min(DEFAULT_BLOCKS, n) if n >= 3 else None
    ok = isinstance(num_blocks, numbers.Integral) and not isinstance(num_blocks, bool)
    if ok:
        j = int(num_blocks)  # type: ignore[call-overload]
        ok = 2 <= j <= n and n - math.ceil(n / j) >= 2
    if not ok:
        raise VarRedError(
            f"{name}: expected an integer J with 2 ≤ J ≤ {n} (the number of evaluation units) "
            f"such that deleting the largest block (⌈{n}/J⌉ units) leaves at least 2 units, "
            f"got {num_blocks!r}"
        )
    return j


def jackknife_stderr(leave_out: Tensor) -> float:
    r"""``sqrt((J − 1)/J · Σ_j (T_{−j} − T̄)²)`` from the ``[J]`` delete-one-block values.

    NaN if any value is NaN (e.g. a zero plain variance in a ratio's denominator).
    """
    t = leave_out.double()
    j = t.shape[0]
    return math.sqrt((j - 1) / j * float(((t - t.mean()) ** 2).sum()))


_PAIRS = {"var": ("d", "d", "cp,cp->c")}  # tr Cov(d) per column: [C]


def _to(m: Moments, device: torch.device) -> Moments:
    return Moments(m.weight.to(device), {k: v.to(device) for k, v in m.mean.items()},
                   {k: v.to(device) for k, v in m.cov.items()})  # fmt: skip


class BlockSums:
    """Per-block centred moments of controlled unit gradients for fixed coefficients.

    Unit ``u`` (counted from 0 over all :meth:`update` calls) goes to block
    ``⌊u·J / num_units⌋``: contiguous blocks whose sizes differ by at most one. Each block
    holds one :class:`varred.moments.Moments` (per column the mean ``[P]`` and the trace of
    the centred covariance), so totals and delete-one-block values are exact Chan merges,
    without cancellation when the mean dominates.

    Args:
        betas: one entry per column: ``[nb, P]`` coefficients or ``None`` (plain ``g``).
        num_params: ``P``.
        num_units: ``n``, the number of units that will be added.
        num_blocks: ``J`` (see :func:`resolve_num_blocks`; ``None``: ``min(16, n)``).

    Raises:
        VarRedError: invalid ``num_blocks``, or ``num_units < 3`` (no jackknife possible).

    >>> sums = BlockSums([None, torch.ones(1, 3)], 3, num_units=8, num_blocks=4)
    >>> sums.update(torch.randn(8, 3), torch.randn(8, 1, 3))
    >>> sums.leave_one_out().shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        betas: Sequence[Tensor | None],
        num_params: int,
        num_units: int,
        num_blocks: int | None = None,
    ) -> None:
        self.num_units = int(num_units)
        j = resolve_num_blocks(num_blocks, self.num_units)
        if j is None:
            raise VarRedError(
                f"num_units: expected at least 3 units for a block jackknife, got {num_units}"
            )
        self.num_blocks = j
        c, p = len(betas), int(num_params)
        nb = max([b.shape[0] for b in betas if b is not None], default=1)
        dev = next((b.device for b in betas if b is not None), None)
        self._beta = torch.zeros(c, nb, p, dtype=torch.float64, device=dev)  # plain: β = 0
        for col, b in enumerate(betas):
            if b is not None:
                self._beta[col] = b.detach().double().to(self._beta.device)
        self.n = 0
        self.blocks = [empty_moments({"d": (c, p)}, _PAIRS, dtype=torch.float64) for _ in range(j)]

    def update(self, g: Tensor, h: Tensor | None = None) -> None:
        """Add units: ``g [U, P]``, ``h [U, nb, P]`` (``None``: no control); kept on the CPU."""
        g = g.detach().double()
        u = g.shape[0]
        if self.n + u > self.num_units:
            raise VarRedError(
                f"g: expected at most {self.num_units - self.n} more units "
                f"(num_units = {self.num_units}), got {u}"
            )
        if self.n == 0:  # the statistics live on the gradients' device
            self._beta = self._beta.to(g.device)
            self.blocks = [_to(m, g.device) for m in self.blocks]
        if h is None:  # no control: every column is the plain g
            d = g[:, None].expand(u, self._beta.shape[0], g.shape[1])
        else:
            # [U, 1, nb, P] × [C, nb, P] -> [U, C, P]: d = g − Σ_b β_b ⊙ h_b (β = 0: plain)
            d = g[:, None] - (self._beta[None] * h.detach().to(g)[:, None]).sum(2)
        j, n = self.num_blocks, self.num_units
        lo = 0
        while lo < u:  # the units of one block are contiguous: slice them (no host sync)
            b = (self.n + lo) * j // n
            hi = min(u, -(-(b + 1) * n // j) - self.n)  # first unit of block b + 1
            part = batch_moments({"d": d[lo:hi]}, _PAIRS)
            self.blocks[b] = merge(self.blocks[b], part, _PAIRS)
            lo = hi
        self.n += u

    def _check(self) -> None:
        if self.n != self.num_units:
            raise VarRedError(
                f"num_units: expected {self.num_units} units to have been added, got {self.n}"
            )

    def variances(self) -> Tensor:
        """``tr Cov(d)`` of each column over all units (unbiased): ``[columns]``."""
        self._check()
        total = self.blocks[0]
        for m in self.blocks[1:]:
            total = merge(total, m, _PAIRS)
        return covariance(total, "var", unbiased=True)

    def leave_one_out(self) -> Tensor:
        """``tr Cov(d)`` of each column with block ``j`` deleted: ``[columns, J]``.

        Prefix and suffix merges: ``O(J)`` merges in all, no subtraction of sums.
        """
        self._check()
        j = self.num_blocks
        left, right = [self.blocks[0]] * j, [self.blocks[-1]] * j
        for k in range(1, j):
            left[k] = merge(left[k - 1], self.blocks[k], _PAIRS)  # blocks 0..k
            right[j - 1 - k] = merge(self.blocks[j - 1 - k], right[j - k], _PAIRS)  # k..J-1
        out = []
        for k in range(j):
            if k == 0:
                rest = right[1]
            elif k == j - 1:
                rest = left[j - 2]
            else:
                rest = merge(left[k - 1], right[k + 1], _PAIRS)
            out.append(covariance(rest, "var", unbiased=True))
        return torch.stack(out, 1)
