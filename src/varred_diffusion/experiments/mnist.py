"""``varred-repro mnist``: figure 3 of Jeha et al. (2024) on real MNIST with ``SmallUNet``.

Multi-σ DSM training (VE, σ log-uniform on [0.01, 10], λ = σ²) with and without the C^0
gradient control (the recipe's ``TrainingStep``: per-element running β per log-σ bin); the variance
ratio of C^0 and C^1 (Hutchinson means; β fitted on independent draws) along the plain
run; training and held-out DSM loss; a grid of samples from the reverse VE SDE
(Euler–Maruyama; Song et al., 2021) after training. Images are scaled to [-1, 1].
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import matplotlib.pyplot as plt
import torch

from varred.layout import CoefficientLayout
from varred_diffusion.bins import SigmaBins
from varred_diffusion.controls import TaylorControl
from varred_diffusion.diagnostics import gradient_variance_ratio
from varred_diffusion.experiments.common import Context, TrainJob, optimizer_step, run_job
from varred_diffusion.experiments.data import find_data_dir, find_split_files, load_images
from varred_diffusion.experiments.io import (
    plus_minus,
    save_figure,
    write_csv,
    write_json,
    write_markdown,
)
from varred_diffusion.experiments.plots import band_plot, image_grid, ratio_lines
from varred_diffusion.experiments.problem import Problem
from varred_diffusion.losses import dsm_loss
from varred_diffusion.models import SmallUNet
from varred_diffusion.recipe import Recipe
from varred_diffusion.sampling import log_uniform_sigma

__all__ = [
    "MnistSettings",
    "control_recipe",
    "mnist_images",
    "mnist_problem",
    "reverse_sde_sample",
    "run_mnist",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class MnistSettings:
    """Sizes of the MNIST experiment (defaults: roughly 20 minutes on two CPU cores)."""

    base: int = 16
    batch: int = 32
    steps: int = 400
    lr: float = 2e-4
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    num_bins: int = 4
    eval_every: int = 50
    eval_size: int = 128
    snapshots: int = 2
    vr_units: int = 32
    vr_units_high: int = 8
    unit_size_high: int = 4
    sample_count: int = 36
    sample_steps: int = 100
    limit: int | None = None


def _settings(ctx: Context) -> MnistSettings:
    s = MnistSettings()
    if ctx.quick:
        s = replace(s, base=8, batch=4, steps=3, eval_every=3, eval_size=4, snapshots=1,
                    vr_units=3, vr_units_high=2, unit_size_high=2, sample_count=4,
                    sample_steps=3, limit=64)  # fmt: skip
    if ctx.steps is not None:
        s = replace(s, steps=int(ctx.steps))
    return s


def mnist_images(ctx: Context, limit: int | None = None) -> Tensor:
    """MNIST images ``[N, 1, 28, 28]`` in [-1, 1] from ``ctx.data_dir`` (train split if found)."""
    directory = find_data_dir(ctx.data_dir)
    split = "train" if find_split_files(directory, "train") else "test"
    print(f"mnist: {split} split of {directory}", file=sys.stderr)
    return load_images(directory, split=split, limit=limit)


def _sigma(n: int, g: torch.Generator, s: MnistSettings) -> Tensor:
    return log_uniform_sigma(torch.rand(n, generator=g), s.sigma_min, s.sigma_max)


def _model(ctx: Context, s: MnistSettings, tag: object) -> torch.nn.Module:
    return SmallUNet(1, base=s.base, generator=ctx.generator("mnist-init", tag)).to(ctx.device)


def control_recipe(s: MnistSettings) -> Recipe:
    """The controlled MNIST step: C^0, running per-element β per log-σ bin."""
    bins = SigmaBins(s.sigma_min, s.sigma_max, s.num_bins)
    return Recipe(control=TaylorControl(order=0), layout=CoefficientLayout("element", groups=bins),
                  name=f"C^0, per-element β per σ bin ({s.num_bins})")  # fmt: skip


def _build(
    ctx: Context, s: MnistSettings, images: Tensor, controlled: bool, every: int
) -> TrainJob:
    model = _model(ctx, s, 0)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    g = ctx.generator("mnist-data", controlled)
    evg = ctx.generator("mnist-eval")
    idx = torch.randint(images.shape[0], (s.eval_size,), generator=evg)
    dev = ctx.device
    x_ev, s_ev = images[idx].to(dev), _sigma(s.eval_size, evg, s).to(dev)
    e_ev = torch.randn(x_ev.shape, generator=evg).to(dev)

    def sf(a: Tensor, b: Tensor) -> Tensor:
        return model(a, b)

    helper = None
    stateful: dict[str, Any] = {}
    if controlled:
        helper = control_recipe(s).build(sf, model.parameters())
        stateful["control"] = helper

    def step(i: int) -> dict[str, float]:
        x = images[torch.randint(images.shape[0], (s.batch,), generator=g)]
        sig, e = _sigma(s.batch, g, s), torch.randn(x.shape, generator=g)
        x, sig, e = x.to(dev), sig.to(dev), e.to(dev)
        return optimizer_step(opt, helper, sf, x, sig, e)

    def evaluate(i: int) -> dict[str, float]:
        with torch.no_grad():
            return {"dsm_loss": float(dsm_loss(sf, x_ev, s_ev, e_ev, validate=False).mean())}

    return TrainJob(model=model, optimizer=opt, step_fn=step, eval_fn=evaluate,
                    eval_every=s.eval_every, generators={"data": g}, stateful=stateful,
                    snapshot_every=every)  # fmt: skip


@torch.no_grad()
def reverse_sde_sample(
    model: torch.nn.Module, n: int, *, sigma_min: float, sigma_max: float, steps: int,
    generator: torch.Generator, shape: tuple[int, ...] = (1, 28, 28),
) -> Tensor:  # fmt: skip
    """Reverse VE SDE, Euler–Maruyama on a geometric σ grid (Song et al., 2021): ``[n, *shape]``.

    ``x ← x + (σ_i² − σ_{i+1}²) s(x, σ_i) + sqrt(σ_i² − σ_{i+1}²) z``, then one denoising
    step ``x + σ_min² s(x, σ_min)``.
    """
    dev = next(model.parameters()).device
    sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1)).to(dev)
    x = sigma_max * torch.randn((n, *shape), generator=generator).to(dev)
    for i in range(steps):
        d = sig[i] ** 2 - sig[i + 1] ** 2
        x = (
            x
            + d * model(x, sig[i].expand(n))
            + d.sqrt() * torch.randn(x.shape, generator=generator).to(dev)
        )
    return x + sigma_min**2 * model(x, torch.full((n,), sigma_min, device=dev))


def _vr_rows(
    ctx: Context, s: MnistSettings, model: torch.nn.Module, images: Tensor, step: int
) -> list:
    def draw(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        x = images[torch.randint(images.shape[0], (n,), generator=g)]
        out = (x, _sigma(n, g, s), torch.randn(x.shape, generator=g))
        return tuple(t.to(ctx.device) for t in out)  # type: ignore[return-value]

    rows = []
    for k, units, size in ((0, s.vr_units, 1), (1, s.vr_units_high, s.unit_size_high)):
        vr = gradient_variance_ratio(
            model, draw, order=k, generator=ctx.generator("mnist-vr", step, k), num_fit=units,
            num_eval=units, unit_size=size, kinds=("unit", "scalar", "element"),
            expectation="hutchinson" if k else "exact",
        )  # fmt: skip
        rows.append({"step": float(step), "order": float(k), "var_plain": vr.variance_plain,
                     **{f"vr_{kk}": v for kk, v in vr.ratio.items()},
                     **{f"beta_{kk}": v for kk, v in vr.beta_summary.items()},
                     **{f"vr_{kk}_se": v for kk, v in vr.ratio_stderr.items()},
                     "var_plain_se": vr.variance_plain_stderr})  # fmt: skip
    return rows


def run_mnist(ctx: Context) -> dict[str, Any]:
    """Train plain and controlled ``SmallUNet``; VR along training; samples; write outputs."""
    t0 = time.perf_counter()
    s = _settings(ctx)
    images = mnist_images(ctx, s.limit)
    every = max(1, s.steps // s.snapshots)
    jobs = {}
    for controlled in (False, True):
        name = f"mnist-{'cv' if controlled else 'plain'}"
        jobs[controlled] = run_job(
            ctx,
            name,
            functools.partial(_build, ctx, s, images, controlled, 0 if controlled else every),
            s.steps,
        )
    model = copy.deepcopy(jobs[False].model)
    vr_rows: list[dict[str, float]] = []
    for step in sorted(jobs[False].snapshots):
        model.load_state_dict(jobs[False].snapshots[step])
        vr_rows += _vr_rows(ctx, s, model, images, step)
    curves = [{"method": "cv" if c else "plain", **r} for c, j in jobs.items() for r in j.evals]
    train: list[dict[str, Any]] = [
        {"method": "cv" if c else "plain", **r} for c, j in jobs.items() for r in j.log
    ]
    final_loss: dict[
        str, dict[str, float]
    ] = {}  # mean training loss over the last 10% of steps, and the last held-out loss
    for m in ("plain", "cv"):
        tail = [r["loss"] for r in train if r["method"] == m][-max(1, s.steps // 10) :]
        held = [float(r["dsm_loss"]) for r in curves if r["method"] == m]
        final_loss[m] = {"train_last10pct": sum(tail) / len(tail), "held_out": held[-1]}
    samples = reverse_sde_sample(jobs[True].model, s.sample_count, sigma_min=s.sigma_min,
                                 sigma_max=s.sigma_max, steps=s.sample_steps,
                                 generator=ctx.generator("mnist-samples"))  # fmt: skip
    results = {
        "settings": asdict(s), "seed": ctx.seed, "num_images": int(images.shape[0]),
        "vr": vr_rows, "eval_curves": curves,
        "final_train_loss": final_loss,
        "sample_mean": float(samples.mean()), "sample_std": float(samples.std()),
    }  # fmt: skip
    out = ctx.out
    write_csv(out / "fig3_vr.csv", vr_rows)
    write_csv(out / "fig3_train_loss.csv", train)
    write_csv(out / "fig3_eval_loss.csv", curves)
    write_json(out / "results.json", results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, color in (("plain", "C3"), ("cv", "C0")):
        rows = [r for r in train if r["method"] == m]
        band_plot(
            axes[0], [r["step"] for r in rows], [[r["loss"] for r in rows]], label=m, color=color
        )
        ev = [r for r in curves if r["method"] == m]
        axes[0].plot([r["step"] for r in ev], [r["dsm_loss"] for r in ev], "o--", color=color,
                     label=f"{m} (held-out)")  # fmt: skip
    axes[0].set(title="training loss", xlabel="step")
    axes[0].legend()
    ratio_lines(axes[1], vr_rows, x="step", y="vr_element")
    axes[1].set(title="variance ratio (per-element β)", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    save_figure(out / "fig3_mnist.png", fig, dpi=ctx.dpi)
    save_figure(
        out / "fig3_samples.png", image_grid(samples[:, 0].cpu().numpy(), nrow=6), dpi=ctx.dpi
    )
    elapsed = time.perf_counter() - t0
    write_json(out / "timings.json", {"total_s": elapsed})
    lines = ["# mnist: Jeha et al. (2024) figure 3", "",
             f"{results['num_images']} images; SmallUNet base {s.base}; {s.steps} steps of batch {s.batch}.", "",
             "Variance ratio ± jackknife standard error (given the fitted β).", "",
             "| step | k | VR β=1 | VR scalar | VR per-element | β scalar |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in vr_rows:
        cells = [
            plus_minus(r[f"vr_{k}"], r.get(f"vr_{k}_se")) for k in ("unit", "scalar", "element")
        ]
        lines.append(f"| {int(r['step'])} | {int(r['order'])} | {' | '.join(cells)} | "
                     f"{r['beta_scalar']:.3g} |")  # fmt: skip
    fl = final_loss
    lines += ["", "| method | training loss (mean of last 10% of steps) | held-out DSM loss |",
              "|---|---|---|"]  # fmt: skip
    lines += [f"| {m} | {fl[m]['train_last10pct']:.4g} | {fl[m]['held_out']:.4g} |" for m in fl]
    lines += [
              "", "Samples: fig3_samples.png (reverse VE SDE).", "", f"Wall time {elapsed:.1f} s."]  # fmt: skip
    write_markdown(out / "summary.md", "\n".join(lines))
    return results


def mnist_problem(ctx: Context) -> Problem:
    """The leaderboard's MNIST problem: a briefly trained ``SmallUNet`` at fixed θ."""
    s = _settings(ctx)
    images = mnist_images(ctx, s.limit)
    steps = 3 if ctx.quick else 100
    job = run_job(
        ctx,
        "leaderboard-mnist",
        lambda: _build(ctx, replace(s, eval_every=0), images, False, 0),
        steps,
    )
    return Problem(
        name="mnist", model=job.model,
        sample_x=lambda n, g: images[torch.randint(images.shape[0], (n,), generator=g)],
        device=ctx.device,
        sigma_min=s.sigma_min, sigma_max=s.sigma_max, dtype=torch.float32,
        batch=4 if ctx.quick else 16, orders=(0, 1) if not ctx.quick else (0,),
        units=3 if ctx.quick else 24, units_high=2 if ctx.quick else 8, expectation="hutchinson",
        timing_repeats=1 if ctx.quick else 5,
    )  # fmt: skip
