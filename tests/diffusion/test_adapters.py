"""Parameterisation adapters: round trips and the ε / x0 / v identities, VE and VP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varred.errors import VarRedError
from varred_diffusion.adapters import (
    DiffusersAdapter,
    DiffusersEpsAdapter,
    EpsFromScore,
    ScoreFromEps,
    ScoreFromV,
    ScoreFromX0,
)
from varred_diffusion.models import MLPScore
from varred_diffusion.schedules import VESchedule, VPSchedule
from varred_diffusion.toy import ring8

SCHEDULES = {"ve": VESchedule(0.01, 10.0), "vp": VPSchedule(kind="cosine")}


class _EpsNet(nn.Module):
    """An ε-prediction net ``(x, time) -> [B, d]`` with a class-label embedding."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.inner = MLPScore(2, width=16, depth=2, generator=generator).double()
        self.labels = nn.Embedding(3, 2).double()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.inner(x, t.abs() + 0.1) * 0.1
        return out if y is None else out + self.labels(y)


def _draw(generator: torch.Generator, sched: VESchedule | VPSchedule) -> tuple[torch.Tensor, ...]:
    x0 = ring8().sample(6, generator)
    eps = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    sigma = sched.t_to_sigma(t)
    alpha = sched.alpha(sigma)
    return x0, eps, sigma, alpha, alpha[:, None] * x0 + sigma[:, None] * eps


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("time_input", ["sigma", "t"])
def test_eps_score_eps_round_trip(generator: torch.Generator, name: str, time_input: str) -> None:
    sched = SCHEDULES[name]
    net = _EpsNet(generator)
    *_, sigma, _, xt = _draw(generator, sched)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    time = sigma if time_input == "sigma" else sched.sigma_to_t(sigma)
    eps_hat = net(xt, time, y=y)
    score = ScoreFromEps(net, sched, time_input=time_input)
    s = score(xt, sigma, y=y)
    assert torch.allclose(s, -eps_hat / sigma[:, None], rtol=1e-15, atol=0)
    back = EpsFromScore(score)(xt, sigma, y=y)
    assert torch.allclose(back, eps_hat, rtol=4e-16, atol=0)
    # score -> eps -> score
    s2 = ScoreFromEps(EpsFromScore(score), sched)(xt, sigma, y=y)
    assert torch.allclose(s2, s, rtol=4e-16, atol=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_perfect_predictors_give_the_conditional_score(
    generator: torch.Generator, name: str
) -> None:
    # a network that knows (x0, ε) exactly: every parameterisation yields −ε/σ = ∇log p(x_t | x0)
    sched = SCHEDULES[name]
    x0, eps, sigma, alpha, xt = _draw(generator, sched)
    target = -eps / sigma[:, None]
    s_eps = ScoreFromEps(lambda x, t: eps, sched)(xt, sigma)
    s_x0 = ScoreFromX0(lambda x, t: x0, sched)(xt, sigma)
    assert torch.allclose(s_eps, target, rtol=1e-14, atol=0)
    assert torch.allclose(s_x0, target, rtol=1e-10, atol=1e-10)
    if name == "vp":
        v = alpha[:, None] * eps - sigma[:, None] * x0
        s_v = ScoreFromV(lambda x, t: v, sched)(xt, sigma)
        assert torch.allclose(s_v, target, rtol=1e-10, atol=1e-10)


def test_v_identities(generator: torch.Generator) -> None:
    sched = SCHEDULES["vp"]
    x0, eps, sigma, alpha, xt = _draw(generator, sched)
    a, s = alpha[:, None], sigma[:, None]
    v = a * eps - s * x0
    assert torch.allclose(s * xt + a * v, eps, atol=1e-14)
    assert torch.allclose(a * xt - s * v, x0, atol=1e-14)


def test_time_input_callable_and_modules(generator: torch.Generator) -> None:
    net = _EpsNet(generator)
    seen = {}

    def tf(s: torch.Tensor) -> torch.Tensor:
        seen["t"] = s
        return torch.log(s)

    sf = ScoreFromEps(net, time_input=tf)
    xt = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    sigma = torch.full((4,), 0.5, dtype=torch.float64)
    sf(xt, sigma)
    assert seen["t"] is sigma
    assert sum(p.numel() for p in sf.parameters()) == sum(p.numel() for p in net.parameters())
    # torch.func works through an adapter
    v = torch.randn_like(xt)
    _, tan = torch.func.jvp(lambda z: sf(z, sigma), (xt,), (v,))
    assert tan.shape == xt.shape


def test_errors(generator: torch.Generator) -> None:
    with pytest.raises(VarRedError, match="time_input"):
        ScoreFromEps(lambda x, t: x, time_input="log")
    with pytest.raises(VarRedError, match="time_input"):
        ScoreFromEps(lambda x, t: x, None, time_input="t")
    with pytest.raises(VarRedError, match="schedule"):
        ScoreFromV(lambda x, t: x, VESchedule())  # type: ignore[arg-type]
    with pytest.raises(VarRedError, match="model"):
        ScoreFromEps(lambda x, t: x[:, :1])(torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(VarRedError, match="sigma"):
        ScoreFromEps(lambda x, t: x)(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(VarRedError, match="prediction_type"):
        DiffusersAdapter(nn.Identity(), torch.linspace(0.99, 0.01, 10), prediction_type="x")


class _FakeUNet(nn.Module):
    """Mimics ``UNet2DModel``: returns an object with ``.sample``; records the timestep."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> object:
        self.last_t = timestep
        return type("Out", (), {"sample": x * 0 + 1})()


def test_diffusers_adapter_timestep_interpolation() -> None:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    unet = _FakeUNet()
    ad = DiffusersAdapter(unet, ac)
    idx = torch.tensor([0, 10, 500, 999])
    sigma = torch.sqrt(1 - ac[idx])
    s = ad(torch.zeros(4, 1, 4, 4, dtype=torch.float64), sigma)
    assert torch.allclose(unet.last_t, idx.double(), atol=1e-8)
    assert torch.allclose(s, -1 / sigma[:, None, None, None].expand(4, 1, 4, 4), rtol=1e-15)
    # halfway in log-SNR between steps 10 and 11 -> timestep 10.5
    lam = torch.log(ac / (1 - ac))
    mid = torch.sqrt(torch.sigmoid(-(lam[10] + lam[11]) / 2)).reshape(1)
    ad(torch.zeros(1, 1, 4, 4, dtype=torch.float64), mid)
    assert torch.allclose(unet.last_t, torch.tensor([10.5], dtype=torch.float64), atol=1e-8)


def _tiny_unet(diffusers: object) -> nn.Module:
    return diffusers.UNet2DModel(  # type: ignore[attr-defined,no-any-return]
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    ).double()


def test_diffusers_unet_if_installed(generator: torch.Generator) -> None:
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():  # diffusers' own init uses the global RNG: keep it untouched
        torch.manual_seed(0)
        unet = _tiny_unet(diffusers)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ad = DiffusersAdapter(unet, sched.alphas_cumprod)
    x = torch.randn(2, 1, 8, 8, generator=generator, dtype=torch.float64)
    sigma = torch.sqrt(1 - sched.alphas_cumprod[[100, 700]].double())
    with torch.no_grad():
        s = ad(x, sigma)
        eps = unet(x, torch.tensor([100.0, 700.0], dtype=torch.float64)).sample
    assert torch.allclose(s, -eps / sigma[:, None, None, None], rtol=1e-6, atol=1e-6)


def test_deprecated_alias() -> None:
    ac = torch.linspace(0.99, 0.01, 10)
    with pytest.warns(DeprecationWarning, match="DiffusersAdapter"):
        old = DiffusersEpsAdapter(nn.Identity(), ac, prediction_type="v_prediction")
    assert isinstance(old, DiffusersAdapter) and old.prediction_type == "v_prediction"
