"""Control parts of a recipe: the Taylor control ``C^k`` and antithetic noise pairs.

A control part gives zero-mean per-sample values ``[B]`` for a :class:`Batch` (``values``),
whose θ-gradients ``varred.GradientControl`` subtracts with fitted coefficients; or, like
:class:`AntitheticPairs`, shapes the batch itself and needs no coefficient
(``needs_coefficients = False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_order, shape_str
from varred_diffusion.batch import Batch
from varred_diffusion.broadcast import repeat_rows
from varred_diffusion.flow import flow_matching_taylor_cv
from varred_diffusion.sampling import antithetic_noise
from varred_diffusion.taylor_cv import k0_control, resolve_expectation, taylor_control

__all__ = ["AntitheticPairs", "FlowTaylorControl", "TaylorControl"]

GROUP_FORWARDS = ("split", "joint")


@dataclass(frozen=True)
class TaylorControl:
    """The DSM Taylor control ``C^k`` of Jeha et al. (2024) as a recipe part.

    Args:
        order: Taylor order ``k ≥ 0`` (k = 0: one extra forward at the clean point ``αx``,
            no derivatives; k ≥ 1: forward-mode AD, see ``dsm_taylor_cv``).
        expectation: the control's mean: ``"auto"``, ``"exact"``, ``"probe"`` or
            ``"hutchinson"`` (see ``resolve_expectation``).
        group_forward: with more than one coefficient group (σ bins), how the per-group
            control gradients are formed: ``"split"`` (default; the batch sorted by group,
            one control forward per group, so each group's backward covers its own rows; one
            host sync per step for the group sizes) or ``"joint"`` (one forward over the
            batch and one backward per group over all of it; sync-free).
        mean_method: the core's name for ``expectation`` (``varred.MeanMethod``); either works.
        stack: k = 0 only, joint forward only: one forward over ``[x_t ; αx]`` (fewer, larger
            kernels) instead of two of ``B`` rows. Same values either way.

    Raises:
        VarRedError: an invalid order, expectation (or one that cannot serve ``order``),
            ``group_forward``, or ``stack`` with ``order > 0``.
    """

    order: int = 0
    expectation: str = "auto"
    group_forward: str = "split"
    stack: bool = False
    mean_method: str | None = None
    needs_coefficients = True

    def __post_init__(self) -> None:
        if self.mean_method is not None:  # the core's name for expectation
            if self.expectation not in ("auto", self.mean_method):
                raise VarRedError(
                    f"mean_method: {self.mean_method!r} contradicts expectation="
                    f"{self.expectation!r}; give one"
                )
            object.__setattr__(self, "expectation", self.mean_method)
        check_order(self.order)
        resolve_expectation(self.expectation, self.order, 1)  # validates the name / order pair
        if self.group_forward not in GROUP_FORWARDS:
            raise VarRedError(
                f"group_forward: expected 'split' or 'joint', got {self.group_forward!r}"
            )
        if self.stack and self.order > 0:
            raise VarRedError(
                f"stack: the stacked [x_t ; αx] forward exists for order 0 only, got order="
                f"{self.order}"
            )

    @property
    def requires_finite_data(self) -> bool:
        """k ≥ 1 refuses non-finite data up front (forward-mode AD and probes would spread
        NaN into every mean); k = 0 leaves a NaN batch to the coefficients' nonfinite policy."""
        return self.order >= 1

    def values(
        self,
        score_fn: Callable[..., Tensor],
        batch: Batch,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample ``C^k`` ``[B]`` (unweighted), differentiable in θ."""
        method = resolve_expectation(self.expectation, self.order, batch.x[0].numel())
        return taylor_control(
            score_fn, batch.x0, batch.sigma, batch.noise, batch.lam_or_default(),
            self.order, method, generator=generator, score_kwargs=batch.score_kwargs,
        )  # fmt: skip

    def stacked_forward(
        self, score_fn: Callable[..., Tensor], batch: Batch
    ) -> tuple[Tensor, Tensor]:
        """``(s(x_t), C^0)`` from one forward over ``[x_t ; αx]`` ``[2B, ...]`` (``stack=True``)."""
        b, x0 = batch.size, batch.x0
        kw = repeat_rows(batch.score_kwargs, b, 2)
        out = score_fn(torch.cat([batch.xt, x0]), batch.sigma.repeat(2), **kw)  # [2B, ...]
        if not isinstance(out, Tensor) or out.shape != (2 * b, *x0.shape[1:]):
            raise VarRedError(
                f"score_fn: expected an output of shape [{2 * b}, ...] for the stacked input, "
                f"got {shape_str(out)}"
            )
        s_t, s_0 = out[:b], out[b:]
        return s_t, k0_control(s_0, batch.noise, batch.sigma, batch.lam_or_default())


@dataclass(frozen=True)
class AntitheticPairs:
    """Antithetic noise: rows ``i`` and ``i + B/2`` share ``x`` and σ and get ``ε``, ``−ε``.

    The first half of the given batch is paired with itself (``B/2`` distinct images per
    step of ``B`` rows), so every odd power of ε cancels within a pair. Alone it fits no
    coefficient; with an inner ``control`` (e.g. ``AntitheticPairs(TaylorControl(order=0))``)
    the pairs carry that control's values and coefficients too. Cost: half the distinct
    images per step. Noise given to the step is used as is (then it must already be
    antithetic for this part to mean anything).

    Args:
        control: a control part whose values the paired batch carries, or ``None``.
    """

    control: Any = None

    def __post_init__(self) -> None:
        if self.control is not None and not callable(getattr(self.control, "values", None)):
            raise VarRedError(
                f"control: expected a control part with values(...), got "
                f"{type(self.control).__name__}"
            )
        if callable(getattr(self.control, "pair", None)):
            raise VarRedError("control: AntitheticPairs inside AntitheticPairs pairs twice")

    @property
    def needs_coefficients(self) -> bool:
        """Whether the inner control fits coefficients (``False`` without one)."""
        return self.control is not None and getattr(self.control, "needs_coefficients", True)

    @property
    def requires_finite_data(self) -> bool:
        return bool(getattr(self.control, "requires_finite_data", False))

    @property
    def group_forward(self) -> str:
        return str(getattr(self.control, "group_forward", "joint"))

    @property
    def stack(self) -> bool:
        return bool(getattr(self.control, "stack", False))

    def pair(self, x: Tensor, sigma: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, ...]`` → ``[x[:B/2]; x[:B/2]]`` and σ likewise (σ ``None`` stays)."""
        b = x.shape[0]
        if b < 2 or b % 2:
            raise VarRedError(f"x: expected an even batch for antithetic pairs, got {b} rows")
        h = b // 2
        x = torch.cat([x[:h], x[:h]])
        if sigma is not None and sigma.ndim == 1:
            sigma = torch.cat([sigma[:h], sigma[:h]])
        return x, sigma

    def noise(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Paired noise ``[ε; −ε]`` like ``x``."""
        where = x.device if generator is None else generator.device
        noise = antithetic_noise(
            x.shape[0], tuple(x.shape[1:]), generator, dtype=x.dtype, device=where
        )
        return noise.to(x.device)  # drawn where the generator lives, then moved

    def values(
        self,
        score_fn: Callable[..., Tensor],
        batch: Batch,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """The inner control's values ``[B]`` on the paired batch (``None`` without one)."""
        if self.control is None:
            return None
        return self.control.values(score_fn, batch, generator)

    def stacked_forward(
        self, score_fn: Callable[..., Tensor], batch: Batch
    ) -> tuple[Tensor, Tensor]:
        """The inner control's stacked forward (``stack=True`` inner controls only)."""
        return self.control.stacked_forward(score_fn, batch)


@dataclass(frozen=True)
class FlowTaylorControl:
    """The flow-matching Taylor control ``C^k`` (``flow_matching_taylor_cv``) as a recipe part.

    For a step on the rectified-flow path (``alpha = 1 − σ``, ``σ = t``, weighting
    ``flow_matching_weighting`` so the step's loss is ``‖v − (ε − x)‖²``) whose ``score_fn`` is a
    ``ScoreFromVelocity``: expands the velocity network about ``(1 − t) x`` in ε. Its values are
    in the FM loss's units, so they pair with that loss one for one.

    Args:
        order: Taylor order ``k ≥ 0``.
        mean_method: ``"auto"``, ``"exact"``, ``"probe"`` or ``"hutchinson"``.
        group_forward: ``"split"`` or ``"joint"`` (as :class:`TaylorControl`).
    """

    order: int = 0
    mean_method: str = "auto"
    group_forward: str = "split"
    needs_coefficients = True
    stack = False

    def __post_init__(self) -> None:
        TaylorControl(self.order, self.mean_method, self.group_forward)  # validates

    @property
    def requires_finite_data(self) -> bool:
        """As :attr:`TaylorControl.requires_finite_data`."""
        return self.order >= 1

    def values(
        self,
        score_fn: Callable[..., Tensor],
        batch: Batch,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample flow-matching ``C^k`` ``[B]`` at ``t = batch.sigma``."""
        velocity = getattr(score_fn, "velocity", None)
        if not callable(velocity):
            raise VarRedError(
                f"score_fn: expected a ScoreFromVelocity (with .velocity) for FlowTaylorControl, "
                f"got {type(score_fn).__name__}"
            )
        return flow_matching_taylor_cv(
            velocity, batch.x, batch.sigma, batch.noise, order=self.order,
            expectation=self.mean_method, generator=generator,
            velocity_kwargs=batch.score_kwargs, validate=False,
        )  # fmt: skip
