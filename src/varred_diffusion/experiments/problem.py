"""``Problem``: a score model at fixed θ and its data, the unit the leaderboard measures on.

Made by the toy (``leaderboard.toy_problem``) and MNIST (``mnist.mnist_problem``)
experiments; read by the leaderboard's harness. A module of its own so that the problems'
builders and the harness need not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Problem"]

Tensor = torch.Tensor


@dataclass
class Problem:
    """A model at fixed θ and its data, with the leaderboard's sizes for it.

    Attributes:
        name: label of the problem in the tables (``"toy-ring8"``, ``"mnist"``).
        model: score model ``(x [B, ...], sigma [B]) -> [B, ...]`` at the fixed θ.
        sample_x: ``sample_x(n, generator) -> x [n, ...]`` clean data (CPU).
        sigma_min, sigma_max: the noise-level range of the objective (log-uniform σ).
        dtype: dtype of the data and the model.
        batch: minibatch size ``B`` of every gradient estimator.
        orders: Taylor orders ``k`` measured on this problem.
        units: batches for fitting β and for evaluating (plain, k = 0).
        units_high: the same for k ≥ 1 (dearer controls).
        num_bins: log-σ bins of per-bin β and of the importance sampler.
        expectation: how the Taylor controls' means are computed (``TaylorControl``).
        timing_repeats: step calls timed per technique (median).
        device: where the model runs; batches are drawn on the CPU and moved there.
    """

    name: str
    model: torch.nn.Module
    sample_x: Callable[[int, torch.Generator], Tensor]
    sigma_min: float
    sigma_max: float
    dtype: torch.dtype
    batch: int
    orders: tuple[int, ...]
    units: int
    units_high: int
    num_bins: int = 4
    expectation: str = "auto"
    timing_repeats: int = 5
    device: str = "cpu"
