"""ControlledDSM under autocast: finite down to σ = 1e-4, float32 statistics, VR as in float32.

The model is float32 (what autocast is for); per-sample gradients are accumulated in float64
for the variance estimates. VR estimator (DESIGN.md "Measurements"): at fixed θ and σ,
per-sample gradients ``g_ℓ``, ``g_c`` of ``n`` draws fit an element-wise β = Cov(g_c, g_ℓ)/Var(g_c);
on ``n`` independent draws ``VR = tr Cov(g_ℓ − β g_c) / tr Cov(g_ℓ)``. float32 and low precision
use the same draws (common random numbers), so the log-ratio of their VRs has a small
jackknife standard error (over blocks of the evaluation draws, β held fixed); the test asks
``|log(VR_low / VR_fp32)| + 5 SE < log 2``. Measured (n = 512): CPU bf16 ratio 1.002–1.006 with
SE of the log-ratio ≈ 0.0016; H100 fp16 ≈ 1.0003 (SE 0.0002), bf16 as CPU — the bound is met
with a margin of about 0.68 in log space (log 2 = 0.69).
"""

from __future__ import annotations

import math

import pytest
import torch

from varred_diffusion import ControlledDSM, MLPScore, ring8

GPU = pytest.mark.gpu
PRECISIONS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=GPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=GPU),
]
N = 512  # draws for fitting β, and again for evaluating VR
CHUNK = 64  # per-sample gradients are taken CHUNK samples at a time
BLOCKS = 16  # jackknife blocks of the evaluation draws


def _model(device: str, seed: int) -> MLPScore:
    net = MLPScore(2, width=16, depth=2, generator=torch.Generator().manual_seed(seed))
    return net.to(device)


