"""Fréchet distance between two sets of features (the FID of Heusel et al., 2017).

.. math:: d²(μ_1, Σ_1; μ_2, Σ_2) = ‖μ_1 − μ_2‖² + tr Σ_1 + tr Σ_2 − 2 tr (Σ_1^{1/2} Σ_2 Σ_1^{1/2})^{1/2},

the squared 2-Wasserstein distance between ``N(μ_1, Σ_1)`` and ``N(μ_2, Σ_2)`` (Dowson &
Landau, 1982). ``tr (Σ_1 Σ_2)^{1/2}`` is computed in float64 from symmetric
eigen-decompositions only: ``Σ_1^{1/2} = V diag(√λ) Vᵀ`` (eigenvalues clipped at 0), then
the eigenvalues of the symmetric PSD ``Σ_1^{1/2} Σ_2 Σ_1^{1/2}`` (clipped at 0) whose
square roots sum to the trace. No non-symmetric ``sqrtm``, so no complex round-off parts
and no failure on singular covariances (``N`` below the feature dimension).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError, check_finite, shape_str

__all__ = [
    "FeatureStatistics",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "image_features",
    "trace_sqrt_product",
]


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, unbiased ``1/(N−1)``) of ``N`` features."""

    mean: Tensor
    cov: Tensor
    count: int


def feature_statistics(features: Tensor) -> FeatureStatistics:
    """Mean and unbiased covariance of ``features`` ``[N, D]`` in float64.

    Raises:
        VarRedError: not ``[N, D]`` with ``N ≥ 2``, or non-finite values.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise VarRedError(f"features: expected [N, D] with N >= 2, got {shape_str(features)}")
    check_finite("features", features)
    f = features.detach().to(torch.float64)
    mean = f.mean(0)
    c = f - mean  # [N, D]
    cov = c.T @ c / (f.shape[0] - 1)  # [D, D]
    return FeatureStatistics(mean, 0.5 * (cov + cov.T), int(f.shape[0]))


def _psd_sqrt(a: Tensor) -> Tensor:
    lam, v = torch.linalg.eigh(a)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(cov1: Tensor, cov2: Tensor) -> Tensor:
    """``tr (Σ_1 Σ_2)^{1/2}`` for symmetric PSD ``[D, D]`` matrices, as a float64 0-d tensor.

    Equals ``tr (Σ_1^{1/2} Σ_2 Σ_1^{1/2})^{1/2}`` (similar matrices, same eigenvalues).
    """
    a = cov1.to(torch.float64)
    b = cov2.to(torch.float64)
    r = _psd_sqrt(0.5 * (a + a.T))
    m = r @ (0.5 * (b + b.T)) @ r
    return torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance ``d²`` between ``N(mean1, cov1)`` and ``N(mean2, cov2)`` (float64).

    Args:
        mean1, mean2: ``[D]``.
        cov1, cov2: ``[D, D]`` symmetric positive semi-definite.

    Returns:
        ``d² ≥ 0`` as a Python float (tiny negative round-off is clipped to 0).

    Raises:
        VarRedError: shapes disagree or are not ``[D]`` / ``[D, D]``; non-finite entries.

    >>> i = torch.eye(2, dtype=torch.float64)
    >>> round(frechet_distance(torch.zeros(2), i, torch.ones(2), 4 * i), 12)  # 2 + 2 + 8 - 2·2·2
    4.0
    """
    d = mean1.shape[0] if mean1.ndim == 1 else -1
    for name, t, shape in (("mean1", mean1, (d,)), ("mean2", mean2, (d,)),
                           ("cov1", cov1, (d, d)), ("cov2", cov2, (d, d))):  # fmt: skip
        if d < 1 or tuple(t.shape) != shape:
            raise VarRedError(f"{name}: expected shape {list(shape)}, got {shape_str(t)}")
        check_finite(name, t)
    diff = mean1.to(torch.float64) - mean2.to(torch.float64)
    tr = cov1.to(torch.float64).trace() + cov2.to(torch.float64).trace()
    value = diff @ diff + tr - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(0.0, float(value))


def frechet_distance_features(
    features1: Tensor | FeatureStatistics, features2: Tensor | FeatureStatistics
) -> float:
    """Fréchet distance between two feature sets ``[N1, D]``, ``[N2, D]`` (or their statistics)."""
    s1 = features1 if isinstance(features1, FeatureStatistics) else feature_statistics(features1)
    s2 = features2 if isinstance(features2, FeatureStatistics) else feature_statistics(features2)
    if s1.mean.shape != s2.mean.shape:
        raise VarRedError(
            f"features2: expected feature dimension {s1.mean.shape[0]}, got {s2.mean.shape[0]}"
        )
    return frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov)


@torch.no_grad()
def image_features(
    feature_fn: Callable[[Tensor], Tensor], images: Tensor, *, batch_size: int = 500
) -> Tensor:
    """``feature_fn`` applied to ``images`` ``[N, ...]`` in batches, without grad: ``[N, D]``.

    Images are clamped to ``[-1, 1]`` first (the classifier's input range; samples of a
    diffusion model may overshoot).
    """
    if images.ndim < 2 or images.shape[0] < 1:
        raise VarRedError(f"images: expected a batch [N, ...] with N >= 1, got {shape_str(images)}")
    if batch_size < 1:
        raise VarRedError(f"batch_size: expected >= 1, got {batch_size}")
    out = [
        feature_fn(images[i : i + batch_size].clamp(-1.0, 1.0)).detach().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)
