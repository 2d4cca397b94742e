"""Tests of varred.gradient.GradientControl: equivalence, convergence, unbiasedness, policies."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from varred.errors import VarRedError
from varred.gradient import GradientControl
from varred.moments import merge_moments, safe_div

F64 = torch.float64


# ----------------------------------------------------------------- helpers
def pooled_ratio(num, den, granularity):
    """Reference β per parameter: ``Σ num / Σ den`` per element, tensor or over all tensors."""
    if granularity == "element":
        return [safe_div(n, d) for n, d in zip(num, den)]
    sn = [n.flatten(1).sum(1) for n in num]  # [L, *p] -> [L]
    sd = [d.flatten(1).sum(1) for d in den]
    lead = lambda x, n: x.reshape(x.shape + (1,) * (n.dim() - 1))  # noqa: E731
    if granularity == "scalar":
        total = safe_div(torch.stack(sn).sum(0), torch.stack(sd).sum(0))
        return [lead(total, n) for n in num]
    return [lead(safe_div(a, b), n) for a, b, n in zip(sn, sd, num)]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # test-side model init only; the library never touches the global RNG
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(
        F64
    )


def mlp_batch(net: torch.nn.Module, x: torch.Tensor, z: torch.Tensor):
    losses = net(x).squeeze(1) ** 2  # [B]
    controls = net(z).squeeze(1) * z[:, 0]  # [B], any differentiable values do for equivalence
    return losses, controls


class Linear:
    """ℓ_i = θᵀa_i, c_i = θᵀb_i with a = μ + k_g ⊙ b + s ⊙ e, b ~ N(0, σ_g²), e ~ N(0, 1).

    Per-sample gradients are a_i and b_i (independent of θ): E∇ℓ = μ, E∇c = 0, the optimal
    per-element coefficient of group g is k_g and 1 − ρ² = s² / (k² + s²) for one group.
    """

    def __init__(self, gen, d=5, k=None, s=None, scale=None):
        self.gen, self.d = gen, d
        self.theta = torch.nn.Parameter(torch.randn(d, generator=gen, dtype=F64))
        self.mu = torch.linspace(-1.0, 1.0, d, dtype=F64)
        self.k = torch.as_tensor(k if k is not None else [[0.5, 1.0, -2.0, 3.0, 0.0]], dtype=F64)
        self.s = torch.as_tensor(s if s is not None else [1.0, 0.5, 2.0, 1.0, 1.0], dtype=F64)
        self.scale = torch.as_tensor(scale if scale is not None else [1.0], dtype=F64)

    def sample(self, b, groups=None):
        g = torch.zeros(b, dtype=torch.long) if groups is None else groups
        g = g if len(self.k) > 1 else torch.zeros_like(g)  # one row of k/scale: shared
        bb = torch.randn(b, self.d, generator=self.gen, dtype=F64) * self.scale[g][:, None]
        e = torch.randn(b, self.d, generator=self.gen, dtype=F64)
        a = self.mu + self.k[g] * bb + self.s * e  # [B, D]
        return a, bb

    def batch(self, b, groups=None):
        a, bb = self.sample(b, groups)
        return a @ self.theta, bb @ self.theta, a, bb


def grads(params):
    return [p.grad.detach().clone() for p in params]


# ----------------------------------------------------------------- equivalence (Thm 3.3/3.4)
@pytest.mark.parametrize("granularity", ["element", "tensor", "scalar"])
@pytest.mark.parametrize(
    ("num_groups", "group_backward"), [(1, "batched"), (3, "batched"), (3, "loop")]
)
@given(beta=st.floats(-3.0, 3.0, allow_nan=False), b=st.integers(1, 7))
def test_fixed_coefficient_equals_controlled_objective(
    granularity, num_groups, group_backward, beta, b
):
    net = mlp()
    gen = torch.Generator().manual_seed(b)
    x, z = torch.randn(b, 3, generator=gen, dtype=F64), torch.randn(b, 3, generator=gen, dtype=F64)
    groups = torch.arange(b) % num_groups
    ctrl = GradientControl(
        net.parameters(), coefficient=beta, granularity=granularity, num_groups=num_groups,
        group_backward=group_backward,
    )  # fmt: skip
    ctrl.backward(*mlp_batch(net, x, z), groups)
    got = grads(net.parameters())
    net.zero_grad()
    losses, controls = mlp_batch(net, x, z)
    torch.autograd.backward((losses - beta * controls).mean())
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("coefficient", [0.0, "running"])
def test_zero_coefficient_is_plain_gradient_bit_for_bit(coefficient, generator):
    net = mlp()
    x, z = (
        torch.randn(6, 3, generator=generator, dtype=F64),
        torch.randn(6, 3, generator=generator, dtype=F64),
    )
    ctrl = GradientControl(net.parameters(), coefficient=coefficient)  # running: in warmup
    d = ctrl.backward(*mlp_batch(net, x, z))
    got = grads(net.parameters())
    net.zero_grad()
    mlp_batch(net, x, z)[0].mean().backward()
    for g, p in zip(got, net.parameters()):
        assert torch.equal(g, p.grad)
    assert float(d["beta_max"]) == 0.0 == float(d["beta_min"])


def test_grad_is_overwritten_not_accumulated(generator):
    net = mlp()
    x, z = (
        torch.randn(4, 3, generator=generator, dtype=F64),
        torch.randn(4, 3, generator=generator, dtype=F64),
    )
    ctrl = GradientControl(net.parameters(), coefficient=0.3)
    ctrl.backward(*mlp_batch(net, x, z))
    first = grads(net.parameters())
    ctrl.backward(*mlp_batch(net, x, z))
    for g, p in zip(first, net.parameters()):
        assert torch.equal(g, p.grad)


# ----------------------------------------------------------------- running β
def test_running_applies_only_earlier_statistics(generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], warmup_steps=3, decay=0.9)
    for t in range(8):
        beta_before = ctrl.coefficients()[0]
        losses, controls, a, bb = prob.batch(4)
        ctrl.backward(losses, controls)
        expected = a.mean(0) - beta_before[0] * bb.mean(0)
        torch.testing.assert_close(prob.theta.grad, expected, rtol=1e-13, atol=1e-14)
        if t < 3:
            assert torch.equal(beta_before, torch.zeros_like(beta_before))
    assert int(ctrl.num_updates) == 8


def test_running_beta_converges_to_optimal(generator):
    prob, steps, b = Linear(generator), 1500, 4
    ctrl = GradientControl([prob.theta], decay=1.0, warmup_steps=1)
    for _ in range(steps):
        losses, controls, _, _ = prob.batch(b)
        ctrl.backward(losses, controls)
    beta = ctrl.coefficients()[0][0]
    se = prob.s / math.sqrt(steps)  # OLS slope SE: sd(resid)/(sd(x) √T) with both ∝ 1/√B
    assert ((beta - prob.k[0]).abs() < 5 * se).all(), (beta, prob.k[0], se)


def test_running_tensor_granularity_pools_statistics(generator):
    prob, steps, b = Linear(generator), 1500, 4
    ctrl = GradientControl([prob.theta], granularity="tensor", decay=1.0, warmup_steps=1)
    for _ in range(steps):
        losses, controls, _, _ = prob.batch(b)
        ctrl.backward(losses, controls)
    beta = ctrl.coefficients()[0]
    assert beta.shape == (1, 1)
    k, d = prob.k[0], prob.d
    # β̂ − k̄ = Σ_j Σ_t x(k_j − k̄)x + s_j e x / Σ x²: both parts mean zero, variances below
    se = math.sqrt(2 * float(((k - k.mean()) ** 2).sum()) + float((prob.s**2).sum()))
    se /= d * math.sqrt(steps)
    assert abs(float(beta) - float(k.mean())) < 5 * se


def test_controlled_gradient_unbiased_and_variance_ratio(generator):
    prob, steps, b = Linear(generator), 2000, 4
    ctrl = GradientControl([prob.theta], decay=1.0, warmup_steps=20)
    ctrl_g, plain_g = [], []
    for t in range(steps):
        losses, controls, a, _ = prob.batch(b)
        d = ctrl.backward(losses, controls)
        if t >= 20:
            ctrl_g.append(prob.theta.grad.clone())
            plain_g.append(a.mean(0))
    gc, gp = torch.stack(ctrl_g), torch.stack(plain_g)  # [T, D]
    n = gc.shape[0]
    # unbiased: mean controlled gradient vs exact E∇ℓ = μ, 5 SE per element
    se = gc.std(0) / math.sqrt(n)
    assert ((gc.mean(0) - prob.mu).abs() < 5 * se).all()
    # per-element variances: controlled s²/B (β → k), plain (k² + s²)/B; chi² rel. SE √(2/(n-1))
    rel = 5 * math.sqrt(2 / (n - 1))
    k, s = prob.k[0], prob.s
    assert ((gc.var(0) / (s**2 / b) - 1).abs() < rel).all()
    assert ((gp.var(0) / ((k**2 + s**2) / b) - 1).abs() < rel).all()
    # the diagnostic: trace ratio Σ s² / Σ (k² + s²) = tr-weighted 1 − ρ²
    truth = float((s**2).sum() / (k**2 + s**2).sum())
    assert abs(float(d["variance_ratio"]) / truth - 1) < 5 * math.sqrt(2 / steps)
    # pooled ρ = Σ Cov / √(Σ Var_c Σ Var_ℓ) = Σ k / √(D Σ (k² + s²)); SE ≈ (1 − ρ²)/√T
    rho = float(k.sum() / torch.sqrt(prob.d * (k**2 + s**2).sum()))
    assert abs(float(d["correlation"][0]) - rho) < 5 * (1 - rho**2) / math.sqrt(steps)


def test_groups_beat_shared_beta(generator):
    # two noise-level bins: group 1's control gradient is 10× smaller but enters with k = 10×
    kw = {"k": [[1.0, 1.0, 1.0], [10.0, 10.0, 10.0]], "s": [0.5, 0.5, 0.5], "scale": [1.0, 0.1]}
    prob = Linear(generator, d=3, **kw)
    steps, b = 800, 8
    groups = torch.arange(b) % 2
    shared = GradientControl([prob.theta], decay=1.0, warmup_steps=20)
    binned = GradientControl([prob.theta], decay=1.0, warmup_steps=20, num_groups=2)
    diffs, err_s, err_b = [], [], []
    for t in range(steps):
        a, bb = prob.sample(b, groups)
        for c in (shared, binned):
            c.backward(a @ prob.theta, bb @ prob.theta, groups if c is binned else None)
            (err_s if c is shared else err_b).append(((prob.theta.grad - prob.mu) ** 2).sum())
        if t >= 20:
            diffs.append(err_s[-1] - err_b[-1])
    dd = torch.stack(diffs)
    assert float(dd.mean()) > 5 * float(dd.std() / math.sqrt(len(dd)))
    beta = binned.coefficients()[0]  # [2, 3] → k_g
    torch.testing.assert_close(beta[:, 0], torch.tensor([1.0, 10.0], dtype=F64), rtol=0.1, atol=0)
    mse_s, mse_b = float(torch.stack(err_s[20:]).mean()), float(torch.stack(err_b[20:]).mean())
    print(f"\nmean squared error per step: shared β {mse_s:.4g}, per-group β {mse_b:.4g}")


# ----------------------------------------------------------------- per-sample β
def test_per_sample_running_beta_is_batch_ols(generator):
    prob = Linear(generator)
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0])
    ctrl = GradientControl(
        [prob.theta], coefficient="per_sample", num_groups=2, decay=1.0, shrinkage=0.0
    )
    losses, controls, a, bb = prob.batch(9, groups)
    ctrl.backward(losses, controls, groups)
    beta = ctrl.coefficients()[0]  # [2, D]
    for g in (0, 1):
        x, y = bb[groups == g], a[groups == g]
        xc, yc = x - x.mean(0), y - y.mean(0)
        torch.testing.assert_close(beta[g], (xc * yc).sum(0) / (xc * xc).sum(0))
    # a second batch merges exactly like concatenating the samples (decay = 1)
    losses2, controls2, a2, bb2 = prob.batch(9, groups)
    ctrl.backward(losses2, controls2, groups)
    x, y = torch.cat([bb, bb2])[torch.cat([groups, groups]) == 1], None
    y = torch.cat([a, a2])[torch.cat([groups, groups]) == 1]
    xc, yc = x - x.mean(0), y - y.mean(0)
    torch.testing.assert_close(ctrl.coefficients()[0][1], (xc * yc).sum(0) / (xc * xc).sum(0))


def test_per_sample_crossfit_matches_manual(generator):
    prob = Linear(generator)
    ctrl = GradientControl(
        [prob.theta], coefficient="per_sample", per_sample_fit="crossfit", folds=2
    )
    losses, controls, a, bb = prob.batch(10)
    ctrl.backward(losses, controls)
    fold = torch.arange(10) % 2
    expected = a.mean(0).clone()
    for k in (0, 1):
        x, y = bb[fold != k], a[fold != k]
        xc, yc = x - x.mean(0), y - y.mean(0)
        expected -= (xc * yc).sum(0) / (xc * xc).sum(0) * bb[fold == k].sum(0) / 10
    torch.testing.assert_close(prob.theta.grad, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"coefficient": "per_sample", "per_sample_fit": "running"},
        {"coefficient": "per_sample", "per_sample_fit": "crossfit"},
        {"shrinkage": 5.0, "warmup_steps": 2},  # β from earlier steps only, shrunk or not
    ],
)
def test_fitted_beta_unbiased(kwargs, generator):
    prob, steps = Linear(generator), 600
    ctrl = GradientControl([prob.theta], **kwargs)
    out = []
    for _ in range(steps):
        losses, controls, _, _ = prob.batch(6)
        ctrl.backward(losses, controls)
        out.append(prob.theta.grad.clone())
    g = torch.stack(out)
    assert ((g.mean(0) - prob.mu).abs() < 5 * g.std(0) / math.sqrt(steps)).all()


# ----------------------------------------------------------------- detachment, dtypes
@pytest.mark.parametrize("coefficient", ["running", "per_sample", 0.5])
def test_beta_and_diagnostics_never_require_grad(coefficient, generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], coefficient=coefficient, warmup_steps=1)
    for _ in range(3):
        losses, controls, _, _ = prob.batch(5)
        d = ctrl.backward(losses, controls)
    assert not any(v.requires_grad for v in d.values())
    assert not any(b.requires_grad for b in ctrl.coefficients())
    assert not prob.theta.grad.requires_grad
    assert all(isinstance(v, torch.Tensor) for v in d.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_at_least_float32(dtype, generator):
    w = torch.nn.Parameter(torch.randn(4, generator=generator).to(dtype))
    ctrl = GradientControl([w], warmup_steps=1)
    for _ in range(3):
        x = torch.randn(6, 4, generator=generator).to(dtype)
        ctrl.backward((x @ w) ** 2, x.flip(1) @ w)
    assert ctrl.coefficients()[0].dtype == torch.float32
    assert w.grad.dtype == dtype and torch.isfinite(w.grad).all()


# ----------------------------------------------------------------- non-finite policy
def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("where", ["losses", "controls"])
@pytest.mark.parametrize("policy", ["propagate", "zero"])
def test_nonfinite_step_leaves_statistics_untouched(where, policy, generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], warmup_steps=1, nonfinite=policy)
    for _ in range(4):
        ctrl.backward(*prob.batch(5)[:2])
    before = ctrl.state_dict()
    losses, controls, _, _ = prob.batch(5)
    bad = torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0], dtype=F64)
    if where == "losses":
        losses = losses * bad
    else:
        controls = controls * bad
    d = ctrl.backward(losses, controls)
    assert not bool(d["finite"])
    assert _state_equal(before, ctrl.state_dict())
    if policy == "zero":
        assert torch.equal(prob.theta.grad, torch.zeros_like(prob.theta))
    else:
        assert torch.isnan(prob.theta.grad).any()
    d = ctrl.backward(*prob.batch(5)[:2])  # recovers
    assert bool(d["finite"]) and torch.isfinite(prob.theta.grad).all()
    assert int(ctrl.num_updates) == 5


def test_nonfinite_per_sample_masked(generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], coefficient="per_sample")
    ctrl.backward(*prob.batch(5)[:2])
    before = ctrl.state_dict()
    losses, controls, _, _ = prob.batch(5)
    d = ctrl.backward(losses * float("inf"), controls)
    assert not bool(d["finite"]) and _state_equal(before, ctrl.state_dict())


@pytest.mark.parametrize("kw", [{"nonfinite": "raise"}, {"raise_on_nonfinite": True}])
def test_raise_on_nonfinite(generator, kw):
    prob = Linear(generator)
    if "raise_on_nonfinite" in kw:  # the deprecated spelling of nonfinite="raise"
        with pytest.warns(DeprecationWarning, match="nonfinite='raise'"):
            ctrl = GradientControl([prob.theta], **kw)
    else:
        ctrl = GradientControl([prob.theta], **kw)
    assert ctrl.config.nonfinite == "raise" and ctrl.config.raise_on_nonfinite
    ctrl.backward(*prob.batch(5)[:2])
    before, grad = ctrl.state_dict(), prob.theta.grad.clone()
    losses, controls, _, _ = prob.batch(5)
    with pytest.raises(VarRedError, match="NaN/Inf"):
        ctrl.backward(losses, controls * float("nan"))
    assert _state_equal(before, ctrl.state_dict()) and torch.equal(grad, prob.theta.grad)


# ----------------------------------------------------------------- state
@pytest.mark.parametrize("coefficient", ["running", "per_sample"])
def test_state_dict_round_trip(coefficient, generator):
    prob = Linear(generator)
    kw = {"coefficient": coefficient, "num_groups": 2, "warmup_steps": 2}
    ctrl = GradientControl([prob.theta], **kw)
    groups = torch.tensor([0, 1, 1, 0, 1])
    for _ in range(4):
        ctrl.backward(*prob.batch(5, groups)[:2], groups)
    buf = io.BytesIO()
    torch.save(ctrl.state_dict(), buf)
    buf.seek(0)
    other = GradientControl([prob.theta], **kw)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert _state_equal(ctrl.state_dict(), other.state_dict())
    # same batch through both controls gives identical gradients and identical new state
    a, bb = prob.sample(5, groups)
    ctrl.backward(a @ prob.theta, bb @ prob.theta, groups)
    g1 = prob.theta.grad.clone()
    other.backward(a @ prob.theta, bb @ prob.theta, groups)
    assert torch.equal(g1, prob.theta.grad)
    assert _state_equal(ctrl.state_dict(), other.state_dict())


def test_reset(generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], warmup_steps=1)
    for _ in range(3):
        ctrl.backward(*prob.batch(5)[:2])
    assert bool((ctrl.coefficients()[0] != 0).any())
    ctrl.reset()
    assert int(ctrl.num_updates) == 0 and bool((ctrl.coefficients()[0] == 0).all())


def test_pooled_ratio_zero_variance_is_zero():
    num = [torch.tensor([[1.0, 0.0]], dtype=F64)]
    den = [torch.tensor([[2.0, 0.0]], dtype=F64)]
    assert torch.equal(pooled_ratio(num, den, "element")[0], torch.tensor([[0.5, 0.0]], dtype=F64))
    assert torch.equal(pooled_ratio(num, den, "tensor")[0], torch.tensor([[0.5]], dtype=F64))
    zero = [torch.zeros(1, 3, dtype=F64)]
    assert torch.equal(pooled_ratio(zero, zero, "scalar")[0], torch.zeros(1, 1, dtype=F64))


@given(n1=st.integers(1, 6), n2=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_merge_moments_equals_concatenation(n1, n2, seed):
    """decay = 1: merging batch moments is exact pooling (Chan et al.); one sample = Finch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n1 + n2, 3, generator=gen, dtype=F64) * 5 + 100  # large mean: centring matters
    y = torch.randn(n1 + n2, 3, generator=gen, dtype=F64) + x

    def moments(xs, ys):
        mx, my = xs.mean(0, keepdim=True), ys.mean(0, keepdim=True)
        cov = lambda a, b: ((a - a.mean(0)) * (b - b.mean(0))).mean(0, keepdim=True)  # noqa: E731
        return {"mean_c": mx, "mean_l": my, "cov_cc": cov(xs, xs), "cov_cl": cov(xs, ys),
                "cov_ll": cov(ys, ys)}  # fmt: skip

    zero = {k: torch.zeros(1, 3, dtype=F64) for k in moments(x, y)}
    w = torch.zeros(1, dtype=F64)
    state, w = merge_moments(zero, w, moments(x[:n1], y[:n1]), torch.tensor([float(n1)]), 1.0)
    state, w = merge_moments(state, w, moments(x[n1:], y[n1:]), torch.tensor([float(n2)]), 1.0)
    want = moments(x, y)
    assert float(w) == n1 + n2
    for k in want:
        torch.testing.assert_close(state[k], want[k], rtol=1e-10, atol=1e-10)


