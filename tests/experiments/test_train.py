"""Draft ``varred-repro train`` (varred_diffusion.experiments.train) on tiny sizes."""

from __future__ import annotations

import json
from dataclasses import replace
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
    # auto's decisions, per seed and budget, reach results.json and summary.md
    logs = {(d["recipe"], d["seed"], d["mode"]): d["decisions"] for d in data["decisions"]}
    assert set(logs) == {
        ("auto", seed, mode) for seed in (0, 1) for mode in ("wallclock", "images")
    }
    assert all(
        log and all(set(e["active_bins"]) <= set(range(4)) for e in log) for log in logs.values()
    )
    assert (
        "bins kept per check" in summary and summary.count("| auto |") == 2 + 4
    )  # table rows per budget, then per seed × budget


@pytest.mark.skipif(dataset_missing_reason("mnist", "test") is not None,
                    reason="needs the MNIST test split (../shared/data/mnist)")  # fmt: skip
def test_merge_equals_one_run(tmp_path):
    """Recipes trained in two processes (plain in one) merge into the one-process report."""
    from varred_diffusion.experiments.train_report import merge_results

    def ctx(out, **extra):
        settings = {"images": 16, "modes": ("images",)}
        return Context(out=tmp_path / out, quick=True, progress=False,
                       extra={"dataset_name": "mnist", "train_settings": settings, **extra})  # fmt: skip

    one = run_train(ctx("one", recipes=["importance σ"]))
    run_train(ctx("a", recipes=["plain"]))  # plain alone
    alone = run_train(ctx("b", recipes=["importance σ"], without_plain=True))
    assert alone["table"] == [] and {f["recipe"] for f in alone["finals"]} == {"importance σ"}
    assert "No plain run here" in (tmp_path / "b" / "summary.md").read_text()
    merged = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "m", dpi=40)
    from varred_diffusion.experiments.io import to_jsonable

    # Same seeds, same streams: the same numbers (all but the measured times).
    def numbers(table):
        return [{k: v for k, v in r.items() if k != "time_to_target_s"} for r in table]

    assert to_jsonable(numbers(merged["table"])) == to_jsonable(numbers(one["table"]))
    assert [r["recipe"] for r in merged["table"]] == ["plain", "importance σ"]
    assert "Merged from" in (tmp_path / "m" / "summary.md").read_text()
    with pytest.raises(VarRedError, match="in both"):
        merge_results([tmp_path / "a", tmp_path / "one"], tmp_path / "x", dpi=40)
    run_train(ctx("c", recipes=["stratified σ"], without_plain=True,
                  train_settings={"images": 20, "modes": ("images",)}))  # fmt: skip
    with pytest.raises(VarRedError, match="images"):
        merge_results([tmp_path / "a", tmp_path / "c"], tmp_path / "x", dpi=40)
    with pytest.raises(VarRedError, match=r"results\.json"):
        merge_results([tmp_path / "a", tmp_path / "nowhere"], tmp_path / "x", dpi=40)
    assert not (tmp_path / "x").exists()  # nothing half-done written

    # Seeds added later: seed 0 now, seed 1 in another run (first_seed=1), one report.
    for k in (0, 1):
        run_train(ctx(f"s{k}", recipes=["importance σ"],
                      train_settings={"images": 16, "modes": ("images",), "seeds": 1,
                                      "first_seed": k}))  # fmt: skip
    later = merge_results([tmp_path / "s0", tmp_path / "s1"], tmp_path / "s", dpi=40)
    assert to_jsonable(numbers(later["table"])) == to_jsonable(numbers(one["table"]))
    assert later["settings"]["seed_list"] == [0, 1]
    assert "2 seeds;" in (tmp_path / "s" / "summary.md").read_text()
    assert "1 seed (1)" in (tmp_path / "s1" / "summary.md").read_text()
    with pytest.raises(VarRedError, match="in both"):  # seed 1 twice
        merge_results([tmp_path / "one", tmp_path / "s1"], tmp_path / "x", dpi=40)


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


