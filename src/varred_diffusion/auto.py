"""``AutoStep``: a recipe that measures what pays on the user's model and keeps only that.

During a probe window it alternates plain steps (cycling through the candidate σ samplers)
with steps controlled by ``C^k`` in every σ bin, and measures per bin the share of the
gradient variance the control removes (GradientControl's ``variance_ratio_per_group``) and,
in the same run, what a plain and a controlled step cost. It then keeps the control only in
the bins where the whole step's efficiency ``(V_plain t_plain)/(V t)`` exceeds ``1 + margin``
(none if no set of bins pays), keeps the σ sampler whose plain gradients varied least, and
re-checks every ``recheck_every`` steps. It never changes the user's objective: candidate
samplers must keep it (``changes_objective = False``); weighting and target are the user's.
Every decision is logged (``decisions`` and the ``varred_diffusion.auto`` logger).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.layout import CoefficientLayout
from varred_diffusion.bins import SigmaBins
from varred_diffusion.controls import TaylorControl
from varred_diffusion.sampling import LogUniformSigma, StratifiedSigma
from varred_diffusion.training_step import TrainingStep

__all__ = ["AutoStep", "choose_bins"]

log = logging.getLogger("varred_diffusion.auto")


def choose_bins(
    reduction: Sequence[float], share: Sequence[float], cost_ratio: float, margin: float
) -> tuple[list[int], float]:
    """The bins whose control makes the step most efficient, and that efficiency.

    Model: controlling the bins ``S`` removes ``Σ_{g∈S} r_g`` of the plain gradient variance
    (per-bin controls act on disjoint samples) and costs ``t_plain (1 + (c − 1) Σ_{g∈S} s_g)``
    (the control's extra work is proportional to its rows, ``s_g`` the bin's share of the
    batch, ``c`` the all-bins cost ratio). Bins are added greedily by reduction per unit
    cost; ``S`` is returned only if its efficiency exceeds ``1 + margin``, else ``[]`` and 1.
    """
    extra = max(float(cost_ratio) - 1.0, 0.0)
    order = sorted(
        range(len(reduction)),
        key=lambda g: -max(reduction[g], 0.0) / max(extra * share[g], 1e-12),
    )
    best, best_eff, chosen, red, cost = [], 1.0, [], 0.0, 1.0
    for g in order:
        if reduction[g] <= 0:
            break
        chosen, red, cost = [*chosen, g], red + reduction[g], cost + extra * share[g]
        eff = 1.0 / (max(1.0 - red, 1e-12) * cost)
        if eff > best_eff:
            best, best_eff = list(chosen), eff
    if best_eff <= 1.0 + margin:
        return [], 1.0
    return sorted(best), best_eff


class AutoStep:
    """An automatic recipe: ``C^k`` only in the σ bins where it pays, the best σ sampler.

    Args:
        score_fn: ``score_fn(x_t, sigma, **kw) -> [B, ...]`` (rows independent).
        params: the parameters whose ``.grad`` is written.
        bins: ``SigmaBins`` over the user's σ range (the decisions' resolution).
        samplers: candidate σ samplers that keep the objective (default: log-uniform and
            stratified log-uniform over the bins' range).
        order, expectation: the Taylor control's (``TaylorControl``).
        probe_steps: length of a probe window (half plain, half controlled steps).
        recheck_every: steps between probe windows (re-measured as θ trains).
        margin: the efficiency a control must beat: ``> 1 + margin``.
        weighting, target, alpha: the user's parts, passed to both steps unchanged.
        coefficient_options: options of the ``GradientControl`` (default warm-up 3 steps).
        clock: time source (seconds) for the cost measurements.

    Raises:
        VarRedError: a sampler that changes the objective, or bad window lengths.
    """

    def __init__(
        self,
        score_fn: Callable[..., Tensor],
        params: Iterable[torch.nn.Parameter],
        *,
        bins: SigmaBins,
        samplers: Sequence[Any] | None = None,
        order: int = 0,
        expectation: str = "auto",
        probe_steps: int = 40,
        recheck_every: int = 1000,
        margin: float = 0.1,
        weighting: Any = None,
        target: Any = None,
        alpha: Any = None,
        coefficient_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if samplers is None:
            samplers = [
                LogUniformSigma(bins.sigma_min, bins.sigma_max),
                StratifiedSigma(bins.sigma_min, bins.sigma_max),
            ]
        for s in samplers:
            if getattr(s, "changes_objective", True):
                raise VarRedError(
                    f"samplers: AutoStep never changes the objective, got {s!r} with "
                    "changes_objective not False"
                )
        if probe_steps < 4 or recheck_every < probe_steps:
            raise VarRedError(
                f"probe_steps, recheck_every: expected 4 <= probe_steps <= recheck_every, got "
                f"{probe_steps}, {recheck_every}"
            )
        params = [p for p in params if p.requires_grad]
        self.samplers, self.bins = list(samplers), bins
        self.probe_steps, self.recheck_every = int(probe_steps), int(recheck_every)
        self.margin, self.clock = float(margin), clock
        parts = {"weighting": weighting, "target": target, "alpha": alpha}
        self.plain = TrainingStep(score_fn, params, sampler=self.samplers[0], **parts)
        opts = {"warmup_steps": 3, **(coefficient_options or {})}
        coefficients = GradientControl(params, layout=CoefficientLayout("element", bins), **opts)
        control = TaylorControl(order, expectation, "split")
        self.controlled = TrainingStep(
            score_fn, params, sampler=self.samplers[0], control=control,
            coefficients=coefficients, **parts,
        )  # fmt: skip
        self.num_steps = 0
        self.active: list[int] = []
        self.decisions: list[dict[str, Any]] = []
        self._reset_probe()

    def _reset_probe(self) -> None:
        self._times: dict[str, list[float]] = {"plain": [], "controlled": []}
        self._prev: dict[int, Tensor] = {}
        self._spread: dict[int, list[float]] = {i: [] for i in range(len(self.samplers))}
        self._share = torch.zeros(self.bins.num_bins, dtype=torch.float64)
        self._last_vr: Tensor | None = None
        self._last_total = 1.0

    @property
    def probing(self) -> bool:
        """Whether this step is in a probe window."""
        return self.num_steps % self.recheck_every < self.probe_steps

    def _flat_grad(self) -> Tensor:
        return torch.cat([p.grad.detach().reshape(-1).double() for p in self.plain.params])

    def step(self, x: Tensor, *, generator: torch.Generator, **kwargs: Any) -> dict[str, Tensor]:
        """One training step (σ and ε drawn from ``generator``); fills ``p.grad``."""
        if self.probing:
            diag = self._probe_step(x, generator, kwargs)
        elif self.active:
            diag = self.controlled.step(x, generator=generator, **kwargs)
        else:
            diag = self.plain.step(x, generator=generator, **kwargs)
        self.num_steps += 1
        if self.num_steps % self.recheck_every == self.probe_steps:
            self._decide()
        diag["auto_active_bins"] = torch.tensor(len(self.active))
        return diag

    __call__ = step

    def _probe_step(self, x: Tensor, g: torch.Generator, kwargs: dict) -> dict[str, Tensor]:
        i = self.num_steps % self.recheck_every
        if i % 2 == 0:  # plain, cycling through the candidate samplers
            k = (i // 2) % len(self.samplers)
            self.plain.sampler = self.samplers[k]
            t0 = self.clock()
            diag = self.plain.step(x, generator=g, **kwargs)
            self._times["plain"].append(self.clock() - t0)
            flat = self._flat_grad()
            if k in self._prev:
                self._spread[k].append(0.5 * float((flat - self._prev[k]).pow(2).sum()))
            self._prev[k] = flat
        else:  # controlled in every bin
            self.controlled.active_groups = None
            t0 = self.clock()
            diag = self.controlled.step(x, generator=g, **kwargs)
            self._times["controlled"].append(self.clock() - t0)
            self._last_vr = diag["variance_ratio_per_group"].detach().double().cpu()
            self._last_total = float(diag["variance_ratio"])
        self._share += torch.bincount(
            self.bins.index(diag["sigma"].cpu()), minlength=self.bins.num_bins
        ).double()
        return diag

    def _decide(self) -> None:
        t_plain = statistics.median(self._times["plain"][1:] or self._times["plain"])
        t_ctrl = statistics.median(self._times["controlled"][1:] or self._times["controlled"])
        share = (self._share / self._share.sum().clamp(min=1)).tolist()
        vr = self._last_vr if self._last_vr is not None else torch.ones(len(share))
        # The per-bin reductions come from β fitted on the same few steps (optimistic); they
        # rank the bins, and are scaled to the honest total: the tracked variance of the
        # applied gradient (β from earlier steps only) over the plain one.
        raw = (1.0 - vr).clamp(min=0)
        total = min(max(1.0 - self._last_total, 0.0), 1.0)
        scale = total / float(raw.sum()) if float(raw.sum()) > 0 else 0.0
        reduction = (raw * scale).tolist()
        self.active, eff = choose_bins(reduction, share, t_ctrl / t_plain, self.margin)
        spreads = {k: statistics.fmean(v) for k, v in self._spread.items() if v}
        best = min(spreads, key=spreads.get) if spreads else 0
        self.plain.sampler = self.controlled.sampler = self.samplers[best]
        mask = torch.zeros(self.bins.num_bins, dtype=torch.bool)
        mask[self.active] = True
        self.controlled.active_groups = mask
        decision = {
            "step": self.num_steps, "active_bins": list(self.active), "efficiency": eff,
            "cost_ratio": t_ctrl / t_plain, "variance_ratio_per_bin": vr.tolist(),
            "variance_ratio_all_bins": self._last_total, "reduction_per_bin": reduction,
            "bin_share": share, "sampler": repr(self.samplers[best]),
            "sampler_spread": {repr(self.samplers[k]): v for k, v in spreads.items()},
        }  # fmt: skip
        self.decisions.append(decision)
        log.info("auto decision: %s", decision)
        self._reset_probe()
