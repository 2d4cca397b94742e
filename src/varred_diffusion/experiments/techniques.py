"""The leaderboard's techniques: a list of ``(name, Recipe)`` rows, and how to label them.

Adding a technique = one part in one module (a sampler in ``sampling.py``, a control in
``controls.py``, …) + one line in :func:`leaderboard_recipes`. Each row is measured by
``leaderboard.leaderboard_rows``; its labels (σ/ε design, control, β) are read off the
recipe's parts here, so a row needs no special case in the harness. The first row is the
reference every ratio is relative to: plain DSM (i.i.d. log-uniform σ and ε, no control), or
on a flow problem plain flow matching (i.i.d. uniform t and ε, no control).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from varred.errors import VarRedError
from varred.layout import CoefficientLayout
from varred_diffusion.adaptive_sampler import AdaptiveSigmaSampler
from varred_diffusion.bins import LogSNRBins, SigmaBins
from varred_diffusion.controls import AntitheticPairs, FlowTaylorControl, TaylorControl
from varred_diffusion.experiments.flow_problems import plain_flow_recipe
from varred_diffusion.experiments.problem import Problem
from varred_diffusion.flow import RectifiedFlowSchedule, flow_matching_weighting
from varred_diffusion.noise_levels import EDMLogNormal, LaplaceLogSNR, LogitNormal
from varred_diffusion.objective_densities import LogUniform, Uniform
from varred_diffusion.recipe import Recipe
from varred_diffusion.sampling import ImportanceSigmaSampler, LogUniformSigma, StratifiedSigma
from varred_diffusion.schedules import VESchedule
from varred_diffusion.stf import StableTarget
from varred_diffusion.stf_reference import FreshReference
from varred_diffusion.weightings import EDMWeighting, MinSNRWeighting

__all__ = [
    "BETA_NAMES",
    "QUICK_TECHNIQUES",
    "beta_kind",
    "control_order",
    "design_name",
    "flow_recipes",
    "is_adaptive",
    "leaderboard_recipes",
    "objective_note",
]

Row = tuple[str, Recipe]

#: β kinds of the moment harness (``diagnostics.fit_coefficients``) and their table labels.
BETA_NAMES = {"unit": "β = 1", "scalar": "scalar β", "element": "per-element β",
              "bin": "per-σ-bin β"}  # fmt: skip

#: The ``(design, order)`` techniques of ``--quick`` runs (``None``: no Taylor control).
QUICK_TECHNIQUES = frozenset({
    ("iid", None), ("antithetic", None), ("stratified", None), ("importance", None),
    ("iid", 0), ("stratified+antithetic", 0), ("iid", 1),
})  # fmt: skip


def _layouts(p: Problem) -> dict[str, dict[str, Any]]:
    """Recipe fields of each β kind; per-σ-bin β in log σ (VE) or log-SNR (flow) bins."""
    lo, hi = p.sigma_min, p.sigma_max
    bins = (LogSNRBins(lo, hi, p.num_bins, process="flow") if p.process == "flow"
            else SigmaBins(lo, hi, p.num_bins))  # fmt: skip
    return {
        "unit": {"coefficient": 1.0},
        "scalar": {"layout": CoefficientLayout("scalar")},
        "element": {"layout": CoefficientLayout("element")},
        "bin": {"layout": CoefficientLayout("element", groups=bins)},
    }


def leaderboard_recipes(p: Problem) -> list[Row]:
    """Every technique on problem ``p``: one ``(name, Recipe)`` per table row, reference first.

    Orders ``k`` not in ``p.orders`` are left out. The importance sampler is the cold one
    here; the harness warms a copy at θ before measuring. Flow problems get
    :func:`flow_recipes`.
    """
    if p.process == "flow":
        return flow_recipes(p)
    lo, hi = p.sigma_min, p.sigma_max
    iid, strat = LogUniformSigma(lo, hi), StratifiedSigma(lo, hi)
    ld = StratifiedSigma(lo, hi, low_discrepancy=True)
    imp = ImportanceSigmaSampler(p.num_bins, lo, hi)
    pairs = AntitheticPairs()
    ck = {k: TaylorControl(order=k, expectation=p.expectation) for k in (0, 1, 2)}
    beta = _layouts(p)

    def row(
        name: str, sampler: Any, control: Any = None, kind: str | None = None, **parts: Any
    ) -> Row:
        recipe = Recipe(sampler=sampler, control=control, name=name, **beta.get(kind, {}), **parts)
        return name, recipe

    objective = LogUniform(lo, hi)  # the reweighted samplers keep the plain objective
    edm = EDMLogNormal(sigma_min=lo, sigma_max=hi, objective=objective, defensive=0.1)
    laplace = LaplaceLogSNR(sigma_min=lo, sigma_max=hi, objective=objective, defensive=0.1)
    logit = LogitNormal(schedule=VESchedule(lo, hi), objective=objective, defensive=0.1)
    adaptive = AdaptiveSigmaSampler(p.num_bins, lo, hi, objective=objective)

    def stf(size: int, own: bool = True) -> StableTarget:  # references drawn i.i.d. from the data
        ref = FreshReference(p.sample_x, size, generator=torch.Generator().manual_seed(size))
        return StableTarget(ref, include_batch=own)

    rows = [
        row("log-uniform σ (plain DSM)", iid),
        row("antithetic ε", iid, pairs),
        row("stratified σ", strat),
        row("low-discrepancy σ", ld),
        row("importance σ", imp),
        row("stratified σ + antithetic ε", strat, pairs),
        row("EDM log-normal σ, reweighted (δ = 0.1)", edm),
        row("Laplace log-SNR σ, reweighted (δ = 0.1)", laplace),
        row("logit-normal t (SD3) on the VE map, reweighted (δ = 0.1)", logit),
        row("Kingma–Gao adaptive σ", adaptive),
        row("STF target, R = 64 (+ own point)", iid, target=stf(64)),
        row("STF target, R = 256 (+ own point)", iid, target=stf(256)),
        row("STF target, R = 256, no own point (biased)", iid, target=stf(256, own=False)),
        row("STF target + C^0, per-σ-bin β", iid, ck[0], "bin", target=stf(256)),
        row("Min-SNR-5 weighting (objective changed)", iid, weighting=MinSNRWeighting(5.0)),
        row("EDM weighting (objective changed)", iid, weighting=EDMWeighting(0.5)),
        row("C^0, β = 1", iid, ck[0], "unit"),
        row("C^0, scalar β", iid, ck[0], "scalar"),
        row("C^0, per-element β", iid, ck[0], "element"),
        row("C^0, per-σ-bin β", iid, ck[0], "bin"),
        row("C^1, β = 1", iid, ck[1], "unit"),
        row("C^1, scalar β", iid, ck[1], "scalar"),
        row("C^1, per-element β", iid, ck[1], "element"),
        row("C^1, per-σ-bin β", iid, ck[1], "bin"),
        row("C^2, β = 1", iid, ck[2], "unit"),
        row("C^2, scalar β", iid, ck[2], "scalar"),
        row("C^2, per-element β", iid, ck[2], "element"),
        row("C^2, per-σ-bin β", iid, ck[2], "bin"),
        row("antithetic ε + C^0, β = 1", iid, AntitheticPairs(ck[0]), "unit"),
        row("antithetic ε + C^0, scalar β", iid, AntitheticPairs(ck[0]), "scalar"),
        row("antithetic ε + C^0, per-element β", iid, AntitheticPairs(ck[0]), "element"),
        row("antithetic ε + C^0, per-σ-bin β", iid, AntitheticPairs(ck[0]), "bin"),
        row("stratified σ + C^0, β = 1", strat, ck[0], "unit"),
        row("stratified σ + C^0, scalar β", strat, ck[0], "scalar"),
        row("stratified σ + C^0, per-element β", strat, ck[0], "element"),
        row("stratified σ + C^0, per-σ-bin β", strat, ck[0], "bin"),
        row("importance σ + C^0, β = 1", imp, ck[0], "unit"),
        row("importance σ + C^0, scalar β", imp, ck[0], "scalar"),
        row("importance σ + C^0, per-element β", imp, ck[0], "element"),
        row("importance σ + C^0, per-σ-bin β", imp, ck[0], "bin"),
        row("stratified σ + antithetic ε + C^0, β = 1", strat, AntitheticPairs(ck[0]), "unit"),
        row("stratified σ + antithetic ε + C^0, scalar β", strat, AntitheticPairs(ck[0]), "scalar"),
        row("stratified σ + antithetic ε + C^0, per-element β", strat, AntitheticPairs(ck[0]), "element"),
        row("stratified σ + antithetic ε + C^0, per-σ-bin β", strat, AntitheticPairs(ck[0]), "bin"),
    ]  # fmt: skip
    return [r for r in rows if control_order(r[1]) in (None, *p.orders)]


def flow_recipes(p: Problem) -> list[Row]:
    """Every technique on a flow problem (``p.process == "flow"``), plain flow matching first.

    Each row keeps the FM loss (λ = ``flow_matching_weighting``) unless its name says the
    objective changed; the reweighted samplers keep the uniform-t objective on
    ``[p.sigma_min, p.sigma_max]``.
    """
    lo, hi = p.sigma_min, p.sigma_max
    plain = plain_flow_recipe(lo, hi)
    iid, uniform, rf = plain.sampler, Uniform(lo, hi), RectifiedFlowSchedule()
    ck = {k: FlowTaylorControl(order=k, mean_method=p.expectation) for k in (0, 1, 2)}
    beta = _layouts(p)

    def row(name: str, sampler: Any, control: Any = None, kind: str | None = None,
            weighting: Any = flow_matching_weighting) -> Row:  # fmt: skip
        return name, Recipe(sampler=sampler, control=control, weighting=weighting, name=name,
                            **beta.get(kind, {}))  # fmt: skip

    logit = LogitNormal(t_min=lo, t_max=hi, objective=uniform, defensive=0.1)
    laplace = LaplaceLogSNR(schedule=rf, sigma_min=lo, sigma_max=hi, objective=uniform,
                            defensive=0.1)  # fmt: skip
    adaptive = AdaptiveSigmaSampler(p.num_bins, lo, hi, objective=uniform)
    rows = [
        (plain.name, plain),
        row("antithetic ε", iid, AntitheticPairs()),
        row("logit-normal t (SD3), reweighted (δ = 0.1)", logit),
        row("logit-normal t (SD3; objective changed)", LogitNormal(t_min=lo, t_max=hi)),
        row("Laplace log-SNR t, reweighted (δ = 0.1)", laplace),
        row("Kingma–Gao adaptive t", adaptive),
        row(
            "Min-SNR-5 weighting, v form (objective changed)",
            iid,
            weighting=MinSNRWeighting(5.0, schedule=rf),
        ),
        *[
            row(f"FM C^{k}, {BETA_NAMES[b]}", iid, ck[k], b)
            for k in (0, 1, 2)
            for b in ("unit", "scalar", "element", "bin")
        ],
        row("antithetic ε + FM C^0, per-σ-bin β", iid, AntitheticPairs(ck[0]), "bin"),
        row("logit-normal t, reweighted + FM C^0, per-σ-bin β", logit, ck[0], "bin"),
    ]
    return [r for r in rows if control_order(r[1]) in (None, *p.orders)]


def objective_note(recipe: Recipe, reference: Recipe | None = None) -> str:
    """``"same"`` when the row estimates the reference objective's gradient, else what changed.

    ``reference``: the first row (plain DSM by default: log-uniform σ, λ = σ²). A row with
    the reference's weighting and sampler changes neither.
    """
    notes = []
    if recipe.weighting is not (None if reference is None else reference.weighting):
        notes.append("weighting")
    if recipe.target is not None and not getattr(recipe.target, "include_batch", False):
        notes.append("target biased O(1/R)")
    same_sampler = reference is not None and recipe.sampler is reference.sampler
    if getattr(recipe.sampler, "changes_objective", False) and not same_sampler:
        notes.append("σ density")
    return "same" if not notes else "changed: " + ", ".join(notes)


def _taylor(recipe: Recipe) -> Any:
    """The recipe's coefficient-fitting control (inside antithetic pairs too), or ``None``."""
    c = recipe.control
    inner = getattr(c, "control", None) if callable(getattr(c, "pair", None)) else c
    return inner if getattr(inner, "needs_coefficients", False) else None


