"""Deterministic validation loss: a fixed σ grid, fixed noise, fixed held-out images.

The training loss is a one-sample Monte Carlo estimate over (x, σ, ε) and too noisy to
compare runs. With everything but θ frozen,

.. math:: L_j(θ) = \\frac{1}{N} \\sum_{i=1}^N ℓ_θ(x_i, σ_j, ε_{ij}),  \\qquad
          L(θ) = \\frac{1}{J} \\sum_j L_j(θ),

is a deterministic function of θ: two runs (or two recipes) are compared on the same
draws (common random numbers). ``ℓ`` defaults to the DSM loss (Vincent, 2011) with
``λ = σ²``; any ``loss_fn(x, sigma, noise) -> [B]`` plugs in (e.g. flow matching at
``t = σ``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError, shape_str

__all__ = ["ValidationResult", "ValidationSet", "dsm_loss_fn", "validation_loss"]

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ValidationSet:
    """Frozen held-out images, noise level grid and noise (build with :meth:`build`).

    Attributes:
        images: ``[N, ...]`` held-out clean images.
        sigmas: ``[J]`` noise levels (float64; cast to the images' dtype when used).
        noise: ``[J, N, ...]`` standard normal draws, one per (σ, image).
    """

    images: Tensor
    sigmas: Tensor
    noise: Tensor

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.sigmas.shape[0] < 1 or bool((self.sigmas <= 0).any()):
            raise VarRedError(f"sigmas: expected [J] positive values, got {shape_str(self.sigmas)}")
        want = (self.sigmas.shape[0], *self.images.shape)
        if tuple(self.noise.shape) != want:
            raise VarRedError(f"noise: expected shape {list(want)}, got {shape_str(self.noise)}")

    @classmethod
    def build(
        cls,
        images: Tensor,
        generator: torch.Generator,
        *,
        size: int = 512,
        num_sigmas: int = 16,
        sigma_min: float = 0.01,
        sigma_max: float = 10.0,
    ) -> ValidationSet:
        """Pick ``size`` images (without replacement) and draw the noise, all from ``generator``.

        Args:
            images: the held-out pool ``[M, ...]`` (e.g. the test split).
            generator: the only randomness (CPU generator).
            size: images kept ``N ≤ M``.
            num_sigmas: ``J`` log-spaced levels from ``sigma_min`` to ``sigma_max``.
            sigma_min, sigma_max: the grid's ends (the training range).
        """
        if not 1 <= size <= images.shape[0]:
            raise VarRedError(f"size: expected 1 <= size <= {images.shape[0]}, got {size}")
        if num_sigmas < 1 or not 0 < sigma_min <= sigma_max:
            raise VarRedError(
                f"num_sigmas, sigma_min, sigma_max: expected >= 1 and 0 < min <= max, got "
                f"{num_sigmas}, {sigma_min}, {sigma_max}"
            )
        idx = torch.randperm(images.shape[0], generator=generator)[:size]
        x = images[idx.to(images.device)].clone()
        sig = torch.exp(
            torch.linspace(
                math.log(sigma_min), math.log(sigma_max), num_sigmas, dtype=torch.float64
            )
        )
        noise = torch.randn((num_sigmas, *x.shape), generator=generator, dtype=x.dtype)
        return cls(x, sig, noise.to(x.device))

    def to(self, device: torch.device | str) -> ValidationSet:
        """The same set on ``device``."""
        return ValidationSet(self.images.to(device), self.sigmas, self.noise.to(device))


@dataclass(frozen=True)
class ValidationResult:
    """Validation loss per σ ``[J]`` (with the standard error over images) and their mean."""

    sigmas: Tensor
    per_sigma: Tensor
    per_sigma_stderr: Tensor
    mean: float

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"val_loss": mean, "val_loss_s0": ..., ...}`` for CSV rows."""
        row = {"val_loss": self.mean}
        row.update({f"val_loss_s{j}": float(v) for j, v in enumerate(self.per_sigma)})
        return row


def dsm_loss_fn(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    weighting: Callable[[Tensor], Tensor] | None = None,
) -> LossFn:
    """``loss_fn(x, sigma, noise) -> [B]``: the per-sample DSM loss of ``score_fn`` (VE)."""
    from varred_diffusion.losses import dsm_loss

    def loss_fn(x: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        return dsm_loss(score_fn, x, sigma, noise, weighting=weighting, validate=False)

    return loss_fn


@torch.no_grad()
def validation_loss(
    vset: ValidationSet,
    score_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 256,
) -> ValidationResult:
    """The deterministic validation loss of a model on ``vset`` (no grad, batched).

    Args:
        vset: frozen images, σ grid and noise.
        score_fn: ``score_fn(x [B, ...], sigma [B]) -> [B, ...]``; DSM loss with ``λ = σ²``.
        loss_fn: instead of ``score_fn``: ``loss_fn(x [B, ...], sigma [B], noise [B, ...]) -> [B]``.
        batch_size: rows per forward.

    Returns:
        :class:`ValidationResult` (per σ ``[J]`` float64, mean over the grid).

    Raises:
        VarRedError: neither or both of ``score_fn`` and ``loss_fn``; a loss not ``[B]``.
    """
    if (score_fn is None) == (loss_fn is None):
        raise VarRedError("score_fn, loss_fn: expected exactly one of them, got "
                          f"{'both' if score_fn is not None else 'neither'}")  # fmt: skip
    fn = loss_fn if loss_fn is not None else dsm_loss_fn(score_fn)  # type: ignore[arg-type]
    n = vset.images.shape[0]
    means, ses = [], []
    for j in range(vset.sigmas.shape[0]):
        vals = []
        for start in range(0, n, batch_size):
            x = vset.images[start : start + batch_size]
            sig = torch.full((x.shape[0],), float(vset.sigmas[j]), dtype=x.dtype, device=x.device)
            v = fn(x, sig, vset.noise[j, start : start + batch_size])
            if v.shape != (x.shape[0],):
                raise VarRedError(f"loss_fn: expected [{x.shape[0]}] losses, got {shape_str(v)}")
            vals.append(v.detach().to(torch.float64).cpu())
        allv = torch.cat(vals)
        means.append(allv.mean())
        ses.append(allv.std() / math.sqrt(n) if n > 1 else torch.tensor(float("nan")))
    per = torch.stack(means)
    return ValidationResult(vset.sigmas, per, torch.stack(ses), float(per.mean()))
