"""Noise-level bins: group samples by σ for per-bin β and per-bin loss statistics.

Every bins object follows one grouping protocol: ``num_groups`` (int; also ``num_bins``) and
``index(sigma [B]) -> LongTensor [B]`` in ``[0, num_groups)``, bin 0 holding the smallest σ.
Three layouts (choose by the σ distribution your sampler draws, docs/diffusers.md):

- :class:`SigmaBins`: equal width in ``log σ`` (VE with log-uniform σ: equal mass there).
- :class:`LogSNRBins`: equal width in the log-SNR ``λ = log(α²/σ²)`` of a VE, VP or
  flow-matching path (Kingma et al., 2021: the SNR is the schedule-free noise level).
- :class:`QuantileBins`: equal mass under the user's own sampler, from draws of it or from a
  discrete DDPM timestep table (uniform integer t: equal timestep ranges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["LogSNRBins", "QuantileBins", "SigmaBins", "log_snr", "sigma_from_log_snr"]

_PROCESSES = ("ve", "vp", "flow")


def _check_num_bins(num_bins: object) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise VarRedError(f"num_bins: expected a positive integer, got {num_bins!r}")
    return num_bins


def _check_range(sigma_min: float, sigma_max: float, upper: float = math.inf) -> None:
    if not 0 < sigma_min < sigma_max <= upper:
        bound = "" if upper == math.inf else f" ≤ {upper}"
        raise VarRedError(
            "sigma_min, sigma_max: expected 0 < sigma_min < sigma_max"
            f"{bound}, got {sigma_min}, {sigma_max}"
        )


def _bucket(inner: Tensor, sigma: Tensor) -> Tensor:
    """Index ``LongTensor[B]``: number of inner edges ``≤ σ`` (clamps out-of-range σ)."""
    check_floating("sigma", sigma)
    s = sigma.detach().to(torch.float64)
    return torch.bucketize(s, inner.to(s.device), right=True)


class _Counts:
    """``counts`` and ``num_groups`` from ``index`` and ``num_bins``."""

    num_bins: int

    def index(self, sigma: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        """Number of groups (= ``num_bins``): the grouping protocol's count."""
        return self.num_bins

    def counts(self, sigma: Tensor) -> Tensor:
        """Number of ``sigma`` ``[B]`` per bin: ``LongTensor[K]``."""
        return torch.bincount(self.index(sigma), minlength=self.num_bins)


@dataclass(frozen=True)
class SigmaBins(_Counts):
    """``num_bins`` bins of equal width in ``log σ`` over ``[sigma_min, sigma_max]``.

    Out-of-range σ are clamped into the first / last bin. Under VP with uniform integer
    timesteps most steps have σ near 1 and fall in the last bin (DDPM linear, 1000 steps,
    4 bins: 6 / 21 / 71 / 902); use :class:`QuantileBins` there.

    Example:
        >>> bins = SigmaBins(0.01, 100.0, 4)
        >>> bins.index(torch.tensor([0.001, 0.05, 5.0, 1e3]))
        tensor([0, 0, 2, 3])
    """

    sigma_min: float
    sigma_max: float
    num_bins: int

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)
        _check_num_bins(self.num_bins)

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


def log_snr(sigma: Tensor, process: str) -> Tensor:
    """``λ = log(α²/σ²)`` ``[B]`` of a path: ``"ve"`` (α = 1), ``"vp"`` (α² + σ² = 1) or
    ``"flow"`` (rectified flow, α = 1 − σ)."""
    if process == "ve":
        return -2 * torch.log(sigma)
    if process == "vp":
        return torch.log1p(-(sigma**2)) - 2 * torch.log(sigma)
    if process == "flow":
        return 2 * (torch.log1p(-sigma) - torch.log(sigma))
    raise VarRedError(f"process: expected one of {_PROCESSES}, got {process!r}")


def sigma_from_log_snr(lam: Tensor, process: str) -> Tensor:
    """Inverse of :func:`log_snr`: σ ``[B]`` from ``λ`` ``[B]``."""
    if process == "ve":
        return torch.exp(-lam / 2)
    if process == "vp":
        return torch.sqrt(torch.sigmoid(-lam))
    if process == "flow":
        return torch.sigmoid(-lam / 2)
    raise VarRedError(f"process: expected one of {_PROCESSES}, got {process!r}")


