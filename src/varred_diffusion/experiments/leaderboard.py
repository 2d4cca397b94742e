"""``varred-repro leaderboard``: every variance-reduction technique through one harness.

At a fixed θ (a briefly trained model) and batch size ``B``, each technique defines a
minibatch gradient estimator. Its variance ``tr Cov[ĝ_B]`` is measured over independent
batches (β fitted on other batches), relative to the plain estimator (i.i.d. log-uniform
σ, i.i.d. ε, no control). Techniques: C^0/C^1/C^2 control variates × β scalar /
per-element / per-σ-bin, antithetic noise (ε, −ε), stratified and low-discrepancy σ,
importance-sampled σ, and combinations. The step-time ratio comes from timing one training
step of each technique in the same run; efficiency = (Var_plain · t_plain)/(Var · t).
Standard errors: each variance gets a delete-one-block jackknife SE over its evaluation
batches (given the fitted β); a technique's batches are independent of the plain
baseline's, so the ratio's SE is ``R·sqrt((SE_V/V)² + (SE_base/V_base)²)`` (delta method
for a ratio of independent estimates); the baseline row is 1 by construction (SE 0).
Problems: the 2-D toy (``MLPScore``) and MNIST (``SmallUNet``; skipped with a note when no
IDX data is found).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from varred.errors import VarRedError
from varred_diffusion.diagnostics import (
    GradientMoments,
    controlled_variance,
    efficiency,
    fit_coefficients,
    time_per_call,
    unit_gradients,
)
from varred_diffusion.experiments.common import Context, run_job
from varred_diffusion.experiments.io import plus_minus, write_csv, write_json, write_markdown
from varred_diffusion.experiments.toysetup import ToyConfig, build_toy_job, make_mixture
from varred_diffusion.jackknife import BlockSums, jackknife_stderr, resolve_num_blocks

__all__ = ["DESIGNS", "Problem", "run_leaderboard"]

Tensor = torch.Tensor
DESIGNS = (
    "iid",
    "antithetic",
    "stratified",
    "low_discrepancy",
    "importance",
    "stratified+antithetic",
)
KIND_NAMES = {
    "scalar": "scalar β",
    "element": "per-element β",
    "bin": "per-σ-bin β",
    "unit": "β = 1",
}


@dataclass
class Problem:
    """A model at fixed θ and its data: ``sample_x(n, generator) -> [n, ...]`` (CPU)."""

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


def _design_batch(
    p: Problem, design: str, g: torch.Generator, sampler: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batch ``(x, sigma, noise, weights)`` of ``design``; weights average to the mean."""
    from varred_diffusion.sampling import (
        antithetic_noise,
        log_uniform_sigma,
        low_discrepancy_uniform,
        stratified_uniform,
    )

    b = p.batch
    anti = "antithetic" in design
    n = b // 2 if anti else b
    x = p.sample_x(n, g)
    w = torch.full((b,), 1.0 / b, dtype=p.dtype)
    if design.startswith("stratified"):
        u = stratified_uniform(n, g, dtype=p.dtype)
    elif design == "low_discrepancy":
        u = low_discrepancy_uniform(n, g, dtype=p.dtype)
    elif design == "importance":
        sigma, iw = sampler.sample(n, g, dtype=p.dtype)
        w = iw / b
        u = None
    else:
        u = torch.rand(n, generator=g, dtype=p.dtype)
    if u is not None:
        sigma = log_uniform_sigma(u, p.sigma_min, p.sigma_max).to(p.dtype)
    if anti:
        x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])  # pair i with i + B/2
        noise = antithetic_noise(b, tuple(x.shape[1:]), g, dtype=p.dtype)
    else:
        noise = torch.randn(x.shape, generator=g, dtype=p.dtype)
    return tuple(t.to(p.device) for t in (x, sigma, noise, w))  # type: ignore[return-value]


def _warm_importance(p: Problem, g: torch.Generator) -> Any:
    """An ``ImportanceSigmaSampler`` fed with plain losses at θ until warmed up."""
    from varred_diffusion.losses import dsm_loss
    from varred_diffusion.sampling import ImportanceSigmaSampler

    sampler = ImportanceSigmaSampler(p.num_bins, p.sigma_min, p.sigma_max)
    for _ in range(200):
        if sampler.warmed_up():
            break
        x, s, e, _ = _design_batch(p, "iid", g, None)
        with torch.no_grad():
            losses = dsm_loss(lambda a, b: p.model(a, b), x, s, e, validate=False)
            sampler.update(s.cpu(), losses.cpu())
    return sampler


