"""Flow matching on the rectified-flow path ``x_t = (1 − t) x + t ε`` as a case of DSM.

Liu, Gong, Liu (2022), "Flow straight and fast: learning to generate and transfer data
with rectified flow"; Lipman et al. (2023), "Flow matching for generative modeling"
(conditional FM with the linear path, σ_min = 0). The velocity target is ``v = ε − x`` and
the per-sample loss ``‖v_θ(x_t, t) − (ε − x)‖²``. In this library's terms the path is a
schedule with ``α = 1 − t``, ``σ = t``; the score and the velocity are related by

.. math:: ε = x_t + (1 − t) v,\\qquad x = x_t − t v,\\qquad s = −\\frac{x_t + (1 − t) v}{t},

and with ``λ = σ²/α²`` the DSM loss of that score is the FM loss exactly:
``σ s + ε = (1 − t)(ε − x − v)``, so ``(λ/σ²)‖σ s + ε‖² = ‖v − (ε − x)‖²``.

The Taylor control ``C^k`` expands ``v_θ(·, t)`` about the clean point ``(1 − t) x`` in ``ε``
(``x_t = (1 − t)x + t ε``): ``T^k v = Σ_{j≤k} t^j/j! D^j v[ε^{⊗j}]``, ``h = ‖T^k v − (ε − x)‖²``,
``C^k = h − E_ε h``. For ``k ≥ 1`` the score's expansion is ``T^k s = −(y + (1 − t) T^k v)/t``
(the ``−y/t`` part is linear, so exact), and then ``dsm_taylor_cv`` with the mapping above
returns exactly this ``C^k``. For ``k = 0`` the score's constant term drops the linear
``−σε/t`` part, which would make it a different control; ``C^0`` is computed directly:
``C^0 = −2 (v_0 + x)ᵀε + ‖ε‖² − d``, ``v_0 = v_θ((1 − t)x, t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from varred.errors import VarRedError, check_finite, check_floating, check_order, shape_str
from varred_diffusion.broadcast import append_dims, per_sample
from varred_diffusion.losses import perturb
from varred_diffusion.taylor_cv import dsm_taylor_cv

__all__ = [
    "RectifiedFlowSchedule",
    "ScoreFromVelocity",
    "flow_matching_loss",
    "flow_matching_taylor_cv",
    "flow_matching_weighting",
    "score_to_velocity",
    "velocity_to_score",
]

VelocityFn = Callable[..., Tensor]


@dataclass(frozen=True)
class RectifiedFlowSchedule:
    """Rectified flow: ``α = 1 − σ``, ``σ = t ∈ [0, 1]``, log-SNR ``2 log((1 − t)/t)``.

    Example:
        >>> rf = RectifiedFlowSchedule()
        >>> rf.alpha(torch.tensor([0.25])), rf.log_snr(torch.tensor([0.5]))
        (tensor([0.7500]), tensor([0.]))
    """

    sigma_min: float = 0.0
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
            raise VarRedError(
                f"sigma_min, sigma_max: expected 0 <= sigma_min < sigma_max <= 1, got "
                f"{self.sigma_min}, {self.sigma_max}"
            )

    def alpha(self, sigma: Tensor) -> Tensor:
        """``α = 1 − σ``."""
        return 1 - sigma

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """``σ = t``."""
        return t

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """``t = σ``."""
        return sigma

    def log_snr(self, sigma: Tensor) -> Tensor:
        """``log(α²/σ²) = 2 (log(1 − σ) − log σ)``."""
        return 2 * (torch.log1p(-sigma) - torch.log(sigma))

    @staticmethod
    def sigma_from_log_snr(lam: Tensor) -> Tensor:
        """``σ = sigmoid(−λ/2)``."""
        return torch.sigmoid(-0.5 * lam)


def flow_matching_weighting(sigma: Tensor) -> Tensor:
    """The DSM-form λ ``[B]`` that makes ``dsm_loss`` the FM loss: ``λ = σ²/α² = t²/(1 − t)²``.

    The recipe's weighting part for flow matching (with ``alpha = 1 − t`` and the score of
    :class:`ScoreFromVelocity`). Other weightings (``MinSNRWeighting(schedule=
    RectifiedFlowSchedule())``) replace it: a λ is absolute, not a factor on this one.
    """
    return (sigma / (1 - sigma)) ** 2


def velocity_to_score(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """``s = −(x_t + (1 − t) v)/t``; ``v``, ``x_t`` ``[B, ...]``, ``t`` ``[B]``."""
    tt = append_dims(t, x_t.ndim)
    return -(x_t + (1 - tt) * v) / tt


def score_to_velocity(s: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """``v = −(t s + x_t)/(1 − t)`` (inverse of :func:`velocity_to_score`)."""
    tt = append_dims(t, x_t.ndim)
    return -(tt * s + x_t) / (1 - tt)


class ScoreFromVelocity(nn.Module):
    """Score function from a velocity network ``v_θ(x_t, t)`` on the rectified-flow path.

    Args:
        model: ``model(x_t [B, ...], time [B], **cond) -> v [B, ...]``.
        time_input: ``None`` passes ``t = σ``; a callable ``t [B] -> time [B]`` (e.g.
            ``lambda t: 1000 * t`` for SD3-style timestep inputs).

    Example:
        >>> sf = ScoreFromVelocity(lambda x, t: -x)  # v = −x_t
        >>> sf(torch.ones(1, 2), torch.tensor([0.5]))  # −(1 − 0.5)/0.5
        tensor([[-1., -1.]])
    """

    def __init__(
        self, model: VelocityFn, time_input: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        super().__init__()
        if time_input is not None and not callable(time_input):
            raise VarRedError(f"time_input: expected None or a callable, got {time_input!r}")
        self.model = model
        self.time_input = time_input

    def velocity(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """``v_θ(x_t, t)`` ``[B, ...]`` (checked shape)."""
        if t.shape != x.shape[:1]:
            raise VarRedError(f"sigma: expected shape [{x.shape[0]}], got {shape_str(t)}")
        time = t if self.time_input is None else self.time_input(t)
        v = self.model(x, time, **cond)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            raise VarRedError(
                f"model: expected an output of the shape of x {shape_str(x)}, got {shape_str(v)}"
            )
        return v

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Score ``[B, ...]`` at ``x_t`` ``[B, ...]``, ``sigma = t`` ``[B]`` in (0, 1]."""
        return velocity_to_score(self.velocity(x, sigma, **cond), x, sigma)