@dataclass(frozen=True)
class LogSNRBins(_Counts):
    """``num_bins`` bins of equal width in log-SNR ``λ(σ)`` over ``[sigma_min, sigma_max]``.

    Bin 0 holds the smallest σ (largest λ), as for :class:`SigmaBins`; out-of-range σ are
    clamped. The bins are computed on σ edges (``λ`` is decreasing in σ on every path), so a
    float32 σ near 1 is binned without the cancellation of ``log(1 − σ²)``. For ``"ve"`` they
    equal ``SigmaBins``. DDPM linear (1000 steps, uniform integer t, 4 bins): 31 / 272 / 419 /
    278 steps; the cosine table is uneven in λ (2 / 55 / 782 / 161): :class:`QuantileBins`.

    Args:
        sigma_min, sigma_max: the σ range (VP and flow: within (0, 1]).
        num_bins: ``K``.
        process: ``"ve"``, ``"vp"`` or ``"flow"`` (see :func:`log_snr`).

    Example:
        >>> LogSNRBins(0.01, 0.99, 2, process="vp").index(torch.tensor([0.02, 0.05, 0.5]))
        tensor([0, 0, 1])
    """

    sigma_min: float
    sigma_max: float
    num_bins: int
    process: str = "vp"

    def __post_init__(self) -> None:
        if self.process not in _PROCESSES:
            raise VarRedError(f"process: expected one of {_PROCESSES}, got {self.process!r}")
        _check_range(self.sigma_min, self.sigma_max, math.inf if self.process == "ve" else 1.0)
        _check_num_bins(self.num_bins)
        if self.process != "ve" and self.sigma_max == 1.0:  # λ = −∞: cap the top edge
            object.__setattr__(self, "sigma_max", math.nextafter(1.0, 0.0))

    @classmethod
    def from_timesteps(cls, alphas_cumprod: Tensor, num_bins: int) -> LogSNRBins:
        """VP bins over the range of a discrete ``ᾱ`` table ``[N]`` (taken in float64: a
        float32 ``sqrt(1 − ᾱ)`` rounds to 1 where ``ᾱ < 6e-8``, e.g. the cosine table's end)."""
        ac = check_floating("alphas_cumprod", alphas_cumprod).detach().to(torch.float64)
        if ac.ndim != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise VarRedError(
                f"alphas_cumprod: expected [N] values in (0, 1), got {shape_str(alphas_cumprod)}"
            )
        sig = torch.sqrt(1 - ac)
        return cls(float(sig.min()), float(sig.max()), num_bins, process="vp")

    @property
    def log_snr_edges(self) -> Tensor:
        """``[K + 1]`` float64 edges in λ, decreasing (bin ``k`` spans ``[λ_{k+1}, λ_k]``)."""
        ends = torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64)
        lam = log_snr(ends, self.process)
        return torch.linspace(float(lam[0]), float(lam[1]), self.num_bins + 1, dtype=torch.float64)

    @property
    def edges(self) -> Tensor:
        """``[K + 1]`` float64 increasing edges in σ."""
        e = sigma_from_log_snr(self.log_snr_edges, self.process)
        e[0], e[-1] = self.sigma_min, self.sigma_max
        return e

    @property
    def centers(self) -> Tensor:
        """``[K]`` float64 σ at the λ-midpoint of each bin."""
        le = self.log_snr_edges
        return sigma_from_log_snr(0.5 * (le[:-1] + le[1:]), self.process)

    def index(self, sigma: Tensor) -> Tensor:
        """Bin index ``LongTensor[B]`` of each ``sigma`` ``[B]`` (clamped to ``[0, K − 1]``)."""
        return _bucket(self.edges[1:-1], sigma)


