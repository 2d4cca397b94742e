"""Loss weightings λ(σ) of the literature, as the λ that multiplies ``‖s + ε/σ‖²`` (DSM form).

A weighting is a callable ``sigma [B] -> λ [B]`` for ``dsm_loss(..., weighting=)`` and
``dsm_taylor_cv(..., weighting=)``: the per-sample loss is ``λ(σ) ‖s_θ(x_t, σ) + ε/σ‖²``
(default ``λ = σ²``). Papers state weights on the MSE of a parameterisation; with
``x_t = α x + σ ε``, SNR ``= α²/σ²`` and the score residual ``r = s + ε/σ``:

.. math::
    ‖\\hat ε − ε‖² = σ² ‖r‖², \\quad ‖\\hat x_0 − x‖² = \\frac{σ^4}{α^2} ‖r‖² = \\frac{σ^2}{\\mathrm{SNR}} ‖r‖²,
    \\quad ‖\\hat v − v‖² = \\frac{σ^2}{α^2} ‖r‖²,

the last for any v with ``ε̂ − ε = α (v̂ − v)``: VP v-prediction ``v = α ε − σ x``
(Salimans & Ho, 2022) and rectified-flow velocity ``v = ε − x`` (α = 1 − t, σ = t). So a
weight ``w`` on a form's MSE is ``λ = w σ²`` (ε), ``w σ⁴/α²`` (x0), ``w σ²/α²`` (v)
(:func:`lambda_from_form_weight`). The weighting decides the objective, not the
parameterisation: one λ is one objective whichever network output you train.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from varred.errors import VarRedError, check_floating

__all__ = [
    "PREDICTION_FORMS",
    "EDMWeighting",
    "LearnedUncertainty",
    "MinSNRWeighting",
    "lambda_from_form_weight",
]

#: Parameterisations whose MSE a paper's weight multiplies (diffusers' ``prediction_type`` names).
PREDICTION_FORMS = ("epsilon", "sample", "v_prediction")


def _log_snr(schedule: Any, sigma: Tensor) -> Tensor:
    """``log(α²/σ²)`` ``[B]``: the schedule's, or VE's ``−2 log σ`` when ``schedule`` is None."""
    return -2 * torch.log(sigma) if schedule is None else schedule.log_snr(sigma)


def _alpha(schedule: Any, sigma: Tensor) -> Tensor:
    return torch.ones_like(sigma) if schedule is None else schedule.alpha(sigma)


def _check_form(prediction: str) -> str:
    if prediction not in PREDICTION_FORMS:
        raise VarRedError(f"prediction: expected one of {PREDICTION_FORMS}, got {prediction!r}")
    return prediction


def lambda_from_form_weight(
    weight: Tensor, sigma: Tensor, alpha: Tensor, prediction: str = "epsilon"
) -> Tensor:
    """The DSM-form λ ``[B]`` equivalent to a weight ``w`` ``[B]`` on the ``prediction`` form's MSE.

    ``λ = w σ²`` (epsilon), ``w σ⁴/α²`` (sample, x0), ``w σ²/α²`` (v_prediction / flow velocity).

    Example:
        >>> s, a = torch.tensor([0.6]), torch.tensor([0.8])
        >>> lambda_from_form_weight(torch.ones(1), s, a, "sample")  # σ⁴/α²
        tensor([0.2025])
    """
    form = _check_form(prediction)
    if form == "epsilon":
        return weight * sigma**2
    if form == "sample":
        return weight * sigma**4 / alpha**2
    return weight * sigma**2 / alpha**2


class MinSNRWeighting:
    """Min-SNR-γ (Hang et al., 2023, "Efficient diffusion training via Min-SNR weighting strategy").

    The paper's definition is on the x0-MSE: ``w_t = min(SNR, γ)``, i.e. the objective
    ``min(SNR, γ) ‖x̂_0 − x‖²``. The same objective in the other forms (paper §3.4) is
    ``min(SNR, γ)/SNR · ‖ε̂ − ε‖²`` and ``min(SNR, γ)/(SNR + 1) · ‖v̂ − v‖²`` (VP; for
    rectified-flow velocity ``min(SNR, γ) t²``), all one λ:

    .. math:: λ(σ) = σ^2 \\min(1, γ/\\mathrm{SNR}) = σ^2 \\frac{\\min(\\mathrm{SNR}, γ)}{\\mathrm{SNR}}.

    Weighting the v-MSE by ``min(SNR, γ)/SNR`` (the ε-form weight, a common slip) is a
    *different* objective: λ larger by ``1/α² = 1 + 1/SNR``, i.e. more weight at high noise.

    Args:
        gamma: ``γ > 0`` (the paper: 5).
        schedule: gives ``log_snr`` (and ``alpha`` for :meth:`loss_weight`); ``None``: VE
            (SNR = 1/σ²).

    Raises:
        VarRedError: ``gamma ≤ 0`` or not finite.

    Example:
        >>> w = MinSNRWeighting(gamma=5.0)
        >>> w(torch.tensor([0.1, 1.0]))  # VE: SNR = 100 (clipped) and 1
        tensor([5.0000e-04, 1.0000e+00])
    """

    def __init__(self, gamma: float = 5.0, schedule: Any = None) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise VarRedError(f"gamma: expected a number > 0, got {gamma!r}")
        if math.isinf(gamma):
            raise VarRedError(
                f"gamma: expected a finite number (use λ = σ² for no clipping), got {gamma}"
            )
        self.gamma = float(gamma)
        self.schedule = schedule

    def snr(self, sigma: Tensor) -> Tensor:
        """``α²/σ²`` ``[B]``."""
        return torch.exp(_log_snr(self.schedule, check_floating("sigma", sigma)))

    def __call__(self, sigma: Tensor) -> Tensor:
        """λ(σ) ``[B]`` for ``sigma`` ``[B]``."""
        check_floating("sigma", sigma)
        clip = (self.gamma * torch.exp(-_log_snr(self.schedule, sigma))).clamp(max=1.0)
        return sigma**2 * clip

    def loss_weight(self, sigma: Tensor, prediction: str = "epsilon") -> Tensor:
        """The paper's weight ``w_t`` ``[B]`` on the ``prediction`` form's MSE (same objective).

        ``sample``: ``min(SNR, γ)``; ``epsilon``: ``min(SNR, γ)/SNR``; ``v_prediction``:
        ``min(SNR, γ) σ²`` (``= min(SNR, γ)/(SNR + 1)`` in VP, ``min(SNR, γ) t²`` for flow).
        """
        form = _check_form(prediction)
        snr = self.snr(sigma)
        m = snr.clamp(max=self.gamma)
        if form == "sample":
            return m
        if form == "epsilon":
            return m / snr
        return m * sigma**2


class EDMWeighting:
    """EDM's loss weight (Karras et al., 2022, Eq. 8 / Table 1) as a DSM-form λ.

    EDM weights the denoiser MSE ``‖D(x + σ̃ ε) − x‖²`` by ``λ_EDM(σ̃) = (σ̃² + σ_d²)/(σ̃ σ_d)²``
    (σ̃ = σ/α, the VE-equivalent noise level; VE: σ̃ = σ). In DSM form (x0 form above):

    .. math:: λ(σ) = λ_\\mathrm{EDM}(σ̃)\\, σ̃^2 σ^2 \\;\\overset{\\mathrm{VE}}{=}\\; σ^2 (σ^2 + σ_d^2)/σ_d^2.

    Args:
        sigma_data: ``σ_d > 0`` (EDM: 0.5).
        schedule: ``None`` (VE) or a schedule with ``log_snr`` (σ̃ = e^{−log-SNR/2}).
    """

    def __init__(self, sigma_data: float = 0.5, schedule: Any = None) -> None:
        if (
            isinstance(sigma_data, bool)
            or not isinstance(sigma_data, (int, float))
            or not sigma_data > 0
        ):
            raise VarRedError(f"sigma_data: expected a number > 0, got {sigma_data!r}")
        self.sigma_data = float(sigma_data)
        self.schedule = schedule

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``λ_EDM(σ̃)`` ``[B]``: EDM's weight on the denoiser (x0) MSE."""
        st2 = torch.exp(-_log_snr(self.schedule, check_floating("sigma", sigma)))  # σ̃²
        sd2 = self.sigma_data**2
        return (st2 + sd2) / (st2 * sd2)

    def __call__(self, sigma: Tensor) -> Tensor:
        """λ(σ) ``[B]`` for ``sigma`` ``[B]``."""
        st2 = torch.exp(-_log_snr(self.schedule, check_floating("sigma", sigma)))
        return sigma**2 * (st2 + self.sigma_data**2) / self.sigma_data**2


