"""Shared experiment plumbing: seeded generators, progress bars, resumable training jobs.

An experiment is a sequence of training jobs (e.g. one per seed × method). Each job
checkpoints itself every ``checkpoint_every`` steps to ``<out>/checkpoints/<job>.ckpt``
(model, optimizer, coefficient statistics, generator states, step, log so far) and writes
``<job>.done.ckpt`` when finished. With ``resume=True`` a finished job is loaded, an
unfinished one continues from its last checkpoint; since all randomness comes from the
checkpointed generators, the final numbers equal those of an uninterrupted run.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.io import (
    get_generator_states,
    load_checkpoint,
    save_checkpoint,
    set_generator_states,
)
from varred_diffusion.losses import dsm_loss

__all__ = ["Context", "TrainJob", "run_job", "seeded_generator"]

T = TypeVar("T")


def seeded_generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a tag path (stable across runs and machines)."""
    key = "/".join(str(t) for t in (seed, *tags)).encode()
    return torch.Generator().manual_seed(zlib.crc32(key) + (seed % 1000003) * 2**32)


@dataclass(frozen=True)
class Context:
    """Options common to every subcommand (see ``varred-repro --help``)."""

    out: Path
    seed: int = 0
    steps: int | None = None
    device: str = "cpu"
    quick: bool = False
    resume: bool = False
    checkpoint_every: int = 0
    progress: bool = True
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, *tags: object) -> torch.Generator:
        """A fresh generator for the stream named by ``tags``."""
        return seeded_generator(self.seed, *tags)

    def bar(
        self, iterable: Iterable[T], *, total: int | None = None, desc: str = ""
    ) -> Iterator[T]:
        """tqdm progress bar when enabled and stderr is a TTY; the bare iterable otherwise."""
        if not self.progress or not sys.stderr.isatty():
            return iter(iterable)
        from tqdm.auto import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))

    @property
    def dpi(self) -> int:
        """Figure resolution: low for ``--quick`` (tests), 120 otherwise."""
        return 30 if self.quick else 120

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class TrainJob:
    """A resumable training run.

    Attributes:
        model: the module trained.
        optimizer: its optimizer.
        step_fn: ``step_fn(i) -> dict`` runs training step ``i`` (0-based), returns floats.
        eval_fn: ``eval_fn(i) -> dict`` measures after step ``i`` (deterministic at fixed θ).
        eval_every: call ``eval_fn`` at initialisation (``i = -1``), when
            ``(i + 1) % eval_every == 0`` and after the last step.
        generators: named generators whose states are checkpointed.
        stateful: further objects with ``state_dict``/``load_state_dict`` (coefficients).
        snapshot_every: keep a copy of the parameters every this many steps (0: never).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int], dict[str, float]]
    eval_fn: Callable[[int], dict[str, float]] | None = None
    eval_every: int = 0
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    stateful: dict[str, Any] = field(default_factory=dict)
    snapshot_every: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generators": get_generator_states(self.generators),
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "log": self.log,
            "evals": self.evals,
            "snapshots": self.snapshots,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_generator_states(self.generators, state["generators"])
        for k, v in self.stateful.items():
            v.load_state_dict(state["stateful"][k])
        self.log = list(state["log"])
        self.evals = list(state["evals"])
        self.snapshots = dict(state["snapshots"])
        self.step = int(state["step"])

    def _snapshot(self) -> None:
        self.snapshots[self.step] = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }


def _maybe_eval(job: TrainJob, i: int, steps: int) -> None:
    if (
        job.eval_fn is not None
        and job.eval_every > 0
        and ((i + 1) % job.eval_every == 0 or i + 1 == steps)
    ):
        row = {"step": float(i + 1)}
        row.update(job.eval_fn(i))
        job.evals.append(row)


def run_job(ctx: Context, name: str, build: Callable[[], TrainJob], steps: int) -> TrainJob:
    """Build the job, restore it when resuming, train to ``steps``, checkpoint along the way.

    Args:
        ctx: experiment context (``resume``, ``checkpoint_every``, output folder).
        name: job name (file-name safe), unique within the experiment.
        build: constructs a fresh job (model, optimizer, generators seeded from ``ctx``).
        steps: total training steps.

    Returns:
        The finished job (model at the final θ, logs, snapshots).
    """
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise VarRedError(f"name: expected a file-name-safe job name, got {name!r}")
    job = build()
    ckpt = ctx.checkpoint_dir / f"{name}.ckpt"
    done = ctx.checkpoint_dir / f"{name}.done.ckpt"
    run_id = {
        "seed": ctx.seed,
        "quick": ctx.quick,
        "steps": steps,
        "extra": repr(sorted(ctx.extra.items())),
    }
    if ctx.resume:
        for path in (done, ckpt):
            if path.exists():
                state = load_checkpoint(path)
                if state.get("run") != run_id:
                    raise VarRedError(
                        f"--resume: checkpoint {str(path)!r} was made by a run with {state.get('run')}, "
                        f"this run has {run_id}; use the same options or drop --resume"
                    )
                job.load_state_dict(state["job"])
                break
    if job.step == 0 and not job.evals:
        if job.snapshot_every:
            job._snapshot()
    for i in ctx.bar(range(job.step, steps), total=steps - job.step, desc=name):
        if i == 0:
            _maybe_eval_before(job)
        row = {"step": float(i + 1)}
        row.update(job.step_fn(i))
        job.log.append(row)
        job.step = i + 1
        _maybe_eval(job, i, steps)
        if job.snapshot_every and job.step % job.snapshot_every == 0:
            job._snapshot()
        if ctx.checkpoint_every and job.step % ctx.checkpoint_every == 0 and job.step < steps:
            save_checkpoint(ckpt, {"job": job.state_dict(), "run": run_id})
    if ctx.checkpoint_every or ctx.resume:
        save_checkpoint(done, {"job": job.state_dict(), "run": run_id})
    return job


def _maybe_eval_before(job: TrainJob) -> None:
    """Evaluate at initialisation (logged as step 0)."""
    if job.eval_fn is not None and job.eval_every > 0:
        row = {"step": 0.0}
        row.update(job.eval_fn(-1))
        job.evals.append(row)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    helper: Any,
    score_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    **helper_kwargs: Any,
) -> dict[str, float]:
    """One training step: ``helper`` (a ``TrainingStep``) fills ``.grad``, or plain DSM if None.

    Returns:
        ``{"loss": mean DSM loss of the batch}`` (one host sync, for the curves).
    """
    optimizer.zero_grad(set_to_none=True)
    if helper is not None:
        loss = float(helper(x, sigma, noise, **helper_kwargs)["loss"])
    else:
        mean_loss = dsm_loss(score_fn, x, sigma, noise, validate=False).mean()
        mean_loss.backward()
        loss = float(mean_loss.detach())
    optimizer.step()
    return {"loss": loss}