class QuantileBins(_Counts):
    """Bins of equal mass under a σ distribution: edges between consecutive quantiles.

    Build them from draws of the sampler you train with (:meth:`from_samples`) or, for
    discrete DDPM timesteps, from the ``ᾱ`` table (:meth:`from_timesteps`). An inner edge lies
    at the geometric midpoint between the two distinct sample values it separates, so the
    sample's own values (in float32 or float64) never sit on an edge and a discrete sample
    splits exactly: uniform integer t over 1000 DDPM steps, 4 bins → 250 / 250 / 250 / 250.

    Args:
        edges: ``[K + 1]`` strictly increasing positive σ edges (the outer two are only the
            sample's range: σ beyond them is clamped into the first / last bin).

    Example:
        >>> bins = QuantileBins.from_samples(torch.tensor([0.1, 0.2, 0.3, 0.4]), 2)
        >>> bins.index(torch.tensor([0.1, 0.2, 0.3, 0.4])).tolist()
        [0, 0, 1, 1]
    """

    def __init__(self, edges: Tensor) -> None:
        e = check_floating("edges", edges).detach().to(torch.float64, copy=True).cpu()
        if e.ndim != 1 or e.numel() < 2:
            raise VarRedError(f"edges: expected shape [K + 1] with K ≥ 1, got {shape_str(e)}")
        if not bool((e[0] > 0) & (e[1:] > e[:-1]).all()):
            raise VarRedError("edges: expected strictly increasing positive values")
        self.edges = e
        self.num_bins = int(e.numel()) - 1
        self._inner = e[1:-1].clone()

    @classmethod
    def from_samples(
        cls, sigma: Tensor, num_bins: int, weights: Tensor | None = None
    ) -> QuantileBins:
        """Equal-mass bins for the distribution of ``sigma`` ``[N]`` (draws, or support points
        with probabilities ``weights`` ``[N]``, default uniform).

        Raises:
            VarRedError: non-positive σ, fewer distinct values than bins, bad weights.
        """
        k = _check_num_bins(num_bins)
        s = check_floating("sigma", sigma).detach().to(torch.float64).flatten().cpu()
        if s.numel() == 0 or not bool((s > 0).all() & torch.isfinite(s).all()):
            raise VarRedError("sigma: expected a non-empty tensor of finite values > 0")
        if weights is None:
            w = torch.ones_like(s)
        else:
            w = check_floating("weights", weights).detach().to(torch.float64).flatten().cpu()
            if w.shape != s.shape or not bool((w >= 0).all()) or float(w.sum()) <= 0:
                raise VarRedError(
                    f"weights: expected {s.numel()} non-negative values with a positive sum, "
                    f"got {shape_str(weights)}"
                )
        u, inv = torch.unique(s, sorted=True, return_inverse=True)
        if u.numel() < k:
            raise VarRedError(
                f"num_bins: expected at most the {u.numel()} distinct σ values, got {k}"
            )
        mass = torch.zeros_like(u).index_add_(0, inv, w)
        before = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)])  # [U + 1]
        cuts, last = [], 0
        for j in range(1, k):  # cut c: values u[:c] below the edge
            target = before[-1] * j / k
            c = int(torch.argmin((before[1:-1] - target).abs())) + 1
            c = min(max(c, last + 1), u.numel() - (k - j))
            cuts.append(c)
            last = c
        inner = [math.sqrt(float(u[c - 1]) * float(u[c])) for c in cuts]
        return cls(torch.tensor([float(u[0]), *inner, float(u[-1])], dtype=torch.float64))

    @classmethod
    def from_timesteps(
        cls, alphas_cumprod: Tensor, num_bins: int, weights: Tensor | None = None
    ) -> QuantileBins:
        """Equal-mass bins over a discrete VP table: σ_t = sqrt(1 − ᾱ_t), t = 0..N−1 drawn
        with probabilities ``weights`` ``[N]`` (default uniform, as ``torch.randint``).

        Args:
            alphas_cumprod: ``[N]`` ``ᾱ`` table (e.g. ``DDPMScheduler.alphas_cumprod``).
        """
        ac = check_floating("alphas_cumprod", alphas_cumprod).detach().to(torch.float64)
        if ac.ndim != 1 or not bool(((ac >= 0) & (ac < 1)).all()):
            raise VarRedError(
                f"alphas_cumprod: expected [N] values in [0, 1), got {shape_str(alphas_cumprod)}"
            )
        return cls.from_samples(torch.sqrt(1 - ac), num_bins, weights)

    @property
    def centers(self) -> Tensor:
        """``[K]`` float64 geometric bin centres."""
        return torch.sqrt(self.edges[:-1] * self.edges[1:])

    def index(self, sigma: Tensor) -> Tensor:
        """Bin index ``LongTensor[B]`` of each ``sigma`` ``[B]`` (clamped to ``[0, K − 1]``)."""
        return _bucket(self._inner, sigma)

    def __repr__(self) -> str:
        return f"QuantileBins(num_bins={self.num_bins}, edges={self.edges.tolist()})"