def _moments(
    p: Problem,
    design: str,
    order: int | None,
    units: int,
    g: torch.Generator,
    sampler: Any,
    sums: BlockSums | None = None,
) -> GradientMoments:
    from varred_diffusion.bins import SigmaBins
    from varred_diffusion.losses import dsm_loss
    from varred_diffusion.taylor_cv import dsm_taylor_cv

    bins = SigmaBins(p.sigma_min, p.sigma_max, p.num_bins)
    params = [q for q in p.model.parameters() if q.requires_grad]
    mom = GradientMoments(sum(q.numel() for q in params), p.num_bins)

    def sf(a: Tensor, b: Tensor) -> Tensor:
        return p.model(a, b)

    for _ in range(units):
        x, s, e, w = _design_batch(p, design, g, sampler)
        losses = dsm_loss(sf, x, s, e, validate=False)
        if order is None:
            gl, _ = unit_gradients(losses, None, params, None, p.num_bins, w)
            mom.update(gl[None])
            if sums is not None:
                sums.update(gl[None])
            continue
        c = dsm_taylor_cv(sf, x, s, e, order=order, expectation=p.expectation, generator=g)
        gl, h = unit_gradients(losses, c, params, bins.index(s), p.num_bins, w)
        mom.update(gl[None], h[None])
        if sums is not None:
            sums.update(gl[None], h[None])
    return mom


def _block_sums(p: Problem, betas: list[Tensor | None], units: int) -> BlockSums | None:
    """Jackknife sums for ``units`` evaluation batches (``None`` below 3 batches: no SE)."""
    blocks = resolve_num_blocks(None, units)
    if blocks is None:
        return None
    num_params = sum(q.numel() for q in p.model.parameters() if q.requires_grad)
    return BlockSums(betas, num_params, units, blocks)


def _stderrs(sums: BlockSums | None, columns: int) -> list[float]:
    """Jackknife SE of each column's variance (NaN without sums)."""
    if sums is None:
        return [math.nan] * columns
    return [jackknife_stderr(loo) for loo in sums.leave_one_out()]


def _step_time(p: Problem, design: str, order: int | None, kind: str | None, sampler: Any) -> float:
    """Median seconds of one training step (sampling + loss + gradient) of a technique."""
    from varred_diffusion.bins import SigmaBins
    from varred_diffusion.losses import dsm_loss
    from varred_diffusion.training import ControlledDSM

    m = copy.deepcopy(p.model)
    g = torch.Generator().manual_seed(0)

    def sf(a: Tensor, b: Tensor) -> Tensor:
        return m(a, b)

    helper = None
    if order is not None:
        gran = {"scalar": "scalar", "element": "element", "bin": "element", "unit": "scalar"}[
            kind or "element"
        ]
        bins = SigmaBins(p.sigma_min, p.sigma_max, p.num_bins) if kind == "bin" else None
        coef: Any = 1.0 if kind == "unit" else "running"
        helper = ControlledDSM(sf, m.parameters(), order=order, granularity=gran, bins=bins,
                               coefficient=coef, expectation=p.expectation)  # fmt: skip

    def step() -> None:
        x, s, e, w = _design_batch(p, design, g, sampler)
        if helper is None:
            m.zero_grad(set_to_none=True)
            (dsm_loss(sf, x, s, e, validate=False) * w).sum().backward()
        else:
            helper(x, s, e, generator=g)  # importance weights: folded into the loss in practice

    return time_per_call(step, repeats=p.timing_repeats, warmup=1 if p.timing_repeats > 1 else 0)


TECHNIQUES: tuple[tuple[str, int | None], ...] = (
    ("iid", None), ("antithetic", None), ("stratified", None), ("low_discrepancy", None),
    ("importance", None), ("stratified+antithetic", None),
    ("iid", 0), ("iid", 1), ("iid", 2),
    ("antithetic", 0), ("stratified", 0), ("importance", 0), ("stratified+antithetic", 0),
)  # fmt: skip


QUICK_TECHNIQUES = (
    ("iid", None), ("antithetic", None), ("stratified", None), ("importance", None),
    ("iid", 0), ("stratified+antithetic", 0), ("iid", 1),
)  # fmt: skip