def test_autocast_keeps_float32_statistics(generator):
    net = torch.nn.Linear(4, 1)  # float32 parameters
    ctrl = GradientControl(net.parameters(), warmup_steps=1)
    for _ in range(3):
        x = torch.randn(6, 4, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = net(x).squeeze(1) ** 2
            controls = net(x.flip(1)).squeeze(1) - net(x.flip(0)).squeeze(1)
        assert losses.dtype == torch.bfloat16
        d = ctrl.backward(losses, controls)
    assert all(b.dtype == torch.float32 for b in ctrl.coefficients())
    assert net.weight.grad.dtype == torch.float32 and bool(d["finite"])


# ----------------------------------------------------------------- errors
def _p():
    return torch.nn.Parameter(torch.ones(3, dtype=F64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "row"}, "granularity: .*got 'row'"),
        ({"coefficient": "adam"}, "coefficient: .*got 'adam'"),
        ({"coefficient": float("nan")}, "coefficient: .*got nan"),
        ({"coefficient": True}, "coefficient: .*got True"),
        ({"decay": 0.0}, r"decay: expected a float in \(0, 1\], got 0.0"),
        ({"decay": 1.5}, "decay: .*got 1.5"),
        ({"num_groups": 0}, "num_groups: expected an integer >= 1, got 0"),
        ({"warmup_steps": -1}, "warmup_steps: .*got -1"),
        ({"folds": 1}, "folds: expected an integer >= 2, got 1"),
        ({"per_sample_fit": "kfold"}, "per_sample_fit: .*got 'kfold'"),
        ({"nonfinite": "skip"}, "nonfinite: .*got 'skip'"),
        ({"process_group": "world"}, "process_group: .*got 'world'"),
        ({"group_backward": "vmap"}, "group_backward: .*got 'vmap'"),
        ({"shrinkage": -1.0}, "shrinkage: expected a finite float >= 0, got -1.0"),
        ({"shrinkage": float("nan")}, "shrinkage: .*got nan"),
    ],
)
def test_option_errors(kwargs, match):
    with pytest.raises(VarRedError, match=match):
        GradientControl([_p()], **kwargs)


