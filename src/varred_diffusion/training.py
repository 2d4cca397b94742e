"""``ControlledDSM``: the 0.1 one-call controlled DSM step, now a recipe (compatibility wrapper).

``ControlledDSM(score_fn, params, order=k, bins=..., ...)`` builds the
:class:`varred_diffusion.TrainingStep` of the recipe "σ given by the caller, λ(σ), ε target,
``TaylorControl(k)`` with a ``CoefficientLayout(granularity, bins, shrinkage)``" and forwards
every call to it. New code composes the parts directly (``vd.Recipe`` / ``vd.TrainingStep``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.layout import CoefficientLayout
from varred_diffusion.controls import TaylorControl
from varred_diffusion.losses import Weighting
from varred_diffusion.training_step import TrainingStep

__all__ = ["ControlledDSM"]

Alpha = Callable[[Tensor], Tensor] | Tensor | float | None

_LAYOUT_KEYS = ("granularity", "layout", "coefficient", "decay")  # shrinkage and num_groups pass


class ControlledDSM:
    """Denoising score matching step with a Taylor control variate on the gradient.

    Args:
        score_fn: ``score_fn(x [N, ...], sigma [N], **score_kwargs) -> [N, ...]``.
        params: the parameters whose ``.grad`` is filled (e.g. ``model.parameters()``).
        order: Taylor order ``k`` of ``C^k`` (0: derivative-free, one extra forward of ``B``
            rows at the clean point).
        coefficient: ``"running"`` (β from earlier steps' statistics), ``"per_sample"``
            or a fixed float β (then equal to backpropagating ``mean(ℓ - β C)``).
        granularity: ``"element"``, ``"tensor"`` or ``"scalar"`` β.
        bins: optional ``SigmaBins``: one β per log-σ bin (C^k scales like 1/σ).
        expectation: mean of the CV: "auto", "exact", "probe" or "hutchinson".
        weighting: λ(σ) (see ``dsm_taylor_cv``; default σ²).
        alpha: signal scale: float, ``[B]`` tensor or callable ``sigma [B] -> alpha [B]``.
        enabled: ``False`` gives the plain DSM gradient, bit for bit.
        decay: running-statistics decay passed to ``GradientControl``.
        stack: k = 0 only: ``True`` runs one forward on ``[αx + σε ; αx]`` (fewer, larger
            kernels); ``False`` (default) two forwards of ``B``. With several σ bins it needs
            ``group_forward="joint"``; with ``order > 0`` it is refused (``VarRedError``).
        validate: input checks with host syncs in ``dsm_loss``, ``dsm_taylor_cv`` and
            ``GradientControl`` (its groups range check); ``False`` makes the step sync-free.
        group_forward: with σ bins (or ``groups``), how the per-bin control gradients are
            formed. ``"split"``: the batch is sorted by bin, the losses take one forward and
            the controls one forward per bin, so each bin's control backward covers only its
            own rows (about one backward in all; one host sync per step for the bin sizes).
            ``"joint"``: one forward over the batch and ``G`` backward passes over all of it
            (batched with vmap where possible; sync-free). ``"auto"`` (default): ``"split"``
            when GradientControl validates groups (a sync anyway), else ``"joint"``. Same
            gradient either way (up to summation order); costs: ``benchmarks/train_step.py``.
        control_kwargs: further keyword arguments for ``GradientControl`` (its default
            ``group_backward="auto"`` falls back to one backward per σ bin where vmap over a
            backward through forward-mode AD fails, e.g. GroupNorm under jvp in torch 2.13).
            ``num_groups`` here means the caller's own groups (pass ``groups=`` to each
            step); with ``bins`` too it is refused, since the bins define the groups.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> step = ControlledDSM(lambda y, s: net(y), net.parameters(), order=0)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8, 2, generator=g)
        >>> sigma = torch.full((8,), 0.1)
        >>> diag = step(x, sigma, torch.randn(8, 2, generator=g))
        >>> opt.step()
    """

    def __init__(
        self,
        score_fn: Callable[..., Tensor],
        params: Iterable[torch.nn.Parameter],
        *,
        order: int = 0,
        coefficient: str | float = "running",
        granularity: str = "element",
        bins: Any = None,
        expectation: str = "auto",
        weighting: Weighting = None,
        alpha: Alpha = None,
        enabled: bool = True,
        decay: float = 0.99,
        stack: bool = False,
        validate: bool = True,
        group_forward: str = "auto",
        control_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if group_forward not in ("auto", "split", "joint"):
            raise VarRedError(
                f"group_forward: expected 'auto', 'split' or 'joint', got {group_forward!r}"
            )
        extra = dict(control_kwargs or {})
        extra.setdefault("validate", validate)
        groups: Any = 1 if bins is None else bins
        if "num_groups" in extra:
            if bins is not None:
                raise VarRedError(
                    f"control_kwargs: num_groups={extra['num_groups']!r} conflicts with bins "
                    "(the bins define the groups); give one of them"
                )
            groups = extra.pop("num_groups")
        clash = sorted(set(extra) & set(_LAYOUT_KEYS))
        if clash:
            raise VarRedError(
                f"control_kwargs: {clash} are ControlledDSM arguments; give them there"
            )
        layout = CoefficientLayout(granularity, groups, extra.pop("shrinkage", None))
        if group_forward == "auto":  # 0.1 behaviour: split syncs once, as the groups check does
            group_forward = "split" if extra["validate"] else "joint"
        self.group_forward = group_forward
        self.order, self.bins, self.enabled = order, bins, bool(enabled)
        control = TaylorControl(order, expectation, group_forward, bool(stack))
        params = [p for p in params if p.requires_grad]
        if not params:
            raise VarRedError(
                "params: expected at least one parameter with requires_grad, got none"
            )
        coefficients = GradientControl(
            params, layout=layout, coefficient=coefficient, decay=decay, **extra
        )
        self.control = coefficients  # the 0.1 name of the coefficient state
        self.training_step = TrainingStep(
            score_fn,
            params,
            weighting=weighting,
            control=control if self.enabled else None,
            coefficients=coefficients if self.enabled else None,
            alpha=alpha,
            validate=validate and bool(extra["validate"]),  # either False: sync-free step
        )
        self.params = self.training_step.params

    def losses_and_controls(
        self,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample DSM losses and controls ``([B], [B])``, both differentiable in θ."""
        step = self.training_step
        if step.control is None:
            step = TrainingStep(
                step.score_fn, step.params, weighting=step.weighting, alpha=step.alpha,
                control=TaylorControl(self.order), validate=step.validate,
            )  # fmt: skip
        batch = step.prepare(x, sigma, noise, generator=generator, score_kwargs=score_kwargs)
        return step.losses_and_controls(batch, generator)

    def step(
        self,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
        scaler: Any = None,
    ) -> dict[str, Tensor]:
        """Fill ``p.grad`` (overwriting) for one batch; return diagnostics (tensors).

        See :meth:`varred_diffusion.TrainingStep.step`; ``groups`` defaults to the σ-bin
        index when ``bins`` was given. Host syncs: none with ``validate=False`` (joint path);
        the split path reads the bin sizes once.
        """
        diag = self.training_step(
            x, sigma, noise, generator=generator, groups=groups,
            score_kwargs=score_kwargs, scaler=scaler,
        )  # fmt: skip
        diag.pop("sigma", None)
        return diag

    __call__ = step

    def state_dict(self) -> dict[str, Any]:
        """Running coefficient statistics (delegates to ``GradientControl``)."""
        return self.control.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.control.load_state_dict(dict(state))
