"""``varred-repro leaderboard``: every variance-reduction recipe through one harness.

At a fixed θ (a briefly trained model) and batch size ``B``, each row of
``techniques.leaderboard_recipes`` (a ``(name, Recipe)``) defines a minibatch gradient
estimator. Batches come from the recipe's own parts: ``step.prepare(x, generator=g)`` (the
sampler draws σ and its weights, antithetic pairs pair rows), ``step.losses``,
``step.controls``. Its variance ``tr Cov[ĝ_B]`` is measured over independent batches (β
fitted on other batches, by the kind the recipe's layout names), relative to the first
row, plain DSM. Rows that share a sampler and a control share one moment pass. The step
time of each row is that of a real ``recipe.build(...)`` step in the same run, timed in
turns with a plain step; efficiency = (Var_plain · t_plain)/(Var · t). Adaptive samplers
are warmed at θ with plain losses first.
Standard errors: each variance gets a delete-one-block jackknife SE over its evaluation
batches (given the fitted β); a row's batches are independent of the plain baseline's, so
the ratio's SE is ``R·sqrt((SE_V/V)² + (SE_base/V_base)²)`` (delta method for a ratio of
independent estimates); the baseline row is 1 by construction (SE 0).
Problems: the 2-D toy (``MLPScore``) and MNIST (``SmallUNet``; skipped with a note when no
IDX data is found), each as a VE score model (DSM) and as a rectified-flow velocity model
(flow matching, ``flow_problems``; the reference row there is plain flow matching).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from varred.errors import VarRedError
from varred_diffusion.batch import Batch
from varred_diffusion.diagnostics import (
    GradientMoments,
    controlled_variance,
    efficiency,
    fit_coefficients,
    time_per_call,
    unit_gradients,
)
from varred_diffusion.experiments.common import Context, run_job
from varred_diffusion.experiments.flow_problems import mnist_flow_problem, toy_flow_problem
from varred_diffusion.experiments.io import plus_minus, write_csv, write_json, write_markdown
from varred_diffusion.experiments.mnist import mnist_problem
from varred_diffusion.experiments.problem import Problem
from varred_diffusion.experiments.techniques import (
    BETA_NAMES,
    QUICK_TECHNIQUES,
    beta_kind,
    control_order,
    design_name,
    is_adaptive,
    leaderboard_recipes,
    objective_note,
)
from varred_diffusion.experiments.toysetup import ToyConfig, build_toy_job, make_mixture
from varred_diffusion.jackknife import BlockSums, jackknife_stderr, resolve_num_blocks
from varred_diffusion.recipe import Recipe
from varred_diffusion.training_step import TrainingStep

__all__ = ["leaderboard_rows", "run_leaderboard", "toy_problem"]

Tensor = torch.Tensor
Row = tuple[str, Recipe]


@dataclass
class _Pass:
    """One moment pass shared by the rows with the same sampler and control."""

    variances: dict[str, float]
    stderrs: dict[str, float]


def _params(p: Problem) -> list[torch.nn.Parameter]:
    return [q for q in p.model.parameters() if q.requires_grad]


def _step(p: Problem, recipe: Recipe) -> TrainingStep:
    """The recipe's step at θ (no validation: the harness draws well-formed batches)."""
    return recipe.build(p.model, _params(p), alpha=p.alpha, validate=False)


