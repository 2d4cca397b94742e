"""``varred-repro train``: time to quality of training recipes, side by side.

Each recipe trains a fresh ``SmallUNet`` (VE, σ log-uniform on [σ_min, σ_max]) for the
same wall-clock budget and, separately, the same number of images, for several seeds.
The deterministic validation loss (:mod:`.validation`) is measured every ``eval_every``
steps (its time is excluded from the clock), the Fréchet distance (:mod:`.quality`,
Fashion-MNIST only: its classifier needs the training split) at the end of the equal
wall-clock runs. Runs go one after another, or with ``schedule="in-turns"`` a seed's
recipes step in turns in one process (:mod:`.train_run`), so that machine load that comes
and goes falls on all of them alike. Outputs:
``curves.csv``, ``final.csv``, ``results.json``, ``quality_vs_wallclock.png``,
``quality_vs_images.png`` and ``summary.md`` (time each recipe needs to reach the plain
run's final validation loss, final Fréchet distance; mean ± standard error over seeds).

A trainer is ``make_step(model) -> step(x [B, ...], generator) -> dict``: the step draws σ and
ε from ``generator``, updates the model and returns floats (``"loss"``).
:func:`recipe_trainer` makes one from a ``vd.Recipe`` and :func:`auto_trainer` from
``vd.AutoStep``; :func:`default_recipes` is the list the command compares.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

import varred_diffusion as vd
from varred.errors import VarRedError
from varred.layout import CoefficientLayout
from varred_diffusion.experiments.common import Context
from varred_diffusion.experiments.datasets import load_dataset
from varred_diffusion.experiments.train_report import merge_results, summarise, write_report
from varred_diffusion.experiments.train_run import RecipeRun, Step, run_in_turns
from varred_diffusion.experiments.validation import ValidationSet

__all__ = [
    "Recipe",
    "TrainSettings",
    "auto_trainer",
    "default_recipes",
    "recipe_trainer",
    "run_train",
    "train_recipes",
]

#: MNIST images (the last of its test split) held out for validation, never trained on.
MNIST_HOLDOUT = 1000
Recipe = Callable[[nn.Module], Step]


@dataclass(frozen=True)
class TrainSettings:
    """Sizes of ``varred-repro train`` (defaults: Fashion-MNIST, 20 CPU-minutes per run)."""

    dataset: str = "fashion-mnist"
    base: int = 16
    batch: int = 32
    lr: float = 2e-4
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    seeds: int = 3
    #: seeds run: ``first_seed, ..., first_seed + seeds - 1`` (more seeds later, then merge)
    first_seed: int = 0
    budget_s: float = 1200.0
    images: int = 200_000
    eval_every: int = 200
    val_size: int = 512
    val_sigmas: int = 16
    fd_count: int = 2000
    heun_steps: int = 18
    limit: int | None = None
    num_bins: int = 4
    stf_reference: int = 256
    #: ``"cpu"``: the process's CPU time (robust to other load; the budget in CPU-seconds);
    #: ``"wall"``: wall-clock; ``"auto"``: CPU time on the CPU, wall-clock (synchronised) on CUDA.
    clock: str = "auto"
    #: which budgets to run: equal training time (``"wallclock"``) and/or equal images.
    modes: tuple[str, ...] = ("wallclock", "images")
    #: ``"sequential"``: one run after another; ``"in-turns"``: a seed's recipes in one
    #: process, the one that has spent least of its budget stepping next, so all of them meet
    #: the same machine load (:func:`~.train_run.run_in_turns`).
    schedule: str = "sequential"

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.first_seed < 0:
            raise VarRedError(f"seeds, first_seed: expected seeds >= 1 and first_seed >= 0, "
                              f"got {self.seeds} and {self.first_seed}")  # fmt: skip
        if self.schedule not in ("sequential", "in-turns"):
            raise VarRedError(
                f"schedule: expected 'sequential' or 'in-turns', got {self.schedule!r}"
            )
        if self.clock not in ("auto", "cpu", "wall"):
            raise VarRedError(f"clock: expected 'auto', 'cpu' or 'wall', got {self.clock!r}")
        bad = [m for m in self.modes if m not in ("wallclock", "images")]
        if bad or not self.modes:
            raise VarRedError(
                f"modes: expected a non-empty subset of ('wallclock', 'images'), got {self.modes!r}"
            )

    def timer(self, device: str) -> Callable[[], float]:
        """The clock the budget is measured on (see :attr:`clock`)."""
        cpu = self.clock == "cpu" or (self.clock == "auto" and not device.startswith("cuda"))
        return time.process_time if cpu else time.perf_counter


def _settings(ctx: Context) -> TrainSettings:
    s = TrainSettings(dataset=str(ctx.extra.get("dataset_name", "fashion-mnist")))
    if ctx.quick:
        s = replace(s, base=8, batch=4, seeds=2, budget_s=0.3, images=48, eval_every=4,
                    val_size=16, val_sigmas=4, fd_count=0, heun_steps=2, limit=256)  # fmt: skip
    given = dict(ctx.extra.get("train_settings", {}))
    unknown = sorted(set(given) - set(asdict(s)))
    if unknown:
        raise VarRedError(f"train settings: unknown {unknown}; expected fields of TrainSettings")
    return replace(s, **given)


def _with_adam(model: nn.Module, s: TrainSettings, step: Callable[..., dict]) -> Step:
    """``run(x, g)``: ``step(x, generator=g)`` fills ``p.grad``, then one Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)

    def run(x: Tensor, g: torch.Generator) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        diag = step(x, generator=g)
        opt.step()
        return {"loss": float(diag["loss"])}

    return run