class LearnedUncertainty(nn.Module):
    """EDM2's learned per-σ log-variance ``u(σ)``: loss ``ℓ/e^{u(σ)} + u(σ)`` (Karras et al., 2024).

    "Analyzing and improving the training dynamics of diffusion models" (EDM2), §5
    (uncertainty-based multi-task weighting, Kendall et al. 2018): ``u`` = a linear layer on
    Fourier features ``√2 cos(2π(f c + φ))`` of ``c = log(σ)/4`` (``f ~ N(0, 1)``,
    ``φ ~ U[0, 1)``, fixed buffers). At the optimum ``e^{u(σ)} = E[ℓ | σ]``, so every σ
    contributes ``≈ 1`` to the loss. As a recipe weighting: ``λ(σ) = base(σ) e^{−u(σ)}``
    (``__call__``) and ``regulariser(σ) = numel · u(σ)`` added to the per-sample loss; train
    its parameters jointly with the model. The linear layer starts at zero (``u = 0``: the
    base weighting). It changes the weighting (hence the objective) as it learns.

    Args:
        base: the fixed weighting (EDM2: ``EDMWeighting(0.5)``); ``None``: ``λ = σ²``.
        channels: Fourier features (EDM2: 128).
        numel: ``1`` for a per-sample loss summed over dimensions; EDM2 adds ``u`` per
            element (``Σ_e ℓ_e/e^u + d u``): pass ``numel = d`` for exactly that.
        generator: draws ``f`` and ``φ`` (default: a generator seeded with 0).

    Example:
        >>> lu = LearnedUncertainty(channels=8)
        >>> s = torch.tensor([0.1, 1.0])
        >>> lu(s).detach(), lu.regulariser(s).detach()  # at init: σ² and 0
        (tensor([0.0100, 1.0000]), tensor([0., 0.]))
    """

    freqs: Tensor
    phases: Tensor

    def __init__(
        self,
        base: Callable[[Tensor], Tensor] | None = None,
        channels: int = 128,
        numel: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise VarRedError(f"channels: expected a positive integer, got {channels!r}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
            raise VarRedError(f"numel: expected a positive integer, got {numel!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.base = base
        self.numel = numel

    def log_variance(self, sigma: Tensor) -> Tensor:
        """``u(σ)`` ``[B]`` in ``sigma``'s dtype."""
        check_floating("sigma", sigma)
        c = (torch.log(sigma) / 4).to(self.freqs.dtype)  # [B]
        feats = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)  # [B, C]
        return self.linear(feats.to(self.linear.weight.dtype)).squeeze(-1).to(sigma.dtype)

    def forward(self, sigma: Tensor) -> Tensor:
        """λ(σ) = base(σ) e^{−u(σ)} ``[B]`` (differentiable in this module's parameters)."""
        lam = sigma**2 if self.base is None else self.base(sigma)
        return lam * torch.exp(-self.log_variance(sigma))

    def regulariser(self, sigma: Tensor) -> Tensor:
        """``numel · u(σ)`` ``[B]``, added to the per-sample loss."""
        return self.numel * self.log_variance(sigma)