def test_param_errors():
    with pytest.raises(
        VarRedError, match="params: expected at least one parameter tensor, got none"
    ):
        GradientControl([])
    with pytest.raises(
        VarRedError, match=r"params\[0\]: expected a tensor with requires_grad=True"
    ):
        GradientControl([torch.ones(3)])
    with pytest.raises(VarRedError, match=r"params\[0\]: expected a floating-point tensor, got"):
        GradientControl([torch.ones(3, dtype=torch.long)])
    with pytest.raises(VarRedError, match="params: expected an iterable of tensors, got int"):
        GradientControl(3)


def test_backward_input_errors():
    p = _p()
    ctrl = GradientControl([p], num_groups=2)
    x = torch.ones(4, 3, dtype=F64)
    ok = x @ p
    cases = [
        (
            (x[:, :, None] * p).sum(1),
            ok,
            None,
            r"losses: expected a non-empty 1-D tensor \[B\], got \[4, 3\]",
        ),
        (ok[:0], ok[:0], None, r"losses: expected a non-empty 1-D tensor \[B\], got \[0\]"),
        (ok, ok[:3], None, r"controls: expected shape \[4\] \(like losses\), got \[3\]"),
        (ok.long(), ok, None, "losses: expected a floating-point tensor, got dtype torch.int64"),
        (ok, ok.long(), None, "controls: expected a floating-point tensor"),
        (
            ok.detach(),
            ok,
            None,
            "losses: expected values that depend on params .*requires_grad=False",
        ),
        (
            ok,
            ok,
            torch.tensor([0, 1, 2, 0]),
            r"groups: expected values in \[0, 2\), got min 0 and max 2",
        ),
        (ok, ok, torch.tensor([0, -1, 1, 0]), r"groups: expected values in \[0, 2\), got min -1"),
        (ok, ok, torch.tensor([0, 1]), r"groups: expected shape \[4\], got \[2\]"),
        (ok, ok, torch.zeros(4), "groups: expected an integer tensor"),
    ]
    for losses, controls, groups, match in cases:
        with pytest.raises(VarRedError, match=match):
            ctrl.backward(losses, controls, groups)
    other = torch.ones(3, dtype=F64, requires_grad=True)
    with pytest.raises(
        VarRedError, match="losses: expected values that depend on params, got a graph"
    ):
        ctrl.backward(x @ other, x @ p)


