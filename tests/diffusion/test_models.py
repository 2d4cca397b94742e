"""Score networks: shapes, row independence, forward-mode AD, preconditioning."""

from __future__ import annotations

import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.models import MLPScore, SmallUNet, parameter_count


def _mlp(generator: torch.Generator, **kw: object) -> MLPScore:
    return MLPScore(2, width=32, depth=2, generator=generator, **kw).double()  # type: ignore[arg-type]


@pytest.mark.parametrize("activation", ["silu", "tanh", "relu", "gelu", "softplus", "elu"])
@pytest.mark.parametrize("embedding", ["fourier", "log"])
@pytest.mark.parametrize("precond", ["ncsn", "edm"])
def test_mlp_rows_independent(
    generator: torch.Generator, activation: str, embedding: str, precond: str
) -> None:
    net = _mlp(generator, activation=activation, sigma_embedding=embedding, preconditioning=precond)
    x = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    s = torch.rand(6, generator=generator, dtype=torch.float64) + 0.01
    full = net(x, s)
    assert full.shape == (6, 2)
    x2 = x.clone()
    x2[1:] = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    s2 = s.clone()
    s2[1:] = 2.0
    assert torch.equal(net(x2, s2)[0], full[0])
    # a different batch size may pick a different GEMM kernel: round-off only
    assert torch.allclose(net(x[:1], s[:1])[0], full[0], rtol=1e-13, atol=1e-13)


def test_mlp_jvp_matches_finite_difference(generator: torch.Generator) -> None:
    net = _mlp(generator)
    x = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    v = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    s = torch.full((4,), 0.3, dtype=torch.float64)
    out, tangent = torch.func.jvp(lambda z: net(z, s), (x,), (v,))
    h = 1e-6
    fd = (net(x + h * v, s) - net(x - h * v, s)) / (2 * h)
    assert torch.equal(out, net(x, s))
    assert torch.allclose(tangent, fd, rtol=1e-6, atol=1e-6)


def test_mlp_preconditioning_formulas(generator: torch.Generator) -> None:
    # the same inner network: NCSN gives F/σ, EDM gives −x/(σ²+σd²) + σd F/(σ sqrt(σ²+σd²))
    ncsn = _mlp(torch.Generator().manual_seed(3), sigma_data=0.7)
    edm = _mlp(torch.Generator().manual_seed(3), sigma_data=0.7, preconditioning="edm")
    x = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    s = torch.rand(5, generator=generator, dtype=torch.float64) + 0.05
    f = ncsn(x, s) * s[:, None]
    v = s[:, None] ** 2 + 0.49
    want = -x / v + 0.7 * f / (s[:, None] * v.sqrt())
    assert torch.allclose(edm(x, s), want, rtol=1e-12, atol=1e-12)


def test_no_preconditioning_returns_the_raw_output(generator: torch.Generator) -> None:
    """``"none"`` is NCSN's inner network without the 1/σ: F itself (e.g. a velocity)."""
    ncsn = _mlp(torch.Generator().manual_seed(3), sigma_data=0.7)
    raw = _mlp(torch.Generator().manual_seed(3), sigma_data=0.7, preconditioning="none")
    x = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    s = torch.rand(5, generator=generator, dtype=torch.float64) + 0.05
    torch.testing.assert_close(raw(x, s), ncsn(x, s) * s[:, None], rtol=1e-12, atol=1e-12)
    unet = SmallUNet(base=8, preconditioning="none", generator=torch.Generator().manual_seed(1))
    img, t = torch.randn(2, 1, 28, 28, generator=generator), torch.tensor([0.2, 0.9])
    ref = SmallUNet(base=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(unet(img, t), ref(img, t) * t[:, None, None, None])


def test_mlp_float32_small_sigma_finite(generator: torch.Generator) -> None:
    net = MLPScore(2, generator=generator)
    out = net(torch.randn(8, 2, generator=generator), torch.full((8,), 1e-4))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_generator_init_is_reproducible() -> None:
    a = MLPScore(3, width=8, generator=torch.Generator().manual_seed(5))
    b = MLPScore(3, width=8, generator=torch.Generator().manual_seed(5))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unet_shapes_params_independence_and_jvp(generator: torch.Generator) -> None:
    net = SmallUNet(generator=generator).double()
    n = parameter_count(net)
    assert 500_000 <= n <= 2_000_000
    x = torch.randn(3, 1, 28, 28, generator=generator, dtype=torch.float64)
    s = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
    out = net(x, s)
    assert out.shape == x.shape
    assert torch.allclose(net(x[1:2], s[1:2])[0], out[1], rtol=1e-12, atol=1e-12)
    v = torch.randn(3, 1, 28, 28, generator=generator, dtype=torch.float64)
    prim, tan = torch.func.jvp(lambda z: net(z, s), (x,), (v,))
    h = 1e-5
    fd = (net(x + h * v, s) - net(x - h * v, s)) / (2 * h)
    assert torch.allclose(prim, out, rtol=1e-12, atol=1e-12)
    assert torch.allclose(tan, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())
    # a row's tangent does not depend on the others' tangents
    v2 = v.clone()
    v2[0] = 0.0
    _, tan2 = torch.func.jvp(lambda z: net(z, s), (x,), (v2,))
    assert torch.equal(tan2[0], torch.zeros_like(tan2[0]))


def test_errors(generator: torch.Generator) -> None:
    with pytest.raises(VarRedError, match="activation"):
        MLPScore(2, activation="swish2")
    with pytest.raises(VarRedError, match="preconditioning"):
        MLPScore(2, preconditioning="vp")
    with pytest.raises(VarRedError, match="sigma_embedding"):
        MLPScore(2, sigma_embedding="none")
    net = MLPScore(2, width=4)
    with pytest.raises(VarRedError, match="sigma"):
        net(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(VarRedError, match="x"):
        net(torch.zeros(3), torch.ones(3))
    unet = SmallUNet(base=8)
    with pytest.raises(VarRedError, match="x"):
        unet(torch.zeros(1, 1, 27, 28), torch.ones(1))
