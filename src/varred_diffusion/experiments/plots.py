"""Matplotlib figures of the reproduction (Jeha et al., 2024, figures 1–5); Agg backend only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["band_plot", "grid_heatmap", "image_grid", "ratio_lines"]

_COLORS = {0: "C0", 1: "C1", 2: "C2"}


def band_plot(
    ax: Any,
    steps: Sequence[float],
    runs: Sequence[Sequence[float]],
    *,
    label: str,
    color: str,
    log: bool = True,
) -> None:
    """Mean over runs with a min–max band: ``runs`` is ``[n_runs][n_steps]``."""
    arr = np.asarray(runs, dtype=float)
    mean = arr.mean(0)
    ax.plot(steps, mean, color=color, label=label)
    if arr.shape[0] > 1:
        ax.fill_between(steps, arr.min(0), arr.max(0), color=color, alpha=0.25, linewidth=0)
    if log:
        ax.set_yscale("log")


def ratio_lines(
    ax: Any,
    rows: Sequence[Mapping[str, float]],
    *,
    x: str,
    y: str,
    group: str = "order",
    logx: bool = False,
    logy: bool = True,
    label_fmt: str = "$C^{{{g:d}}}$",
) -> None:
    """One line per value of ``group`` (e.g. Taylor order), ``y`` against ``x``.

    Rows that carry ``<y>_se`` get ±1 SE error bars (on a log axis the lower bar is cut at
    90% of the value so that it stays positive).
    """
    groups = sorted({int(r[group]) for r in rows})
    for g in groups:
        sel = sorted((r for r in rows if int(r[group]) == g), key=lambda r: r[x])
        xs = [r[x] for r in sel]
        ys = [r[y] for r in sel]
        color = _COLORS.get(g, None)
        ax.plot(xs, ys, marker="o", color=color, label=label_fmt.format(g=g))
        se = np.asarray([float(r.get(f"{y}_se", np.nan)) for r in sel], dtype=float)
        if np.isfinite(se).any():
            se = np.nan_to_num(se, nan=0.0)
            lower = np.minimum(se, 0.9 * np.asarray(ys, dtype=float)) if logy else se
            ax.errorbar(xs, ys, yerr=[lower, se], fmt="none", ecolor=color, capsize=2, lw=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")


def grid_heatmap(
    ax: Any,
    values: np.ndarray,
    annotations: Sequence[Sequence[str]],
    *,
    xticks: Sequence[str],
    yticks: Sequence[str],
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Any:
    """A log-coloured heatmap with a text annotation per cell (figure 5 style).

    ``vmin``/``vmax`` (in value units, not log) share one colour scale across panels.
    """
    v = np.log10(np.clip(values, 1e-12, None))
    lo = None if vmin is None else float(np.log10(max(vmin, 1e-12)))
    hi = None if vmax is None else float(np.log10(max(vmax, 1e-12)))
    im = ax.imshow(v, cmap="viridis_r", aspect="auto", vmin=lo, vmax=hi)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, annotations[i][j], ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(xticks)), xticks)
    ax.set_yticks(range(len(yticks)), yticks)
    ax.set_title(title)
    return im


def image_grid(images: np.ndarray, *, nrow: int = 8) -> Any:
    """A figure tiling ``images`` ``[N, H, W]`` (values in [-1, 1]) in rows of ``nrow``."""
    n = images.shape[0]
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrows, ncol, figsize=(ncol, nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.clip(images[k], -1, 1), cmap="gray", vmin=-1, vmax=1)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return fig