def test_process_group_default_needs_init():
    p = _p()
    ctrl = GradientControl([p], process_group="default")
    x = torch.ones(4, 3, dtype=F64)
    with pytest.raises(VarRedError, match="process_group: expected an initialised"):
        ctrl.backward(x @ p, x @ p)


def test_load_state_dict_errors():
    ctrl = GradientControl([_p()], num_groups=2)
    sd = ctrl.state_dict()
    with pytest.raises(VarRedError, match="state_dict: expected keys"):
        ctrl.load_state_dict({k: v for k, v in sd.items() if k != "weight"})
    with pytest.raises(
        VarRedError,
        match=r"state_dict\['cov_cl'\]: expected a tensor of shape \[2, 3\], got \[1, 3\]",
    ):
        ctrl.load_state_dict({**sd, "cov_cl": torch.zeros(1, 3, dtype=F64)})
    with pytest.raises(VarRedError, match=r"state_dict\['num_groups'\]: expected 2, got 3"):
        ctrl.load_state_dict({**sd, "num_groups": 3})


# ----------------------------------------------------------------- group backward "auto"
def conv_net() -> torch.nn.Module:
    torch.manual_seed(0)  # test-side model init only
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
        torch.nn.Flatten(), torch.nn.Linear(64, 1),
    ).to(F64)  # fmt: skip