def recipe_trainer(recipe: vd.Recipe, s: TrainSettings) -> Recipe:
    """A ``vd.Recipe`` trained with Adam: its step draws σ (sampler) and ε from ``g``."""

    def make_step(model: nn.Module) -> Step:
        return _with_adam(model, s, recipe.build(model, model.parameters(), validate=False))

    return make_step


def auto_trainer(s: TrainSettings) -> Recipe:
    """``vd.AutoStep`` (C^0 only in the σ bins where it pays; σ sampler by measured spread)."""

    def make_step(model: nn.Module) -> Step:
        bins = vd.SigmaBins(s.sigma_min, s.sigma_max, s.num_bins)
        probe = max(4, min(40, s.eval_every))
        auto = vd.AutoStep(model, model.parameters(), bins=bins, probe_steps=probe,
                           recheck_every=max(probe, 25 * probe))  # fmt: skip
        run = _with_adam(model, s, auto)
        run.decisions = auto.decisions  # type: ignore[attr-defined]  # the report lists them
        return run

    return make_step


def default_recipes(s: TrainSettings, reference: Tensor) -> dict[str, Recipe]:
    """The recipes ``varred-repro train`` compares (plain first; ``reference``: STF's data)."""
    lo, hi = s.sigma_min, s.sigma_max
    bins = vd.SigmaBins(lo, hi, s.num_bins)
    plain = vd.LogUniformSigma(lo, hi)

    def draw(n: int, g: torch.Generator) -> Tensor:
        return reference[torch.randint(reference.shape[0], (n,), generator=g)]

    stf = vd.StableTarget(vd.FreshReference(draw, s.stf_reference,
                                            generator=torch.Generator().manual_seed(1)))  # fmt: skip
    recipes = {
        "plain": vd.Recipe(sampler=plain),
        "importance σ": vd.Recipe(sampler=vd.ImportanceSigmaSampler(s.num_bins, lo, hi)),
        "stratified σ": vd.Recipe(sampler=vd.StratifiedSigma(lo, hi)),
        f"STF (R = {s.stf_reference})": vd.Recipe(sampler=plain, target=stf),
        "C^0, per-σ-bin β": vd.Recipe(
            sampler=plain,
            control=vd.TaylorControl(0),
            layout=CoefficientLayout("element", groups=bins),
        ),
        "Min-SNR-5 (objective changed)": vd.Recipe(
            sampler=plain, weighting=vd.MinSNRWeighting(5.0)
        ),
    }
    out = {name: recipe_trainer(r, s) for name, r in recipes.items()}
    out["auto"] = auto_trainer(s)
    return out


