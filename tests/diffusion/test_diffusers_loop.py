"""The diffusers adapter against diffusers itself: σ/α/t on the integer grid bit for bit, our
loss = diffusers' MSE on the same noisy inputs for ε/v/sample, and C^0 zero-mean under
diffusers' own noising (``DDPMScheduler.add_noise``, uniform integer t, ``randn`` noise)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from varred_diffusion.adapters import DiffusersAdapter
from varred_diffusion.losses import dsm_loss
from varred_diffusion.taylor_cv import dsm_taylor_cv
from varred_diffusion.training import ControlledDSM

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")

N_T = 1000


def _unet(dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=4,
            in_channels=1,
            out_channels=1,
            block_out_channels=(4, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=2,
        )
    return unet.to(dtype)


def _reference(sched, unet, x, eps, t, prediction_type):  # type: ignore[no-untyped-def]
    """diffusers' per-sample loss (the training scripts' MSE, mean over C, H, W)."""
    noisy = sched.add_noise(x, eps, t)
    out = unet(noisy, t).sample
    if prediction_type == "epsilon":
        target, w = eps, 1.0
    elif prediction_type == "v_prediction":
        target, w = sched.get_velocity(x, eps, t), 1.0
    else:  # train_unconditional.py: SNR-weighted x0-MSE
        ac = sched.alphas_cumprod.to(x.dtype)[t]
        target, w = x, (ac / (1 - ac))
    return noisy, w * (out - target).pow(2).flatten(1).mean(1)


def _draw(dtype: torch.dtype, n: int = N_T, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    return x, torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_is_diffusers_bit_for_bit(beta_schedule: str, dtype: torch.dtype) -> None:
    sched = diffusers.DDPMScheduler(num_train_timesteps=N_T, beta_schedule=beta_schedule)
    ad = DiffusersAdapter(nn.Identity(), sched.alphas_cumprod)
    t = torch.arange(N_T)
    ones = torch.ones(N_T, 1, dtype=dtype)
    sig_ref = sched.add_noise(torch.zeros_like(ones), ones, t)[:, 0]  # sqrt(1 − ᾱ_t) as diffusers
    alpha_ref = sched.add_noise(ones, torch.zeros_like(ones), t)[:, 0]  # sqrt(ᾱ_t)
    sigma = ad.sigma(t, dtype)
    assert sigma.dtype == dtype and torch.equal(sigma, sig_ref)
    assert torch.equal(ad.alpha(sigma), alpha_ref)
    assert torch.equal(ad.timestep(sigma), t.to(dtype))  # σ → t round trip on the grid
    # off the grid: the fractional log-SNR step, strictly between its neighbours
    mid = torch.sqrt(sigma[:-1].double() * sigma[1:].double()).to(dtype)
    off = (mid != sigma[:-1]) & (mid != sigma[1:])
    tm = ad.timestep(mid)[off]
    assert bool(((tm > t[:-1][off]) & (tm < t[1:][off])).all())


def test_eps_loss_equals_diffusers_mse_float32_all_t() -> None:
    # float32, the dtype diffusers trains in: ‖σ s + ε‖² = ‖ε − ε̂‖² up to σ·(−ε̂/σ) round-off
    sched = diffusers.DDPMScheduler(num_train_timesteps=N_T)
    unet = _unet(torch.float32)
    ad = DiffusersAdapter(unet, sched.alphas_cumprod)
    x, eps = _draw(torch.float32)
    t = torch.arange(N_T)
    sigma = ad.sigma(t)
    kw = {"alpha": ad.alpha(sigma), "weighting": ad.mse_weighting(16)}
    with torch.no_grad():
        noisy, ref = _reference(sched, unet, x, eps, t, "epsilon")
        assert torch.equal(
            kw["alpha"][:, None, None, None] * x + sigma[:, None, None, None] * eps, noisy
        )
        ours = dsm_loss(ad, x, sigma, eps, **kw)
        by_kw = dsm_loss(ad, x, sigma, eps, **kw, score_kwargs={"timestep": t})
        step = ControlledDSM(ad, unet.parameters(), alpha=ad.alpha, weighting=ad.mse_weighting(16))
        fused, _ = step.losses_and_controls(x, sigma, eps)
    for got in (ours, by_kw, fused):
        rel = ((got - ref).abs() / ref).max()
        assert float(rel) < 1e-6, float(rel)  # measured 1.1e-7 (8×8 UNet) over t = 0..999


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_losses_equal_diffusers_all_t(prediction_type: str) -> None:
    # float64: in float32 the score form ε + σ s cancels to O(α) at large t (α = 0.0064 at
    # t = 999), a relative error ~ u/α ≈ 1e-5 there (measured max 1.2e-5 / mean 4e-7, below)
    sched = diffusers.DDPMScheduler(num_train_timesteps=N_T, prediction_type=prediction_type)
    t = torch.arange(N_T)
    for dtype, tol_max, tol_mean in ((torch.float64, 1e-12, 1e-13), (torch.float32, 5e-5, 1e-6)):
        unet = _unet(dtype)
        ad = DiffusersAdapter(unet, sched.alphas_cumprod, prediction_type)
        x, eps = _draw(dtype)
        sigma = ad.sigma(t, dtype)
        with torch.no_grad():
            _, ref = _reference(sched, unet, x, eps, t, prediction_type)
            ours = dsm_loss(
                ad, x, sigma, eps, alpha=ad.alpha(sigma), weighting=ad.mse_weighting(16)
            )
        rel = (ours - ref).abs() / ref
        assert float(rel.max()) < tol_max and float(rel.mean()) < tol_mean, (dtype, rel.max())


def test_control_zero_mean_under_diffusers_noising() -> None:
    # C^0 with diffusers' noise draws, uniform integer t and diffusers' ᾱ: E C^0 = 0 (5 SE)
    sched = diffusers.DDPMScheduler(num_train_timesteps=N_T)
    unet = _unet(torch.float64)
    ad = DiffusersAdapter(unet, sched.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    n = 4000
    pool, _ = _draw(torch.float64, 32, seed=2)
    x = pool[torch.randint(0, 32, (n,), generator=g)]
    t = torch.randint(0, N_T, (n,), generator=g)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigma = ad.sigma(t, torch.float64)
    alpha = ad.alpha(sigma)
    w = ad.mse_weighting(16)
    with torch.no_grad():
        c = dsm_taylor_cv(ad, x, sigma, eps, order=0, weighting=w, alpha=alpha)
        z = float(c.mean() / (c.std() / math.sqrt(n)))
        assert abs(z) < 5, z
    # the check has power: with ε̂(y) = y (depends on ε through x_t), C^0 at the clean point αx
    # is still zero-mean, but the same statistic with the score at x_t is biased (E = −2 d λ/σ²)
    ident = DiffusersAdapter(lambda y, tt: y, sched.alphas_cumprod)
    with torch.no_grad():
        c_id = dsm_taylor_cv(ident, x, sigma, eps, order=0, weighting=w, alpha=alpha)
        assert abs(float(c_id.mean() / (c_id.std() / math.sqrt(n)))) < 5
        s_t = ident(sched.add_noise(x, eps, t), sigma)
        bad = (w(sigma) / sigma**2) * (
            2 * sigma * (s_t * eps).flatten(1).sum(1) + eps.pow(2).flatten(1).sum(1) - 16
        )
        z_bad = float(bad.mean() / (bad.std() / math.sqrt(n)))
    assert z_bad < -5, z_bad