def _draw(n: int, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean ring8 points and noise ``[n, 2]`` float32, drawn on the CPU generator."""
    x = ring8(dtype=torch.float32).sample(n, gen).float()
    eps = torch.randn(n, 2, generator=gen)
    return x.to(device), eps.to(device)


def _per_sample_grads(
    step: ControlledDSM,
    sigma: float,
    n: int,
    gen: torch.Generator,
    device: str,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``g_ℓ``, ``g_c`` ``[n, P]`` float64; ``dtype`` None = no autocast."""
    params = step.params
    gl_rows, gc_rows = [], []
    for _ in range(n // CHUNK):
        x, eps = _draw(CHUNK, gen, device)
        sig = torch.full((CHUNK,), sigma, device=device)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, ctrl = step.losses_and_controls(x, sig, eps)
        eye = torch.eye(CHUNK, device=device)
        gl = torch.autograd.grad(loss, params, eye, retain_graph=True, is_grads_batched=True)
        gc = torch.autograd.grad(ctrl, params, eye, is_grads_batched=True)
        gl_rows.append(torch.cat([g.reshape(CHUNK, -1) for g in gl], 1).double())  # [C, P]
        gc_rows.append(torch.cat([g.reshape(CHUNK, -1) for g in gc], 1).double())
    return torch.cat(gl_rows), torch.cat(gc_rows)


def _controlled_and_plain(
    step: ControlledDSM, sigma: float, seed: int, device: str, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Controlled and plain per-sample gradients ``[N, P]`` on evaluation draws.

    β (element-wise, ``[P]``) is fitted on ``N`` draws independent of the evaluation draws.
    """
    gen = torch.Generator().manual_seed(seed)
    gl, gc = _per_sample_grads(step, sigma, N, gen, device, dtype)  # fit draws
    dl, dc = gl - gl.mean(0), gc - gc.mean(0)
    var_c = (dc * dc).mean(0)
    beta = torch.where(var_c > 0, (dc * dl).mean(0) / var_c.clamp_min(1e-300), 0.0)  # [P]
    gl, gc = _per_sample_grads(step, sigma, N, gen, device, dtype)  # independent eval draws
    return gl - beta * gc, gl


def _trcov(y: torch.Tensor) -> torch.Tensor:
    """tr Cov of the rows of ``y`` ``[n, P]`` (unbiased), float64 scalar."""
    return y.var(0).sum()


def _log_vr_jackknife(y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log VR`` on all rows and its ``BLOCKS`` leave-one-block-out replicates."""
    full = torch.log(_trcov(y) / _trcov(g))
    idx = torch.arange(y.shape[0]) % BLOCKS
    reps = torch.stack(
        [torch.log(_trcov(y[idx != j]) / _trcov(g[idx != j])) for j in range(BLOCKS)]
    )
    return full, reps


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize(("order", "sigma"), [(0, 1e-2), (1, 1e-2), (0, 1e-4)])
def test_variance_ratio_within_factor_two_of_float32(
    device, dtype, order, sigma, seed, record_property
):
    """VR of the controlled per-sample gradient under autocast is within ×2 of float32's."""
    net = _model(device, seed)
    step = ControlledDSM(net, net.parameters(), order=order, expectation="exact")
    y32, g32 = _controlled_and_plain(step, sigma, seed + 1, device, None)
    ylo, glo = _controlled_and_plain(step, sigma, seed + 1, device, dtype)  # same draws
    assert torch.isfinite(ylo).all() and torch.isfinite(glo).all()
    f32, r32 = _log_vr_jackknife(y32, g32)
    flo, rlo = _log_vr_jackknife(ylo, glo)
    diff, reps = flo - f32, rlo - r32  # log(VR_low / VR_fp32) and its jackknife replicates
    se = math.sqrt((BLOCKS - 1) / BLOCKS * float(((reps - reps.mean()) ** 2).sum()))
    record_property("vr_fp32", float(f32.exp()))  # in the junit xml of benchmarks/gpu_check.sh
    record_property("vr_low", float(flo.exp()))
    record_property("se_log_ratio", se)
    assert float(f32) < math.log(0.1)  # the control works at all (VR < 0.1) in float32
    assert abs(float(diff)) + 5 * se < math.log(2.0), (float(diff.exp()), se)


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("order", [0, 1])
def test_controlled_step_finite_with_float32_statistics(device, dtype, order, seed):
    """Steps under autocast at σ down to 1e-4: finite grads, diagnostics and float32 statistics."""
    net = _model(device, seed)
    step = ControlledDSM(
        net, net.parameters(), order=order, expectation="exact",
        control_kwargs={"warmup_steps": 1},
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for sigma in (1.0, 1e-2, 1e-4, 1e-4):
        x, eps = _draw(32, gen, device)
        sig = torch.full((32,), sigma, device=device)
        with torch.autocast(device, dtype=dtype):
            first = net.net[0]  # autocast is really engaged on the model's layers
            assert first(torch.zeros(1, first.in_features, device=device)).dtype == dtype
            diag = step(x, sig, eps)
        for p in net.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all(), (sigma, p.shape)
        for key, val in diag.items():
            assert bool(torch.isfinite(val.float()).all()), (sigma, key)
        assert diag["loss"].dtype == torch.float32
        opt.step()
    assert int(step.control.num_updates) == 4  # every step was finite and folded in
    for key, val in step.state_dict().items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            assert val.dtype == torch.float32, key
            assert torch.isfinite(val).all(), key
    assert all(b.dtype == torch.float32 for b in step.control.coefficients())


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
def test_losses_and_controls_are_float32_under_autocast(device, dtype, seed):
    """Per-sample losses and controls come out in float32 (reductions outside low precision)."""
    net = _model(device, seed)
    gen = torch.Generator().manual_seed(seed)
    x, eps = _draw(16, gen, device)
    sig = torch.full((16,), 1e-4, device=device)
    for order in (0, 1):
        step = ControlledDSM(net, net.parameters(), order=order, expectation="exact")
        with torch.autocast(device, dtype=dtype):
            loss, ctrl = step.losses_and_controls(x, sig, eps)
        assert loss.dtype == torch.float32 and ctrl.dtype == torch.float32
        assert torch.isfinite(loss).all() and torch.isfinite(ctrl).all()


@GPU
@pytest.mark.parametrize("order", [0, 1])
def test_float16_with_grad_scaler_trains(order, seed):
    """CUDA fp16 + GradScaler: ``scaler.step`` applies the controlled update, every step is
    finite and folded into the statistics, and the loss falls over a short run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = _model("cuda", seed)
    step = ControlledDSM(
        net, net.parameters(), order=order, expectation="exact",
        control_kwargs={"warmup_steps": 2},
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(60):
        x, eps = _draw(64, gen, "cuda")
        sig = torch.exp(torch.empty(64).uniform_(-4, 0, generator=gen)).cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            diag = step(x, sig, eps, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        losses.append(float(diag["loss"]))
    assert int(step.control.num_updates) >= 55  # a few overflow steps may be skipped
    assert sum(losses[-10:]) < sum(losses[:10])
