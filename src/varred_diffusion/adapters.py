"""Parameterisation adapters: any ε-, x0- or v-prediction network as a score function.

The protocol everywhere is ``score_fn(x_t [B, ...], sigma [B], **cond) -> [B, ...]`` with
``x_t = α x0 + σ ε`` (VE: α = 1). Identities used (Ho et al., 2020; Salimans & Ho, 2022):

- ε-prediction: ``s = −ε̂/σ`` and back ``ε̂ = −σ s``.
- x0-prediction: ``s = (α x̂0 − x_t)/σ²`` (Tweedie).
- v-prediction (VP, ``α² + σ² = 1``): ``v = α ε − σ x0``, so ``ε̂ = σ x_t + α v̂``,
  ``x̂0 = α x_t − σ v̂`` and ``s = −(σ x_t + α v̂)/σ``.

Adapters are ``nn.Module``s wrapping any ``nn.Module`` (parameters, ``.to``, ``torch.func``
all work); extra keyword conditioning (class labels, ...) is passed to the model unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from varred.errors import VarRedError, check_floating, shape_str
from varred_diffusion.schedules import VESchedule, VPSchedule, append_dims

__all__ = [
    "DiffusersAdapter",
    "DiffusersEpsAdapter",
    "EpsFromScore",
    "ScoreFromEps",
    "ScoreFromV",
    "ScoreFromX0",
    "eps_to_score",
    "score_to_eps",
    "v_to_eps",
    "x0_to_score",
]

Schedule = VESchedule | VPSchedule


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """``s = −ε̂/σ``; ``eps`` ``[B, ...]``, ``sigma`` ``[B]``."""
    return -eps / append_dims(sigma, eps.ndim)


def score_to_eps(score: Tensor, sigma: Tensor) -> Tensor:
    """``ε̂ = −σ s``; ``score`` ``[B, ...]``, ``sigma`` ``[B]``."""
    return -append_dims(sigma, score.ndim) * score


def x0_to_score(x0: Tensor, x: Tensor, sigma: Tensor, alpha: Tensor) -> Tensor:
    """Tweedie: ``s = (α x̂0 − x_t)/σ²``; tensors ``[B, ...]``, ``sigma``/``alpha`` ``[B]``."""
    a, s = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
    return (a * x0 - x) / s**2


def v_to_eps(v: Tensor, x: Tensor, sigma: Tensor, alpha: Tensor) -> Tensor:
    """VP: ``ε̂ = σ x_t + α v̂`` (from ``v = α ε − σ x0`` and ``x_t = α x0 + σ ε``)."""
    a, s = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
    return s * x + a * v


class _Adapter(nn.Module):
    """Holds the model, the schedule and the σ → model-time conversion."""

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: Schedule | None = None,
        time_input: str | Callable[[Tensor], Tensor] = "sigma",
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        if isinstance(time_input, str):
            if time_input not in ("sigma", "t"):
                raise VarRedError(
                    f"time_input: expected 'sigma', 't' or a callable, got {time_input!r}"
                )
            if time_input == "t" and schedule is None:
                raise VarRedError(
                    "time_input: 't' needs a schedule (VESchedule or VPSchedule), got None"
                )
        elif not callable(time_input):
            raise VarRedError(
                f"time_input: expected 'sigma', 't' or a callable, got {time_input!r}"
            )
        self.time_input = time_input

    def model_time(self, sigma: Tensor) -> Tensor:
        """What the wrapped model receives as its second argument, from ``sigma`` ``[B]``."""
        if callable(self.time_input):
            return self.time_input(sigma)
        if self.time_input == "t":
            assert self.schedule is not None
            return self.schedule.sigma_to_t(sigma)
        return sigma

    def alpha(self, sigma: Tensor) -> Tensor:
        """Signal scale ``α(σ)`` ``[B]`` (ones without a schedule: VE)."""
        return torch.ones_like(sigma) if self.schedule is None else self.schedule.alpha(sigma)

    def _call(self, x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        if sigma.shape != x.shape[:1]:
            raise VarRedError(f"sigma: expected shape [{x.shape[0]}], got {shape_str(sigma)}")
        out = self.model(x, self.model_time(sigma), **cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise VarRedError(
                f"model: expected an output of the shape of x {shape_str(x)}, got {shape_str(out)}"
            )
        return out


class ScoreFromEps(_Adapter):
    """Score from an ε-prediction model: ``s = −ε̂(x_t, t)/σ``.

    Args:
        model: ``model(x_t [B, ...], time [B], **cond) -> ε̂ [B, ...]``.
        schedule: ``VESchedule``/``VPSchedule`` (``None``: VE with σ as the time input).
        time_input: ``"sigma"`` (pass σ), ``"t"`` (pass ``schedule.sigma_to_t(σ)``) or a
            callable ``σ [B] -> time [B]``.

    Example:
        >>> sf = ScoreFromEps(lambda x, t: torch.ones_like(x))
        >>> sf(torch.zeros(2, 3), torch.tensor([0.5, 2.0]))[:, 0]
        tensor([-2.0000, -0.5000])
    """

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Score ``[B, ...]`` at ``x_t`` ``[B, ...]``, ``sigma`` ``[B]``."""
        return eps_to_score(self._call(x, sigma, cond), sigma)


