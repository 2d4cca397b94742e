"""Variance-ratio harness (varred_diffusion.diagnostics): analytic truths and the toy claim."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred_diffusion.diagnostics import (
    GradientMoments,
    controlled_variance,
    efficiency,
    fit_coefficients,
    gradient_variance_ratio,
    per_sample_gradients,
    time_per_call,
    unit_gradients,
    variance_ratio_by_sigma,
)
from varred_diffusion.jackknife import BlockSums, jackknife_stderr
from varred_diffusion.models import MLPScore
from varred_diffusion.toy import ring8


def _direct_var(y: torch.Tensor) -> float:
    return float(y.var(0, unbiased=True).sum())


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(3, 20))
def test_streaming_variance_equals_direct(s, nb, n):
    g0 = torch.Generator().manual_seed(s)
    g = torch.randn(n, 5, generator=g0, dtype=torch.float64)
    h = torch.randn(n, nb, 5, generator=g0, dtype=torch.float64) + 0.5 * g[:, None]
    beta = torch.randn(nb, 5, generator=g0, dtype=torch.float64)
    mom = GradientMoments(5, nb)
    mom.update(g[:2], h[:2])
    mom.update(g[2:], h[2:])
    direct = _direct_var(g - (beta * h).sum(1))
    assert abs(controlled_variance(mom, beta) - direct) <= 1e-10 * max(1.0, direct)
    assert abs(controlled_variance(mom) - _direct_var(g)) <= 1e-10 * max(1.0, _direct_var(g))


def test_fitted_coefficients_match_regressions(generator):
    n = 200
    g = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    h = (2.0 * g + 0.1 * torch.randn(n, 4, generator=generator, dtype=torch.float64))[:, None]
    mom = GradientMoments(4, 1)
    mom.update(g, h)
    betas = fit_coefficients(mom, ("unit", "scalar", "element", "bin"))
    gc, hc = g - g.mean(0), h[:, 0] - h[:, 0].mean(0)
    torch.testing.assert_close(betas["element"][0], (gc * hc).sum(0) / (hc * hc).sum(0))
    torch.testing.assert_close(betas["scalar"][0, 0], (gc * hc).sum() / (hc * hc).sum())
    torch.testing.assert_close(betas["bin"], betas["element"])  # one bin: same regression
    assert torch.equal(betas["unit"], torch.ones(1, 4, dtype=torch.float64))
    # the fitted β minimises the in-sample variance
    best = controlled_variance(mom, betas["element"])
    assert best <= controlled_variance(mom, betas["element"] * 1.01)
    assert best <= controlled_variance(mom, betas["element"] * 0.99)


def test_zero_control_gives_zero_beta(generator):
    mom = GradientMoments(3, 2)
    mom.update(torch.randn(10, 3, generator=generator, dtype=torch.float64), torch.zeros(10, 2, 3))
    for kind, beta in fit_coefficients(mom, ("scalar", "element", "bin")).items():
        assert torch.equal(beta, torch.zeros_like(beta)), kind


def _mlp(generator: torch.Generator) -> MLPScore:
    return MLPScore(2, width=16, depth=2, generator=generator).double()


def _draw(sigma: float):
    mix = ring8()

    def draw(n, g):
        x = mix.sample(n, g)
        return (
            x,
            torch.full((n,), sigma, dtype=x.dtype),
            torch.randn(n, 2, generator=g, dtype=x.dtype),
        )

    return draw


def _loss(score_fn, x, s, e):
    return ((s[:, None] * score_fn(x + s[:, None] * e, s) + e) ** 2).sum(-1)


def test_per_sample_gradients_vmap_equals_batched(generator):
    model = _mlp(generator)
    x, s, e = _draw(0.1)(6, generator)
    a = per_sample_gradients(model, _loss, x, s, e, method="vmap")
    b = per_sample_gradients(model, _loss, x, s, e, method="batched")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    for i in range(6):
        gi, _ = unit_gradients(
            _loss(lambda u, v: model(u, v), x[i : i + 1], s[i : i + 1], e[i : i + 1]), None, params
        )
        torch.testing.assert_close(gi, a[i], rtol=1e-10, atol=1e-12)


def test_control_equal_to_loss_gives_zero_variance(generator):
    """Analytic truth: a control whose gradient equals the loss gradient removes all variance."""
    model = _mlp(generator)
    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=_loss, num_fit=8, num_eval=8)  # fmt: skip
    assert vr.ratio["unit"] < 1e-20
    assert abs(vr.beta_summary["scalar"] - 1.0) < 1e-12


def test_zero_control_gives_ratio_one(generator):
    model = _mlp(generator)

    def zero(score_fn, x, s, e):
        return 0.0 * score_fn(x, s).sum(-1)

    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=zero, num_fit=8, num_eval=8)  # fmt: skip
    assert vr.ratio["scalar"] == 1.0 and vr.ratio["element"] == 1.0


def test_toy_c0_sigma_001_per_element_at_init(generator):
    """The paper's toy claim: at σ = 0.01, C^0 with per-element β removes > 99% of the variance."""
    model = MLPScore(2, width=64, depth=3, generator=generator).double()
    vr = gradient_variance_ratio(model, _draw(0.01), order=0, generator=generator,
                                 num_fit=128, num_eval=128, kinds=("element",))  # fmt: skip
    assert vr.ratio["element"] < 1e-2


