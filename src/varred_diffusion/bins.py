"""Log-σ bins: group samples by noise level (per-bin β, per-bin loss statistics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating

__all__ = ["SigmaBins"]


@dataclass(frozen=True)
class SigmaBins:
    """``num_bins`` bins of equal width in ``log σ`` over ``[sigma_min, sigma_max]``.

    Out-of-range σ are clamped into the first / last bin.

    Example:
        >>> bins = SigmaBins(0.01, 100.0, 4)
        >>> bins.index(torch.tensor([0.001, 0.05, 5.0, 1e3]))
        tensor([0, 0, 2, 3])
    """

    sigma_min: float
    sigma_max: float
    num_bins: int

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise VarRedError(
                f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if (
            isinstance(self.num_bins, bool)
            or not isinstance(self.num_bins, int)
            or self.num_bins < 1
        ):
            raise VarRedError(f"num_bins: expected a positive integer, got {self.num_bins!r}")

    @property
    def log_edges(self) -> Tensor:
        """``[K + 1]`` float64 bin edges in ``log σ``."""
        return torch.linspace(
            math.log(self.sigma_min),
            math.log(self.sigma_max),
            self.num_bins + 1,
            dtype=torch.float64,
        )

    @property
    def edges(self) -> Tensor:
        """``[K + 1]`` float64 bin edges in σ."""
        e = torch.exp(self.log_edges)
        e[0], e[-1] = self.sigma_min, self.sigma_max
        return e

    @property
    def centers(self) -> Tensor:
        """``[K]`` float64 geometric bin centres."""
        le = self.log_edges
        return torch.exp(0.5 * (le[:-1] + le[1:]))

    def index(self, sigma: Tensor) -> Tensor:
        """Bin index ``LongTensor[B]`` of each ``sigma`` ``[B]`` (clamped to ``[0, K − 1]``)."""
        check_floating("sigma", sigma)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        pos = (torch.log(sigma.detach().to(torch.float64)) - lo) * (self.num_bins / (hi - lo))
        return pos.floor().clamp(0, self.num_bins - 1).long()

    def counts(self, sigma: Tensor) -> Tensor:
        """Number of ``sigma`` ``[B]`` per bin: ``LongTensor[K]``."""
        return torch.bincount(self.index(sigma), minlength=self.num_bins)