class ScoreFromX0(_Adapter):
    """Score from a denoiser / x0-prediction model: ``s = (α x̂0 − x_t)/σ²`` (Tweedie).

    Args: as ``ScoreFromEps``; ``α`` comes from ``schedule`` (VE: 1).
    """

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Score ``[B, ...]`` at ``x_t`` ``[B, ...]``, ``sigma`` ``[B]``."""
        return x0_to_score(self._call(x, sigma, cond), x, sigma, self.alpha(sigma))


class ScoreFromV(_Adapter):
    """Score from a v-prediction model (VP only): ``s = −(σ x_t + α v̂)/σ`` (Salimans & Ho, 2022).

    Args: as ``ScoreFromEps``, but ``schedule`` must be a ``VPSchedule``.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: VPSchedule,
        time_input: str | Callable[[Tensor], Tensor] = "sigma",
    ) -> None:
        if not isinstance(schedule, VPSchedule):
            raise VarRedError(
                f"schedule: v-prediction needs a VPSchedule (α² + σ² = 1), got {type(schedule).__name__}"
            )
        super().__init__(model, schedule, time_input)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Score ``[B, ...]`` at ``x_t`` ``[B, ...]``, ``sigma`` ``[B]``."""
        eps = v_to_eps(self._call(x, sigma, cond), x, sigma, self.alpha(sigma))
        return eps_to_score(eps, sigma)


class EpsFromScore(nn.Module):
    """ε-prediction from a score function: ``ε̂ = −σ s(x_t, σ)`` (inverse of ``ScoreFromEps``).

    Args:
        score_fn: ``score_fn(x_t [B, ...], sigma [B], **cond) -> [B, ...]`` (any callable/Module).
    """

    def __init__(self, score_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.score_fn = score_fn

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """``ε̂`` ``[B, ...]`` at ``x_t`` ``[B, ...]``, ``sigma`` ``[B]``."""
        return score_to_eps(self.score_fn(x, sigma, **cond), sigma)


_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class DiffusersAdapter(_Adapter):
    """Score from a ``diffusers`` ``UNet2DModel`` (VP, discrete DDPM timesteps).

    ε-, v- and sample-prediction (``prediction_type`` as in ``DDPMScheduler.config``). The
    model receives exactly what diffusers' own training loop feeds it:

    - σ on the integer grid: :meth:`sigma` gives diffusers' ``sqrt(1 − ᾱ_t)`` bit for bit (in the
      data's dtype, as ``scheduler.add_noise`` computes it), and :meth:`timestep` maps it back
      to the integer ``t`` exactly (the σ table is strictly increasing in float32 and float64 for
      the linear, scaled-linear and cosine tables of 1000 steps); :meth:`alpha` gives
      diffusers' ``sqrt(ᾱ_t)`` there, so ``α x + σ ε`` equals ``scheduler.add_noise(x, ε, t)``.
    - any other σ: the fractional step whose log-SNR is ``log(α²/σ²)``, interpolated linearly
      in log-SNR between integer steps (``VPSchedule.sigma_to_t``), ``α = sqrt(1 − σ²)``.
    - or pass ``timestep=`` (``[B]``, e.g. diffusers' ``LongTensor``) as a keyword: the model
      gets it unchanged.

    ``diffusers`` is never imported here: any module returning an object with ``.sample``
    (or a tensor) works. Zero-terminal-SNR tables (``ᾱ_{N−1} = 0``) are not supported.

    Args:
        unet: the network (e.g. ``diffusers.UNet2DModel``).
        alphas_cumprod: ``[N]`` ``ᾱ`` table (e.g. ``scheduler.alphas_cumprod``), kept in its
            own dtype and cast to the data's dtype on use, as diffusers does.
        prediction_type: ``"epsilon"`` (default), ``"v_prediction"`` or ``"sample"``.

    Example:
        >>> ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> ad = DiffusersAdapter(lambda x, t: x, ac)
        >>> ad.timestep(ad.sigma(torch.tensor([0, 999]))).tolist()
        [0.0, 999.0]
    """

    def __init__(
        self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"
    ) -> None:
        if prediction_type not in _PREDICTIONS:
            raise VarRedError(
                f"prediction_type: expected one of {_PREDICTIONS}, got {prediction_type!r}"
            )
        table = torch.as_tensor(alphas_cumprod).detach()
        schedule = VPSchedule(alphas_cumprod=table.to(torch.float64))
        super().__init__(unet, schedule, "t")
        self.prediction_type = prediction_type
        self._table = table.cpu()
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def _grid(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(ᾱ, sqrt(1 − ᾱ))`` ``[N]`` in ``dtype`` on ``device``, computed as diffusers does."""
        key = (dtype, device)
        if key not in self._cache:
            ac = self._table.to(device=device).to(dtype=dtype)
            self._cache[key] = (ac, (1 - ac) ** 0.5)
        return self._cache[key]

    def sigma(self, timesteps: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Diffusers' noise level ``sqrt(1 − ᾱ_t)`` ``[B]`` in ``dtype`` for integer ``timesteps`` ``[B]``."""
        if not isinstance(timesteps, Tensor) or timesteps.is_floating_point():
            got = (
                shape_str(timesteps) if isinstance(timesteps, Tensor) else type(timesteps).__name__
            )
            raise VarRedError(f"timesteps: expected an integer tensor, got {got}")
        _, sig = self._grid(dtype, timesteps.device)
        return sig[timesteps]

    def _snap(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(j, hit, ᾱ)``: the grid step ``j`` ``[B]`` with ``σ_j == σ`` where ``hit`` ``[B]``."""
        ac, tab = self._grid(sigma.dtype, sigma.device)
        j = torch.searchsorted(tab, sigma.detach().contiguous()).clamp(max=tab.numel() - 1)
        return j, tab[j] == sigma, ac

    def timestep(self, sigma: Tensor) -> Tensor:
        """Model timestep ``[B]`` (``sigma``'s dtype): the integer ``t`` where ``σ`` is on the
        grid (exact round trip of :meth:`sigma`), the fractional log-SNR step elsewhere."""
        check_floating("sigma", sigma)
        j, hit, _ = self._snap(sigma)
        frac = self.schedule.sigma_to_t(sigma.detach().to(torch.float64))  # type: ignore[union-attr]
        return torch.where(hit, j.to(sigma.dtype), frac.to(sigma.dtype))

    def model_time(self, sigma: Tensor) -> Tensor:
        """What the UNet receives as ``timestep`` for ``sigma`` ``[B]`` (:meth:`timestep`)."""
        return self.timestep(sigma)

    def alpha(self, sigma: Tensor) -> Tensor:
        """Signal scale ``[B]``: diffusers' ``sqrt(ᾱ_t)`` on the grid, ``sqrt(1 − σ²)`` elsewhere."""
        j, hit, ac = self._snap(sigma)
        return torch.where(hit, ac[j] ** 0.5, torch.sqrt(1 - sigma**2))

    def mse_weighting(self, num_elements: int) -> Callable[[Tensor], Tensor]:
        """``λ(σ)`` that makes ``dsm_loss`` equal diffusers' per-sample MSE for this prediction type.

        With ``D = num_elements`` (``C·H·W``): ε: ``λ = σ²/D`` (``mse(ε̂, ε)``); sample:
        ``λ = σ²/D`` (``train_unconditional.py``'s SNR-weighted ``(α²/σ²) mse(x̂0, x)``);
        v: ``λ = σ²/(α² D)`` (``mse(v̂, scheduler.get_velocity(x, ε, t))``).
        """
        if isinstance(num_elements, bool) or not isinstance(num_elements, int) or num_elements < 1:
            raise VarRedError(f"num_elements: expected a positive integer, got {num_elements!r}")
        d = float(num_elements)
        if self.prediction_type == "v_prediction":
            return lambda sigma: sigma**2 / (self.alpha(sigma) ** 2 * d)
        return lambda sigma: sigma**2 / d

    def _call(self, x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        if sigma.shape != x.shape[:1]:
            raise VarRedError(f"sigma: expected shape [{x.shape[0]}], got {shape_str(sigma)}")
        t = cond.pop("timestep", None)
        if t is None:
            t = self.timestep(sigma).to(x.dtype)
        elif not isinstance(t, Tensor) or t.shape != sigma.shape:
            raise VarRedError(
                f"timestep: expected a tensor of shape [{x.shape[0]}], got {shape_str(t)}"
            )
        out = self.model(x, t, **cond)
        out = out if isinstance(out, Tensor) else out.sample
        if out.shape != x.shape:
            raise VarRedError(
                f"unet: expected an output of the shape of x {shape_str(x)}, got {shape_str(out)}"
            )
        return out

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Score ``[B, C, H, W]`` at ``x_t`` ``[B, C, H, W]``, ``sigma`` ``[B]`` in (0, 1).

        ``cond`` goes to the UNet; a ``timestep=`` tensor ``[B]`` replaces :meth:`timestep`.
        """
        out = self._call(x, sigma, dict(cond))
        alpha = self.alpha(sigma)
        if self.prediction_type == "sample":
            return x0_to_score(out, x, sigma, alpha)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, x, sigma, alpha)
        return eps_to_score(out, sigma)


class DiffusersEpsAdapter(DiffusersAdapter):
    """Deprecated alias of :class:`DiffusersAdapter` (the name predates v-/sample-prediction)."""

    def __init__(
        self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"
    ) -> None:
        warnings.warn(
            "DiffusersEpsAdapter is deprecated; use DiffusersAdapter (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(unet, alphas_cumprod, prediction_type)
