"""``varred-repro toy``: figures 1 and 2 of Jeha et al. (2024) on 2-D mixtures.

Figure 1: DSM training with and without the C^0 gradient control (``toysetup.control_recipe``, per-
element running β, one β per log-σ bin) over several seeds: held-out DSM loss and exact
σ²-weighted score error ``E σ²‖s_θ − ∇log p_σ‖²`` against the step (mean and min–max band).
Figure 2: variance ratio and fitted β of C^0, C^1, C^2 against the training step (σ from
the training distribution) and against σ ∈ {1e-3, 1e-2, 1e-1, 1} (at initialisation and
after training), with β fitted on draws independent of the evaluation draws.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import matplotlib.pyplot as plt
import torch

from varred_diffusion.controls import TaylorControl
from varred_diffusion.diagnostics import efficiency, time_per_call
from varred_diffusion.experiments.common import Context, run_job
from varred_diffusion.experiments.io import (
    plus_minus,
    save_figure,
    write_csv,
    write_json,
    write_markdown,
)
from varred_diffusion.experiments.plots import band_plot, ratio_lines
from varred_diffusion.experiments.toysetup import (
    ToyConfig,
    build_toy_job,
    draw_fn,
    make_mixture,
    variance_ratios,
)
from varred_diffusion.losses import dsm_loss
from varred_diffusion.recipe import Recipe

__all__ = ["ToySettings", "run_toy", "toy_settings"]


@dataclass(frozen=True)
class ToySettings:
    """Sizes of the toy experiment (defaults: about two minutes on two CPU cores)."""

    steps: int = 400
    seeds: int = 3
    eval_every: int = 25
    snapshots: int = 2
    sigmas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    orders: tuple[int, ...] = (0, 1, 2)
    vr_units: int = 128
    unit_size_high: int = 16
    vr_units_high: int = 12


def toy_settings(ctx: Context) -> tuple[ToySettings, ToyConfig]:
    """Settings for ``ctx`` (``--quick`` shrinks everything; ``--steps`` overrides)."""
    s = ToySettings()
    cfg = ToyConfig(dataset=str(ctx.extra.get("dataset", "ring8")), device=ctx.device)
    if ctx.quick:
        s = replace(s, steps=12, seeds=2, eval_every=6, snapshots=1, vr_units=24,
                    vr_units_high=2, unit_size_high=2, sigmas=(1e-2, 1.0))  # fmt: skip
        cfg = replace(cfg, width=32, depth=2, batch=32, eval_size=128)
    if ctx.steps is not None:
        s = replace(s, steps=int(ctx.steps))
    return s, cfg


def _vr(ctx: Context, model: torch.nn.Module, cfg: ToyConfig, s: ToySettings, **kw: Any) -> list:
    rows = variance_ratios(ctx, model, cfg, orders=(0,), num=s.vr_units, **kw)
    high = tuple(k for k in s.orders if k > 0)
    if high:
        rows += variance_ratios(
            ctx, model, cfg, orders=high, num=s.vr_units_high, unit_size=s.unit_size_high, **kw
        )
    return rows


def step_times(
    ctx: Context, cfg: ToyConfig, model: torch.nn.Module, orders: tuple[int, ...], repeats: int = 7
) -> dict:
    """Median seconds per training step: plain DSM and the C^k recipe's step of each order."""
    m = copy.deepcopy(model)
    g = ctx.generator("timing")
    x, sig, e = draw_fn(make_mixture(cfg.dataset), cfg)(cfg.batch, g)

    def sf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return m(a, b)

    def plain() -> None:
        m.zero_grad(set_to_none=True)
        dsm_loss(sf, x, sig, e, validate=False).mean().backward()

    warm = 1 if repeats > 1 else 0
    out = {"plain": time_per_call(plain, repeats=repeats, warmup=warm)}
    for k in orders:
        helper = Recipe(control=TaylorControl(order=k, expectation="exact")).build(
            sf, m.parameters()
        )
        call = functools.partial(helper, x, sig, e, generator=g)
        out[f"C{k}"] = time_per_call(call, repeats=repeats, warmup=warm)
    return out


