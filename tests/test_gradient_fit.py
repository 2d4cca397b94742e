"""The fit strategies of GradientControl, each alone (varred.gradient_fit)."""

from __future__ import annotations

import torch

from varred.gradient_fit import FlatPool, fixed_beta, per_sample_fit, running_beta

F64 = torch.float64


def test_pool_by_granularity(generator):
    num = torch.randn(2, 5, generator=generator, dtype=F64)
    den = torch.rand(2, 5, generator=generator, dtype=F64) + 0.1
    lengths = torch.tensor([2, 3])
    torch.testing.assert_close(FlatPool(lengths, "element", 0.0).pool(num, den), num / den)
    t = FlatPool(lengths, "tensor", 0.0).pool(num, den)  # [2, npar]
    want = torch.stack(
        [num[:, :2].sum(1) / den[:, :2].sum(1), num[:, 2:].sum(1) / den[:, 2:].sum(1)], 1
    )
    torch.testing.assert_close(t, want, rtol=1e-14, atol=0)
    s = FlatPool(lengths, "scalar", 0.0).pool(num, den)
    torch.testing.assert_close(s, (num.sum(1) / den.sum(1))[:, None], rtol=1e-14, atol=0)
    # shrinkage: κ → ∞ gives the tensor β, κ = 0 the element β
    big = FlatPool(lengths, "element", 1e15).pool(num, den, torch.ones(2, dtype=F64))
    torch.testing.assert_close(
        big, FlatPool(lengths, "tensor", 0.0).expand(t, 5), rtol=1e-9, atol=0
    )


def test_fixed_and_running_beta():
    assert torch.equal(
        fixed_beta(0.5, 3, F64, torch.device("cpu")), torch.full((3, 1), 0.5, dtype=F64)
    )
    pool = FlatPool(torch.tensor([2]), "element", 0.0)
    stats = {
        "cov_cl": torch.tensor([[1.0, 2.0]], dtype=F64),
        "cov_cc": torch.tensor([[2.0, 0.0]], dtype=F64),
    }
    w = torch.ones(1, dtype=F64)
    assert torch.equal(
        running_beta(pool, stats, w, torch.tensor(True)), torch.tensor([[0.5, 0.0]], dtype=F64)
    )
    assert torch.equal(
        running_beta(pool, stats, w, torch.tensor(False)), torch.zeros(1, 2, dtype=F64)
    )


def test_per_sample_fit_moments_and_crossfit(generator):
    b, p = 12, 3
    gl = 5.0 + torch.randn(b, p, generator=generator, dtype=F64)
    gc = torch.randn(b, p, generator=generator, dtype=F64) + 0.5 * gl
    groups = torch.tensor([0, 1] * 6)
    pool = FlatPool(torch.tensor([p]), "element", 0.0)
    g_l, g_c, beta, finite, (batch, n_g) = per_sample_fit(
        gl, gc, groups, 2, 2, torch.tensor(0), pool, lambda: None, lambda xs: xs
    )
    assert bool(finite) and n_g.tolist() == [6.0, 6.0]
    torch.testing.assert_close(g_l, gl.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(g_c.sum(0), gc.mean(0), rtol=1e-14, atol=1e-15)
    for g in range(2):
        c, l_ = gc[groups == g], gl[groups == g]
        cov = ((c - c.mean(0)) * (l_ - l_.mean(0))).mean(0)
        torch.testing.assert_close(batch["cov_cl"][g], cov, rtol=1e-12, atol=0)
        # fold f of group g (samples alternate between folds within a group) uses the other fold
        for f in range(2):
            o = torch.nonzero(groups == g)[:, 0][1 - f :: 2]
            co, lo = gc[o], gl[o]
            want = ((co - co.mean(0)) * (lo - lo.mean(0))).sum(0) / ((co - co.mean(0)) ** 2).sum(0)
            torch.testing.assert_close(beta[f * 2 + g], want, rtol=1e-10, atol=0)
