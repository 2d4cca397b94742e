"""Shared measurement for the VI examples: per-block variance ratios ± jackknife SE, bias check, cost.

At fixed variational parameters, ``reps`` independent batches of ``batch`` draws. For each
configuration and block: VR = Σ_r tr Var_r[controlled] / Σ_r tr Var_r[plain] (plain = the full
reparameterisation gradient on the same draws), SE by the leave-one-repetition-out jackknife;
bias = max over coordinates of |mean_r(controlled − plain)| / SE_r; cost = time of the
controlled per-sample gradients (controls, means and β included) / time of the plain ones,
measured in the same run.
"""

from __future__ import annotations

import math
import time

import torch

from varred.coefficients import OptimalCoefficient
from varred.estimate import estimate
from varred.vi.control import ELBOControl
from varred.vi.gradient import elbo_grads

CONFIGS = [
    ("order 1 (Miller)", 1, "none"),
    ("order 2", 2, "none"),
    ("STL", 0, "stl"),
    ("STL blend (fitted β)", 0, "blend"),
    ("order 2 + STL blend", 2, "blend"),
]


def jackknife_ratio(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """``Σnum/Σden`` and its leave-one-out jackknife standard error (``num, den: [R]``)."""
    r = num.shape[0]
    full = float(num.sum() / den.sum())
    loo = (num.sum() - num) / (den.sum() - den)
    se = math.sqrt((r - 1) / r * float(((loo - loo.mean()) ** 2).sum()))
    return full, se


def measure(family, log_p, *, reps: int, batch: int, generator: torch.Generator, configs=CONFIGS):
    """Print and return ``{name: {block: (vr, se), "bias_z": float, "cost": float}}``."""
    eps_all = [family.sample_noise(batch, generator) for _ in range(reps)]
    elbo_grads(family, log_p, eps_all[0])  # warm-up outside the timed region
    t0 = time.perf_counter()
    plain = [elbo_grads(family, log_p, e) for e in eps_all]
    t_plain = time.perf_counter() - t0
    plain = [(gm, gs.reshape(batch, -1)) for gm, gs in plain]
    results = {}
    print(
        f"{'control':24s} {'VR mean block':>20s} {'VR scale block':>20s} {'max|bias|/SE':>13s} {'cost':>6s}"
    )
    for name, order, stl in configs:
        ctrl = ELBOControl(family, log_p, order=order, stl=stl,
                           coefficient=OptimalCoefficient(kind="scalar", fit="crossfit", folds=2))  # fmt: skip
        var_c = {"mean": [], "scale": []}
        var_p = {"mean": [], "scale": []}
        diffs = []
        t0 = time.perf_counter()
        outs = []
        for e in eps_all:
            parts = ctrl.per_sample(e, generator)
            outs.append({b: estimate(f, c, ctrl.coefficients[b] if c is not None else None)
                         for b, (f, c) in parts.items()})  # fmt: skip
        t_ctrl = time.perf_counter() - t0
        for est, (gm, gs) in zip(outs, plain):
            d = []
            for b, g in (("mean", gm), ("scale", gs)):
                var_c[b].append(est[b].variance.sum())
                var_p[b].append(g.var(0).sum())
                d.append(est[b].mean - g.mean(0))
            diffs.append(torch.cat(d))
        dd = torch.stack(diffs)
        z = dd.mean(0).abs() / (dd.std(0) / math.sqrt(reps)).clamp_min(1e-300)
        res = {b: jackknife_ratio(torch.stack(var_c[b]), torch.stack(var_p[b])) for b in var_c}
        res["bias_z"] = float(z.max())
        res["cost"] = t_ctrl / t_plain
        results[name] = res
        cell = {b: f"{res[b][0]:.3g} ± {res[b][1]:.2g}" for b in ("mean", "scale")}
        print(
            f"{name:24s} {cell['mean']:>20s} {cell['scale']:>20s} {res['bias_z']:13.2f} {res['cost']:6.2f}"
        )
    print(f"(VR ± jackknife SE over {reps} repetitions of {batch} draws; bias: controlled vs plain "
          "mean gradient, paired, in SEs; cost: controlled / plain time in this run)")  # fmt: skip
    return results


def fit(family, log_p, *, steps: int, batch: int, lr: float, generator: torch.Generator) -> None:
    """A short Adam run with STL gradients, to measure at a realistic point."""
    if steps <= 0:
        return
    ctrl = ELBOControl(family, log_p, order=0, stl="stl")
    opt = torch.optim.Adam(family.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        info = ctrl.step(batch, generator)
        opt.step()
    print(f"fitted {steps} Adam steps (STL, batch {batch}): ELBO ≈ {float(info['elbo']):.2f}")