def train_and_held(s: TrainSettings, data_dir: Any = None) -> tuple[Tensor, Tensor]:
    """Training images and held-out validation images, disjoint.

    Fashion-MNIST: its train split (first ``s.limit``) and its test split. MNIST has only
    its test split here: its last :data:`MNIST_HOLDOUT` images are held out, the rest
    (first ``s.limit``) train.
    """
    if s.dataset == "fashion-mnist":
        train = load_dataset(s.dataset, "train", data_dir, limit=s.limit).images
        return train, load_dataset(s.dataset, "test", data_dir).images
    images = load_dataset(s.dataset, "test", data_dir).images
    train, held = images[:-MNIST_HOLDOUT], images[-MNIST_HOLDOUT:]
    return (train if s.limit is None else train[: s.limit]), held


def train_recipes(ctx: Context, recipes: Mapping[str, Recipe], s: TrainSettings, *,
                  require_plain: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train every recipe × seed × mode; return settings, curves, finals and the table.

    Without a ``"plain"`` recipe (``require_plain=False``: a run to be merged with one
    that has it, :func:`~.train_report.merge_results`) the table is empty.
    """
    if require_plain and "plain" not in recipes:
        raise VarRedError(
            f"recipes: expected a 'plain' recipe (the reference), got {sorted(recipes)}"
        )
    train, held = train_and_held(s, ctx.data_dir)
    vset = ValidationSet.build(held, ctx.generator("train-val"), size=min(s.val_size, len(held)),
                               num_sigmas=s.val_sigmas, sigma_min=s.sigma_min,
                               sigma_max=s.sigma_max).to(ctx.device)  # fmt: skip
    fd = None
    if s.fd_count > 0 and s.dataset == "fashion-mnist":
        from varred_diffusion.experiments.quality import fashion_mnist_evaluator

        fd, acc = fashion_mnist_evaluator(
            count=s.fd_count, data_dir=ctx.data_dir, progress=ctx.progress
        )
        print(f"train: Fréchet classifier test accuracy {acc:.4f}", file=sys.stderr)
    seeds = range(s.first_seed, s.first_seed + s.seeds)
    if s.schedule == "in-turns":  # a seed's recipes step in turns, in one process
        groups = [[(name, seed) for name in recipes] for seed in seeds]
    else:
        groups = [[(name, seed)] for name in recipes for seed in seeds]
    curves, finals, decisions = [], [], []
    for mode in s.modes:
        for group in groups:
            runs = [RecipeRun(ctx, s, name, recipes[name], seed, mode, train, vset)
                    for name, seed in group]  # fmt: skip
            run_in_turns(runs)
            for run in runs:
                rows, final, log = run.finish(fd)
                curves += rows
                finals.append(final)
                if log is not None:  # an automatic recipe: what it kept, and when
                    decisions.append({"recipe": run.name, "seed": run.seed, "mode": mode,
                                      "decisions": list(log)})  # fmt: skip
    table = summarise(curves, finals, list(recipes), s.modes) if "plain" in recipes else []
    clock = "cpu" if s.timer(ctx.device) is time.process_time else "wall"
    return {"settings": asdict(s), "clock": clock, "curves": curves, "finals": finals,
            "table": table, "decisions": decisions}  # fmt: skip


def run_train(ctx: Context, recipes: Mapping[str, Recipe] | None = None) -> dict[str, Any]:
    """``varred-repro train``: the :func:`default_recipes` (or ``recipes``) side by side.

    With ``ctx.extra["merge"]`` (directories of earlier runs) it trains nothing and writes
    the report of their union instead (:func:`~.train_report.merge_results`).
    """
    if ctx.extra.get("merge"):
        return merge_results(ctx.extra["merge"], ctx.out, ctx.dpi)
    s = _settings(ctx)
    if recipes is None:
        recipes = default_recipes(s, train_and_held(s, ctx.data_dir)[0])
        keep = ctx.extra.get("recipes")
        if keep:
            recipes = {k: v for k, v in recipes.items() if k == "plain" or k in keep}
        if ctx.extra.get("without_plain"):
            recipes = {k: v for k, v in recipes.items() if k != "plain"}
    t0 = time.perf_counter()
    res = train_recipes(ctx, recipes, s, require_plain=not ctx.extra.get("without_plain", False))
    write_report(ctx.out, res, ctx.dpi, wall_s=time.perf_counter() - t0)
    return res