def _jvp_batch(net, x, z):
    """Losses and a control built from a first-order Taylor term (``torch.func.jvp``)."""
    losses = net(x).squeeze(1) ** 2  # [B]
    _, tangent = torch.func.jvp(net, (x,), (z,))  # [B, 1] directional derivative along z
    return losses, tangent.squeeze(1) * z[:, 0, 0, 0]


def test_auto_group_backward_falls_back_for_jvp_controls(generator):
    net = conv_net()
    x = torch.randn(6, 1, 4, 4, generator=generator, dtype=F64)
    z = torch.randn(6, 1, 4, 4, generator=generator, dtype=F64)
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    kw = {"coefficient": 0.7, "num_groups": 3}
    # the premise: vmap over a backward through jvp of GroupNorm + SiLU (as in SmallUNet) fails
    with pytest.raises(RuntimeError, match="size of tensor"):
        GradientControl(net.parameters(), group_backward="batched", **kw).backward(
            *_jvp_batch(net, x, z), groups
        )
    auto = GradientControl(net.parameters(), **kw)  # default "auto"
    for _ in range(2):  # the second step reuses the remembered choice
        auto.backward(*_jvp_batch(net, x, z), groups)
        got = grads(net.parameters())
        GradientControl(net.parameters(), group_backward="loop", **kw).backward(
            *_jvp_batch(net, x, z), groups
        )
        for g, p in zip(got, net.parameters()):
            assert torch.equal(g, p.grad)
    assert auto._batched_choice == {"losses": None, "controls": False}
    net.zero_grad()
    losses, controls = _jvp_batch(net, x, z)
    (losses - 0.7 * controls).mean().backward()  # fixed β = the controlled objective
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)
    # per-sample mode falls back too (B single-row passes)
    ps = GradientControl(net.parameters(), coefficient="per_sample", num_groups=3)
    assert bool(ps.backward(*_jvp_batch(net, x, z), groups)["finite"])
    assert ps._batched_choice == {"losses": True, "controls": False}


