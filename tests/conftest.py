"""Shared fixtures: float64 by default in statistical tests, fixed seeds, hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(int(os.environ.get("VARRED_TEST_THREADS", "1")))


@pytest.fixture
def seed() -> int:
    """The one seed statistical tests start from (change it and they must still pass)."""
    return int(os.environ.get("VARRED_TEST_SEED", "20241126"))


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed``: the only randomness tests use."""
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