def test_efficiency():
    assert efficiency(1.0, 1.0, 0.25, 2.0) == 2.0


def test_c0_ratio_by_sigma_small_at_small_sigma(generator):
    """k = 0 removes the σ^{-1} noise term: the ratio is far below 1 at σ ≤ 0.1 (at init)."""
    model = MLPScore(2, width=32, depth=2, generator=generator).double()
    mix = ring8()
    out = variance_ratio_by_sigma(model, mix.sample, [1e-3, 1e-1], generator=generator,
                                  num_fit=64, num_eval=64, kinds=("unit", "element"))  # fmt: skip
    assert set(out) == {1e-3, 1e-1}
    for vr in out.values():
        assert vr.ratio["unit"] < 0.1 and vr.num_eval == 64


# --- standard errors: delete-one-block jackknife over the evaluation units -------------------


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(5, 30), st.integers(2, 5))
def test_block_sums_equal_direct_leave_one_block_out(s, nb, n, j):
    j = min(j, n // 2)  # every deleted block leaves >= 2 units
    g0 = torch.Generator().manual_seed(s)
    g = 3.0 + torch.randn(n, 4, generator=g0, dtype=torch.float64)  # a mean that dominates
    h = torch.randn(n, nb, 4, generator=g0, dtype=torch.float64) + 0.5 * g[:, None]
    beta = torch.randn(nb, 4, generator=g0, dtype=torch.float64)
    sums = BlockSums([None, beta], 4, n, j)
    sums.update(g[:3], h[:3])  # uneven chunks: the block of a unit is its global index
    sums.update(g[3:], h[3:])
    d = torch.stack([g, g - (beta * h).sum(1)])  # [2, n, 4]
    block = torch.arange(n) * j // n
    torch.testing.assert_close(sums.variances(), d.var(1).sum(-1), rtol=1e-10, atol=0)
    direct = torch.stack([d[:, block != b].var(1).sum(-1) for b in range(j)], 1)  # [2, J]
    torch.testing.assert_close(sums.leave_one_out(), direct, rtol=1e-10, atol=0)


def test_jackknife_stderr_of_a_mean_is_the_usual_one(generator):
    """Blocks of one unit, T = mean: the jackknife SE is exactly s/sqrt(n) (Efron, 1982)."""
    y = torch.randn(20, generator=generator, dtype=torch.float64)
    loo = (y.sum() - y) / 19
    assert math.isclose(jackknife_stderr(loo), float(y.std() / math.sqrt(20)), rel_tol=1e-12)


@pytest.mark.parametrize("bad", [1, 0, 9, 2.0, True, "4"])
def test_num_blocks_is_validated(generator, bad):
    model = _mlp(generator)
    with pytest.raises(VarRedError, match="num_blocks") as info:
        gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                control_fn=_loss, num_fit=4, num_eval=8, num_blocks=bad)  # fmt: skip
    assert repr(bad) in str(info.value) and "2 ≤ J ≤ 8" in str(info.value)
    # 3 units in 2 blocks: deleting the block of 2 leaves 1 unit, no variance
    with pytest.raises(VarRedError, match="num_blocks"):
        gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                control_fn=_loss, num_fit=4, num_eval=3, num_blocks=2)  # fmt: skip
    # 5 units in 4 blocks: deleting the block of 2 leaves 3 units, fine
    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=_loss, num_fit=4, num_eval=5, num_blocks=4)  # fmt: skip
    assert vr.num_blocks == 4


def test_stderr_leaves_the_point_estimate_unchanged(seed):
    """The jackknife only observes the evaluation draws: ratios equal bit for bit for any J."""
    out = []
    for blocks in (None, 4, 32):
        g = torch.Generator().manual_seed(seed)
        model = _mlp(torch.Generator().manual_seed(seed))
        out.append(gradient_variance_ratio(model, _draw(0.5), generator=g, order=0, num_fit=8,
                                           num_eval=32, num_blocks=blocks))  # fmt: skip
    for vr in out[1:]:
        assert vr.ratio == out[0].ratio and vr.variance_plain == out[0].variance_plain
    assert [vr.num_blocks for vr in out] == [16, 4, 32]
    assert set(out[0].ratio_stderr) == set(out[0].ratio) == set(out[0].variance_stderr)
    assert all(0 < v < math.inf for v in out[0].ratio_stderr.values())


