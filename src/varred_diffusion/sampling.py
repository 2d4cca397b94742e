"""Noise-level and noise sampling: stratified, low-discrepancy, antithetic, importance.

All functions take an explicit ``torch.Generator``. For the distributed variants the
*global* batch ``N = batch · world_size`` is stratified and each rank returns its slice
``[rank · batch, (rank + 1) · batch)``; with the same generator state on every rank, the
union over ranks is exactly the single-process draw of size ``N``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, shape_str
from varred_diffusion.bins import SigmaBins
from varred_diffusion.objective_densities import LogUniform

__all__ = [
    "ImportanceSigmaSampler",
    "LogUniformSigma",
    "StratifiedSigma",
    "antithetic_noise",
    "log_uniform_sigma",
    "low_discrepancy_uniform",
    "stratified_uniform",
]


def _where(generator: torch.Generator | None) -> torch.device:
    """The device a draw from ``generator`` happens on (a CUDA generator draws on CUDA)."""
    return torch.device("cpu") if generator is None else generator.device


def _check_rank(batch: int, rank: int, world_size: int) -> None:
    if batch < 1:
        raise VarRedError(f"batch: expected a positive integer, got {batch}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise VarRedError(
            f"rank, world_size: expected 0 <= rank < world_size, got {rank}, {world_size}"
        )


def stratified_uniform(
    batch: int,
    generator: torch.Generator | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stratified uniforms ``u_i = (i + U_i)/N``, ``U_i ~ U[0, 1)`` iid, this rank's slice ``[batch]``.

    Exactly one point in each stratum ``[i/N, (i+1)/N)`` of the global batch; every
    rank draws all ``N`` ``U_i`` (cheap) so that the union over ranks is one draw.
    """
    _check_rank(batch, rank, world_size)
    n = batch * world_size
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    i = torch.arange(rank * batch, (rank + 1) * batch, dtype=torch.float64, device=device)
    return ((i + u[rank * batch : (rank + 1) * batch]) / n).to(dtype)


