"""GPU readiness: every public function of varred and varred_diffusion on CUDA tensors.

Each test checks that results live on the input's device, have the expected shape and are
finite; two tests compare CPU and CUDA in float64 (TaylorCV, dsm_taylor_cv). Every test is
marked ``gpu`` (conftest skips them without CUDA; run with ``pytest -m gpu``). The device is
``$VARRED_TEST_DEVICE`` (default ``cuda``), so the code paths can be smoke-tested on the CPU.
Randomness: generators on the test device (CUDA generators), except where an API documents
CPU generators (``GaussianMixture.sample``, ``ImportanceSigmaSampler.sample``).
"""

from __future__ import annotations

import os

import pytest
import torch

import varred
import varred_diffusion as vd
from varred import GradientControl, OptimalCoefficient, TaylorCV
from varred_diffusion.adapters import DiffusersAdapter

pytestmark = pytest.mark.gpu
DEV = torch.device(os.environ.get("VARRED_TEST_DEVICE", "cuda"))
F64, F32 = torch.float64, torch.float32


def _on_dev(*ts: torch.Tensor) -> None:
    for t in ts:
        assert t.device.type == DEV.type, t.device
        assert bool(torch.isfinite(t.float()).all())


@pytest.fixture
def dgen(seed: int) -> torch.Generator:
    """A generator on the test device."""
    return torch.Generator(device=DEV).manual_seed(seed)