def test_auto_group_backward_keeps_batched_when_it_works(generator):
    net = mlp()
    x, z = (
        torch.randn(6, 3, generator=generator, dtype=F64),
        torch.randn(6, 3, generator=generator, dtype=F64),
    )
    ctrl = GradientControl(net.parameters(), coefficient=0.3, num_groups=2)
    ctrl.backward(*mlp_batch(net, x, z), torch.arange(6) % 2)
    assert ctrl._batched_choice["controls"] is True


# ----------------------------------------------------------------- variance-ratio diagnostic
def test_variance_ratio_is_tracked_applied_over_plain(generator):
    """decay = 1: exactly tr Var(applied grads) / tr Var(plain grads) over the β-active steps."""
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], decay=1.0, warmup_steps=3, num_groups=2)
    groups = torch.tensor([0, 1, 1, 0, 1])
    applied, plain = [], []
    for t in range(12):
        losses, controls, a, _ = prob.batch(5, groups)
        d = ctrl.backward(losses, controls, groups)
        if t < 4:  # β = 0 for the first 3 steps; one active observation has no variance yet
            assert float(d["variance_ratio"]) == 1.0
        if t >= 3:
            applied.append(prob.theta.grad.clone())
            plain.append(a.mean(0))
    ga, gp = torch.stack(applied), torch.stack(plain)
    want = ga.var(0, correction=0).sum() / gp.var(0, correction=0).sum()
    torch.testing.assert_close(d["variance_ratio"], want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_ratio_never_negative_with_many_groups(seed):
    """The reported regression: σ-binned MLP, k = 0-style controls, 19 steps (was −0.18)."""
    gen = torch.Generator().manual_seed(seed)
    net = mlp(seed)
    ctrl = GradientControl(net.parameters(), num_groups=8, warmup_steps=2)
    per_sample = GradientControl(net.parameters(), num_groups=8, coefficient="per_sample")
    for _ in range(19):
        x = torch.randn(32, 3, generator=gen, dtype=F64)
        eps = torch.randn(32, 3, generator=gen, dtype=F64)
        sigma = torch.exp(torch.rand(32, generator=gen, dtype=F64) * -5)
        groups = (torch.log(sigma) / -5 * 8).long().clamp(0, 7)
        for c in (ctrl, per_sample):
            out = net(x + sigma[:, None] * eps).squeeze(1)
            losses = (out + eps[:, 0] / sigma) ** 2 * sigma**2
            controls = 2 * sigma * net(x).squeeze(1) * eps[:, 0]  # mean zero given x
            d = c.backward(losses, controls, groups)
            for key in ("variance_ratio", "variance_ratio_per_group"):
                assert bool((d[key] >= 0).all()) and bool(torch.isfinite(d[key]).all()), key
    # per-sample mode: within-group in-sample fit, hence also ≤ 1
    assert float(d["variance_ratio"]) <= 1.0


def test_variance_ratio_one_without_control(generator):
    prob = Linear(generator)
    ctrl = GradientControl([prob.theta], warmup_steps=1)
    for _ in range(5):
        losses, _, _, _ = prob.batch(4)
        d = ctrl.backward(losses, losses.detach() * 0)  # controls without gradient
    assert float(d["variance_ratio"]) == 1.0
    assert float(d["variance_ratio_per_group"][0]) == 1.0


# ----------------------------------------------------------------- flat layout
def test_tensor_pooling_matches_pooled_ratio(generator):
    net = mlp()
    ctrl = GradientControl(net.parameters(), granularity="tensor", warmup_steps=1, num_groups=2)
    for _ in range(4):
        x, z = (
            torch.randn(6, 3, generator=generator, dtype=F64),
            torch.randn(6, 3, generator=generator, dtype=F64),
        )
        ctrl.backward(*mlp_batch(net, x, z), torch.arange(6) % 2)
    shapes = [p.shape for p in net.parameters()]

    def split(t):  # [G, P] -> per parameter [G, *p]
        sizes = [math.prod(s) for s in shapes]
        return [x.reshape(2, *s) for x, s in zip(t.split(sizes, 1), shapes)]

    sd = ctrl.state_dict()
    want = pooled_ratio(split(sd["cov_cl"]), split(sd["cov_cc"]), "tensor")
    for got, w in zip(ctrl.coefficients(), want):
        torch.testing.assert_close(got, w, rtol=1e-13, atol=0)


def test_params_on_one_device():
    with pytest.raises(VarRedError, match=r"params\[1\]: expected all parameters on one device"):
        GradientControl([_p(), torch.nn.Parameter(torch.ones(2, device="meta"))])


@pytest.mark.parametrize("coefficient", ["running", "per_sample", 0.7])
@pytest.mark.parametrize("granularity", ["element", "tensor", "scalar"])
def test_controls_split_by_group_equal_joint_controls(coefficient, granularity, generator):
    """Per-group control tensors from separate forwards ≡ one ``[B]`` tensor with ``groups``."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))]
    nets.append(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)))
    nets = [n.double() for n in nets]
    nets[1].load_state_dict(nets[0].state_dict())
    kw = {"coefficient": coefficient, "granularity": granularity, "num_groups": 3}
    ctrls = [GradientControl(n.parameters(), warmup_steps=2, **kw) for n in nets]
    for _ in range(5):
        x = torch.randn(9, 2, generator=generator, dtype=torch.float64)
        z = torch.randn(9, 2, generator=generator, dtype=torch.float64)
        groups = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2])  # sorted; group 1 empty

        def lc(net, xs, zs):
            return (net(xs + 0.3 * zs).squeeze(1) - xs[:, 0]) ** 2, net(xs).squeeze(1) * zs[:, 0]

        loss_a, ctl_a = lc(nets[0], x, z)
        d_a = ctrls[0].backward(loss_a, ctl_a, groups)
        parts = [lc(nets[1], x[lo:hi], z[lo:hi]) for lo, hi in ((0, 4), (4, 4), (4, 9))]
        loss_b = torch.cat([p[0] for p in parts])
        d_b = ctrls[1].backward(loss_b, [p[1] for p in parts])
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d_a["variance_ratio"], d_b["variance_ratio"])
        for n in nets:
            with torch.no_grad():
                for p in n.parameters():
                    p -= 0.1 * p.grad
    assert any(bool((b != 0).any()) for b in ctrls[1].coefficients())


def test_controls_split_by_group_errors(generator):
    net = torch.nn.Linear(2, 1).double()
    ctrl = GradientControl(net.parameters(), num_groups=2)
    x = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    loss = net(x).squeeze(1) ** 2
    c = net(x).squeeze(1) * x[:, 0]
    cases = [
        (([c[:2]], None), r"controls: expected 2 per-group tensors \(num_groups\), got 1"),
        (([c[:2], c[2:]], torch.zeros(4, dtype=torch.long)), "groups: expected None when"),
        (
            ([c[:2], c[3:]], None),
            r"sizes summing to the batch size of losses \[4\], got sizes \[2, 1\]",
        ),
        (([c[:2], c[2:, None]], None), r"controls\[1\]: expected a 1-D tensor"),
        (([c[:2], torch.ones(2, dtype=torch.long)], None), r"controls\[1\]"),
        ((5, None), "controls: expected a tensor .* got int"),
    ]
    for (controls, groups), match in cases:
        with pytest.raises(VarRedError, match=match):
            ctrl.backward(loss, controls, groups)


@pytest.mark.parametrize("coefficient", ["running", "per_sample"])
def test_grad_scaler_scales_grads_not_statistics(coefficient, generator):
    """With a GradScaler the written gradient is S × the unscaled controlled gradient, β and
    statistics match the unscaled run, and ``scaler.step`` then applies the same update."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))]
    nets.append(torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)))
    nets[1].load_state_dict(nets[0].state_dict())
    ctrls = [GradientControl(n.parameters(), coefficient=coefficient, warmup_steps=2) for n in nets]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(5):
        x = torch.randn(8, 2, generator=generator)
        z = torch.randn(8, 2, generator=generator)
        out = []
        for net, ctrl, sc in zip(nets, ctrls, (None, scaler)):
            loss = (net(x + 0.3 * z).squeeze(1) - x[:, 0]) ** 2
            out.append(ctrl.backward(loss, net(x).squeeze(1) * z[:, 0], scaler=sc))
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(q.grad, p.grad * 2.0**12, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            out[1]["variance_ratio"], out[0]["variance_ratio"], rtol=1e-4, atol=1e-6
        )
        opts[0].step()
        scaler.step(opts[1])
        scaler.update()
    for a, b in zip(ctrls[0].coefficients(), ctrls[1].coefficients()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(bool((b != 0).any()) for b in ctrls[1].coefficients())
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_step_and_statistics(generator):
    """An Inf gradient (overflow) is written for the scaler to see: it skips the optimizer
    step and halves S, and GradientControl's statistics stay bit-for-bit unchanged."""
    net = torch.nn.Linear(2, 1)
    ctrl = GradientControl(net.parameters(), warmup_steps=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 2, generator=generator)
    ctrl.backward(net(x).squeeze(1) ** 2, net(x).squeeze(1) * x[:, 0], scaler=scaler)
    scaler.step(opt)
    scaler.update()
    before = {k: v.clone() for k, v in ctrl.state_dict().items() if isinstance(v, torch.Tensor)}
    params = [p.detach().clone() for p in net.parameters()]
    loss = net(x).squeeze(1) ** 2 * torch.tensor([float("inf")] + [1.0] * 7)
    diag = ctrl.backward(loss, net(x).squeeze(1) * x[:, 0], scaler=scaler)
    assert not bool(diag["finite"])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p.detach(), q)
    for k, v in ctrl.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_grad_scaler_error(generator):
    net = torch.nn.Linear(2, 1)
    ctrl = GradientControl(net.parameters())
    x = torch.randn(4, 2, generator=generator)
    with pytest.raises(
        VarRedError, match=r"scaler: expected a torch\.amp\.GradScaler .* got float"
    ):
        ctrl.backward(net(x).squeeze(1), net(x).squeeze(1) * x[:, 0], scaler=2.0)


