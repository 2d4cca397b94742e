"""``Batch``: one training step's per-sample tensors, resolved and checked once.

Every per-sample quantity of a step (σ, α, λ, the importance weight, the regression
target's noise, keyword tensors of the score network) is resolved to ``[B]`` (or
``[B, ...]``) when the batch is made, so that the parts of a recipe never broadcast again
and a batch can be reordered or split by σ bin with :meth:`Batch.rows` (every per-sample
argument follows its rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from varred_diffusion.broadcast import append_dims, take_rows

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """Per-sample tensors of one step (``B`` rows).

    Attributes:
        x: clean data ``[B, ...]``.
        sigma: noise levels ``[B]``.
        noise: ε ``[B, ...]`` (the noise that made ``xt``).
        alpha: signal scale ``[B]`` (ones for VE).
        lam: λ(σ) ``[B]``, or ``None`` for the default ``σ²`` (exactly the factor 1).
        weight: importance weight ``[B]`` of the σ draw, or ``None`` (all ones).
        score_kwargs: extra keyword arguments of the score network; tensors whose first
            dimension is ``B`` are per-sample and follow their rows.
    """

    x: Tensor
    sigma: Tensor
    noise: Tensor
    alpha: Tensor
    lam: Tensor | None = None
    weight: Tensor | None = None
    score_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """``B``."""
        return self.x.shape[0]

    @property
    def x0(self) -> Tensor:
        """The clean point ``α x`` ``[B, ...]`` (the Taylor controls' expansion point)."""
        return append_dims(self.alpha, self.x.ndim) * self.x

    @property
    def xt(self) -> Tensor:
        """The noisy input ``α x + σ ε`` ``[B, ...]``."""
        return self.x0 + append_dims(self.sigma, self.x.ndim) * self.noise

    def lam_or_default(self) -> Tensor:
        """λ ``[B]`` with the default ``σ²`` made explicit."""
        return self.sigma * self.sigma if self.lam is None else self.lam

    def weighted(self, values: Tensor) -> Tensor:
        """``w ⊙ values`` ``[B]`` (``values`` unchanged when there are no weights)."""
        return values if self.weight is None else self.weight.to(values.dtype) * values

    def rows(self, index: Tensor | slice) -> Batch:
        """The batch of rows ``index`` (a permutation, a subset or a slice)."""
        b = self.size

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Batch(
            x=self.x[index],
            sigma=self.sigma[index],
            noise=self.noise[index],
            alpha=self.alpha[index],
            lam=pick(self.lam),
            weight=pick(self.weight),
            score_kwargs=take_rows(self.score_kwargs, index, b),
        )
