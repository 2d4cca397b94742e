"""Kingma & Gao's adaptive noise-level proposal ``q(σ) ∝ p(σ) · E[ℓ | σ]``, with importance weights.

Kingma & Gao (2023), "Understanding diffusion objectives as the ELBO with simple data
augmentation", §5 / App. F: sample the log-SNR from ``p(λ) ∝ w(λ) E[‖ε − ε̂‖² | λ]``
(an estimate of the loss per λ kept during training) and weight by ``w(λ)/p(λ)``, which
keeps the objective ``∫ w(λ) E[‖ε − ε̂‖² | λ] dλ``. Written in σ with this library's
per-sample loss ``ℓ`` (already weighted by λ(σ)) and the objective density ``p(σ)``:

.. math:: q(σ) ∝ p(σ)\\,\\bar ℓ(σ), \\qquad w = p(σ)/q(σ), \\qquad E_q[w ℓ] = E_p[ℓ].

``\\bar ℓ`` is a running mean per log-σ bin (an exponential moving average over updates),
so ``q`` is piecewise: bin ``b`` has mass ``q_b = (1 − f) P_b \\bar ℓ_b / Σ_c P_c \\bar ℓ_c +
f P_b`` (``P_b``: the objective's mass in the bin; ``f``: the floor), and inside a bin σ is log-uniform. For a log-uniform objective the
floor bounds every weight by ``1/f``; for others, by ``1/f`` times the variation of
``p(σ)σ`` inside a bin (more bins: closer to ``1/f``). The weight uses the objective's exact
``log_prob``, so the estimate is unbiased for *any* ``q`` (bin masses by quadrature only
affect efficiency). Before the first ``update`` ``q_b = P_b``; a bin that has not seen a
loss yet takes the largest running mean of the others (optimistic, so it gets sampled).
The proposal is ``E[ℓ]``-proportional (Kingma & Gao), not ``sqrt(E[ℓ²])`` as in
``ImportanceSigmaSampler`` (Nichol & Dhariwal, 2021), which minimises the variance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from varred.errors import VarRedError, shape_str
from varred.gradient_inputs import allreduce, resolve_process_group
from varred_diffusion.bins import SigmaBins
from varred_diffusion.objective_densities import LogUniform, ObjectiveDensity, open_uniform

__all__ = ["AdaptiveSigmaSampler"]

F64 = torch.float64
_QUAD_NODES = 16


class AdaptiveSigmaSampler:
    """Adaptive proposal ``q ∝ p · E[ℓ | bin]`` in log-σ bins (Kingma & Gao, 2023), unbiased weights.

    Args:
        num_bins: ``K`` bins of equal width in ``log σ`` over ``[σ_min, σ_max]``.
        sigma_min, sigma_max: the range (must cover the objective's support).
        objective: the density ``p`` to keep (``log_prob``); ``None``: ``LogUniform(σ_min, σ_max)``.
        decay: EMA factor of each bin's running mean loss per update, in ``[0, 1)``.
        floor: mixture weight ``f ∈ (0, 1]`` of ``p`` itself (log-uniform ``p``: weights ``≤ 1/f``).
        process_group: ``None`` (local statistics), ``"default"`` (the initialised default
            group) or a process group: ``update`` then sums every rank's per-bin losses and
            counts in one all-reduce of ``2K + 1`` floats, so all ranks hold the state of one
            process that saw the global batch (per-rank batch sizes may differ).

    ``changes_objective`` is ``False``: the weights keep ``objective``. Losses passed to
    ``update`` should be the nonnegative per-sample losses whose ``p``-mean you train on
    (negative bin means are clamped to 0; the floor keeps such bins sampled).
    Under DDP give ``process_group`` (every rank must call ``update`` each time), and use a
    different generator per rank in ``sample``.

    Example:
        >>> sam = AdaptiveSigmaSampler(8, 0.01, 10.0)
        >>> s, w = sam.sample(16, torch.Generator().manual_seed(0))
        >>> sam.update(s, s.double() ** 2)  # the loss grows with σ: q moves mass up
        >>> bool(torch.allclose(w, torch.ones(16))), s.shape
        (True, torch.Size([16]))
    """

    changes_objective = False

    def __init__(
        self,
        num_bins: int,
        sigma_min: float,
        sigma_max: float,
        objective: ObjectiveDensity | None = None,
        decay: float = 0.99,
        floor: float = 0.1,
        process_group: Any = None,
    ) -> None:
        self.bins = SigmaBins(sigma_min, sigma_max, num_bins)
        if not 0.0 <= decay < 1.0:
            raise VarRedError(f"decay: expected a value in [0, 1), got {decay}")
        if not 0.0 < floor <= 1.0:
            raise VarRedError(f"floor: expected a value in (0, 1] (0 can bias), got {floor}")
        self.decay, self.floor = float(decay), float(floor)
        if objective is None:
            objective = LogUniform(sigma_min, sigma_max)
        if not callable(getattr(objective, "log_prob", None)):
            raise VarRedError(
                f"objective: expected a density with log_prob(sigma), got {type(objective).__name__}"
            )
        sup = getattr(objective, "support", None)
        if sup is not None and not (
            sup[0] >= sigma_min * (1 - 1e-12) and sup[1] <= sigma_max * (1 + 1e-12)
        ):
            raise VarRedError(
                f"objective: its support {tuple(sup)} must lie inside [{sigma_min}, {sigma_max}]"
            )
        self.objective = objective
        self.process_group = process_group
        self.objective_mass = self._bin_masses()  # [K]
        self._sums = torch.zeros(num_bins, dtype=F64)
        self._counts = torch.zeros(num_bins, dtype=F64)

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    @property
    def support(self) -> tuple[float, float]:
        """``(σ_min, σ_max)``."""
        return self.bins.sigma_min, self.bins.sigma_max

    def _bin_masses(self) -> Tensor:
        """``P_b = ∫_bin p(σ) dσ`` ``[K]`` by Gauss–Legendre in ``log σ``, normalised to sum 1."""
        x, w = np.polynomial.legendre.leggauss(_QUAD_NODES)
        le = self.bins.log_edges  # [K + 1]
        half = 0.5 * (le[1:] - le[:-1])  # [K]
        mid = 0.5 * (le[1:] + le[:-1])
        u = mid[:, None] + half[:, None] * torch.as_tensor(x, dtype=F64)  # [K, n]
        s = torch.exp(u)
        dens = torch.exp(self.objective.log_prob(s.reshape(-1)).to(F64)).reshape(s.shape) * s
        mass = (dens * torch.as_tensor(w, dtype=F64)).sum(1) * half  # [K]
        if not bool(torch.isfinite(mass).all()) or not float(mass.sum()) > 0:
            raise VarRedError(
                "objective: expected a finite density with mass in [sigma_min, sigma_max]"
            )
        return mass / mass.sum()

    def warmed_up(self) -> bool:
        """Whether every bin with objective mass has its own running mean loss (informative)."""
        return bool(((self._counts > 0) | (self.objective_mass == 0)).all())

    def mean_losses(self) -> Tensor:
        """Running mean loss per bin ``[K]`` (float64; NaN where no loss was seen)."""
        return self._sums / self._counts

    def probabilities(self) -> Tensor:
        """Bin probabilities ``q_b`` ``[K]`` (float64)."""
        p = self.objective_mass
        seen = self._counts > 0
        if not bool(seen.any()):
            return p.clone()
        m = self.mean_losses().clamp(min=0.0)
        m = torch.where(seen, m, m[seen].max())  # unseen bins: the largest mean (optimistic)
        prop = p * m
        total = prop.sum()
        prop = prop / total if float(total) > 0 else p
        return (1 - self.floor) * prop + self.floor * p

    def log_prob(self, sigma: Tensor) -> Tensor:
        """``log q(σ)`` ``[B]`` of the current proposal (float64; −inf outside the range)."""
        s = sigma.detach().to(F64)
        le = self.bins.log_edges
        width = float(le[1] - le[0])
        q = self.probabilities()[self.bins.index(s)]
        lp = torch.log(q) - torch.log(s) - math.log(width)
        inside = (s >= self.bins.sigma_min) & (s <= self.bins.sigma_max)
        return torch.where(inside, lp, -math.inf)

    def weights_for(self, sigma: Tensor) -> Tensor:
        """``p(σ)/q(σ)`` ``[B]`` (float64) under the current proposal."""
        lp = self.objective.log_prob(sigma.detach().to(F64)).to(F64)
        return torch.exp(lp - self.log_prob(sigma))

    def sample(
        self,
        n: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``σ ~ q`` ``[n]`` (bin, then log-uniform inside it) and ``w = p(σ)/q(σ)`` ``[n]``."""
        u = open_uniform(n, generator)  # validates n
        b = torch.multinomial(self.probabilities(), n, replacement=True, generator=generator)
        le = self.bins.log_edges
        s = torch.exp(le[b] + u * (le[b + 1] - le[b]))
        s = s.clamp(self.bins.sigma_min, self.bins.sigma_max)
        w = self.weights_for(s)
        return s.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)

    def update(self, sigma: Tensor, losses: Tensor) -> None:
        """Fold per-sample ``losses`` ``[B]`` at ``sigma`` ``[B]`` into each bin's running mean.

        Per bin with new samples: ``S_b ← decay·S_b + Σ ℓ``, ``N_b ← decay·N_b + n_b``,
        mean ``S_b/N_b`` (detached, float64, on the host). With ``process_group`` the sums
        and counts are every rank's; a NaN/Inf on any rank raises on all of them, and the
        state is left unchanged.
        """
        if sigma.ndim != 1 or losses.shape != sigma.shape:
            raise VarRedError(
                f"losses: expected shape [B] matching sigma {shape_str(sigma)}, got {shape_str(losses)}"
            )
        s = sigma.detach().to(F64).cpu()
        ell = losses.detach().to(F64).cpu()
        finite = torch.isfinite(ell) & torch.isfinite(s)
        bad = (~finite).sum().to(F64).reshape(1)
        idx = self.bins.index(torch.where(finite, s, self.bins.sigma_min))
        k = self.num_bins
        sums = torch.bincount(idx, weights=torch.where(finite, ell, 0.0), minlength=k)
        counts = torch.bincount(idx, minlength=k).to(F64)
        active, pg = resolve_process_group(self.process_group)
        if active:  # one collective, on the losses' device (CUDA under NCCL, host under gloo)
            dev = losses.device
            xs = allreduce(active, pg, [sums.to(dev), counts.to(dev), bad.to(dev)])
            sums, counts, bad = (x.cpu() for x in xs)
        if float(bad) > 0:
            raise VarRedError(
                f"losses: expected finite losses and sigma, got {int(bad)} NaN/Inf values "
                "(over all ranks); the running means are left unchanged"
            )
        seen = counts > 0
        self._sums = torch.where(seen, self.decay * self._sums + sums, self._sums)
        self._counts = torch.where(seen, self.decay * self._counts + counts, self._counts)

    def state_dict(self) -> dict[str, Tensor]:
        """Running sums and (decayed) counts per bin, ``[K]`` each."""
        return {"sums": self._sums.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from ``state_dict()``."""
        sums, counts = state["sums"], state["counts"]
        if sums.shape != (self.num_bins,) or counts.shape != (self.num_bins,):
            raise VarRedError(
                f"state: expected sums and counts of shape [{self.num_bins}], "
                f"got {shape_str(sums)} and {shape_str(counts)}"
            )
        self._sums = sums.detach().to(F64).clone()
        self._counts = counts.detach().to(F64).clone()
