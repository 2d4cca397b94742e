"""Stable Target Field: exactness, limits, numerics, memory, bad input, bias."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from varred.errors import VarRedError
from varred_diffusion.stf import StableTarget, stf_target, stf_weights
from varred_diffusion.stf_reference import FreshReference, MemoryBank
from varred_diffusion.toy import GaussianMixture


def brute_posterior_mean(xt, sigma, data, alpha=1.0):
    """Exact E[x0 | x_t] under the empirical distribution of ``data`` (B×N×D brute force)."""
    x = xt.flatten(1).double()[:, None, :]  # [B, 1, D]
    r = data.flatten(1).double()[None]  # [1, N, D]
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    logw = -((x - a[..., None] * r) ** 2).sum(-1) / (2 * s**2)  # [B, N]
    return (torch.softmax(logw, 1) @ data.flatten(1).double()).reshape(xt.shape)


def test_gaussian_mixture_closed_form():
    # point masses = a mixture with tiny component variance: Tweedie on the exact score
    means = torch.tensor([[-2.0, 0.0], [1.0, 1.5], [2.0, -1.0]], dtype=torch.float64)
    counts = [5, 3, 2]
    tau = 1e-4
    gm = GaussianMixture(
        torch.tensor(counts, dtype=torch.float64) / 10,
        means,
        (tau**2 * torch.eye(2, dtype=torch.float64)).expand(3, 2, 2).clone(),
    )
    data = torch.cat([means[k].expand(c, 2) for k, c in enumerate(counts)])  # [10, 2]
    g = torch.Generator().manual_seed(1)
    xt = 2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    for sig, alpha in [(0.3, 1.0), (1.0, 1.0), (0.8, 0.6)]:
        s = torch.full((64,), sig, dtype=torch.float64)
        a = torch.full((64,), alpha, dtype=torch.float64)
        exact = (xt + sig**2 * gm.score(xt, s, a)) / alpha  # Tweedie: E[x0 | x_t]
        got = stf_target(xt, s, data, alpha=a, chunk=3)
        torch.testing.assert_close(got, exact, atol=1e-6, rtol=0)  # O(τ²/σ²) model gap


def test_whole_image_set_equals_brute_force():
    g = torch.Generator().manual_seed(2)
    data = torch.rand(50, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    x = data[torch.randint(50, (16,), generator=g)]
    sigma = torch.logspace(-1.5, 0.5, 16, dtype=torch.float64)
    alpha = torch.linspace(0.5, 1.0, 16, dtype=torch.float64)
    xt = alpha[:, None, None, None] * x + sigma[:, None, None, None] * torch.randn(
        x.shape, generator=g, dtype=torch.float64
    )
    got = stf_target(xt, sigma, data, alpha=alpha, chunk=7)
    torch.testing.assert_close(
        got, brute_posterior_mean(xt, sigma, data, alpha), atol=1e-12, rtol=0
    )
    w = stf_weights(xt, sigma, data, alpha=alpha)
    torch.testing.assert_close(w.sum(1), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(got.flatten(1), w @ data.flatten(1), atol=1e-12, rtol=0)


def test_own_point_equals_appending_it():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(20, 5, generator=g, dtype=torch.float64)
    own = torch.randn(4, 5, generator=g, dtype=torch.float64)
    xt = own + 0.7 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = stf_target(xt, 0.7, ref, own=own, chunk=6)
    for i in range(4):
        one = stf_target(xt[i : i + 1], 0.7, torch.cat([own[i : i + 1], ref]))
        torch.testing.assert_close(got[i : i + 1], one, atol=1e-13, rtol=0)
    # R = 0 with an own point is plain DSM's clean point
    assert torch.equal(stf_target(xt, 0.7, ref[:0], own=own), own)


@pytest.mark.parametrize("alpha", [None, 0.9])
def test_sigma_to_zero_is_plain_dsm(alpha):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1  # float32
    noise = torch.randn(x.shape, generator=g)
    sigma = torch.full((32,), 1e-4)
    eps = StableTarget()(x, sigma, noise, alpha)
    assert torch.equal(eps, noise)  # one-hot weights on the own point: ε̃ = ε bit for bit
    # and the limit is approached continuously
    big = StableTarget()(x, torch.full((32,), 0.02), noise, alpha)
    assert (big - noise).abs().max() < 1e-3


@pytest.mark.parametrize("sig", [1e-4, 80.0])
def test_weights_finite_float32(sig):
    g = torch.Generator().manual_seed(5)
    data = torch.rand(64, 784, generator=g) * 2 - 1
    xt = data[:16] + sig * torch.randn(16, 784, generator=g)
    w = stf_weights(xt, torch.full((16,), sig), data)
    assert w.dtype == torch.float32 and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(16))
    x0 = stf_target(xt, torch.full((16,), sig), data, chunk=10)
    assert bool(torch.isfinite(x0).all())
    exact = brute_posterior_mean(xt.double(), sig, data.double()).float()
    torch.testing.assert_close(x0, exact, atol=1e-3, rtol=0)  # float32 logits of size ~1e9 at 1e-4
    if sig == 1e-4:  # one-hot on the own image
        assert torch.equal(x0, data[:16])


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(6)
    data = torch.randn(300, 3, 4, 4, generator=g)
    xt = data[:8] + 0.5 * torch.randn(8, 3, 4, 4, generator=g)
    full = stf_target(xt, 0.5, data, chunk=10_000)
    for chunk in (1, 7, 64, 299):
        torch.testing.assert_close(
            stf_target(xt, 0.5, data, chunk=chunk), full, atol=1e-6, rtol=1e-6
        )


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_no_b_by_r_by_d_tensor():
    b, r, d, chunk = 16, 512, 256, 128
    g = torch.Generator().manual_seed(7)
    data = torch.randn(r, d, generator=g)
    xt = torch.randn(b, d, generator=g)
    with _LargestTensor() as mode:
        stf_target(xt, torch.full((b,), 0.5), data, chunk=chunk)
    # the largest is the reference-sized finiteness check: R·D = 131,072, not B·R·D = 2,097,152
    assert mode.largest <= max(b * chunk, r * d, b * d)
    with _LargestTensor() as mode:
        stf_target(xt, torch.full((b,), 0.5), data, chunk=chunk, validate=False)
    assert mode.largest <= max(b * chunk, chunk * d, b * d)
    with _LargestTensor() as mode:
        StableTarget(MemoryBank(r))(xt, torch.full((b,), 0.5), torch.randn(b, d, generator=g))
    assert mode.largest <= (b + r) * d


def test_bad_input():
    xt = torch.randn(4, 3)
    with pytest.raises(VarRedError, match="reference"):
        stf_target(xt, 1.0, torch.randn(0, 3))
    with pytest.raises(VarRedError, match="reference"):
        stf_target(xt, 1.0, torch.randn(5, 2))
    with pytest.raises(VarRedError, match="reference"):
        stf_target(xt, 1.0, torch.randn(5, 3, 1))
    for bad in (0.0, -1.0, torch.tensor([1.0, 0.0, 1.0, 1.0])):
        with pytest.raises(VarRedError, match="sigma"):
            stf_target(xt, bad, torch.randn(5, 3))
    with pytest.raises(VarRedError, match="sigma"):
        stf_target(xt, torch.ones(3), torch.randn(5, 3))
    with pytest.raises(VarRedError, match="alpha"):
        stf_target(xt, 1.0, torch.randn(5, 3), alpha=-0.5)
    with pytest.raises(VarRedError, match="chunk"):
        stf_target(xt, 1.0, torch.randn(5, 3), chunk=0)
    with pytest.raises(VarRedError, match="own"):
        stf_target(xt, 1.0, torch.randn(5, 3), own=torch.randn(3, 3))
    with pytest.raises(VarRedError, match="reference_labels"):
        stf_target(
            xt,
            1.0,
            torch.randn(5, 3),
            labels=torch.zeros(4, dtype=torch.long),
            reference_labels=torch.ones(5, dtype=torch.long),
        )
    with pytest.raises(VarRedError, match="size"):
        MemoryBank(0)
    with pytest.raises(VarRedError, match="draw"):
        FreshReference(lambda n, g: torch.randn(n, 2), 8).reference(xt, None)


def test_labels_mask_other_classes():
    g = torch.Generator().manual_seed(8)
    ref = torch.randn(30, 4, generator=g, dtype=torch.float64)
    rl = torch.arange(30) % 3
    xt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    got = stf_target(xt, 1.3, ref, labels=lab, reference_labels=rl, chunk=4)
    for i in range(6):
        sub = ref[rl == lab[i]]
        torch.testing.assert_close(got[i], brute_posterior_mean(xt[i : i + 1], 1.3, sub)[0])


def test_memory_bank_fifo_per_class_and_state():
    bank = MemoryBank(2, num_classes=2)
    x = torch.arange(5.0)[:, None]
    bank.update(x, torch.tensor([0, 1, 0, 0, 1]))
    refs, labs = bank.reference(x, None)
    assert refs.flatten().tolist() == [2.0, 3.0, 1.0, 4.0] and labs.tolist() == [0, 0, 1, 1]
    bank.update(torch.tensor([[9.0]]), torch.tensor([0]))
    assert bank.reference(x, None)[0].flatten().tolist() == [3.0, 9.0, 1.0, 4.0]
    other = MemoryBank(2, num_classes=2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.reference(x, None)[0], bank.reference(x, None)[0])


def test_stable_target_updates_bank_after_target():
    g = torch.Generator().manual_seed(9)
    bank = MemoryBank(8)
    target = StableTarget(bank)
    x, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    sigma = torch.full((4,), 0.8)
    first = target(x, sigma, noise)
    assert len(bank) == 4
    # first step: reference = the batch only (bank empty before the update)
    torch.testing.assert_close(first, StableTarget()(x, sigma, noise))
    x2 = torch.randn(4, 3, generator=g)
    second = target(x2, sigma, noise)
    x0 = stf_target(x2 + 0.8 * noise, sigma, torch.cat([x2, x]))
    torch.testing.assert_close(second, noise + (x2 - x0) / 0.8)


def _posterior_draws(data, xt, sigma, reps, r, own, g):
    """``reps`` independent STF estimates of E[x0 | x_t] (one query), R i.i.d. references each."""
    w = torch.softmax(-((xt - data) ** 2).sum(1) / (2 * sigma**2), 0)
    out = []
    for _ in range(reps):
        ref = data[torch.randint(data.shape[0], (r,), generator=g)]
        o = data[torch.multinomial(w, 1, generator=g)] if own else None
        out.append(stf_target(xt, sigma, ref, own=o, validate=False)[0])
    return torch.stack(out), w @ data


def test_bias_with_own_point_zero_and_without_shrinks():
    # own point ~ posterior + i.i.d. references: E[x̂0 | x_t] is the exact posterior mean
    # (conditional importance sampling); without it the self-normalised bias shrinks with R.
    g = torch.Generator().manual_seed(10)
    data = 2 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    xt = 2 * torch.randn(1, 3, generator=g, dtype=torch.float64)
    sigma = 1.0
    reps = 1500
    biases = {}
    for r in (2, 32):
        for own in (True, False):
            est, exact = _posterior_draws(data, xt, sigma, reps, r, own, g)
            z = (est.mean(0) - exact) / (est.std(0) / reps**0.5)
            if own:
                assert bool((z.abs() < 5).all()), z
            biases[r, own] = ((est.mean(0) - exact) ** 2).sum()
            if not own and r == 2:
                assert bool((z.abs() > 5).any()), z  # the SNIS bias is visible
    assert biases[32, False] < 0.1 * biases[2, False]


def test_bias_experiment_smoke():
    from varred_diffusion.experiments.stf_bias import markdown_table, stf_bias

    g = torch.Generator().manual_seed(11)
    data = torch.rand(200, 1, 4, 4, generator=g) * 2 - 1
    rows = stf_bias(data, g, queries=16, reps=3, sizes=(4, 32), bins=((0.3, 1.0),))
    assert len(rows) == 4 and {r["estimator"] for r in rows} == {"stf", "no_own"}
    assert all(r["var"] >= 0 and r["dsm_var"] > 0 for r in rows)
    assert markdown_table(rows).count("\n") == 3  # header, rule, two R rows
