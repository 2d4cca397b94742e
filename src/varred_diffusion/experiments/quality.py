"""Fréchet distance of a score model's samples to held-out images, on classifier features.

``FrechetEvaluator`` holds the feature classifier (:mod:`.classifier`) and the feature
statistics of ``N`` held-out images (computed once); ``evaluate(images)`` embeds ``N``
generated images and returns the Fréchet distance (:mod:`.frechet`);
``evaluate_model`` first draws them with the deterministic EDM Heun sampler
(:mod:`.heun`, Karras et al., 2022, Algorithm 1) from noise drawn from the caller's
generator.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from varred.errors import VarRedError
from varred_diffusion.experiments.classifier import (
    ClassifierSettings,
    FeatureClassifier,
    load_or_train_classifier,
)
from varred_diffusion.experiments.datasets import load_dataset
from varred_diffusion.experiments.frechet import (
    FeatureStatistics,
    feature_statistics,
    frechet_distance_features,
    image_features,
)
from varred_diffusion.experiments.heun import DEFAULT_HEUN_STEPS, edm_sigma_steps, heun_sample

__all__ = ["DEFAULT_FRECHET_COUNT", "FrechetEvaluator", "fashion_mnist_evaluator"]

DEFAULT_FRECHET_COUNT = 2000


@dataclass(frozen=True)
class FrechetEvaluator:
    """Fréchet distance against fixed reference images.

    Attributes:
        classifier: feature extractor (``features(x [B, 1, 28, 28]) -> [B, D]``), eval mode, CPU.
        reference: feature statistics of the held-out reference images.
        batch_size: rows per classifier forward.
    """

    classifier: FeatureClassifier
    reference: FeatureStatistics
    batch_size: int = 500

    @classmethod
    def from_images(
        cls, classifier: FeatureClassifier, reference_images: Tensor, *, batch_size: int = 500
    ) -> FrechetEvaluator:
        """Embed ``reference_images`` ``[N, 1, 28, 28]`` once and keep their statistics."""
        feats = image_features(classifier.features, reference_images.cpu(), batch_size=batch_size)
        return cls(classifier, feature_statistics(feats), batch_size)

    @property
    def count(self) -> int:
        """Number ``N`` of reference images."""
        return self.reference.count

    def features(self, images: Tensor) -> Tensor:
        """Classifier features ``[N, D]`` of ``images`` ``[N, 1, 28, 28]`` (clamped to [-1, 1])."""
        return image_features(self.classifier.features, images.cpu(), batch_size=self.batch_size)

    def evaluate(self, images: Tensor) -> float:
        """Fréchet distance between ``images`` ``[N, 1, 28, 28]`` and the reference set."""
        return frechet_distance_features(self.features(images), self.reference)

    def sample(
        self,
        score_fn: Callable[[Tensor, Tensor], Tensor],
        generator: torch.Generator,
        *,
        count: int | None = None,
        steps: int = DEFAULT_HEUN_STEPS,
        sigma_min: float = 0.01,
        sigma_max: float = 10.0,
        device: torch.device | str = "cpu",
        batch_size: int = 500,
    ) -> Tensor:
        """``count`` (default ``N``) Heun samples ``[count, 1, 28, 28]`` of ``score_fn``."""
        n = self.count if count is None else int(count)
        if n < 2:
            raise VarRedError(f"count: expected >= 2 samples, got {n}")
        noise = torch.randn((n, 1, 28, 28), generator=generator).to(device)
        sig = edm_sigma_steps(steps, sigma_min, sigma_max, dtype=torch.float32)
        return heun_sample(score_fn, noise, sig, batch_size=batch_size)

    def evaluate_model(
        self,
        score_fn: Callable[[Tensor, Tensor], Tensor],
        generator: torch.Generator,
        **sample_kwargs: object,
    ) -> float:
        """Fréchet distance of ``N`` Heun samples of ``score_fn`` (see :meth:`sample`)."""
        return self.evaluate(self.sample(score_fn, generator, **sample_kwargs))  # type: ignore[arg-type]


def fashion_mnist_evaluator(
    *,
    count: int = DEFAULT_FRECHET_COUNT,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: ClassifierSettings | None = None,
    progress: bool = False,
) -> tuple[FrechetEvaluator, float]:
    """The Fashion-MNIST evaluator: cached classifier, the first ``count`` test images as reference.

    Trains the classifier on the 60,000 training images on first use (about 3.5
    CPU-minutes with the default settings) and caches it (see ``load_or_train_classifier``).

    Returns:
        ``(evaluator, classifier test accuracy on all 10,000 test images)``.
    """
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    if not 2 <= count <= len(test):
        raise VarRedError(f"count: expected 2 <= count <= {len(test)}, got {count}")
    clf, acc = load_or_train_classifier(
        train.images, train.labels, train.sha256, settings, cache_dir=cache_dir,
        test_images=test.images, test_labels=test.labels, progress=progress,
    )  # fmt: skip
    return FrechetEvaluator.from_images(clf, test.images[:count]), acc
