"""Bias and variance of the Stable Target Field against the exact posterior mean.

For Fashion-MNIST (or any IDX set) the data distribution is the empirical one over the N
training images, so the exact posterior mean ``E[x₀ | x_t] = Σ_n w_n x_n`` over all N is
computable (one ``Q×N`` weight matrix per σ bin). For each σ bin: ``Q`` queries
``x_t = x_i + σ ε`` (``x_i`` uniform over the set, σ log-uniform in the bin); for each
reference size R and ``reps`` repetitions, a fresh clean point ``x_i' ~ p(x₀ | x_t)``
(exact posterior draw) and R references drawn i.i.d. uniformly from the set (shared by the
Q queries of one repetition). Two estimators (:func:`varred_diffusion.stf.stf_target`):

- ``stf``: own point + R references (the paper's construction: the minibatch in the reference);
- ``no_own``: R references only (a reference batch independent of ``x_t``).

Per query, in ε units per dimension (``α²/(σ² D)`` times squared x₀ errors):
``bias2 = ‖mean_reps x̂₀ − E[x₀|x_t]‖² − tr S/reps`` (S the sample covariance over the
repetitions; the subtraction makes it unbiased), ``var = tr S``, and ``dsm_var``:
``Var[ε | x_t] = tr Cov[x₀ | x_t]/(σ² D)``, the conditional variance of plain DSM's target.
Table rows average over the Q queries (± SE over queries; queries of one repetition share
references, so the SEs are approximate).

``python -m varred_diffusion.experiments.stf_bias --out results/stf_bias`` (about two minutes
on one core with the defaults) writes ``stf_bias.csv`` and ``stf_bias.md`` atomically.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from varred_diffusion.experiments.data import load_images
from varred_diffusion.experiments.io import plus_minus, write_csv, write_markdown
from varred_diffusion.stf import stf_target, stf_weights

__all__ = ["BINS", "SIZES", "main", "markdown_table", "stf_bias"]

BINS: tuple[tuple[float, float], ...] = (
    (0.05, 0.2),
    (0.2, 0.5),
    (0.5, 1.0),
    (1.0, 2.0),
    (2.0, 5.0),
    (5.0, 20.0),
    (20.0, 80.0),
)
SIZES: tuple[int, ...] = (64, 256, 1024, 4096)


def _mean_se(v: Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


def stf_bias(
    data: Tensor,
    generator: torch.Generator,
    *,
    queries: int = 256,
    reps: int = 12,
    sizes: Sequence[int] = SIZES,
    bins: Sequence[tuple[float, float]] = BINS,
) -> list[dict[str, Any]]:
    """Rows ``{sigma_lo, sigma_hi, R, estimator, bias2, bias2_se, var, var_se, dsm_var, ...}``.

    Args:
        data: ``[N, ...]`` the whole data set (float32; its empirical distribution is the truth).
        generator: all randomness (queries, posterior draws, references).
        queries: Q query points per σ bin.
        reps: repetitions per query (≥ 2).
        sizes: reference sizes R.
        bins: σ bins ``(lo, hi)``; σ is log-uniform inside.
    """
    n = data.shape[0]
    flat = data.reshape(n, -1)  # [N, ...] -> [N, D]
    d = flat.shape[1]
    rn = flat.pow(2).sum(1)  # [N]
    rows: list[dict[str, Any]] = []
    for lo, hi in bins:
        u = torch.rand(queries, generator=generator)
        sigma = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))  # [Q]
        idx = torch.randint(n, (queries,), generator=generator)
        xt = flat[idx] + sigma[:, None] * torch.randn(queries, d, generator=generator)
        w = stf_weights(xt, sigma, flat)  # [Q, N] exact posterior over the whole set
        exact = w @ flat  # [Q, D]
        post_var = (w @ rn - exact.pow(2).sum(1)).clamp_min(0)  # tr Cov[x0 | x_t]   [Q]
        scale = 1.0 / (sigma.double() ** 2 * d)  # ε units per dimension
        dsm_var = post_var.double() * scale
        for r in sizes:
            s1 = {k: torch.zeros(queries, d, dtype=torch.float64) for k in ("stf", "no_own")}
            s2 = {k: torch.zeros(queries, dtype=torch.float64) for k in ("stf", "no_own")}
            for _ in range(reps):
                ref = flat[torch.randint(n, (r,), generator=generator)]  # [R, D], i.i.d.
                own = flat[torch.multinomial(w, 1, generator=generator)[:, 0]]  # x0 ~ posterior
                for key, o in (("stf", own), ("no_own", None)):
                    est = (stf_target(xt, sigma, ref, own=o, validate=False) - exact).double()
                    s1[key] += est
                    s2[key] += est.pow(2).sum(1)
            for key in ("stf", "no_own"):
                mean = s1[key] / reps  # [Q, D] mean error
                tr_s = (s2[key] - reps * mean.pow(2).sum(1)) / (reps - 1)  # tr S   [Q]
                bias2 = (mean.pow(2).sum(1) - tr_s / reps) * scale
                var = tr_s * scale
                b, b_se = _mean_se(bias2)
                v, v_se = _mean_se(var)
                dv, dv_se = _mean_se(dsm_var)
                rows.append(
                    {
                        "sigma_lo": lo,
                        "sigma_hi": hi,
                        "R": r,
                        "estimator": key,
                        "bias2": b,
                        "bias2_se": b_se,
                        "var": v,
                        "var_se": v_se,
                        "mse": b + v,
                        "dsm_var": dv,
                        "dsm_var_se": dv_se,
                        "var_ratio": v / dv if dv > 0 else float("nan"),
                        "queries": queries,
                        "reps": reps,
                    }
                )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (σ bin, R): bias² and variance of both estimators, plain DSM's variance."""
    by = {(r["sigma_lo"], r["R"], r["estimator"]): r for r in rows}
    out = [
        "| σ bin | R | STF bias² | STF var | STF var / DSM var | no-own bias² | no-own var | DSM var |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["estimator"] != "stf":
            continue
        o = by[(r["sigma_lo"], r["R"], "no_own")]
        out.append(
            f"| [{r['sigma_lo']:g}, {r['sigma_hi']:g}) | {r['R']} "
            f"| {plus_minus(r['bias2'], r['bias2_se'], '.2g')} | {plus_minus(r['var'], r['var_se'], '.3g')} "
            f"| {r['var_ratio']:.3g} | {plus_minus(o['bias2'], o['bias2_se'], '.3g')} "
            f"| {plus_minus(o['var'], o['var_se'], '.3g')} | {plus_minus(r['dsm_var'], r['dsm_var_se'], '.3g')} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m varred_diffusion.experiments.stf_bias [--out DIR] [--data-dir DIR]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/stf_bias"))
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    args = p.parse_args(argv)
    data = load_images(args.data_dir, split="train", limit=args.limit)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    rows = stf_bias(data, g, queries=args.queries, reps=args.reps)
    elapsed = time.perf_counter() - t0
    write_csv(args.out / "stf_bias.csv", rows)
    head = (
        f"STF target bias² and variance (ε units per dimension) vs the exact posterior mean over "
        f"{data.shape[0]} training images; {args.queries} queries per σ bin, {args.reps} repetitions, "
        f"seed {args.seed}, {elapsed:.0f} s.\n\n"
    )
    write_markdown(args.out / "stf_bias.md", head + markdown_table(rows))
    print(head + markdown_table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