def control_order(recipe: Recipe) -> int | None:
    """Taylor order ``k`` of the recipe's control, ``None`` without a fitted control."""
    c = _taylor(recipe)
    return None if c is None else int(getattr(c, "order", 0))


def is_adaptive(sampler: Any) -> bool:
    """Whether a sampler learns from losses (``update`` and ``warmed_up``, e.g. importance σ)."""
    return callable(getattr(sampler, "update", None)) and callable(
        getattr(sampler, "warmed_up", None)
    )


def design_name(recipe: Recipe) -> str:
    """The σ/ε design column: the sampler's name, ``+antithetic`` when the control pairs rows."""
    s = recipe.sampler
    if isinstance(s, StratifiedSigma):
        name = "low_discrepancy" if s.low_discrepancy else "stratified"
    elif isinstance(s, ImportanceSigmaSampler):
        name = "importance"
    elif type(s) in (LogUniformSigma, Uniform):  # i.i.d. from the (VE / flow) objective
        name = "iid"
    elif s is None:
        raise VarRedError(f"recipe {recipe.name!r}: expected a sampler, got None")
    else:
        name = str(getattr(s, "label", type(s).__name__))
    if callable(getattr(recipe.control, "pair", None)):
        return "antithetic" if name == "iid" else f"{name}+antithetic"
    return name


def beta_kind(recipe: Recipe) -> tuple[str, SigmaBins | None]:
    """The harness's β kind of a recipe with a fitted control, and its σ bins (``"bin"``).

    Coefficient 1.0 → ``"unit"``; layout granularity ``"scalar"`` → ``"scalar"``;
    ``"element"`` with one group → ``"element"``, with σ-bin groups → ``"bin"``.

    Raises:
        VarRedError: a layout or coefficient the moment harness does not measure.
    """
    coef, layout = recipe.coefficient, recipe.layout or CoefficientLayout()
    if isinstance(coef, numbers.Real) and not isinstance(coef, bool):
        if float(coef) == 1.0:
            return "unit", None
        raise VarRedError(f"recipe {recipe.name!r}: expected a fixed coefficient 1.0, got {coef}")
    groups = layout.groups
    if layout.granularity == "scalar" and layout.num_groups == 1:
        return "scalar", None
    if layout.granularity == "element" and layout.num_groups == 1:
        return "element", None
    if layout.granularity == "element" and callable(getattr(groups, "index", None)):
        return "bin", groups
    raise VarRedError(
        f"recipe {recipe.name!r}: expected a scalar β, or per-element β with one group or σ "
        f"bins, got layout {layout}"
    )