def test_settings_refuse_unknown_clock_and_modes():
    with pytest.raises(VarRedError, match="clock"):
        TrainSettings(clock="gpu")
    with pytest.raises(VarRedError, match="first_seed"):
        TrainSettings(first_seed=-1)
    with pytest.raises(VarRedError, match="seeds"):
        TrainSettings(seeds=0)
    with pytest.raises(VarRedError, match="modes"):
        TrainSettings(modes=("epochs",))
    with pytest.raises(VarRedError, match="modes"):
        TrainSettings(modes=())


def test_cpu_clock_ignores_time_the_process_does_not_run():
    """The CPU-time budget counts the process's own work, not time lost to other load
    (here: sleeping); ``auto`` is CPU time on the CPU and wall-clock on CUDA."""
    import time as _time

    for clock, device, counts_sleep in (("cpu", "cpu", False), ("auto", "cpu", False),
                                        ("wall", "cpu", True), ("auto", "cuda", True)):  # fmt: skip
        now = TrainSettings(clock=clock).timer(device)
        t0 = now()
        _time.sleep(0.05)
        assert (now() - t0 >= 0.05) == counts_sleep, (clock, device)


@pytest.mark.skipif(dataset_missing_reason("mnist", "test") is not None,
                    reason="needs the MNIST test split (../shared/data/mnist)")  # fmt: skip
