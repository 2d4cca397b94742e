"""VE/VP schedules: t ↔ σ round trips, α² + σ² = 1, DDPM tables, log-SNR."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred_diffusion.schedules import VESchedule, VPSchedule, append_dims


def test_append_dims() -> None:
    x = torch.arange(3.0)
    y = append_dims(x, 4)
    assert y.shape == (3, 1, 1, 1)
    assert torch.equal(y.flatten(), x)
    assert append_dims(x, 1) is not None and append_dims(x, 1).shape == (3,)
    with pytest.raises(VarRedError, match="ndim"):
        append_dims(torch.zeros(2, 2), 1)


@given(t=st.floats(min_value=0.0, max_value=1.0))
def test_ve_round_trip(t: float) -> None:
    ve = VESchedule(0.002, 80.0)
    tt = torch.tensor(t, dtype=torch.float64)
    s = ve.t_to_sigma(tt)
    assert torch.allclose(ve.sigma_to_t(s), tt, rtol=0, atol=1e-14)
    assert float(ve.alpha(s)) == 1.0
    assert torch.allclose(ve.log_snr(s), -2 * torch.log(s))


def test_ve_endpoints_and_errors() -> None:
    ve = VESchedule(0.01, 50.0)
    ends = ve.t_to_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ends, torch.tensor([0.01, 50.0], dtype=torch.float64), rtol=1e-14)
    with pytest.raises(VarRedError, match="sigma_min"):
        VESchedule(1.0, 0.5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("discrete", [False, True])
def test_vp_round_trip_and_identities(kind: str, discrete: bool) -> None:
    vp = VPSchedule(kind=kind, discrete=discrete)
    hi = vp.num_steps - 1 if discrete else 0.99
    t = torch.linspace(0.01, hi, 101, dtype=torch.float64)
    s = vp.t_to_sigma(t)
    assert bool((s[1:] > s[:-1]).all())  # σ increases with t
    assert torch.allclose(vp.sigma_to_t(s), t, rtol=0, atol=1e-6)
    a = vp.alpha(s)
    assert torch.allclose(a**2 + s**2, torch.ones_like(s), rtol=0, atol=1e-15)
    assert torch.allclose(vp.log_snr(s), torch.log(a**2 / s**2), rtol=1e-10, atol=1e-10)
    assert torch.allclose(vp.sigma_from_log_snr(vp.log_snr(s)), s, rtol=1e-10)
    assert 0 < vp.sigma_min < vp.sigma_max < 1


def test_vp_discrete_table_is_ddpm() -> None:
    vp = VPSchedule(kind="linear", discrete=True, num_steps=1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    assert vp.alphas_cumprod is not None
    assert torch.equal(vp.alphas_cumprod, ac)
    idx = torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64)
    assert torch.allclose(vp.t_to_sigma(idx), torch.sqrt(1 - ac[[0, 10, 999]]), rtol=1e-12)


def test_vp_continuous_linear_matches_vpsde() -> None:
    # Song et al. (2021): β(t) = 0.1 + 19.9 t, ᾱ(t) = exp(−∫β)
    vp = VPSchedule(kind="linear")
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    ab = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
    assert torch.allclose(vp.t_to_sigma(t), torch.sqrt(1 - ab), rtol=1e-12)


def test_vp_custom_table_and_errors() -> None:
    ac = torch.tensor([0.99, 0.9, 0.5, 0.1], dtype=torch.float64)
    vp = VPSchedule(alphas_cumprod=ac)
    assert vp.discrete and vp.num_steps == 4
    assert torch.allclose(
        vp.t_to_sigma(torch.tensor(2.0, dtype=torch.float64)),
        torch.tensor(math.sqrt(0.5), dtype=torch.float64),
    )
    with pytest.raises(VarRedError, match="alphas_cumprod"):
        VPSchedule(alphas_cumprod=torch.tensor([0.5, 0.9], dtype=torch.float64))
    with pytest.raises(VarRedError, match="kind"):
        VPSchedule(kind="sigmoid")
