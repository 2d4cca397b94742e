"""The report of ``varred-repro train``: time to the plain run's quality, figures, merges.

:func:`summarise` turns validation curves into the table users decide on: for each
budget (equal training time, equal images) and recipe, the time and images needed to
reach the plain recipe's final validation loss (mean over seeds), how many seeds reached
it, and the final validation loss and Fréchet distance, each as mean ± standard error
over seeds. :func:`write_report` writes ``curves.csv``, ``final.csv``, ``results.json``,
``quality_vs_wallclock.png``, ``quality_vs_images.png`` and ``summary.md``.
:func:`merge_results` joins runs made in parallel (one process or machine per group of
recipes, identical settings but their seeds, ``plain`` in at least one) into one report.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from varred.errors import VarRedError
from varred_diffusion.experiments.io import (
    plus_minus,
    save_figure,
    write_csv,
    write_json,
    write_markdown,
)

__all__ = ["merge_results", "summarise", "write_report"]


def _time_to(rows: list[dict], target: float, key: str = "elapsed_s") -> float:
    """``key`` (time or images) of the first evaluation with loss ≤ ``target`` (NaN if never)."""
    for r in rows:
        if r["val_loss"] <= target:
            return float(r[key])
    return float("nan")


def _mean_se(v: list[float | None]) -> tuple[float, float]:
    v = [x for x in v if x is not None and math.isfinite(x)]  # None: NaN read back from JSON
    if not v:
        return float("nan"), float("nan")
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return statistics.fmean(v), se


def _common_step(per_run: list[list[dict]]) -> int:
    """The largest step at which every run was evaluated (0 when only the start is shared)."""
    shared = set.intersection(*({r["step"] for r in rows} for rows in per_run))
    return max(shared, default=0)


def _loss_at(rows: list[dict], step: int) -> float:
    return next((r["val_loss"] for r in rows if r["step"] == step), float("nan"))


def summarise(curves: list[dict], finals: list[dict], names: Sequence[str],
              modes: Sequence[str]) -> list[dict]:  # fmt: skip
    """Per budget and recipe: time / images to plain's final validation loss, finals.

    The seeds are those each recipe ran (``runs``), so merged runs whose recipes ran on
    different seeds each count their own. ``val_loss_at_common_step`` compares the recipes
    per image seen, which a machine's load cannot move: the validation loss at
    ``common_step``, the largest step at which every run of the budget was evaluated;
    ``paired_delta_at_common_step`` is its difference from plain's run of the same seed
    (same initialisation and data stream), over the seeds both ran.
    """
    table = []
    for mode in modes:
        plain = [f["val_loss"] for f in finals if f["mode"] == mode and f["recipe"] == "plain"]
        if not plain:
            raise VarRedError(f"finals: expected runs of 'plain' for budget {mode!r}, got none")
        target = statistics.fmean(plain)
        runs: dict[tuple, list[dict]] = {
            (f["recipe"], f["seed"]): [] for f in finals if f["mode"] == mode
        }
        for r in curves:
            if r["mode"] == mode and (r["recipe"], r["seed"]) in runs:
                runs[r["recipe"], r["seed"]].append(r)
        common = _common_step(list(runs.values()))
        for name in names:
            fin = [f for f in finals if f["mode"] == mode and f["recipe"] == name]
            per_seed = [runs[name, f["seed"]] for f in fin]
            t = [_time_to(rows, target) for rows in per_seed]
            n_img = [_time_to(rows, target, "images") for rows in per_seed]
            at_common = [_loss_at(rows, common) for rows in per_seed]
            paired = [at - _loss_at(runs["plain", f["seed"]], common)
                      for f, at in zip(fin, at_common, strict=True) if ("plain", f["seed"]) in runs]  # fmt: skip
            table.append({"mode": mode, "recipe": name, "target_val_loss": target,
                          "time_to_target_s": _mean_se(t),
                          "images_to_target": _mean_se(n_img), "reached": sum(map(math.isfinite, t)),
                          "runs": len(fin), "final_val_loss": _mean_se([f["val_loss"] for f in fin]),
                          "final_frechet": _mean_se([f["frechet"] for f in fin]),
                          "common_step": common, "val_loss_at_common_step": _mean_se(at_common),
                          "paired_delta_at_common_step": _mean_se(paired),
                          "images": _mean_se([float(f["images"]) for f in fin])})  # fmt: skip
    return table


def _figure(curves: list[dict], mode: str, x: str, recipes: list[str]) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, name in enumerate(recipes):
        for k, seed in enumerate(sorted({r["seed"] for r in curves})):
            rows = [r for r in curves if (r["recipe"], r["seed"], r["mode"]) == (name, seed, mode)]
            ax.plot([r[x] for r in rows], [r["val_loss"] for r in rows], color=f"C{c}",
                    alpha=0.8, label=name if k == 0 else None)  # fmt: skip
    ax.set(xlabel="training time (s, the budget's clock)" if x == "elapsed_s" else "images seen",
           ylabel="validation DSM loss (fixed σ grid)", yscale="log")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    return fig


def _names(finals: list[dict]) -> list[str]:
    """Recipe names in the order they ran, plain first."""
    names = list(dict.fromkeys(f["recipe"] for f in finals))
    return sorted(names, key=lambda n: n != "plain")


def _seed_text(s: dict[str, Any]) -> str:
    first = s.get("first_seed", 0)  # absent in runs written before first_seed existed
    seeds = s.get("seed_list", list(range(first, first + s["seeds"])))
    if len(seeds) == 1:
        return f"1 seed ({seeds[0]})"
    if seeds == list(range(len(seeds))):
        return f"{len(seeds)} seeds"
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


def _schedule_text(s: dict[str, Any]) -> str:
    if s.get("schedule", "sequential") == "sequential":  # also runs written before the option
        return ""
    return ", a seed's recipes stepping in turns in one process (each on its own clock)"


def _at_step(row: dict) -> str:
    """``164.3 ± 0.5 (step 5500) | −0.2 ± 0.4``; rows written before these columns: "– | –"."""
    if "common_step" not in row:
        return "– | –"
    return (f"{plus_minus(*row['val_loss_at_common_step'], '.4g')} (step {row['common_step']}) | "
            f"{plus_minus(*row['paired_delta_at_common_step'])}")  # fmt: skip


def _decision_lines(decisions: list[dict]) -> list[str]:
    """Markdown: per automatic run, the σ bins it kept the control in at each check."""
    if not decisions:
        return []
    lines = ["", "Automatic recipes' decisions (σ bins with the control kept, at each check; "
             "last check's cost ratio of a controlled to a plain step and efficiency):", "",
             "| budget | recipe | seed | bins kept per check | last cost ratio | last efficiency | "
             "last sampler |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in decisions:
        log = d["decisions"]
        if not log:
            lines.append(
                f"| {d['mode']} | {d['recipe']} | {d['seed']} | no check ran | – | – | – |"
            )
            continue
        kept = " ".join(str(e["active_bins"]).replace(" ", "") for e in log)
        last = log[-1]
        lines.append(f"| {d['mode']} | {d['recipe']} | {d['seed']} | {kept} | "
                     f"{last['cost_ratio']:.2f} | {last['efficiency']:.3g} | {last['sampler']} |")  # fmt: skip
    return lines


def write_report(
    out: Path,
    res: dict[str, Any],
    dpi: int,
    *,
    wall_s: float | None = None,
    sources: Sequence[str | Path] = (),
) -> None:
    """Every output file of ``varred-repro train`` from ``res`` (see the module docstring)."""
    s = res["settings"]
    names = _names(res["finals"])
    write_csv(out / "curves.csv", res["curves"])
    write_csv(out / "final.csv", res["finals"])
    write_json(out / "results.json", res)
    for x, mode, file in (("elapsed_s", "wallclock", "quality_vs_wallclock.png"),
                          ("images", "images", "quality_vs_images.png")):  # fmt: skip
        mode = mode if mode in s["modes"] else s["modes"][0]  # one run's curve has both axes
        save_figure(out / file, _figure(res["curves"], mode, x, names), dpi=dpi)
    clock = ("CPU time (process time, torch threads summed)" if res["clock"] == "cpu"
             else "wall-clock")  # fmt: skip
    with_fd = s["fd_count"] > 0 and s["dataset"] == "fashion-mnist"
    fd_text = (f"Fréchet distance (equal-time runs) of {s['fd_count']} Heun samples "
               f"({s['heun_steps']} levels) on Fashion-MNIST classifier features" if with_fd
               else "no Fréchet distance (it needs Fashion-MNIST and fd_count > 0)")  # fmt: skip
    budgets = {
        "wallclock": f"{s['budget_s']:g} s of training {clock} (evaluation excluded)",
        "images": f"{s['images']} images",
    }
    lines = [f"# train: time to quality on {s['dataset']}", "",
             f"SmallUNet base {s['base']}, batch {s['batch']}, Adam lr {s['lr']}, {_seed_text(s)}; "
             f"budgets: {'; '.join(budgets[m] for m in s['modes'])}"
             f"{_schedule_text(s)}; validation loss on "
             f"{s['val_sigmas']} log-spaced σ × {s['val_size']} held-out images; {fd_text}. "
             "Target: the mean over seeds of plain's final validation loss (so plain itself "
             "reaches it in about half its seeds). The common step: the largest step at which "
             "every run of the budget was evaluated (equal images seen, which the machine's "
             "load cannot move); paired Δ: minus plain's loss there in the same seed (same "
             "initialisation and data). Mean ± standard error over seeds.", ""]  # fmt: skip
    if res["table"]:
        lines += ["| budget | recipe | time to plain's final val loss (s) | images to it | "
                  "reached | images seen | final val loss | val loss at the common step | "
                  "paired Δ vs plain there | final Fréchet |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    else:
        lines += ["No plain run here: merge with one (`varred-repro train --merge DIR DIR`)."]
    for r in res["table"]:
        lines.append(f"| {r['mode']} | {r['recipe']} | {plus_minus(*r['time_to_target_s'])} | "
                     f"{plus_minus(*r['images_to_target'])} | "
                     f"{r['reached']}/{r['runs']} | {plus_minus(*r['images'], '.3g')} | "
                     f"{plus_minus(*r['final_val_loss'], '.4g')} | "
                     f"{_at_step(r)} | {plus_minus(*r['final_frechet'])} |")  # fmt: skip
    lines += _decision_lines(res.get("decisions", []))
    if wall_s is not None:
        lines += ["", f"Wall time {wall_s:.1f} s."]
    if sources:
        lines += ["", "Merged from " + ", ".join(f"`{d}`" for d in sources) + "."]
    write_markdown(out / "summary.md", "\n".join(lines))


def merge_results(dirs: Sequence[str | Path], out: Path, dpi: int) -> dict[str, Any]:
    """One report from runs of the same settings made apart (``plain`` in at least one).

    The runs may differ in their seeds (``seeds``, ``first_seed``: more seeds added later),
    nothing else; each recipe, seed and budget must come from one run only.
    """
    if len(dirs) < 2:
        raise VarRedError(f"merge: expected at least two run directories, got {list(dirs)}")
    runs = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise VarRedError(f"merge: expected {path} (a varred-repro train output), not found")
        runs.append(json.loads(path.read_text()))
        runs[-1]["settings"].setdefault("schedule", "sequential")  # written before the option
    first = runs[0]
    free = {"seeds", "first_seed", "seed_list"}
    for d, r in zip(dirs[1:], runs[1:], strict=True):
        keys = sorted((set(first["settings"]) | set(r["settings"])) - free)
        diff = [k for k in keys if first["settings"].get(k) != r["settings"].get(k)]
        if diff or r["clock"] != first["clock"]:
            raise VarRedError(f"merge: {d} differs from {dirs[0]} in {diff or ['clock']}; "
                              "expected runs of identical settings (seeds aside)")  # fmt: skip
    seen: dict[tuple, str] = {}
    for d, r in zip(dirs, runs, strict=True):
        for f in r["finals"]:
            key = (f["recipe"], f["seed"], f["mode"])
            if key in seen:
                raise VarRedError(f"merge: {key} is in both {seen[key]} and {d}; expected each "
                                  "recipe, seed and budget in one run")  # fmt: skip
            seen[key] = str(d)
    curves = [c for r in runs for c in r["curves"]]
    finals = [f for r in runs for f in r["finals"]]
    seeds = sorted({f["seed"] for f in finals})
    s = dict(first["settings"], seeds=len(seeds), first_seed=seeds[0], seed_list=seeds)
    s["modes"] = tuple(s["modes"])
    res = {"settings": s, "clock": first["clock"], "curves": curves, "finals": finals,
           "table": summarise(curves, finals, _names(finals), s["modes"]),
           "decisions": [d for r in runs for d in r.get("decisions", [])]}  # fmt: skip
    write_report(out, res, dpi, sources=dirs)
    return res
