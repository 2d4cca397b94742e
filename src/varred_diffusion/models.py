"""Small score networks ``s_θ(x, σ)``: an MLP for toy data and a U-Net for 28×28 images.

Both use the same output parameterisation (choose with ``preconditioning``):

- ``"ncsn"`` (default; Song & Ermon, 2020): ``s = F_θ(c_in x, c_noise) / σ`` with
  ``c_in = 1/sqrt(σ² + σ_data²)`` and ``c_noise = log(σ)/4``. With ``λ = σ²`` the DSM loss
  becomes ``‖F_θ + ε‖²``: the network predicts ``−ε``, an O(1) target at every σ, and
  the ``1/σ`` lives outside the network, so float32 at σ = 1e-4 is fine and the
  Taylor CVs see a Jacobian ``∂_x s = (c_in/σ) ∂F``.
- ``"edm"`` (Karras et al., 2022): ``D = c_skip x + c_out F_θ``, ``s = (D − x)/σ²``,
  i.e. ``s = −x/(σ² + σ_data²) + σ_data F_θ/(σ sqrt(σ² + σ_data²))``: exact for
  zero-mean Gaussian data with ``F = 0``; the same ``1/σ`` behaviour at small σ.
- ``"none"``: the raw output ``F_θ(c_in x, c_noise)`` itself, for networks that predict
  something other than the score: a rectified-flow velocity ``v_θ(x_t, t)`` (with ``σ = t``;
  wrap it in ``varred_diffusion.ScoreFromVelocity``), an ε- or x0-prediction.

Rows are independent (no BatchNorm; GroupNorm normalises per sample), and no op is
in-place, so ``torch.func.jvp`` / ``vmap`` work through both models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varred.errors import VarRedError, shape_str

__all__ = ["MLPScore", "SmallUNet", "init_parameters", "parameter_count"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
}
_PRECONDITIONINGS = ("ncsn", "edm", "none")


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise VarRedError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every Linear/Conv weight and bias as PyTorch's default init, from ``generator``.

    PyTorch's own init uses the global RNG; this makes a model reproducible from an
    explicit generator. ``U(−1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.rand(m.weight.shape, generator=generator, dtype=m.weight.dtype)
            m.weight.copy_((2 * w - 1) * bound)
            if m.bias is not None:
                b = torch.rand(m.bias.shape, generator=generator, dtype=m.bias.dtype)
                m.bias.copy_((2 * b - 1) * bound)
    return module


def _check_inputs(x: Tensor, sigma: Tensor, trailing: int) -> None:
    if x.ndim != 1 + trailing:
        raise VarRedError(
            f"x: expected {1 + trailing} dimensions [B, ...], got shape {shape_str(x)}"
        )
    if sigma.shape != x.shape[:1]:
        raise VarRedError(f"sigma: expected shape [{x.shape[0]}], got {shape_str(sigma)}")


class _Preconditioned(nn.Module):
    """Shared σ-preconditioning: ``c_in``, ``c_noise`` and the score from the raw output ``F``."""

    def __init__(self, preconditioning: str, sigma_data: float) -> None:
        super().__init__()
        if preconditioning not in _PRECONDITIONINGS:
            raise VarRedError(
                f"preconditioning: expected one of {_PRECONDITIONINGS}, got {preconditioning!r}"
            )
        if not sigma_data > 0:
            raise VarRedError(f"sigma_data: expected > 0, got {sigma_data!r}")
        self.preconditioning = preconditioning
        self.sigma_data = float(sigma_data)

    def _c_in(self, sigma: Tensor) -> Tensor:
        return torch.rsqrt(sigma**2 + self.sigma_data**2)

    def _score(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        if self.preconditioning == "none":
            return out
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ...]
        if self.preconditioning == "ncsn":
            return out / s
        v = s**2 + self.sigma_data**2
        return -x / v + self.sigma_data * out / (s * torch.sqrt(v))


class _FourierEmbedding(nn.Module):
    """Deterministic sinusoidal features of ``c_noise = log(σ)/4`` ``[B] -> [B, dim]``."""

    freqs: Tensor

    def __init__(self, dim: int, max_freq: float = 64.0) -> None:
        super().__init__()
        half = max(dim // 2, 1)
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = 2 * half  # output width

    def forward(self, c: Tensor) -> Tensor:
        arg = c[:, None] * self.freqs.to(c)  # [B, half]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class MLPScore(_Preconditioned):
    """An MLP score model ``s_θ(x [B, d], σ [B]) -> [B, d]`` conditioned on ``log σ``.

    Args:
        dim: data dimension ``d``.
        width: hidden width.
        depth: number of hidden layers (≥ 1).
        activation: ``silu``, ``tanh``, ``relu``, ``gelu``, ``softplus``, ``elu`` or
            ``sigmoid`` (``relu`` has zero second derivative: order-2 Taylor CVs see no curvature).
        sigma_embedding: ``"fourier"`` (sinusoidal features of ``log σ/4``) or ``"log"``
            (the scalar ``log σ/4`` appended to the input).
        embedding_dim: size of the Fourier features.
        preconditioning: ``"ncsn"``, ``"edm"`` or ``"none"`` (see the module docstring).
        sigma_data: data scale in ``c_in`` (and EDM's skip).
        generator: if given, parameters are drawn from it (see ``init_parameters``).

    Example:
        >>> net = MLPScore(2, width=16, depth=2, generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(3, 2), torch.full((3,), 0.5)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        activation: str = "silu",
        sigma_embedding: str = "fourier",
        *,
        embedding_dim: int = 16,
        preconditioning: str = "ncsn",
        sigma_data: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(preconditioning, sigma_data)
        if depth < 1 or width < 1 or dim < 1:
            raise VarRedError(f"dim/width/depth: expected ≥ 1, got {dim}/{width}/{depth}")
        if sigma_embedding == "fourier":
            fourier = _FourierEmbedding(embedding_dim)
            self.embed: nn.Module | None = fourier
            emb = fourier.dim
        elif sigma_embedding == "log":
            self.embed, emb = None, 1
        else:
            raise VarRedError(
                f"sigma_embedding: expected 'fourier' or 'log', got {sigma_embedding!r}"
            )
        layers: list[nn.Module] = []
        fan = dim + emb
        for _ in range(depth):
            layers += [nn.Linear(fan, width), _activation(activation)]
            fan = width
        layers.append(nn.Linear(fan, dim))
        self.net = nn.Sequential(*layers)
        self.dim = dim
        if generator is not None:
            init_parameters(self, generator)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Score ``[B, d]`` at ``x`` ``[B, d]``, noise level ``sigma`` ``[B]``."""
        _check_inputs(x, sigma, 1)
        c_noise = torch.log(sigma) / 4
        e = self.embed(c_noise) if self.embed is not None else c_noise[:, None]
        h = torch.cat([x * self._c_in(sigma)[:, None], e.to(x.dtype)], dim=1)
        return self._score(x, sigma, self.net(h))


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + σ embedding, GroupNorm → SiLU → conv, residual."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SmallUNet(_Preconditioned):
    """A small U-Net score model ``s_θ(x [B, C, H, W], σ [B]) -> [B, C, H, W]`` (28×28 images).

    Two resolutions below the input (28 → 14 → 7 for MNIST), one residual block per level
    on the way down and two on the way up (with skip concatenation), GroupNorm + SiLU,
    σ conditioning through Fourier features of ``log σ/4`` and an MLP added in every block.
    ``H`` and ``W`` must be divisible by 4. About 0.6M parameters at ``base=32``.

    Args:
        channels: image channels ``C``.
        base: channels at full resolution.
        channel_mult: multipliers per level (three levels).
        groups: GroupNorm groups.
        embedding_dim: σ-embedding width.
        preconditioning, sigma_data, generator: as in ``MLPScore`` (``sigma_data=0.5`` suits
            images scaled to [−1, 1]).
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        *,
        groups: int = 8,
        embedding_dim: int = 128,
        preconditioning: str = "ncsn",
        sigma_data: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(preconditioning, sigma_data)
        if len(channel_mult) != 3:
            raise VarRedError(f"channel_mult: expected 3 multipliers, got {tuple(channel_mult)}")
        c0, c1, c2 = (base * m for m in channel_mult)
        self.fourier = _FourierEmbedding(embedding_dim // 2)
        self.emb_mlp = nn.Sequential(
            nn.Linear(self.fourier.dim, embedding_dim),
            nn.SiLU(),
            nn.Linear(embedding_dim, embedding_dim),
        )
        e = embedding_dim
        self.conv_in = nn.Conv2d(channels, c0, 3, padding=1)
        self.down0 = _ResBlock(c0, c0, e, groups)
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = _ResBlock(c0, c1, e, groups)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(c1, c2, e, groups)
        self.mid2 = _ResBlock(c2, c2, e, groups)
        self.up1 = _ResBlock(c2 + c1, c1, e, groups)
        self.up1b = _ResBlock(c1, c1, e, groups)
        self.up0 = _ResBlock(c1 + c0, c0, e, groups)
        self.up0b = _ResBlock(c0, c0, e, groups)
        self.norm_out = nn.GroupNorm(min(groups, c0), c0)
        self.conv_out = nn.Conv2d(c0, channels, 3, padding=1)
        self.channels = channels
        if generator is not None:
            init_parameters(self, generator)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Score ``[B, C, H, W]`` at ``x`` ``[B, C, H, W]``, noise level ``sigma`` ``[B]``."""
        _check_inputs(x, sigma, 3)
        if x.shape[1] != self.channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise VarRedError(
                f"x: expected [B, {self.channels}, H, W] with H, W divisible by 4, got {shape_str(x)}"
            )
        e = self.emb_mlp(self.fourier(torch.log(sigma) / 4).to(x.dtype))  # [B, E]
        h0 = self.conv_in(x * self._c_in(sigma)[:, None, None, None])
        h0 = self.down0(h0, e)  # [B, c0, H, W]
        h1 = self.down1(self.pool0(h0), e)  # [B, c1, H/2, W/2]
        h = self.mid2(self.mid1(self.pool1(h1), e), e)  # [B, c2, H/4, W/4]
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up1b(self.up1(torch.cat([h, h1], dim=1), e), e)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up0b(self.up0(torch.cat([h, h0], dim=1), e), e)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self._score(x, sigma, out)