def test_control_equal_to_loss_gives_zero_ratio_and_zero_stderr(generator):
    """h = g, β = 1: every controlled unit gradient is exactly 0, in every deleted block too."""
    model = _mlp(generator)
    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=_loss, num_fit=8, num_eval=12, kinds=("unit",))  # fmt: skip
    assert vr.ratio["unit"] < 1e-20
    assert vr.ratio_stderr["unit"] == 0.0 and vr.variance_stderr["unit"] == 0.0
    assert vr.variance_plain_stderr > 0


@pytest.mark.parametrize("control", ["zero", "none"])
def test_no_control_gives_ratio_one_and_zero_stderr(generator, control):
    """h = 0 (a zero control, or none at all): d = g exactly, so R = 1 and every R_{-j} = 1."""
    model = _mlp(generator)

    def zero(score_fn, x, s, e):
        return 0.0 * score_fn(x, s).sum(-1)

    def none(score_fn, x, s, e):
        return None

    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=zero if control == "zero" else none, num_fit=8,
                                 num_eval=12, kinds=("unit", "scalar", "element"))  # fmt: skip
    for kind in ("unit", "scalar", "element"):
        assert vr.ratio[kind] == 1.0, kind
        assert vr.ratio_stderr[kind] == 0.0, kind


def test_too_few_evaluation_units_give_nan_stderr(generator):
    model = _mlp(generator)
    vr = gradient_variance_ratio(model, _draw(0.1), generator=generator, loss_fn=_loss,
                                 control_fn=_loss, num_fit=4, num_eval=2)  # fmt: skip
    assert vr.num_blocks == 0 and math.isnan(vr.ratio_stderr["scalar"])
    assert math.isfinite(vr.ratio["scalar"])


class _Affine(torch.nn.Module):
    """``score(x, σ) = W [x, log σ] + b`` (8 parameters): cheap enough for 150 repetitions."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(2, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, s.log()[:, None]], 1) @ self.w + self.b


def test_ratio_stderr_is_calibrated(generator):
    """Across R independent repetitions, the SD of the ratio equals the mean reported SE.

    β = 1 ("unit") is fixed, so the jackknife SE (which conditions on β) claims all of the
    ratio's variation; fitted kinds add β noise it does not claim (see the docstring).
    Tolerance: the sample SD of R draws has relative SE ≈ sqrt((κ − 1)/(4R)), κ the kurtosis
    of the ratio (≈ 3–6 here with 32 evaluation units: 0.058–0.091 for R = 150), and the mean
    of R reported SEs (coefficient of variation ≈ 0.5 with J = 16) has ≈ 0.5/sqrt(R) = 0.041;
    together ≈ 0.07–0.10 on a log scale, so [0.7, 1.4] (log −0.36 … +0.34) is 3.5–5
    standard errors. Over 16 seeds the quotient was 0.82–1.02 (mean 0.93: the jackknife is
    slightly low at n = 32). A wrong constant fails: 1/J instead of (J − 1)/J gives ≈ 0.25,
    the SE of the variance instead of the ratio has the wrong scale; treating numerator and
    denominator as independent gives 1.2–1.9 (fails at most seeds).
    """
    reps = 150
    model = _Affine(generator)

    def draw(n, g):
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        return (
            x,
            torch.full((n,), 0.5, dtype=x.dtype),
            torch.randn(n, 2, generator=g, dtype=x.dtype),
        )

    def control(score_fn, x, s, e):  # the loss at the clean point: partly correlated with g
        return ((s[:, None] * score_fn(x, s) + e) ** 2).sum(-1)

    ratios, stderrs = [], []
    for _ in range(reps):
        vr = gradient_variance_ratio(model, draw, generator=generator, loss_fn=_loss,
                                     control_fn=control, num_fit=2, num_eval=32, kinds=("unit",))  # fmt: skip
        ratios.append(vr.ratio["unit"])
        stderrs.append(vr.ratio_stderr["unit"])
    r, se = torch.tensor(ratios), torch.tensor(stderrs)
    assert 0.1 < float(r.mean()) < 0.9  # a ratio well inside (0, 1): not a degenerate case
    q = float(se.mean() / r.std())
    assert 0.7 < q < 1.4, f"mean SE {float(se.mean()):.4g} vs SD {float(r.std()):.4g}"


def test_time_per_call_cpu_clock_counts_work_not_waiting() -> None:
    """A sleeping call costs ~0 CPU time but its full wall time; a bad clock is refused."""

    def nap() -> None:
        time.sleep(0.02)

    assert time_per_call(nap, repeats=3, warmup=0, clock="wall") >= 0.02
    assert time_per_call(nap, repeats=3, warmup=0, clock="cpu") < 0.01
    with pytest.raises(VarRedError, match="clock: expected 'wall' or 'cpu', got 'gpu'"):
        time_per_call(nap, clock="gpu")
