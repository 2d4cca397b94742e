"""The leaderboard is a list of ``(name, Recipe)`` rows; one more row is one more table row."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from varred.layout import CoefficientLayout
from varred_diffusion.controls import AntitheticPairs, TaylorControl
from varred_diffusion.experiments.common import Context
from varred_diffusion.experiments.leaderboard import leaderboard_rows
from varred_diffusion.experiments.problem import Problem
from varred_diffusion.experiments.techniques import (
    QUICK_TECHNIQUES,
    beta_kind,
    control_order,
    design_name,
    leaderboard_recipes,
    objective_note,
)
from varred_diffusion.flow import ScoreFromVelocity
from varred_diffusion.models import MLPScore
from varred_diffusion.recipe import Recipe
from varred_diffusion.sampling import LogUniformSigma, StratifiedSigma
from varred_diffusion.toy import ring8

F64 = torch.float64


def _problem() -> Problem:
    model = MLPScore(2, width=8, depth=2, generator=torch.Generator().manual_seed(0)).to(F64)
    mix = ring8()
    return Problem(
        name="tiny", model=model, sample_x=lambda n, g: mix.sample(n, g).to(F64),
        sigma_min=1e-2, sigma_max=1.0, dtype=F64, batch=4, orders=(0,), units=4,
        units_high=3, expectation="exact", timing_repeats=1,
    )  # fmt: skip


def test_leaderboard_is_a_list_of_recipe_rows() -> None:
    p = _problem()
    rows = leaderboard_recipes(p)
    assert isinstance(rows, list) and rows
    assert all(isinstance(n, str) and isinstance(r, Recipe) for n, r in rows)
    assert len({n for n, _ in rows}) == len(rows)
    assert rows[0][1].control is None and design_name(rows[0][1]) == "iid"
    assert {control_order(r) for _, r in rows} == {None, 0}  # p.orders = (0,)
    keys = {(design_name(r), control_order(r)) for _, r in rows}
    assert QUICK_TECHNIQUES - {("iid", 1)} <= keys
    for _, r in rows:  # every controlled row maps to one β kind of the harness
        if control_order(r) is not None:
            assert beta_kind(r)[0] in ("unit", "scalar", "element", "bin")


def test_one_more_row_is_one_more_table_row(tmp_path) -> None:
    p = _problem()
    ctx = Context(out=tmp_path, quick=True, progress=False)
    lo, hi = p.sigma_min, p.sigma_max
    rows = [
        ("plain", Recipe(sampler=LogUniformSigma(lo, hi), name="plain")),
        ("C^0 scalar", Recipe(sampler=LogUniformSigma(lo, hi), control=TaylorControl(0),
                              layout=CoefficientLayout("scalar"), name="C^0 scalar")),
    ]  # fmt: skip
    before = leaderboard_rows(ctx, p, rows)
    extra = ("stratified", Recipe(sampler=StratifiedSigma(lo, hi), name="stratified"))
    after = leaderboard_rows(ctx, p, [*rows, extra])
    assert len(before) == 2 and len(after) == 3
    assert [r["recipe"] for r in after] == ["plain", "C^0 scalar", "stratified"]
    assert after[2]["design"] == "stratified" and after[2]["control"] == "none"
    for a, b in zip(before, after):  # same seed, same recipe: same numbers
        assert a["variance"] == b["variance"] and a["variance_se"] == b["variance_se"]
    assert after[0]["variance_ratio"] == 1.0 and after[0]["variance_ratio_se"] == 0.0
    assert all(math.isfinite(r["variance_ratio"]) and r["variance"] > 0 for r in after)
    # C^0 at β fitted on independent batches removes most of the small-σ variance
    assert after[1]["variance_ratio"] < 0.5


def test_rows_sharing_sampler_and_control_share_one_pass(tmp_path) -> None:
    p = _problem()
    ctx = Context(out=tmp_path, quick=True, progress=False)
    s, c = LogUniformSigma(p.sigma_min, p.sigma_max), TaylorControl(0)
    plain = ("plain", Recipe(sampler=s))
    unit = ("unit", Recipe(sampler=s, control=c, coefficient=1.0))
    scalar = ("scalar", Recipe(sampler=s, control=c, layout=CoefficientLayout("scalar")))
    both = leaderboard_rows(ctx, p, [plain, unit, scalar])
    alone = leaderboard_rows(ctx, p, [plain, scalar])
    assert both[2]["variance"] == alone[1]["variance"]  # one pass, the same draws
    assert [r["beta"] for r in both] == ["-", "unit", "scalar"]


def test_first_row_must_be_the_plain_reference(tmp_path) -> None:
    p = _problem()
    ctx = Context(out=tmp_path, quick=True, progress=False)
    r = Recipe(sampler=LogUniformSigma(p.sigma_min, p.sigma_max), control=TaylorControl(0))
    with pytest.raises(ValueError, match="rows: expected the plain reference"):
        leaderboard_rows(ctx, p, [("C0", r)])


def test_antithetic_pairs_carry_an_inner_control() -> None:
    net = MLPScore(2, width=8, depth=2, generator=torch.Generator().manual_seed(1)).to(F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    inner = TaylorControl(0)
    paired = Recipe(sampler=LogUniformSigma(1e-2, 1.0), control=AntitheticPairs(inner))
    step = paired.build(lambda a, s: net(a, s), net.parameters())
    batch = step.prepare(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(batch.x[:3], batch.x[3:]) and torch.equal(batch.noise[:3], -batch.noise[3:])
    assert torch.equal(step.controls(batch), inner.values(step.score_fn, batch))
    assert step.coefficients is not None and AntitheticPairs(inner).needs_coefficients
    assert (
        not AntitheticPairs().needs_coefficients
        and AntitheticPairs().values(step.score_fn, batch) is None
    )
    with pytest.raises(ValueError, match="control: expected a control part"):
        AntitheticPairs(control=3)


def test_off_cpu_path_times_a_step_on_cpu_drawn_batches(tmp_path) -> None:
    # "cpu:0" takes the non-CPU branch (batches drawn on the CPU, then moved) without a GPU
    p = _problem()
    p.device = "cpu:0"
    ctx = Context(out=tmp_path, quick=True, progress=False)
    rows = [(n, r) for n, r in leaderboard_recipes(p) if design_name(r) in ("iid", "importance")]
    rows = [rows[0], *[(n, r) for n, r in rows if design_name(r) == "importance"][:2]]
    out = leaderboard_rows(ctx, p, rows)
    p.device = "cpu"
    ref = leaderboard_rows(ctx, p, rows)
    assert [r["variance"] for r in out] == [r["variance"] for r in ref]
    assert all(r["step_time_ratio"] > 0 for r in out)


def _flow_problem(t_max: float = 0.999) -> Problem:
    net = MLPScore(2, width=8, depth=2, preconditioning="none",
                   generator=torch.Generator().manual_seed(0)).to(F64)  # fmt: skip
    mix = ring8()
    return Problem(
        name="tiny-flow", model=ScoreFromVelocity(net),
        sample_x=lambda n, g: mix.sample(n, g).to(F64), sigma_min=1e-3, sigma_max=t_max,
        dtype=F64, batch=4, orders=(0,), units=6, units_high=3, expectation="exact",
        timing_repeats=1, process="flow",
    )  # fmt: skip


def test_flow_rows_keep_the_uniform_t_objective_unless_named() -> None:
    rows = leaderboard_recipes(_flow_problem())
    assert rows[0][0] == "uniform t (plain flow matching)" and design_name(rows[0][1]) == "iid"
    notes = {n: objective_note(r, rows[0][1]) for n, r in rows}
    assert notes[rows[0][0]] == "same"
    for n, note in notes.items():  # the name says when the objective changes, and only then
        assert (note != "same") == ("objective changed" in n), (n, note)
    assert notes["logit-normal t (SD3; objective changed)"] == "changed: σ density"
    assert notes["Min-SNR-5 weighting, v form (objective changed)"] == "changed: weighting"
    assert {control_order(r) for _, r in rows} == {None, 0}
    dsm = dict(leaderboard_recipes(_problem()))
    logit = dsm["logit-normal t (SD3) on the VE map, reweighted (δ = 0.1)"]
    assert objective_note(logit) == "same"
    with pytest.raises(ValueError, match="process: expected 've' or 'flow', got 'vp'"):
        replace(_problem(), process="vp")


def test_flow_c0_removes_the_noise_part_of_small_t_variance(tmp_path) -> None:
    """At small t the FM loss is ≈ ‖v_0 + x − ε‖², whose ε-part C^0 is: the fitted-β gradient
    variance falls below plain flow matching's (what is left is the data's part, x)."""
    p = replace(_flow_problem(t_max=0.05), units=40)
    ctx = Context(out=tmp_path, quick=True, progress=False)
    names = ("uniform t (plain flow matching)", "FM C^0, scalar β", "antithetic ε")
    out = {r["recipe"]: r for r in leaderboard_rows(
        ctx, p, [r for r in leaderboard_recipes(p) if r[0] in names])}  # fmt: skip
    assert out[names[0]]["variance_ratio"] == 1.0
    c0 = out["FM C^0, scalar β"]
    assert c0["objective"] == "same" and c0["control"] == "C0"
    assert c0["variance_ratio"] + 3 * c0["variance_ratio_se"] < 1.0, c0
    assert math.isfinite(out["antithetic ε"]["variance_ratio"])