def _draw(p: Problem, step: TrainingStep, g: torch.Generator) -> Batch:
    """One batch of the step's recipe, drawn on the CPU from ``g`` and moved to the device.

    Paired recipes keep the first ``B/2`` images of ``x`` (each is paired with itself), so
    only those are drawn.
    """
    pairs = callable(getattr(step.control, "pair", None))
    x = p.sample_x(p.batch // 2 if pairs else p.batch, g)
    batch = step.prepare(torch.cat([x, x]) if pairs else x, generator=g)
    if p.device == "cpu":
        return batch
    moved = {k: getattr(batch, k) for k in ("x", "sigma", "noise", "alpha", "lam", "weight")}
    return replace(batch, **{k: v if v is None else v.to(p.device) for k, v in moved.items()})


def _unit_weights(batch: Batch) -> Tensor:
    """Weights ``w_i / B`` ``[B]`` of the batch mean (``w`` = the sampler's importance weights)."""
    b = batch.size
    w = torch.ones(b, dtype=batch.x.dtype) if batch.weight is None else batch.weight.cpu()
    return (w / b).to(batch.x.device)


def _moments(
    p: Problem, step: TrainingStep, units: int, g: torch.Generator, bins: Any,
    sums: BlockSums | None = None,
) -> GradientMoments:  # fmt: skip
    """Unit-gradient moments of ``units`` batches (controls binned by ``bins``, if any)."""
    params = _params(p)
    nb = 1 if bins is None else int(bins.num_bins)
    mom = GradientMoments(sum(q.numel() for q in params), nb)
    controlled = step.coefficients is not None
    for _ in range(units):
        batch = _draw(p, step, g)
        losses, w = step.losses(batch), _unit_weights(batch)
        if not controlled:
            gl, _ = unit_gradients(losses, None, params, None, nb, w)
            mom.update(gl[None])
            if sums is not None:
                sums.update(gl[None])
            continue
        c = step.controls(batch, generator=g)
        idx = None if bins is None else bins.index(batch.sigma)
        gl, h = unit_gradients(losses, c, params, idx, nb, w)
        mom.update(gl[None], h[None])
        if sums is not None:
            sums.update(gl[None], h[None])
    return mom


def _block_sums(p: Problem, betas: list[Tensor | None], units: int) -> BlockSums | None:
    """Jackknife sums for ``units`` evaluation batches (``None`` below 3 batches: no SE)."""
    blocks = resolve_num_blocks(None, units)
    if blocks is None:
        return None
    return BlockSums(betas, sum(q.numel() for q in _params(p)), units, blocks)


def _stderrs(sums: BlockSums | None, columns: int) -> list[float]:
    """Jackknife SE of each column's variance (NaN without sums)."""
    if sums is None:
        return [math.nan] * columns
    return [jackknife_stderr(loo) for loo in sums.leave_one_out()]


def _measure(ctx: Context, p: Problem, group: list[Recipe]) -> _Pass:
    """Variance and its SE of every β kind of ``group`` (one sampler, one control)."""
    first = group[0]
    step, order = _step(p, first), control_order(first)
    g = ctx.generator(p.name, design_name(first), order)
    units = p.units if order is None or order == 0 else p.units_high
    if order is None:
        sums = _block_sums(p, [None], units)
        var = controlled_variance(_moments(p, step, units, g, None, sums))
        (se,) = _stderrs(sums, 1)
        return _Pass({"-": var}, {"-": se})
    kinds = dict(beta_kind(r) for r in group)  # kind -> σ bins ("bin") or None
    bins = next((b for b in kinds.values() if b is not None), None)
    fit = _moments(p, step, units, g, bins)
    betas = fit_coefficients(fit, tuple(kinds))  # no randomness
    sums = _block_sums(p, list(betas.values()), units)
    ev = _moments(p, step, units, g, bins, sums)
    var = {k: controlled_variance(ev, b) for k, b in betas.items()}
    return _Pass(var, dict(zip(betas, _stderrs(sums, len(betas)))))


def _step_times(p: Problem, recipe: Recipe, reference: Recipe) -> tuple[float, float]:
    """Median seconds of one real step of ``recipe`` and of ``reference``, timed in turns.

    A step is sampling, loss, control and ``p.grad``. The two steps alternate call by call,
    so a slow stretch of the machine slows both and their ratio survives it. On the CPU the
    seconds are this process's CPU time (``time_per_call(clock="cpu")``).

    On the CPU the step draws σ and ε itself (``step(x, generator=g)``). Elsewhere the
    samplers' CPU draws and a device generator for ε cannot share one generator, so the
    batch is drawn on the CPU as in the moment passes and the step gets ``(x, σ, ε)``.
    """
    clock = "cpu" if p.device == "cpu" else "wall"  # CPU time: robust to other processes
    calls = []
    for r in (recipe, reference):
        m = copy.deepcopy(p.model)
        step, g = r.build(m, m.parameters(), alpha=p.alpha), torch.Generator().manual_seed(0)

        def call(step: Any = step, g: torch.Generator = g) -> None:
            if p.device == "cpu":
                step(p.sample_x(p.batch, g), generator=g)
            else:
                batch = _draw(p, step, g)
                step(batch.x, batch.sigma, batch.noise)

        calls.append(call)
    warmup = 1 if p.timing_repeats > 1 else 0
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(p.timing_repeats):
        for call, out in zip(calls, times):
            out.append(time_per_call(call, repeats=1, warmup=warmup, clock=clock))
        warmup = 0
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def _warm(ctx: Context, p: Problem, rows: list[Row]) -> list[Row]:
    """The rows with each adaptive sampler replaced by a copy fed the reference's losses at θ."""
    plain = _step(p, rows[0][1])
    warmed: dict[int, Any] = {}
    out = []
    for name, r in rows:
        if is_adaptive(r.sampler) and id(r.sampler) not in warmed:
            sampler, g = copy.deepcopy(r.sampler), ctx.generator(p.name, design_name(r))
            for _ in range(200):
                if sampler.warmed_up():
                    break
                batch = _draw(p, plain, g)
                with torch.no_grad():
                    sampler.update(batch.sigma.cpu(), plain.losses(batch).cpu())
            warmed[id(r.sampler)] = sampler
        out.append(
            (name, replace(r, sampler=warmed[id(r.sampler)]) if is_adaptive(r.sampler) else r)
        )
    return out


def leaderboard_rows(
    ctx: Context, p: Problem, rows: list[Row] | None = None
) -> list[dict[str, Any]]:
    """Measure every row on problem ``p``: one table row per ``(name, Recipe)``.

    Args:
        ctx: experiment context (seed; ``quick`` keeps ``QUICK_TECHNIQUES`` of the default rows).
        p: the problem at fixed θ.
        rows: ``(name, Recipe)`` rows, the plain reference first; default
            ``leaderboard_recipes(p)``.

    Raises:
        VarRedError: a first row with a control (it must be the plain reference).
    """
    if rows is None:
        rows = leaderboard_recipes(p)
        if ctx.quick:
            ref = rows[0][1]
            rows = [r for r in rows if (design_name(r[1]), control_order(r[1])) in QUICK_TECHNIQUES
                    and r[1].weighting is ref.weighting and r[1].target is None]  # fmt: skip
    if not rows or rows[0][1].control is not None:
        raise VarRedError("rows: expected the plain reference (no control) as the first row")
    rows = _warm(ctx, p, rows)
    passes: dict[tuple[str, ...], _Pass] = {}
    out: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for i, (name, recipe) in enumerate(
        ctx.bar(rows, total=len(rows), desc=f"leaderboard {p.name}")
    ):
        key = _pass_key(recipe)
        if key not in passes:  # rows differing only in β share one moment pass
            group = [r for _, r in rows if _pass_key(r) == key]
            passes[key] = _measure(ctx, p, group)
        kind = "-" if control_order(recipe) is None else beta_kind(recipe)[0]
        var, var_se = passes[key].variances[kind], passes[key].stderrs[kind]
        t, t_ref = _step_times(p, recipe, rows[0][1])
        if i == 0:
            base.update(var=var, se=var_se)
        # the ratio to the reference timed alongside this row, not to row 0's own timing
        row_base = dict(base, t=t if i == 0 else t_ref)
        out.append(_row(p, name, recipe, kind, var, var_se, t, row_base, rows[0][1]))
    return out


def _pass_key(recipe: Recipe) -> tuple[str, ...]:
    """What a moment pass depends on: every part but the coefficient layout."""
    return tuple(repr(getattr(recipe, k)) for k in ("sampler", "weighting", "target", "control"))


def _row(
    p: Problem, name: str, recipe: Recipe, kind: str, var: float, var_se: float, t: float,
    base: dict, reference: Recipe,
) -> dict:  # fmt: skip
    is_base = recipe is reference
    ratio = var / base["var"] if base["var"] > 0 else math.nan
    if is_base:  # the baseline against itself: 1 exactly
        ratio_se = 0.0
    else:  # independent batches: delta method for a ratio of independent estimates
        ratio_se = abs(ratio) * math.hypot(var_se / var if var > 0 else math.nan,
                                           base["se"] / base["var"])  # fmt: skip
    order = control_order(recipe)
    return {
        "problem": p.name, "design": design_name(recipe),
        "control": "none" if order is None else f"C{order}", "beta": kind,
        "variance": var, "variance_ratio": ratio,
        "step_time_ratio": t / base["t"], "efficiency": efficiency(base["var"], base["t"], var, t),
        "variance_se": var_se, "variance_ratio_se": ratio_se, "recipe": recipe.name or name,
        "objective": objective_note(recipe, reference),
    }  # fmt: skip


def toy_problem(ctx: Context) -> Problem:
    """The leaderboard's toy problem: ``MLPScore`` briefly trained on the 2-D mixture."""
    cfg = ToyConfig(dataset=str(ctx.extra.get("dataset", "ring8")), device=ctx.device)
    steps = 300
    if ctx.quick:
        cfg = replace(cfg, width=16, depth=2, batch=16)
        steps = 5
    if ctx.steps is not None:
        steps = int(ctx.steps)
    job = run_job(
        ctx, "leaderboard-toy", build_toy_job(ctx, cfg, controlled=False, seed_tag="lb"), steps
    )
    mixture = make_mixture(cfg.dataset)
    return Problem(
        name=f"toy-{cfg.dataset}", model=job.model,
        sample_x=lambda n, g: mixture.sample(n, g).to(cfg.dtype),
        device=ctx.device,
        sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, dtype=cfg.dtype,
        batch=8 if ctx.quick else 32, orders=(0, 1) if ctx.quick else (0, 1, 2),
        units=6 if ctx.quick else 96, units_high=3 if ctx.quick else 24, expectation="exact",
        timing_repeats=1 if ctx.quick else 5,
    )  # fmt: skip


def run_leaderboard(ctx: Context) -> dict[str, Any]:
    """Measure the toy (and MNIST when its data is found); write the table and summary."""
    t0 = time.perf_counter()
    rows = leaderboard_rows(ctx, toy_problem(ctx)) + leaderboard_rows(ctx, toy_flow_problem(ctx))
    notes: list[str] = []
    for label, make in (("MNIST", mnist_problem), ("MNIST flow matching", mnist_flow_problem)):
        try:
            rows += leaderboard_rows(ctx, make(ctx))
        except VarRedError as exc:
            notes.append(f"{label} skipped: {exc}")
    keep = ("problem", "design", "control", "beta", "variance", "variance_ratio", "variance_se",
            "variance_ratio_se", "recipe")  # fmt: skip
    det = [{k: v for k, v in r.items() if k in keep} for r in rows]
    write_json(ctx.out / "results.json", {"seed": ctx.seed, "rows": det, "notes": notes})
    write_csv(ctx.out / "leaderboard.csv", rows)
    elapsed = time.perf_counter() - t0
    write_json(ctx.out / "timings.json", {"total_s": elapsed, "rows": rows})
    lines = ["# leaderboard: variance, cost and efficiency of every technique", "",
             "Variance ratio = tr Cov of the minibatch gradient / that of plain DSM (i.i.d. σ and ε, "
             "no control), same θ and batch size; β fitted on independent batches. "
             "Efficiency = (Var_plain · t_plain)/(Var · t), t = measured step time in this run "
             "(process CPU time on the CPU, wall-clock on a GPU; each row's steps alternate "
             "with plain's, median of each). "
             "± is the standard error of the variance ratio (jackknife over evaluation batches, "
             "given the fitted β).", "",
             "| problem | σ/ε design | control | β | variance ratio | step time ratio | efficiency | objective | recipe |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["problem"], -r["efficiency"])):
        lines.append(
            f"| {r['problem']} | {r['design']} | {r['control']} | {BETA_NAMES.get(r['beta'], r['beta'])} | "
            f"{plus_minus(r['variance_ratio'], r['variance_ratio_se'])} | "
            f"{r['step_time_ratio']:.2f} | {r['efficiency']:.3g} | {r['objective']} | {r['recipe']} |"
        )
    lines += [""] + [f"- {n}" for n in notes] + ["", f"Wall time {elapsed:.1f} s."]
    write_markdown(ctx.out / "summary.md", "\n".join(lines))
    return {"rows": det, "notes": notes}
