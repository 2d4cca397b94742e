"""Draft ``varred-repro train`` (varred_diffusion.experiments.train) on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import varred_diffusion as vd
from varred.errors import VarRedError
from varred_diffusion.experiments.common import Context
from varred_diffusion.experiments.datasets import dataset_missing_reason
from varred_diffusion.experiments.train import (
    TrainSettings,
    default_recipes,
    recipe_trainer,
    run_train,
    train_recipes,
)


@pytest.mark.skipif(dataset_missing_reason("mnist", "test") is not None,
                    reason="needs the MNIST test split (../shared/data/mnist)")  # fmt: skip
def test_train_quick_writes_everything(tmp_path):
    ctx = Context(out=tmp_path, quick=True, progress=False,
                  extra={"dataset_name": "mnist", "train_settings": {"images": 24},
                         "recipes": ["C^0, per-σ-bin β", "auto"]})  # fmt: skip
    res = run_train(ctx)
    for f in ("curves.csv", "final.csv", "results.json", "summary.md",
              "quality_vs_wallclock.png", "quality_vs_images.png"):  # fmt: skip
        assert (tmp_path / f).stat().st_size > 0, f
    data = json.loads(Path(tmp_path / "results.json").read_text())
    assert {r["recipe"] for r in data["table"]} == {"plain", "C^0, per-σ-bin β", "auto"}
    by_images = [f for f in res["finals"] if f["mode"] == "images"]
    assert all(f["images"] == 24 for f in by_images)
    # Same seed, same data stream and init: the plain runs of both modes start equal.
    starts = [
        r for r in res["curves"] if r["step"] == 0 and r["recipe"] == "plain" and r["seed"] == 0
    ]
    assert len(starts) == 2 and starts[0]["val_loss"] == starts[1]["val_loss"]
    summary = (tmp_path / "summary.md").read_text()
    assert "time to plain's final val loss" in summary and "no Fréchet distance" in summary


def test_train_needs_plain(tmp_path):
    ctx = Context(out=tmp_path, quick=True)
    with pytest.raises(VarRedError, match="plain"):
        train_recipes(ctx, {"other": recipe_trainer(vd.Recipe(), TrainSettings())}, TrainSettings())


def test_default_recipes_are_the_issue_list():
    """plain, importance σ, stratified σ, STF, C^0 per-bin β, Min-SNR and auto, plain first."""
    import torch

    names = list(default_recipes(TrainSettings(), torch.zeros(4, 1, 28, 28)))
    assert names[0] == "plain" and names[-1] == "auto" and len(names) == 7
    assert any(n.startswith("STF") for n in names) and any("Min-SNR" in n for n in names)
