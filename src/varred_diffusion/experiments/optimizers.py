"""``varred-repro optimizers``: figure 4 of Jeha et al. (2024), Adam against SGD.

The same MLP is trained with plain DSM under Adam and under SGD; at snapshots along
training the variance ratio of C^0, C^1, C^2 (per-element β fitted on independent draws,
σ from the training distribution) is measured at the current θ.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import matplotlib.pyplot as plt

from varred_diffusion.experiments.common import Context, run_job
from varred_diffusion.experiments.io import (
    plus_minus,
    save_figure,
    write_csv,
    write_json,
    write_markdown,
)
from varred_diffusion.experiments.plots import ratio_lines
from varred_diffusion.experiments.toysetup import ToyConfig, build_toy_job, variance_ratios

__all__ = ["OptimizerSettings", "run_optimizers"]


@dataclass(frozen=True)
class OptimizerSettings:
    """Sizes of the optimizer comparison."""

    steps: int = 600
    snapshots: int = 4
    orders: tuple[int, ...] = (0, 1, 2)
    lr_adam: float = 1e-3
    lr_sgd: float = 1e-2
    vr_units: int = 128
    vr_units_high: int = 12
    unit_size_high: int = 16


def _settings(ctx: Context) -> tuple[OptimizerSettings, ToyConfig]:
    s = OptimizerSettings()
    cfg = ToyConfig(dataset=str(ctx.extra.get("dataset", "ring8")), device=ctx.device)
    if ctx.quick:
        s = replace(s, steps=8, snapshots=2, orders=(0, 1), vr_units=16, vr_units_high=3,
                    unit_size_high=4)  # fmt: skip
        cfg = replace(cfg, width=16, depth=2, batch=16, eval_size=64)
    if ctx.steps is not None:
        s = replace(s, steps=int(ctx.steps))
    return s, cfg


def run_optimizers(ctx: Context) -> dict[str, Any]:
    """Train under Adam and SGD; variance ratio of C^k at snapshots; write outputs."""
    t0 = time.perf_counter()
    s, base = _settings(ctx)
    rows: list[dict[str, Any]] = []
    every = max(1, s.steps // s.snapshots)
    finals: dict[str, dict[str, float]] = {}  # held-out metrics at the start and the end
    for opt, lr in (("adam", s.lr_adam), ("sgd", s.lr_sgd)):
        cfg = replace(base, optimizer=opt, lr=lr)
        job = run_job(
            ctx, f"opt-{opt}",
            build_toy_job(ctx, cfg, controlled=False, seed_tag="opt", snapshot_every=every,
                          eval_every=every), s.steps,
        )  # fmt: skip
        if job.evals:
            first, last = job.evals[0], job.evals[-1]
            finals[opt] = {f"{k}_{w}": float(r[k]) for w, r in (("init", first), ("final", last))
                           for k in r if k != "step"}  # fmt: skip
        model = copy.deepcopy(job.model)
        for step in sorted(job.snapshots):
            model.load_state_dict(job.snapshots[step])
            tag = ("opt", opt, step)
            vr = variance_ratios(ctx, model, cfg, orders=(0,), num=s.vr_units, sigma=None, tag=tag)
            high = tuple(k for k in s.orders if k > 0)
            if high:
                vr += variance_ratios(
                    ctx, model, cfg, orders=high, num=s.vr_units_high,
                    unit_size=s.unit_size_high, sigma=None, tag=tag,
                )  # fmt: skip
            for r in vr:
                rows.append({"optimizer": opt, "step": float(step), **r})
    results = {"settings": asdict(s), "seed": ctx.seed, "rows": rows, "held_out": finals}
    write_csv(ctx.out / "fig4_optimizers.csv", rows)
    write_json(ctx.out / "results.json", results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, opt in zip(axes, ("adam", "sgd")):
        ratio_lines(ax, [r for r in rows if r["optimizer"] == opt], x="step", y="vr_element")
        ax.set(title=f"{opt.upper()}: variance ratio (per-element β)", xlabel="training step")
        ax.legend()
    fig.tight_layout()
    save_figure(ctx.out / "fig4_optimizers.png", fig, dpi=ctx.dpi)
    elapsed = time.perf_counter() - t0
    write_json(ctx.out / "timings.json", {"total_s": elapsed})
    lines = ["# optimizers: Jeha et al. (2024) figure 4", "",
             "Variance ratio ± jackknife standard error (given the fitted β).", "",
             "| optimizer | step | k | VR β=1 | VR scalar | VR per-element |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [
            plus_minus(r[f"vr_{k}"], r.get(f"vr_{k}_se")) for k in ("unit", "scalar", "element")
        ]
        lines.append(
            f"| {r['optimizer']} | {int(r['step'])} | {int(r['order'])} | {' | '.join(cells)} |"
        )
    if finals:  # how far each optimizer trained: the VR comparison is only fair at similar loss
        keys = sorted(next(iter(finals.values())))
        lines += ["", "Held-out metrics (start → end of training):", "",
                  "| optimizer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
        for opt, m in finals.items():
            lines.append(f"| {opt} | " + " | ".join(f"{m[k]:.4g}" for k in keys) + " |")
    lines += ["", f"Wall time {elapsed:.1f} s."]
    write_markdown(ctx.out / "summary.md", "\n".join(lines))
    return results