def _times(t: float | Tensor, x: Tensor, *, open_interval: bool, validate: bool) -> Tensor:
    tt = per_sample("t", t, x.shape[0], x)
    if validate:
        check_finite("t", tt)
        lo, hi = float(tt.min()), float(tt.max())
        bad = (lo <= 0 or hi >= 1) if open_interval else (lo < 0 or hi > 1)
        if bad:
            want = "in the open interval (0, 1)" if open_interval else "in [0, 1]"
            raise VarRedError(f"t: expected values {want}, got min {lo:.3g}, max {hi:.3g}")
    return tt


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x: Tensor,
    t: float | Tensor,
    noise: Tensor,
    *,
    velocity_kwargs: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Tensor:
    """Conditional flow-matching loss ``‖v_θ((1 − t)x + tε, t) − (ε − x)‖²`` per sample ``[B]``.

    Args:
        velocity_fn: ``velocity_fn(x_t [B, ...], t [B], **velocity_kwargs) -> [B, ...]``.
        x: clean data ``[B, ...]``.
        t: times ``[B]`` (or a float / 0-d tensor) in ``[0, 1]``.
        noise: ``ε`` ``[B, ...]``.
        velocity_kwargs: extra conditioning.
        validate: check finiteness and the range of ``t`` (host syncs).

    Returns:
        ``[B]`` losses, summed over non-batch dims, in ``x``'s dtype (at least float32).

    Raises:
        VarRedError: ``t`` outside ``[0, 1]``; ``noise`` or the output of another shape.

    Example:
        >>> x, eps = torch.zeros(2, 3), torch.ones(2, 3)
        >>> flow_matching_loss(lambda xt, t: torch.ones_like(xt), x, 0.5, eps)
        tensor([0., 0.])
    """
    check_floating("x", x)
    check_floating("noise", noise)
    if x.ndim < 1:
        raise VarRedError(f"x: expected a batch [B, ...], got shape {shape_str(x)}")
    if validate:
        check_finite("x", x)
    tt = _times(t, x, open_interval=False, validate=validate)
    xt = perturb(x, tt, noise, 1 - tt)
    v = velocity_fn(xt, tt, **dict(velocity_kwargs or {}))
    if not isinstance(v, Tensor) or v.shape != x.shape:
        raise VarRedError(
            f"velocity_fn: expected an output of the shape of x {shape_str(x)}, got {shape_str(v)}"
        )
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        resid = v.to(dtype) - (noise.to(dtype) - x.to(dtype))
        return resid.pow(2).flatten(1).sum(1) if x.ndim > 1 else resid.pow(2)


