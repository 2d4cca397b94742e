"""Noise-level conventions: VE (``x_t = x + σ ε``) and VP (``x_t = α x + σ ε``, ``α² + σ² = 1``).

Everything in ``varred_diffusion`` is indexed by σ (per sample, ``[B]``); a schedule only
converts between σ, the signal scale α, a time ``t`` and the log-SNR ``log(α²/σ²)``.
VE: Song & Ermon (2019) / Karras et al. (2022). VP: Ho et al. (2020) (linear betas),
Nichol & Dhariwal (2021) (cosine), Song et al. (2021) (continuous VP-SDE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["VESchedule", "VPSchedule", "append_dims", "per_sample"]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``x`` has ``ndim`` dims: ``[B] -> [B, 1, ..., 1]``.

    >>> append_dims(torch.ones(3), 4).shape
    torch.Size([3, 1, 1, 1])
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise VarRedError(f"ndim: expected ≥ x.ndim = {x.ndim}, got {ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def per_sample(
    name: str, v: float | Tensor | None, n: int, like: Tensor, default: float | None = None
) -> Tensor:
    """Broadcast a per-sample parameter (σ, α, λ) to ``[n]`` in ``like``'s dtype and device.

    A Python number becomes ``torch.full`` on the device (no host-to-device copy), a 0-d
    tensor is expanded, a ``[n]`` tensor is cast; ``None`` takes ``default`` (an error when
    there is none). ``losses``, ``taylor_cv``, ``training`` and ``toy`` broadcast their per-sample
    σ/α/λ with it; turning ``[B]`` into ``[B, 1, ..., 1]`` against the data is ``append_dims``
    here (adapters, losses) and a private copy, ``taylor_cv._bcast`` (the Taylor CVs and
    ``ControlledDSM``): not yet one place (issue 15, item 2).

    Raises:
        VarRedError: ``None`` without a default, a non-numeric value, or a shape other than
            ``[]`` / ``[n]``.
    """
    if v is None:
        if default is None:
            raise VarRedError(f"{name}: expected a float or a tensor of shape [{n}], got None")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise VarRedError(
            f"{name}: expected a float or a tensor of shape [{n}], got {type(v).__name__}"
        )
    if not isinstance(v, Tensor):
        return torch.full((n,), float(v), dtype=like.dtype, device=like.device)
    t = v.to(dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise VarRedError(
            f"{name}: expected shape [{n}] (one per sample), a float or a 0-d tensor, "
            f"got {shape_str(t)}"
        )
    return t


def _as_tensor(v: float | Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.get_default_dtype())


@dataclass(frozen=True)
class VESchedule:
    """Variance exploding: ``α = 1``, ``σ(t) = σ_min (σ_max/σ_min)^t`` for ``t ∈ [0, 1]``.

    Example:
        >>> ve = VESchedule(0.01, 50.0)
        >>> round(float(ve.t_to_sigma(torch.tensor(1.0, dtype=torch.float64))), 6)
        50.0
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise VarRedError(
                f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )

    def alpha(self, sigma: Tensor) -> Tensor:
        """Signal scale: ones like ``sigma``."""
        return torch.ones_like(sigma)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Geometric interpolation ``σ_min (σ_max/σ_min)^t``."""
        t = _as_tensor(t)
        return self.sigma_min * torch.exp(t * math.log(self.sigma_max / self.sigma_min))

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Inverse of ``t_to_sigma``."""
        sigma = _as_tensor(sigma)
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def log_snr(self, sigma: Tensor) -> Tensor:
        """``log(α²/σ²) = −2 log σ``."""
        return -2 * torch.log(sigma)


