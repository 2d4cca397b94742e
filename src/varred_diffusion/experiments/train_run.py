"""One recipe × seed × budget of ``varred-repro train``, and the schedules that run them.

A :class:`RecipeRun` holds one run's model, step, clock and validation curve and advances
one training step at a time, so runs can be trained one after another or **in turns** in one
process (:func:`run_in_turns`: the run that has spent the least of its budget steps next), so
that every run of a seed meets the same machine (other processes' load, its thermal state)
through the whole comparison. Each run's
clock sums its own steps only; evaluation is excluded. Apart from the clock the two schedules
give the same numbers: each run has its own model, generators and optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from varred_diffusion.experiments.common import Context
from varred_diffusion.experiments.validation import ValidationSet, validation_loss

__all__ = ["RecipeRun", "Step", "run_in_turns"]

#: ``step(x [B, ...], generator) -> {"loss": ...}``: one update of the model.
Step = Callable[[Tensor, torch.Generator], dict[str, float]]


class RecipeRun:
    """Training of one recipe for one seed under one budget (``mode``), a step at a time.

    ``s`` is the command's ``TrainSettings``; the model is a fresh ``SmallUNet`` from the
    seed's ``train-init`` stream and the data, σ and ε come from its ``train-data`` stream,
    the same for every recipe. The validation loss is recorded at step 0, every
    ``s.eval_every`` steps and at the end.
    """

    def __init__(self, ctx: Context, s: Any, name: str, recipe: Callable[[nn.Module], Step],
                 seed: int, mode: str, images: Tensor, vset: ValidationSet) -> None:  # fmt: skip
        from varred_diffusion.models import SmallUNet

        self.ctx, self.s, self.name, self.seed, self.mode = ctx, s, name, seed, mode
        self.images, self.vset = images, vset
        gen = ctx.generator("train-init", seed)
        self.model = SmallUNet(1, base=s.base, generator=gen).to(ctx.device)
        self.step = recipe(self.model)
        self.g = ctx.generator("train-data", seed)
        self.now = s.timer(ctx.device)
        self.clock, self.seen, self.i = 0.0, 0, 0
        self.rows: list[dict] = []
        self._record()

    @property
    def done(self) -> bool:
        """Whether the budget is spent (training time, or images seen)."""
        if self.mode == "wallclock":
            return self.clock >= self.s.budget_s
        return self.seen >= self.s.images

    @property
    def spent(self) -> float:
        """The share of the budget spent so far (what :func:`run_in_turns` balances)."""
        if self.mode == "wallclock":
            return self.clock / self.s.budget_s
        return self.seen / self.s.images

    def _record(self) -> None:
        self.model.eval()
        r = validation_loss(self.vset, self.model)
        self.model.train()
        self.rows.append({"recipe": self.name, "seed": self.seed, "mode": self.mode,
                          "step": self.i, "images": self.seen, "elapsed_s": self.clock,
                          **r.as_dict()})  # fmt: skip

    def advance(self) -> None:
        """One training step on the run's clock (then an evaluation, every ``eval_every``)."""
        s, dev = self.s, self.ctx.device
        idx = torch.randint(self.images.shape[0], (s.batch,), generator=self.g)
        x = self.images[idx].to(dev)
        t0 = self.now()
        self.step(x, self.g)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        self.clock += self.now() - t0
        self.seen, self.i = self.seen + s.batch, self.i + 1
        if self.i % s.eval_every == 0:
            self._record()

    def finish(self, fd: Any) -> tuple[list[dict], dict, list | None]:
        """Curve, final row (with the Fréchet distance of an equal-time run) and decisions."""
        s = self.s
        if self.rows[-1]["step"] != self.i:
            self._record()
        final = {"recipe": self.name, "seed": self.seed, "mode": self.mode, "steps": self.i,
                 "images": self.seen, "elapsed_s": self.clock,
                 "val_loss": self.rows[-1]["val_loss"], "frechet": float("nan")}  # fmt: skip
        if fd is not None and self.mode == "wallclock":  # quality at the budget users pay
            self.model.eval()
            final["frechet"] = fd.evaluate_model(
                self.model, self.ctx.generator("train-fd", self.seed), count=s.fd_count,
                steps=s.heun_steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                device=self.ctx.device,
            )  # fmt: skip
        return self.rows, final, getattr(self.step, "decisions", None)


def run_in_turns(runs: Sequence[RecipeRun]) -> None:
    """All runs to the end of their budgets, the one that has spent least stepping next.

    One run alone is trained straight to its end; ties go to the earlier run, so runs on an
    images budget take one step each in order.
    """
    active = [r for r in runs if not r.done]
    while active:
        min(active, key=lambda r: r.spent).advance()
        active = [r for r in active if not r.done]