def low_discrepancy_uniform(
    batch: int,
    generator: torch.Generator | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """VDM's low-discrepancy times ``u_i = (u_0 + i/N) mod 1`` (Kingma et al., 2021), slice ``[batch]``.

    One shared ``u_0 ~ U[0, 1)`` (the generator must be in the same state on every rank);
    ``i/N`` from integers. Each point is marginally uniform; one per stratum of width ``1/N``.
    """
    _check_rank(batch, rank, world_size)
    n = batch * world_size
    u0 = torch.rand(1, generator=generator, dtype=torch.float64, device=device)
    i = torch.arange(rank * batch, (rank + 1) * batch, dtype=torch.float64, device=device)
    return torch.remainder(u0 + i / n, 1.0).to(dtype)


def log_uniform_sigma(u: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """``σ = exp(log σ_min + u (log σ_max − log σ_min))`` ``[B]`` from uniforms ``u`` ``[B]``."""
    if not 0 < sigma_min <= sigma_max:
        raise VarRedError(
            f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}"
        )
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(lo + u * (hi - lo))


class LogUniformSigma(LogUniform):
    """i.i.d. log-uniform σ on ``[sigma_min, sigma_max]``: the plain DSM sampler (weights 1).

    The ``LogUniform`` objective density (``log_prob``, ``support``) drawn as
    ``log_uniform_sigma`` of float64 uniforms on the generator's device; its density defines
    the objective the other σ samplers keep (``changes_objective`` is ``False``).
    """

    def _uniforms(self, n: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=_where(generator))

    def sample(
        self,
        n: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(sigma [n], ones [n])``."""
        if n < 1:
            raise VarRedError(f"n: expected a positive integer, got {n}")
        sigma = log_uniform_sigma(self._uniforms(n, generator), self.sigma_min, self.sigma_max)
        sigma = sigma.to(dtype=dtype, device=device)
        return sigma, torch.ones_like(sigma)  # [n], [n]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sigma_min:g}, {self.sigma_max:g})"


class StratifiedSigma(LogUniformSigma):
    """Log-uniform σ with one draw per stratum of ``u`` (``low_discrepancy``: VDM's shifted grid).

    Each σ is marginally log-uniform, so the objective is the plain one with weights 1; the
    batch covers the σ range evenly (Kingma et al., 2021).
    """

    def __init__(
        self, sigma_min: float, sigma_max: float, *, low_discrepancy: bool = False
    ) -> None:
        super().__init__(sigma_min, sigma_max)
        self.low_discrepancy = bool(low_discrepancy)

    def _uniforms(self, n: int, generator: torch.Generator | None) -> Tensor:
        draw = low_discrepancy_uniform if self.low_discrepancy else stratified_uniform
        return draw(n, generator, device=_where(generator))

    def __repr__(self) -> str:
        ld = ", low_discrepancy=True" if self.low_discrepancy else ""
        return f"StratifiedSigma({self.sigma_min:g}, {self.sigma_max:g}{ld})"


def antithetic_noise(
    batch: int,
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Antithetic Gaussian noise ``[batch, *shape]``: rows ``[:batch/2]`` are ``ε``, rows ``[batch/2:]`` are ``−ε``.

    Row ``i`` and row ``i + batch/2`` form a pair (the layout ``varred.antithetic_estimate``
    takes as ``f(ε)``, ``f(−ε)``). ``batch`` must be even.
    """
    if batch < 2 or batch % 2:
        raise VarRedError(f"batch: expected a positive even integer (pairs), got {batch}")
    half = torch.randn(batch // 2, *shape, generator=generator, dtype=dtype, device=device)
    return torch.cat([half, -half], dim=0)


class ImportanceSigmaSampler:
    """Importance sampling of log-σ bins with ``p(b) ∝ sqrt(E[ℓ² | b])`` (Nichol & Dhariwal, 2021).

    improved-DDPM's ``LossSecondMomentResampler`` in log-σ bins: the target objective is
    ``E_{σ ~ logU[σ_min, σ_max]} ℓ(σ)`` (every bin has mass ``1/K``); σ is drawn as bin
    ``b ~ p`` and then log-uniform inside it, and weighted by ``w = (1/K)/p(b)``, so that
    ``E[w ℓ] = (1/K) Σ_b E[ℓ | b]`` exactly, for any ``p``. ``p = (1 − f) q + f/K`` with
    ``q ∝ sqrt(mean of the last `history` squared losses)`` of each bin and the floor ``f``;
    ``p`` is uniform until every bin holds ``history`` losses.

    Under DDP (``process_group`` given, or the default group if initialised and
    ``process_group="default"``) ``update`` all-gathers ``(σ, ℓ)`` of every rank (the row counts,
    then 2·max B·world floats per step; per-rank batches may differ in size), so all ranks
    hold the same state.
    Use a different generator per rank in ``sample``.
    """

    changes_objective = False  # the weights keep the log-uniform objective

    def __init__(
        self,
        num_bins: int,
        sigma_min: float,
        sigma_max: float,
        history: int = 10,
        uniform_floor: float = 0.1,
        process_group: Any = None,
    ) -> None:
        self.bins = SigmaBins(sigma_min, sigma_max, num_bins)
        if history < 1:
            raise VarRedError(f"history: expected a positive integer, got {history}")
        if not 0.0 <= uniform_floor <= 1.0:
            raise VarRedError(f"uniform_floor: expected a value in [0, 1], got {uniform_floor}")
        self.history = int(history)
        self.uniform_floor = float(uniform_floor)
        self.process_group = process_group
        self._buffer = torch.zeros(num_bins, history, dtype=torch.float64)  # oldest first
        self._counts = torch.zeros(num_bins, dtype=torch.long)

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    def warmed_up(self) -> bool:
        """Whether every bin holds ``history`` losses."""
        return bool((self._counts >= self.history).all())

    def probabilities(self) -> Tensor:
        """Current bin probabilities ``p`` ``[K]`` (float64)."""
        k = self.num_bins
        if not self.warmed_up():
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        rms = torch.sqrt((self._buffer**2).mean(dim=1))  # [K]
        total = rms.sum()
        q = rms / total if float(total) > 0 else torch.full((k,), 1.0 / k, dtype=torch.float64)
        return (1 - self.uniform_floor) * q + self.uniform_floor / k

    def weights_for(self, sigma: Tensor) -> Tensor:
        """Importance weights ``(1/K)/p(b(σ))`` ``[B]`` for given ``sigma`` ``[B]``."""
        p = self.probabilities()
        return (1.0 / (self.num_bins * p))[self.bins.index(sigma)]

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``sigma`` ``[batch]`` and importance weights ``[batch]`` (``E[w ℓ]`` = log-uniform objective)."""
        if batch < 1:
            raise VarRedError(f"batch: expected a positive integer, got {batch}")
        where = _where(generator)  # draw on the generator's device (CPU or CUDA)
        p = self.probabilities().to(where)
        b = torch.multinomial(p, batch, replacement=True, generator=generator)  # [B]
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=where)
        le = self.bins.log_edges.to(where)
        log_sigma = le[b] + u * (le[b + 1] - le[b])
        sigma = torch.exp(log_sigma).clamp(self.bins.sigma_min, self.bins.sigma_max)
        w = 1.0 / (self.num_bins * p[b])
        return sigma.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)

    def _gather(self, t: Tensor) -> Tensor:
        """All ranks' rows of ``t`` ``[n_r, c]``, rank 0's first; ``n_r`` may differ by rank.

        Two collectives: the row counts, then the rows padded to the largest count.
        """
        import torch.distributed as dist

        pg = None if self.process_group == "default" else self.process_group
        world = dist.get_world_size(pg)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        n = torch.full((1,), t.shape[0], dtype=torch.long, device=t.device)
        counts = torch.empty(world, dtype=torch.long, device=t.device)
        gather(counts, n, group=pg)
        sizes = counts.tolist()  # update() syncs anyway (its history lives on the host)
        m = max(sizes)
        pad = t.new_zeros((m, *t.shape[1:]))
        pad[: t.shape[0]] = t
        out = torch.empty((world * m, *t.shape[1:]), dtype=t.dtype, device=t.device)
        gather(out, pad, group=pg)
        return torch.cat([out[r * m : r * m + k] for r, k in enumerate(sizes)])

    def update(self, sigma: Tensor, losses: Tensor) -> None:
        """Record per-sample ``losses`` ``[B]`` at ``sigma`` ``[B]`` (detached; all ranks' under DDP)."""
        if sigma.ndim != 1 or losses.shape != sigma.shape:
            raise VarRedError(
                f"losses: expected shape [B] matching sigma {shape_str(sigma)}, got {shape_str(losses)}"
            )
        s = sigma.detach().to(torch.float64)
        ell = losses.detach().to(torch.float64)
        if self.process_group is not None:  # every rank's samples, any per-rank batch size
            s, ell = self._gather(torch.stack([s, ell], 1)).unbind(1)
        s, ell = s.cpu(), ell.cpu()
        if not bool(torch.isfinite(ell).all() & torch.isfinite(s).all()):
            bad = int((~torch.isfinite(ell)).sum() + (~torch.isfinite(s)).sum())
            raise VarRedError(
                f"losses: expected finite losses and sigma, got {bad} NaN/Inf values "
                f"(shape {shape_str(losses)}); the loss history is left unchanged"
            )
        idx = self.bins.index(s)
        for b in torch.unique(idx).tolist():
            new = ell[idx == b]
            c = int(self._counts[b])
            old = self._buffer[b, self.history - min(c, self.history) :]
            merged = torch.cat([old, new])[-self.history :]
            self._buffer[b, self.history - merged.numel() :] = merged
            self._counts[b] = min(c + new.numel(), self.history)

    def state_dict(self) -> dict[str, Tensor]:
        """Loss history ``[K, history]`` (oldest first, right-aligned) and fill counts ``[K]``."""
        return {"buffer": self._buffer.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from ``state_dict()`` (shapes must match)."""
        buf, cnt = state["buffer"], state["counts"]
        if buf.shape != self._buffer.shape or cnt.shape != self._counts.shape:
            raise VarRedError(
                f"state: expected buffer {shape_str(self._buffer)} and counts {shape_str(self._counts)}, "
                f"got {shape_str(buf)} and {shape_str(cnt)}"
            )
        self._buffer = buf.detach().to(torch.float64).clone()
        self._counts = cnt.detach().to(torch.long).clone()