@pytest.mark.parametrize("coefficient", ["running", "per_sample"])
def test_shrinkage_between_element_and_tensor_beta(coefficient, generator):
    """Shrunk per-element β is, entry by entry, a convex combination of the per-element and
    the per-tensor β of the same statistics; κ → ∞ gives the per-tensor β, κ = 0 the
    per-element one bit for bit."""
    prob = Linear(generator)
    kw = {"coefficient": coefficient, "decay": 1.0, "warmup_steps": 1}
    fitted = GradientControl([prob.theta], **kw)
    for _ in range(6):
        losses, controls, _, _ = prob.batch(5)
        fitted.backward(losses, controls)
    ctrls = {k: GradientControl([prob.theta], shrinkage=k, **kw) for k in (0.0, 3.0, 1e12)}
    tensor = GradientControl([prob.theta], granularity="tensor", **kw)
    for c in (*ctrls.values(), tensor):  # the same statistics, read with each layout
        c.load_state_dict(fitted.state_dict())
    plain = fitted
    b0 = ctrls[0.0].coefficients()[0][0]
    bt = tensor.coefficients()[0][0].expand_as(b0)
    bs = ctrls[3.0].coefficients()[0][0]
    assert torch.equal(b0, plain.coefficients()[0][0])
    lo, hi = torch.minimum(b0, bt), torch.maximum(b0, bt)
    tol = 1e-12 * (1 + hi.abs())
    assert bool(((bs >= lo - tol) & (bs <= hi + tol)).all())
    assert bool(((bs - b0).abs() > 1e-9).any())  # and it really moved toward β_tensor
    torch.testing.assert_close(ctrls[1e12].coefficients()[0][0], bt, rtol=1e-6, atol=1e-9)