def flow_matching_taylor_cv(
    velocity_fn: VelocityFn,
    x: Tensor,
    t: float | Tensor,
    noise: Tensor,
    *,
    order: int = 1,
    expectation: str = "auto",
    probe_noise: Tensor | tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    velocity_kwargs: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Tensor:
    """Zero-mean Taylor control ``C^k`` ``[B]`` for :func:`flow_matching_loss` (module docstring).

    ``C^k = ‖T^k v − (ε − x)‖² − E_ε‖T^k v − (ε − x)‖²`` with ``v_θ(·, t)`` expanded about
    ``(1 − t) x``; ``E_ε C^k = 0`` for every θ, so its θ-gradient is a zero-mean control
    for the FM gradient. A velocity field of degree ``≤ k`` in ``x_t`` makes
    ``loss − C^k = E_ε loss`` exactly. Computed by ``dsm_taylor_cv`` (``α = 1 − t``,
    ``σ = t``, ``λ = t²/(1 − t)²``, the score of :func:`velocity_to_score`) for ``k ≥ 1``,
    directly for ``k = 0``. Same cost and options as ``dsm_taylor_cv``.

    Precision: the mapping divides by ``α² = (1 − t)²``, so for ``k ≥ 1`` in float32 the
    absolute error grows like ``1e-7/(1 − t)²`` (measured on a tanh MLP with values O(5):
    4e-7 at t ≤ 0.5, 4e-3 at t = 0.99, 0.3 at t = 0.999); float64 there, or clip t ≤ 0.99.
    The control pays at small t, where it is accurate.

    Args:
        velocity_fn: ``velocity_fn(x_t [N, ...], t [N], **velocity_kwargs) -> [N, ...]``;
            rows independent.
        x: clean data ``[B, ...]`` (at least 2 dims).
        t: times ``[B]`` (or scalar) in the open interval ``(0, 1)``.
        noise: the ε of the loss ``[B, ...]``.
        order, expectation, probe_noise, generator: as in ``dsm_taylor_cv``.
        velocity_kwargs: extra conditioning (batch tensors are tiled when stacked).
        validate: check finiteness and the range of ``t``.

    Returns:
        ``[B]`` control values, differentiable in the parameters of ``velocity_fn``.

    Raises:
        VarRedError: ``t`` outside ``(0, 1)``, and everything ``dsm_taylor_cv`` raises.
    """
    order = check_order(order)
    check_floating("x", x)
    if x.ndim < 2:
        raise VarRedError(
            f"x: expected shape [B, ...] with at least 2 dimensions, got {shape_str(x)}"
        )
    check_floating("noise", noise)
    if noise.shape != x.shape:
        raise VarRedError(f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}")
    if validate:
        check_finite("x", x)
    tt = _times(t, x, open_interval=True, validate=validate)
    kw = dict(velocity_kwargs or {})
    a = 1 - tt
    if order == 0:
        v0 = velocity_fn(append_dims(a, x.ndim) * x, tt, **kw)
        if not isinstance(v0, Tensor) or v0.shape != x.shape:
            raise VarRedError(
                f"velocity_fn: expected an output of the shape of x {shape_str(x)}, got {shape_str(v0)}"
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        e = noise.to(dtype)
        d = math.prod(x.shape[1:])
        lin = ((v0.to(dtype) + x.to(dtype)) * e).flatten(1).sum(1)
        return -2 * lin + e.pow(2).flatten(1).sum(1) - d

    def score_fn(y: Tensor, s: Tensor, **c: Any) -> Tensor:
        return velocity_to_score(velocity_fn(y, s, **c), y, s)

    lam = flow_matching_weighting(tt)
    return dsm_taylor_cv(
        score_fn,
        x,
        tt,
        noise,
        order=order,
        weighting=lam,
        alpha=a,
        expectation=expectation,
        probe_noise=probe_noise,
        generator=generator,
        score_kwargs=kw,
        validate=False,
    )