def _f(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3] -> [n, 2]`` smooth test function."""
    return torch.stack([torch.sin(x).sum(1), torch.exp(0.3 * x[:, 0]) * x[:, 1]], dim=1)


# ----------------------------------------------------------------- varred core
@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("expectation", ["exact", "probe"])
def test_taylor_cv(order, expectation, dgen):
    eps = torch.randn(64, 3, generator=dgen, device=DEV, dtype=F64)
    cv = TaylorCV(_f, order, expectation=expectation, num_probes=2)
    c = cv(eps, generator=dgen)
    assert c.shape == (64, 2)
    _on_dev(c, cv.polynomial(eps), cv.remainder(eps))
    if expectation == "exact":
        _on_dev(cv.expectation(d=3, device=DEV))
    mean = torch.zeros(3, dtype=F64, device=DEV)
    cv2 = TaylorCV(_f, order, mean=mean, scale_tril=0.5 * torch.eye(3, dtype=F64, device=DEV))
    _on_dev(cv2(eps))


def test_taylor_cv_cpu_cuda_agree(seed):
    eps = torch.randn(32, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    probes = torch.randn(2, 32, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    for order in (0, 1, 2, 3):
        for expectation in ("exact", "probe"):
            cv = TaylorCV(_f, order, expectation=expectation, num_probes=2)
            kw = {} if expectation == "exact" else {"probe_noise": probes}
            cpu = cv(eps, **kw)
            kw = {k: v.to(DEV) for k, v in kw.items()}
            dev = cv(eps.to(DEV), **kw)
            torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-10, atol=1e-12)


def test_taylor_terms_and_gaussian(dgen):
    x0 = torch.randn(8, 3, generator=dgen, device=DEV, dtype=F64)
    v = torch.randn(8, 3, generator=dgen, device=DEV, dtype=F64)
    terms = varred.taylor_terms(_f, x0, v, 3)
    assert len(terms) == 4
    _on_dev(*terms)
    nodes, weights = varred.gauss_hermite_cubature(3, 4, device=DEV)
    _on_dev(nodes, weights)
    val = varred.gaussian_polynomial_expectation(lambda e: (e**2).sum(1), 3, 2, device=DEV)
    _on_dev(val)
    torch.testing.assert_close(val.cpu(), torch.tensor(3.0, dtype=F64))


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("fit", ["crossfit", "batch", "running"])
def test_estimate_all_fits(kind, fit, dgen):
    eps = torch.randn(200, 3, generator=dgen, device=DEV, dtype=F64)
    f = _f(eps)  # [200, 2]
    controls = torch.stack([eps[:, 0], eps[:, 1], eps[:, 2]], dim=-1)[:, None, :].expand(-1, 2, -1)
    coef = OptimalCoefficient(kind=kind, fit=fit)
    for _ in range(2):  # running: second call uses the first call's statistics
        est = varred.estimate(f, controls, coefficient=coef)
    _on_dev(est.mean, est.stderr, est.variance, est.variance_ratio, est.coefficient)
    y, beta = coef.controlled(f, controls)
    _on_dev(y, beta)
    _on_dev(varred.estimate(f, controls[..., 0], coefficient=0.5).mean)
    _on_dev(varred.estimate(f).mean)


def test_running_moments_and_controls(dgen):
    eps = torch.randn(50, 3, generator=dgen, device=DEV, dtype=F64)
    rm = varred.RunningMoments(decay=0.9)
    rm.update(_f(eps), eps[:, :2])
    sums = [v for k, v in rm.state_dict().items() if k.startswith("sum_")]
    _on_dev(rm.beta("diagonal"), *sums)  # metadata (decay, out_shape, ...) may stay on the CPU
    cv = varred.ControlVariate(lambda x: x.sum(-1), mean=0.0)
    stacked = varred.stack_controls([cv, varred.ControlVariate(lambda x: x[:, 0] ** 2, 1.0)])
    _on_dev(cv(eps), stacked(eps))


def test_antithetic_and_score_function(dgen):
    eps = torch.randn(40, 3, generator=dgen, device=DEV, dtype=F64)
    est = varred.antithetic_estimate(_f, eps)
    _on_dev(est.mean, est.stderr)
    values = torch.randn(16, generator=dgen, device=DEV, dtype=F64)
    logp = torch.randn(16, generator=dgen, device=DEV, dtype=F64, requires_grad=True)
    _on_dev(varred.loo_baseline(values))
    sur = varred.score_function_surrogate(values, logp)
    _on_dev(sur)
    sur.sum().backward()
    _on_dev(logp.grad)


GC_MODES = {
    "running": {"coefficient": "running"},
    "per_sample": {"coefficient": "per_sample"},
    "crossfit": {"coefficient": "per_sample", "per_sample_fit": "crossfit"},
    "fixed": {"coefficient": 0.5},
}


@pytest.mark.parametrize("mode", sorted(GC_MODES))
@pytest.mark.parametrize("granularity", ["element", "tensor", "scalar"])
@pytest.mark.parametrize("group_backward", ["batched", "loop"])
def test_gradient_control_all_modes(mode, granularity, group_backward, dgen):
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net = net.to(DEV)
    ctrl = GradientControl(
        net.parameters(), granularity=granularity, num_groups=2, warmup_steps=1,
        group_backward=group_backward, validate=False, **GC_MODES[mode],
    )  # fmt: skip
    groups = torch.arange(16, device=DEV) % 2
    for _ in range(3):
        x = torch.randn(16, 3, generator=dgen, device=DEV)
        z = torch.randn(16, 3, generator=dgen, device=DEV)
        losses = net(x + 0.1 * z).squeeze(1) ** 2
        controls = (net(x).squeeze(1) - net(x - 0.1 * z).squeeze(1)) * z[:, 0]
        diag = ctrl.backward(losses, controls, groups)
    _on_dev(*[p.grad for p in net.parameters()], *diag.values(), *ctrl.coefficients())
    state = ctrl.state_dict()
    _on_dev(*[v for v in state.values() if torch.is_tensor(v)])
    ctrl.load_state_dict(state)


# ------------------------------------------------------------ varred_diffusion
def _mlp(dtype: torch.dtype = F32) -> vd.MLPScore:
    return vd.MLPScore(2, width=16, depth=2, generator=torch.Generator().manual_seed(0)).to(
        device=DEV, dtype=dtype
    )


def test_dsm_loss_and_perturb(dgen):
    net = _mlp()
    x = torch.randn(8, 2, generator=dgen, device=DEV)
    eps = torch.randn(8, 2, generator=dgen, device=DEV)
    sigma = torch.rand(8, generator=dgen, device=DEV) + 0.01
    _on_dev(vd.perturb(x, sigma, eps), vd.perturb(x, sigma, eps, alpha=torch.ones_like(sigma)))
    loss = vd.dsm_loss(net, x, sigma, eps)
    _on_dev(loss, vd.dsm_loss(net, x, 0.3, eps, validate=False))
    loss.mean().backward()
    _on_dev(*[p.grad for p in net.parameters()])


@pytest.mark.parametrize(
    ("order", "expectation"),
    [(0, "exact"), (1, "exact"), (1, "probe"), (1, "hutchinson"), (2, "exact"), (2, "probe"),
     (2, "hutchinson")],
)  # fmt: skip
def test_dsm_taylor_cv(order, expectation, dgen):
    net = _mlp()
    x = torch.randn(8, 2, generator=dgen, device=DEV)
    eps = torch.randn(8, 2, generator=dgen, device=DEV)
    sigma = torch.rand(8, generator=dgen, device=DEV) * 0.5 + 1e-3
    c = vd.dsm_taylor_cv(net, x, sigma, eps, order=order, expectation=expectation, generator=dgen)
    assert c.shape == (8,)
    _on_dev(c)
    c.mean().backward()
    _on_dev(*[p.grad for p in net.parameters()])


def test_dsm_taylor_cv_cpu_cuda_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    x, eps = (
        torch.randn(8, 2, generator=gen, dtype=F64),
        torch.randn(8, 2, generator=gen, dtype=F64),
    )
    sigma = torch.rand(8, generator=gen, dtype=F64) * 0.5 + 1e-2
    g = torch.randn(8, 2, generator=gen, dtype=F64)
    z = torch.randint(0, 2, (8, 2), generator=gen).to(F64) * 2 - 1
    cases = [
        (0, "exact", None), (1, "exact", None), (2, "exact", None), (1, "probe", g),
        (2, "probe", g), (1, "hutchinson", z), (2, "hutchinson", (z, g)),
    ]  # fmt: skip
    cpu_net, dev_net = _mlp(F64).cpu(), _mlp(F64)
    for order, expectation, probe in cases:
        cpu = vd.dsm_taylor_cv(
            cpu_net, x, sigma, eps, order=order, expectation=expectation, probe_noise=probe
        )
        if isinstance(probe, tuple):
            probe = tuple(p.to(DEV) for p in probe)
        elif probe is not None:
            probe = probe.to(DEV)
        dev = vd.dsm_taylor_cv(
            dev_net, x.to(DEV), sigma.to(DEV), eps.to(DEV), order=order,
            expectation=expectation, probe_noise=probe,
        )  # fmt: skip
        torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", [0, 1])
def test_controlled_dsm_small_unet_autocast(order, dtype, dgen):
    if DEV.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 autocast is a CUDA feature")
    net = vd.SmallUNet(base=8, embedding_dim=16, generator=torch.Generator().manual_seed(0))
    net = net.to(DEV)
    bins = vd.SigmaBins(1e-3, 10.0, 4)
    step = vd.ControlledDSM(
        net, net.parameters(), order=order, bins=bins, expectation="hutchinson" if order else "auto",
        control_kwargs={"warmup_steps": 1, "validate": False},
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for _ in range(2):
        x = torch.rand(4, 1, 28, 28, generator=dgen, device=DEV) * 2 - 1
        eps = torch.randn(4, 1, 28, 28, generator=dgen, device=DEV)
        u = vd.stratified_uniform(4, dgen, device=DEV, dtype=F32)
        sigma = vd.log_uniform_sigma(u, 1e-3, 10.0)
        with torch.autocast(DEV.type, dtype=dtype):
            diag = step(x, sigma, eps, generator=dgen)
        _on_dev(*[p.grad for p in net.parameters()], *diag.values())
        assert all(p.grad.dtype == F32 for p in net.parameters())
        opt.step()
    _on_dev(*[v for v in step.state_dict().values() if torch.is_tensor(v)])


def test_controlled_dsm_plain_and_fixed(dgen):
    net = _mlp()
    x = torch.randn(8, 2, generator=dgen, device=DEV)
    eps = torch.randn(8, 2, generator=dgen, device=DEV)
    sigma = torch.full((8,), 0.1, device=DEV)
    for kw in ({"enabled": False}, {"coefficient": 0.7}, {"coefficient": "per_sample"}):
        diag = vd.ControlledDSM(net, net.parameters(), order=1, **kw)(x, sigma, eps)
        _on_dev(*[p.grad for p in net.parameters()], *diag.values())


def test_samplers_with_device_generators(dgen):
    for fn in (vd.stratified_uniform, vd.low_discrepancy_uniform):
        u = fn(8, dgen, rank=1, world_size=2, device=DEV)
        _on_dev(u)
        assert bool(((u >= 0) & (u < 1)).all())
        _on_dev(vd.log_uniform_sigma(u, 1e-3, 10.0))
    noise = vd.antithetic_noise(8, (1, 4, 4), dgen, device=DEV)
    _on_dev(noise)
    assert torch.equal(noise[:4], -noise[4:])
    bins = vd.SigmaBins(1e-3, 10.0, 4)
    sigma = vd.log_uniform_sigma(vd.stratified_uniform(16, dgen, device=DEV), 1e-3, 10.0)
    assert bins.index(sigma).device.type == DEV.type
    sampler = vd.ImportanceSigmaSampler(4, 1e-3, 10.0, history=2)
    for _ in range(3):  # documented: CPU generator, results on ``device``
        s, w = sampler.sample(16, torch.Generator().manual_seed(0), device=DEV)
        _on_dev(s, w)
        sampler.update(s, s**2)  # device inputs are accepted
    assert sampler.warmed_up()


def test_adapters_schedules_models(dgen):
    x = torch.randn(4, 2, generator=dgen, device=DEV)
    sigma = torch.rand(4, generator=dgen, device=DEV) * 0.9 + 0.05
    net = _mlp()
    for sched in (vd.VPSchedule(), vd.VPSchedule(kind="cosine", discrete=True)):
        t = sched.sigma_to_t(sigma)
        _on_dev(t, sched.t_to_sigma(t), sched.alpha(sigma), sched.log_snr(sigma))
        for cls in (vd.ScoreFromEps, vd.ScoreFromX0, vd.ScoreFromV):
            _on_dev(cls(net, sched)(x, sigma))
        _on_dev(vd.ScoreFromEps(net, sched, "t")(x, sigma))
    ve = vd.VESchedule(0.01, 10.0)
    _on_dev(ve.t_to_sigma(torch.rand(4, generator=dgen, device=DEV)))
    _on_dev(vd.EpsFromScore(net)(x, sigma))
    vp = vd.VPSchedule(kind="linear", num_steps=100, discrete=True)
    unet = DiffusersAdapter(lambda y, t: y * t[:, None] * 0.0 + y, vp.alphas_cumprod)
    _on_dev(unet(x, sigma))
    grid = unet.sigma(torch.arange(4, device=DEV))
    _on_dev(grid, unet.alpha(grid), unet.timestep(grid), unet.mse_weighting(3)(grid))
    _on_dev(vd.append_dims(sigma, 3))


def test_toy_score_error(dgen):
    mix = vd.ring8(dtype=F32)
    x = mix.sample(64, torch.Generator().manual_seed(0)).to(DEV)  # documented: CPU generator
    sigma = torch.full((64,), 0.2, device=DEV)
    _on_dev(mix.score(x, sigma), mix.log_prob(x, sigma))
    err = vd.score_error(_mlp(), mix, x, 0.2, dgen)
    _on_dev(*[v for v in err if torch.is_tensor(v)])


@pytest.mark.gpu
def test_recipe_step_with_sampler_on_cuda() -> None:
    """A recipe whose sampler draws σ runs on CUDA with one CUDA generator (σ and ε)."""
    import varred_diffusion as vd

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    model = vd.MLPScore(2, width=16, depth=1).cuda()
    for sampler in (vd.LogUniformSigma(1e-2, 1.0), vd.StratifiedSigma(1e-2, 1.0),
                    vd.ImportanceSigmaSampler(4, 1e-2, 1.0)):  # fmt: skip
        step = vd.Recipe(sampler=sampler, control=vd.TaylorControl(0)).build(
            model, model.parameters()
        )
        diag = step(torch.randn(16, 2, device="cuda"), generator=g)
        assert diag["sigma"].device.type == "cuda"