def test_train_one_mode(tmp_path):
    """``modes=("images",)`` runs the equal-images budget alone; both figures still drawn."""
    ctx = Context(out=tmp_path, quick=True, progress=False,
                  extra={"dataset_name": "mnist",
                         "train_settings": {"images": 16, "modes": ("images",)}})  # fmt: skip
    res = run_train(ctx)
    assert {f["mode"] for f in res["finals"]} == {"images"}
    assert {r["mode"] for r in res["table"]} == {"images"}
    assert (tmp_path / "quality_vs_wallclock.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "budgets: 16 images;" in summary
    assert "of training" not in summary  # the wall-clock budget did not run, so it is not stated


def test_summary_compares_at_the_largest_step_every_run_reached():
    """Per image seen: the loss at the largest step all runs were evaluated at, mean ± SE."""
    from varred_diffusion.experiments.train_report import summarise

    def curve(recipe, seed, losses, last):
        steps = [500 * i for i in range(len(losses) - 1)] + [last]  # the end is off the grid
        return [{"recipe": recipe, "seed": seed, "mode": "wallclock", "step": s,
                 "elapsed_s": float(s), "images": 32 * s, "val_loss": v}
                for s, v in zip(steps, losses, strict=True)]  # fmt: skip

    curves = (curve("plain", 0, [9.0, 7.0, 5.0, 4.0, 3.5], 1777)
              + curve("plain", 1, [9.0, 7.2, 5.2, 4.2, 3.7], 1811)
              + curve("slow", 0, [9.0, 6.0, 4.8, 4.6], 1203)  # evaluated at 0, 500, 1000
              + curve("slow", 1, [9.0, 6.4, 5.0, 4.9], 1250))  # fmt: skip
    finals = [{"recipe": c[-1]["recipe"], "seed": c[-1]["seed"], "mode": "wallclock",
               "val_loss": c[-1]["val_loss"], "frechet": float("nan"), "images": c[-1]["images"]}
              for c in (curves[0:5], curves[5:10], curves[10:14], curves[14:18])]  # fmt: skip
    table = summarise(curves, finals, ["plain", "slow"], ["wallclock"])
    assert [r["common_step"] for r in table] == [1000, 1000]
    (plain_mean, plain_se), (slow_mean, slow_se) = (r["val_loss_at_common_step"] for r in table)
    assert plain_mean == pytest.approx(5.1) and plain_se == pytest.approx(0.1)
    assert slow_mean == pytest.approx(4.9) and slow_se == pytest.approx(0.1)
    # paired with plain's run of the same seed, what the seeds share cancels: −0.2 in both
    delta, delta_se = table[1]["paired_delta_at_common_step"]
    assert delta == pytest.approx(-0.2) and delta_se == pytest.approx(0.0, abs=1e-12)
    assert table[0]["paired_delta_at_common_step"] == (0.0, 0.0)
    # the slow recipe's lower loss per step does not change the equal-time target
    assert table[1]["target_val_loss"] == pytest.approx(3.6) and table[1]["reached"] == 0


class _FakeRun:
    """A run whose step spends ``cost`` of a budget of 1 (what run_in_turns sees of one)."""

    def __init__(self, name, cost, log):
        self.name, self.cost, self.log, self.spent = name, cost, log, 0.0

    @property
    def done(self):
        return self.spent >= 1.0

    def advance(self):
        self.log.append(self.name)
        self.spent += self.cost


def test_in_turns_keeps_every_run_within_one_step_of_the_others():
    from varred_diffusion.experiments.train_run import run_in_turns

    log = []
    runs = [_FakeRun("cheap", 0.125, log), _FakeRun("dear", 0.5, log), _FakeRun("mid", 0.25, log)]
    spent_at = []

    def watch(run):
        advance = run.advance

        def step():
            advance()
            spent_at.append([r.spent for r in runs])

        run.advance = step

    for r in runs:
        watch(r)
    run_in_turns(runs)
    assert all(r.done for r in runs)
    assert log.count("cheap") == 8 and log.count("dear") == 2 and log.count("mid") == 4
    # a run steps only while it has spent least, so no run leads another by more than its step
    for spent in spent_at[:-1]:
        assert max(spent) - min(spent) <= 0.5
    assert log[:3] == ["cheap", "dear", "mid"]  # ties go to the earlier run
    log.clear()
    run_in_turns([_FakeRun("one", 0.25, log)])
    assert log == ["one"] * 4


@pytest.mark.skipif(dataset_missing_reason("mnist", "test") is not None,
                    reason="needs the MNIST test split (../shared/data/mnist)")  # fmt: skip
def test_in_turns_gives_the_sequential_numbers_on_an_images_budget(tmp_path):
    """Each run has its own model, streams and optimiser: stepping in turns changes nothing
    but the order (one step of each recipe in turn, seed by seed)."""
    order = []

    def logged(name, make):
        def make_step(model):
            step = make(model)

            def run(x, g):
                order.append(name)
                return step(x, g)

            return run

        return make_step

    base = TrainSettings(dataset="mnist", base=8, batch=4, seeds=2, images=12, eval_every=2,
                         val_size=8, val_sigmas=3, fd_count=0, limit=64, modes=("images",))  # fmt: skip
    results = {}
    for schedule in ("sequential", "in-turns"):
        s = replace(base, schedule=schedule)
        recipes = {name: logged(name, recipe_trainer(r, s)) for name, r in
                   {"plain": vd.Recipe(sampler=vd.LogUniformSigma(0.01, 10.0)),
                    "importance σ": vd.Recipe(sampler=vd.ImportanceSigmaSampler(2, 0.01, 10.0))}.items()}  # fmt: skip
        order.clear()
        results[schedule] = train_recipes(Context(out=tmp_path, quick=True), recipes, s)
        results[schedule]["order"] = list(order)
    seq, turns = results["sequential"], results["in-turns"]
    assert seq["order"] == ["plain"] * 6 + ["importance σ"] * 6  # 3 steps × 2 seeds each
    assert turns["order"] == ["plain", "importance σ"] * 6

    def losses(res):
        return sorted((r["recipe"], r["seed"], r["step"], r["val_loss"]) for r in res["curves"])

    assert losses(turns) == losses(seq)
    assert turns["settings"]["schedule"] == "in-turns"
    with pytest.raises(VarRedError, match="schedule"):
        replace(base, schedule="round-robin")
