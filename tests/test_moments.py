"""The one moment state (varred.moments) and every former user of it, against a two-pass reference.

Data carry a mean of 1e8 on unit-scale noise: raw sums (``E[x²] − E[x]²``) lose every digit of
the variance in float64 there (1e16 · 2⁻⁵² ≈ 2), centred merges keep ~8.
"""

from __future__ import annotations

import pytest
import torch

from varred.coefficients import RunningMoments
from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.moments import batch_moments, check_decay, covariance, empty_moments, merge, observe
from varred_diffusion.gradient_moments import GradientMoments
from varred_diffusion.jackknife import BlockSums

F64 = torch.float64
OFFSET = 1e8
RTOL = 1e-6  # relative to the O(1) variances; raw sums would be off by O(1)


def _data(generator, n=40, p=3):
    a = OFFSET + torch.randn(n, p, generator=generator, dtype=F64)
    b = -OFFSET + torch.randn(n, p, generator=generator, dtype=F64) + 0.5 * (a - OFFSET)
    return a, b


def _cov(x, y, ddof=0):
    """Two-pass reference: centre first, then multiply."""
    return ((x - x.mean(0)) * (y - y.mean(0))).sum(0) / (x.shape[0] - ddof)


def test_merge_equals_two_pass_in_any_split(generator):
    a, b = _data(generator)
    pairs = {"ab": ("a", "b", "...,...->..."), "bb": ("b", "b", "...,...->...")}
    state = empty_moments({"a": (3,), "b": (3,)}, pairs, dtype=F64)
    for lo, hi in ((0, 1), (1, 17), (17, 40)):
        state = merge(state, batch_moments({"a": a[lo:hi], "b": b[lo:hi]}, pairs), pairs)
    assert float(state.weight) == 40
    torch.testing.assert_close(state.cov["ab"], _cov(a, b), rtol=RTOL, atol=0)
    torch.testing.assert_close(
        covariance(state, "bb", unbiased=True), _cov(b, b, 1), rtol=RTOL, atol=0
    )
    one = empty_moments({"a": (3,), "b": (3,)}, pairs, dtype=F64)
    for i in range(40):  # one observation at a time (Finch 2009)
        one = observe(one, {"a": a[i], "b": b[i]}, pairs)
    torch.testing.assert_close(one.cov["ab"], _cov(a, b), rtol=RTOL, atol=0)


def test_weighted_and_decayed_moments_equal_weighted_two_pass(generator):
    a, b = _data(generator, n=30)
    pairs = {"ab": ("a", "b", "...,...->...")}
    state = empty_moments({"a": (3,), "b": (3,)}, pairs, dtype=F64)
    decay, batches = 0.7, [(0, 10), (10, 30)]
    w = torch.rand(30, generator=generator, dtype=F64)
    for lo, hi in batches:
        state = merge(
            state, batch_moments({"a": a[lo:hi], "b": b[lo:hi]}, pairs, w[lo:hi]), pairs, decay
        )
    ww = torch.cat([w[:10] * decay, w[10:]])  # [n] effective weights
    ma, mb = (ww @ a) / ww.sum(), (ww @ b) / ww.sum()
    want = (ww[:, None] * (a - ma) * (b - mb)).sum(0) / ww.sum()
    torch.testing.assert_close(state.cov["ab"], want, rtol=RTOL, atol=0)
    torch.testing.assert_close(state.weight, ww.sum(), rtol=1e-14, atol=0)


def test_masked_merge_is_an_exact_no_op(generator):
    a, b = _data(generator, n=5)
    pairs = {"ab": ("a", "b", "...,...->...")}
    state = batch_moments({"a": a, "b": b}, pairs)
    bad = batch_moments({"a": a * float("nan"), "b": b}, pairs)
    out = merge(state, bad, pairs, 0.9, torch.tensor(False))
    assert torch.equal(out.weight, state.weight) and torch.equal(out.cov["ab"], state.cov["ab"])
    assert torch.equal(out.mean["a"], state.mean["a"])


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.01, True, "0.9"])
def test_one_decay_range(decay):
    for build in (
        check_decay,
        RunningMoments,
        lambda d: GradientControl([torch.nn.Parameter(torch.ones(2))], decay=d),
    ):
        with pytest.raises(VarRedError, match=r"decay: expected a float in \(0, 1\]"):
            build(decay)


def test_gradient_control_running_statistics_large_mean(generator):
    """ℓ_i = θᵀa_i, c_i = θᵀb_i: one sample per step, step gradients are a_i and b_i."""
    a, b = _data(generator)
    theta = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    ctrl = GradientControl([theta], decay=1.0)
    for i in range(40):
        ctrl.backward(a[i : i + 1] @ theta, b[i : i + 1] @ theta)
    sd = ctrl.state_dict()
    torch.testing.assert_close(sd["cov_cc"][0], _cov(b, b), rtol=RTOL, atol=0)
    torch.testing.assert_close(sd["cov_cl"][0], _cov(b, a), rtol=RTOL, atol=0)
    torch.testing.assert_close(sd["cov_ll"][0], _cov(a, a), rtol=RTOL, atol=0)


def test_gradient_control_per_sample_statistics_large_mean(generator):
    a, b = _data(generator)
    theta = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    ctrl = GradientControl([theta], coefficient="per_sample", decay=1.0)
    for lo, hi in ((0, 15), (15, 40)):
        ctrl.backward(a[lo:hi] @ theta, b[lo:hi] @ theta)
    sd = ctrl.state_dict()
    torch.testing.assert_close(sd["cov_cl"][0], _cov(b, a), rtol=RTOL, atol=0)
    torch.testing.assert_close(sd["cov_cc"][0], _cov(b, b), rtol=RTOL, atol=0)


def test_running_moments_large_mean(generator):
    a, b = _data(generator)
    rm = RunningMoments(decay=1.0)
    rm.update(a[:7], b[:7])
    rm.update(a[7:], b[7:])
    sd = rm.state_dict()
    torch.testing.assert_close(sd["cov_cf"][..., 0], _cov(b, a), rtol=RTOL, atol=0)
    torch.testing.assert_close(sd["cov_cc"][..., 0, 0], _cov(b, b), rtol=RTOL, atol=0)
    # (β itself is 0 here by design: Var c < 1e-10 E[c²] counts as a constant control)


def test_gradient_moments_large_mean(generator):
    a, b = _data(generator)
    mom = GradientMoments(3, 1)
    mom.update(a[:9], b[:9, None])
    mom.update(a[9:], b[9:, None])
    vg, cgh, chh = mom.covariances()
    torch.testing.assert_close(vg, _cov(a, a, 1), rtol=RTOL, atol=0)
    torch.testing.assert_close(cgh[0], _cov(a, b, 1), rtol=RTOL, atol=0)
    torch.testing.assert_close(chh[0, 0], _cov(b, b, 1), rtol=RTOL, atol=0)


def test_block_sums_large_mean(generator):
    a, b = _data(generator)
    sums = BlockSums([None, torch.ones(1, 3, dtype=F64)], 3, num_units=40, num_blocks=4)
    sums.update(a[:13], b[:13, None])
    sums.update(a[13:], b[13:, None])
    d = a - b
    want = torch.stack([_cov(a, a, 1).sum(), _cov(d, d, 1).sum()])
    torch.testing.assert_close(sums.variances(), want, rtol=RTOL, atol=0)
    keep = torch.arange(40) >= 10  # block 0 = units 0..9
    torch.testing.assert_close(
        sums.leave_one_out()[1, 0], _cov(d[keep], d[keep], 1).sum(), rtol=RTOL, atol=0
    )