def leaderboard_rows(ctx: Context, p: Problem) -> list[dict[str, Any]]:
    """Measure every technique on problem ``p``; one row per (design, control, β kind)."""
    sampler = _warm_importance(p, ctx.generator(p.name, "importance"))
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    chosen = QUICK_TECHNIQUES if ctx.quick else TECHNIQUES
    techniques = [(d, k) for d, k in chosen if k is None or k in p.orders]
    for design, order in ctx.bar(techniques, total=len(techniques), desc=f"leaderboard {p.name}"):
        units = p.units if (order is None or order == 0) else p.units_high
        g = ctx.generator(p.name, design, order)
        if order is None:
            sums = _block_sums(p, [None], units)
            ev = _moments(p, design, None, units, g, sampler, sums)
            var = controlled_variance(ev)
            (var_se,) = _stderrs(sums, 1)
            if design == "iid":
                base["var"], base["se"] = var, var_se
                base["t"] = _step_time(p, "iid", None, None, sampler)
            t = base["t"] if design == "iid" else _step_time(p, design, None, None, sampler)
            rows.append(_row(p, design, "none", "-", var, var_se, t, base, design == "iid"))
            continue
        fit = _moments(p, design, order, units, g, sampler)
        betas = fit_coefficients(fit, ("unit", "scalar", "element", "bin"))  # no randomness
        sums = _block_sums(p, list(betas.values()), units)
        ev = _moments(p, design, order, units, g, sampler, sums)
        for (kind, beta), var_se in zip(betas.items(), _stderrs(sums, len(betas))):
            var = controlled_variance(ev, beta)
            t = _step_time(p, design, order, kind, sampler)
            rows.append(_row(p, design, f"C{order}", kind, var, var_se, t, base))
    return rows


def _row(
    p: Problem, design: str, control: str, kind: str, var: float, var_se: float, t: float,
    base: dict, is_base: bool = False,
) -> dict:  # fmt: skip
    ratio = var / base["var"] if base["var"] > 0 else math.nan
    if is_base:  # the baseline against itself: 1 exactly
        ratio_se = 0.0
    else:  # independent batches: delta method for a ratio of independent estimates
        ratio_se = abs(ratio) * math.hypot(var_se / var if var > 0 else math.nan,
                                           base["se"] / base["var"])  # fmt: skip
    return {
        "problem": p.name, "design": design, "control": control, "beta": kind,
        "variance": var, "variance_ratio": ratio,
        "step_time_ratio": t / base["t"], "efficiency": efficiency(base["var"], base["t"], var, t),
        "variance_se": var_se, "variance_ratio_se": ratio_se,
    }  # fmt: skip


def _toy_problem(ctx: Context) -> Problem:
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
    rows = leaderboard_rows(ctx, _toy_problem(ctx))
    notes: list[str] = []
    try:
        from varred_diffusion.experiments.mnist import mnist_problem

        rows += leaderboard_rows(ctx, mnist_problem(ctx))
    except VarRedError as exc:
        notes.append(f"MNIST skipped: {exc}")
    keep = ("problem", "design", "control", "beta", "variance", "variance_ratio", "variance_se",
            "variance_ratio_se")  # fmt: skip
    det = [{k: v for k, v in r.items() if k in keep} for r in rows]
    write_json(ctx.out / "results.json", {"seed": ctx.seed, "rows": det, "notes": notes})
    write_csv(ctx.out / "leaderboard.csv", rows)
    elapsed = time.perf_counter() - t0
    write_json(ctx.out / "timings.json", {"total_s": elapsed, "rows": rows})
    lines = ["# leaderboard: variance, cost and efficiency of every technique", "",
             "Variance ratio = tr Cov of the minibatch gradient / that of plain DSM (i.i.d. σ and ε, "
             "no control), same θ and batch size; β fitted on independent batches. "
             "Efficiency = (Var_plain · t_plain)/(Var · t), t = measured step time in this run. "
             "± is the standard error of the variance ratio (jackknife over evaluation batches, "
             "given the fitted β).", "",
             "| problem | σ/ε design | control | β | variance ratio | step time ratio | efficiency |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["problem"], -r["efficiency"])):
        lines.append(
            f"| {r['problem']} | {r['design']} | {r['control']} | {KIND_NAMES.get(r['beta'], r['beta'])} | "
            f"{plus_minus(r['variance_ratio'], r['variance_ratio_se'])} | "
            f"{r['step_time_ratio']:.2f} | {r['efficiency']:.3g} |"
        )
    lines += [""] + [f"- {n}" for n in notes] + ["", f"Wall time {elapsed:.1f} s."]
    write_markdown(ctx.out / "summary.md", "\n".join(lines))
    return {"rows": det, "notes": notes}
