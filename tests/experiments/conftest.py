"""Fixtures of the experiments tests: Fashion-MNIST when installed, a clear skip otherwise."""

from __future__ import annotations

import pytest

from varred_diffusion.experiments.datasets import dataset_missing_reason


def fashion_mnist_reason(split: str = "train") -> str | None:
    """Why Fashion-MNIST's ``split`` is unavailable here (None when it is installed)."""
    return dataset_missing_reason("fashion-mnist", split)


@pytest.fixture
def fashion_mnist_splits() -> None:
    """Skip the test (with the loader's reason) unless both Fashion-MNIST splits are installed."""
    for split in ("train", "test"):
        reason = fashion_mnist_reason(split)
        if reason is not None:
            pytest.skip(f"needs Fashion-MNIST ({reason})")