_KINDS = ("linear", "cosine")


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """Variance preserving: ``α² + σ² = 1``, from DDPM betas (linear or cosine).

    ``discrete=True``: ``t`` is the (fractional) step index in ``[0, N−1]`` of the
    ``ᾱ`` table (diffusers/DDPM convention; ``σ_i = sqrt(1 − ᾱ_i)``), and ``t ↔ σ``
    interpolates the log-SNR linearly between integer steps. ``discrete=False``: ``t ∈
    [0, 1]`` in closed form: linear ``log ᾱ(t) = −(β_0 t + ½(β_1 − β_0) t²)`` with
    ``β_0 = N·beta_start``, ``β_1 = N·beta_end`` (the VP-SDE), or cosine ``ᾱ(t) =
    f(t)/f(0)``, ``f(t) = cos²(π/2 · (t + s)/(1 + s))`` floored at ``1e-8`` as ``t → 1``.

    Args:
        kind: ``"linear"`` or ``"cosine"``.
        num_steps: ``N``.
        beta_start, beta_end: linear betas (DDPM: 1e-4, 0.02).
        discrete: see above.
        cosine_s: offset ``s`` of the cosine schedule.
        alphas_cumprod: optional custom ``ᾱ`` table ``[N]`` (implies ``discrete``).
    """

    kind: str = "linear"
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    discrete: bool = False
    cosine_s: float = 0.008
    alphas_cumprod: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise VarRedError(f"kind: expected one of {_KINDS}, got {self.kind!r}")
        if self.alphas_cumprod is not None:
            ac = check_floating("alphas_cumprod", self.alphas_cumprod).detach().to(torch.float64)
            if ac.ndim != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
                raise VarRedError(
                    f"alphas_cumprod: expected [N] values in (0, 1), got shape {list(ac.shape)}"
                )
            if not bool((ac[1:] < ac[:-1]).all()):
                raise VarRedError("alphas_cumprod: expected strictly decreasing values")
            object.__setattr__(self, "alphas_cumprod", ac)
            object.__setattr__(self, "num_steps", int(ac.numel()))
            object.__setattr__(self, "discrete", True)
        elif self.discrete:
            object.__setattr__(self, "alphas_cumprod", self._table())

    def _table(self) -> Tensor:
        n = self.num_steps
        if self.kind == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        else:
            t = torch.arange(n + 1, dtype=torch.float64) / n
            f = torch.cos((t + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
            ab = f / f[0]
            betas = torch.clamp(1 - ab[1:] / ab[:-1], max=0.999)
        return torch.cumprod(1 - betas, dim=0)

    # -- continuous ᾱ(t) -------------------------------------------------
    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        if self.kind == "linear":
            b0, b1 = self.beta_start * self.num_steps, self.beta_end * self.num_steps
            return -(b0 * t + 0.5 * (b1 - b0) * t**2)
        s = self.cosine_s
        f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / f0
        return torch.log(torch.clamp(ab, min=1e-8))

    def _t_from_log_alpha_bar(self, la: Tensor) -> Tensor:
        if self.kind == "linear":
            b0, b1 = self.beta_start * self.num_steps, self.beta_end * self.num_steps
            d = b1 - b0
            return (-b0 + torch.sqrt(b0**2 - 2 * d * la)) / d
        s = self.cosine_s
        f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        arg = torch.sqrt(torch.exp(la) * f0).clamp(max=1.0)
        return torch.arccos(arg) * (2 / math.pi) * (1 + s) - s

    # -- public ----------------------------------------------------------
    def alpha(self, sigma: Tensor) -> Tensor:
        """``α = sqrt(1 − σ²)`` (σ must lie in (0, 1))."""
        return torch.sqrt(1 - sigma**2)

    def log_snr(self, sigma: Tensor) -> Tensor:
        """``log(α²/σ²) = log(1 − σ²) − 2 log σ``."""
        return torch.log1p(-(sigma**2)) - 2 * torch.log(sigma)

    @staticmethod
    def sigma_from_log_snr(lam: Tensor) -> Tensor:
        """``σ = sqrt(sigmoid(−λ))``."""
        return torch.sqrt(torch.sigmoid(-lam))

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """σ at time ``t`` (fractional step index if discrete, ``[0, 1]`` otherwise)."""
        t = _as_tensor(t)
        if not self.discrete:
            return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))
        assert self.alphas_cumprod is not None
        lam = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)  # [N], decreasing
        lam = lam.to(dtype=t.dtype if t.is_floating_point() else torch.float64, device=t.device)
        tt = t.clamp(0, self.num_steps - 1)
        i0 = tt.floor().long().clamp(max=self.num_steps - 2)
        w = tt - i0
        return self.sigma_from_log_snr(lam[i0] * (1 - w) + lam[i0 + 1] * w)

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Inverse of ``t_to_sigma`` (discrete: clamped to ``[0, N−1]``)."""
        sigma = _as_tensor(sigma)
        if not self.discrete:
            return self._t_from_log_alpha_bar(torch.log1p(-(sigma**2)))
        assert self.alphas_cumprod is not None
        lam_tab = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        lam_tab = lam_tab.to(dtype=sigma.dtype, device=sigma.device)
        lam = self.log_snr(sigma)
        # lam_tab decreasing: search on the negated (increasing) table
        neg = -lam_tab
        j = torch.searchsorted(neg, (-lam).contiguous()).clamp(
            1, self.num_steps - 1
        )  # neg[j-1] < -lam ≤ neg[j]
        lo, hi = neg[j - 1], neg[j]
        w = ((-lam - lo) / (hi - lo)).clamp(0, 1)
        return (j - 1).to(sigma.dtype) + w

    @property
    def sigma_min(self) -> float:
        """Smallest σ of the schedule (step 0, or ``t = 1/N`` if continuous)."""
        t = 0.0 if self.discrete else 1.0 / self.num_steps
        return float(self.t_to_sigma(torch.tensor(t, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        """Largest σ (step ``N−1``, or ``t = 1``)."""
        t = float(self.num_steps - 1) if self.discrete else 1.0
        return float(self.t_to_sigma(torch.tensor(t, dtype=torch.float64)))