def run_toy(ctx: Context) -> dict[str, Any]:
    """Run the toy experiment; write figures, tables and ``summary.md`` under ``ctx.out``."""
    t0 = time.perf_counter()
    s, cfg = toy_settings(ctx)
    curves: list[dict[str, Any]] = []
    jobs = {}
    snap_every = max(1, s.steps // s.snapshots) if s.snapshots else 0
    for seed in range(s.seeds):
        for controlled in (False, True):
            name = f"toy-seed{seed}-{'cv' if controlled else 'plain'}"
            build = build_toy_job(
                ctx, cfg, controlled=controlled, seed_tag=seed, eval_every=s.eval_every,
                snapshot_every=snap_every if (seed == 0 and not controlled) else 0,
            )  # fmt: skip
            job = run_job(ctx, name, build, s.steps)
            jobs[(seed, controlled)] = job
            for row in job.evals:
                curves.append({"seed": seed, "method": "cv" if controlled else "plain", **row})
    t_train = time.perf_counter() - t0

    # figure 2: VR and β against the step (plain run, seed 0) and against σ
    ref = jobs[(0, False)]
    model = copy.deepcopy(ref.model)
    vr_step: list[dict[str, Any]] = []
    for step in sorted(ref.snapshots):
        model.load_state_dict(ref.snapshots[step])
        for row in _vr(ctx, model, cfg, s, sigma=None, tag=("step", step)):
            vr_step.append({"step": float(step), **row})
    vr_sigma: list[dict[str, Any]] = []
    for when, st in (("init", ref.snapshots[0]), ("final", ref.model.state_dict())):
        model.load_state_dict(st)
        for sigma in s.sigmas:
            for row in _vr(ctx, model, cfg, s, sigma=sigma, tag=("sigma", when, sigma)):
                vr_sigma.append({"when": when, "sigma": sigma, **row})
    t_total = time.perf_counter() - t0
    times = step_times(ctx, cfg, ref.model, s.orders, repeats=1 if ctx.quick else 7)
    final_train = [r for r in vr_step if r["step"] == max(ref.snapshots)]
    eff = [
        {
            "order": r["order"],
            "vr_element": r["vr_element"],
            "vr_element_se": r["vr_element_se"],
            "step_time_ratio": times[f"C{int(r['order'])}"] / times["plain"],
            "efficiency": efficiency(
                1.0, times["plain"], r["vr_element"], times[f"C{int(r['order'])}"]
            ),
        }
        for r in final_train
    ]
    results = {
        "settings": asdict(s),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "seed": ctx.seed,
        "fig1_final": _final_summary(curves),
        "fig2_vr_step": vr_step,
        "fig2_vr_sigma": vr_sigma,
    }
    out = ctx.out
    write_csv(out / "fig1_curves.csv", curves)
    write_csv(out / "fig2_vr_step.csv", vr_step)
    write_csv(out / "fig2_vr_sigma.csv", vr_sigma)
    write_json(out / "results.json", results)
    write_json(
        out / "timings.json",
        {"train_s": t_train, "total_s": t_total, "step_s": times, "efficiency": eff},
    )
    _figures(ctx, curves, vr_step, vr_sigma, s)
    write_markdown(out / "summary.md", _summary(results, times, eff, t_total))
    return results


def _final_summary(curves: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    last = max(r["step"] for r in curves)
    out: dict[str, dict[str, float]] = {}
    for method in ("plain", "cv"):
        rows = [r for r in curves if r["method"] == method and r["step"] == last]
        out[method] = {k: sum(r[k] for r in rows) / len(rows) for k in ("dsm_loss", "score_error")}
    return out


def _figures(ctx: Context, curves: list, vr_step: list, vr_sigma: list, s: ToySettings) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("dsm_loss", "score_error")):
        for method, color in (("plain", "C3"), ("cv", "C0")):
            rows = [r for r in curves if r["method"] == method]
            steps = sorted({r["step"] for r in rows})
            runs = [
                [next(r[key] for r in rows if r["seed"] == sd and r["step"] == st) for st in steps]
                for sd in sorted({r["seed"] for r in rows})
            ]
            label = "plain DSM" if method == "plain" else "with $C^0$ (per-element β)"
            band_plot(ax, steps, runs, label=label, color=color)
        ax.set_xlabel("training step")
        ax.set_title({"dsm_loss": "held-out DSM loss", "score_error": "E σ²‖s − ∇log p_σ‖²"}[key])
        ax.legend()
    fig.tight_layout()
    save_figure(ctx.out / "fig1_convergence.png", fig, dpi=ctx.dpi)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ratio_lines(axes[0, 0], vr_step, x="step", y="vr_element")
    axes[0, 0].set(title="variance ratio (per-element β)", xlabel="training step")
    ratio_lines(axes[0, 1], vr_step, x="step", y="beta_scalar", logy=False)
    axes[0, 1].set(title="fitted scalar β", xlabel="training step")
    final = [r for r in vr_sigma if r["when"] == "final"]
    ratio_lines(axes[1, 0], final, x="sigma", y="vr_element", logx=True)
    axes[1, 0].set(title="variance ratio vs σ (trained)", xlabel="σ")
    ratio_lines(axes[1, 1], final, x="sigma", y="beta_scalar", logx=True, logy=False)
    axes[1, 1].set(title="fitted scalar β vs σ (trained)", xlabel="σ")
    for ax in axes.flat:
        ax.legend()
    fig.tight_layout()
    save_figure(ctx.out / "fig2_variance_ratio.png", fig, dpi=ctx.dpi)


def _summary(results: dict[str, Any], times: dict, eff: list, t_total: float) -> str:
    lines = ["# toy: Jeha et al. (2024) figures 1 and 2", ""]
    f1 = results["fig1_final"]
    lines += ["## Figure 1: final held-out metrics (mean over seeds)", "",
              "| method | DSM loss | σ²-weighted score error |", "|---|---|---|"]  # fmt: skip
    for m in ("plain", "cv"):
        lines.append(f"| {m} | {f1[m]['dsm_loss']:.4g} | {f1[m]['score_error']:.4g} |")
    lines += ["", "## Figure 2: variance ratio against σ (± jackknife standard error)", "",
              "| when | σ | k | VR unit β=1 | VR scalar | VR per-element | β scalar |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["fig2_vr_sigma"]:
        cells = [
            plus_minus(r[f"vr_{k}"], r.get(f"vr_{k}_se")) for k in ("unit", "scalar", "element")
        ]
        lines.append(
            f"| {r['when']} | {r['sigma']:g} | {int(r['order'])} | {' | '.join(cells)} | "
            f"{r['beta_scalar']:.3g} |"
        )
    lines += ["", "## Cost (this run's wall time; not part of the deterministic results)", "",
              "| k | VR (per-element) | step time / plain | efficiency |", "|---|---|---|---|"]  # fmt: skip
    for e in eff:
        lines.append(
            f"| {int(e['order'])} | {plus_minus(e['vr_element'], e['vr_element_se'])} | "
            f"{e['step_time_ratio']:.2f} | {e['efficiency']:.3g} |"
        )
    lines += ["", f"plain step: {times['plain'] * 1e3:.2f} ms; total wall time {t_total:.1f} s."]
    return "\n".join(lines)
