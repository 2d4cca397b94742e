"""``Problem``: a score model at fixed θ and its data, the unit the leaderboard measures on.

Made by the toy (``leaderboard.toy_problem``) and MNIST (``mnist.mnist_problem``)
experiments; read by the leaderboard's harness. A module of its own so that the problems'
builders and the harness need not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from varred.errors import VarRedError
from varred_diffusion.flow import RectifiedFlowSchedule

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
        process: ``"ve"`` (``x + σ ε``, a score model, σ log-uniform) or ``"flow"``
            (rectified flow ``(1 − t) x + t ε`` with ``σ = t``, α = 1 − t; ``model`` is a
            ``ScoreFromVelocity``, the objective uniform in t on ``[sigma_min, sigma_max]``).
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
    process: str = "ve"

    def __post_init__(self) -> None:
        if self.process not in ("ve", "flow"):
            raise VarRedError(f"process: expected 've' or 'flow', got {self.process!r}")

    @property
    def alpha(self) -> Callable[[Tensor], Tensor] | None:
        """The steps' signal scale ``α(σ)``: ``1 − t`` for flow, ``None`` (α = 1) for VE."""
        return RectifiedFlowSchedule().alpha if self.process == "flow" else None
