"""A training step as a recipe of four parts: noise-level sampler, weighting, target, control.

Diffusion users make four independent choices; each is a small protocol here, and
:class:`Recipe` holds one of each (``None`` = the trivial part) and builds the
:class:`varred_diffusion.TrainingStep` that composes them. Plain DSM is the recipe of trivial
parts, bit for bit. The leaderboard, the reproduction commands and ``auto`` iterate over
recipes (``docs/architecture.md`` draws one step's data flow).

| part | protocol | trivial part |
|---|---|---|
| sampler | ``sample(n, generator, *, dtype, device) -> (sigma [n], weight [n])`` | σ given by the caller |
| weighting | ``weighting(sigma [B]) -> λ [B]`` (+ optional ``regulariser``) | λ = σ² |
| target | ``target(x, sigma, noise, alpha, xt) -> ε̃ [B, ...]`` | ε |
| control | ``values(...)`` zero-mean per sample, with a coefficient layout | none |
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred_diffusion.training_step import TrainingStep

__all__ = [
    "NoiseLevelSampler",
    "Recipe",
    "Target",
    "WeightingPart",
]


@runtime_checkable
class NoiseLevelSampler(Protocol):
    """Draws σ per sample and the importance weight that keeps the user's objective.

    ``weight = p_objective(σ) / q(σ)`` (mean 1 under the proposal ``q``), so that
    ``E_q[w ℓ] = E_p[ℓ]``; a sampler whose own density defines the objective returns ones
    and sets ``changes_objective = True``. Adaptive samplers also have
    ``update(sigma [B], losses [B])``, called by the step after each backward.
    """

    changes_objective: bool

    def sample(
        self,
        n: int,
        generator: torch.Generator | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class WeightingPart(Protocol):
    """``λ(σ)`` ``[B]`` multiplying ``‖s + ε̃/σ‖²``; a learned one may add ``regulariser(σ)``."""

    def __call__(self, sigma: Tensor) -> Tensor: ...


@runtime_checkable
class Target(Protocol):
    """The ``ε̃`` the loss regresses onto: ``(λ/σ²)‖σ s(x_t) + ε̃‖²``; plain DSM's is ``ε``."""

    def __call__(
        self, x: Tensor, sigma: Tensor, noise: Tensor, alpha: Tensor, xt: Tensor
    ) -> Tensor: ...


@dataclass(frozen=True)
class Recipe:
    """One choice of each part, built into a :class:`TrainingStep` per model.

    Args:
        sampler: a :class:`NoiseLevelSampler`, or ``None`` (σ passed to every step call).
        weighting: λ(σ): ``None`` (σ²), a float, a ``[B]`` tensor or a callable.
        target: a :class:`Target`, or ``None`` (ε).
        control: a control part (:class:`varred_diffusion.TaylorControl`,
            :class:`varred_diffusion.AntitheticPairs`) or ``None``.
        layout: the coefficient layout of the control's β (``varred.CoefficientLayout``:
            granularity × groups, e.g. σ bins, × shrinkage); ``None``: per-element, one group.
        coefficient: ``"running"``, ``"per_sample"`` or a fixed float β.
        coefficient_options: further ``varred.GradientControl`` options (``warmup_steps``,
            ``decay``, ``process_group``, …).
        name: a label for tables.

    ``build`` deep-copies the stateful parts (an adaptive sampler, a learned weighting), so
    one recipe builds independent steps for several seeds.

    Example:
        >>> import varred_diffusion as vd
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> recipe = vd.Recipe(control=vd.TaylorControl(order=0), name="C^0")
        >>> step = recipe.build(lambda y, s: net(y), net.parameters())
    """

    sampler: Any = None
    weighting: Any = None
    target: Any = None
    control: Any = None
    layout: Any = None
    coefficient: str | float = "running"
    coefficient_options: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.sampler is not None and not callable(getattr(self.sampler, "sample", None)):
            raise VarRedError(
                f"sampler: expected an object with sample(n, generator), got "
                f"{type(self.sampler).__name__}"
            )
        if self.target is not None and not callable(self.target):
            raise VarRedError(
                f"target: expected a callable target(x, sigma, noise, alpha, xt), got "
                f"{type(self.target).__name__}"
            )
        if self.control is not None and not callable(getattr(self.control, "values", None)):
            raise VarRedError(
                f"control: expected a control part with values(...), got "
                f"{type(self.control).__name__}"
            )
        clash = {"layout", "coefficient", "granularity", "num_groups", "shrinkage"}
        bad = sorted(clash & set(self.coefficient_options))
        if bad:
            raise VarRedError(
                f"coefficient_options: {bad} are Recipe fields (layout, coefficient); "
                "give them there, not in coefficient_options"
            )

    def build(
        self,
        score_fn: Callable[..., Tensor],
        params: Iterable[torch.nn.Parameter],
        *,
        alpha: Any = None,
        validate: bool = True,
    ) -> TrainingStep:
        """A fresh :class:`TrainingStep` of this recipe for ``score_fn`` and ``params``."""
        params = list(params)
        coefficients = None
        needs_beta = self.control is not None and getattr(self.control, "needs_coefficients", True)
        if needs_beta:
            opts: dict[str, Any] = {"validate": validate, **dict(self.coefficient_options)}
            if self.layout is not None:
                opts["layout"] = self.layout
            coefficients = GradientControl(params, coefficient=self.coefficient, **opts)
        return TrainingStep(
            score_fn,
            params,
            sampler=copy.deepcopy(self.sampler),
            weighting=copy.deepcopy(self.weighting),
            target=copy.deepcopy(self.target),
            control=self.control,
            coefficients=coefficients,
            alpha=alpha,
            validate=validate,
        )

    def describe(self) -> str:
        """One line naming each non-trivial part."""
        parts = []
        for label in ("sampler", "weighting", "target", "control", "layout"):
            v = getattr(self, label)
            if v is not None:
                parts.append(f"{label}={_short(v)}")
        if self.control is not None and getattr(self.control, "needs_coefficients", True):
            parts.append(f"coefficient={self.coefficient!r}")
        return ", ".join(parts) or "plain DSM"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else type(v).__name__
