r"""Per-sample reparameterisation gradients of the ELBO and their zero-mean controls.

For ``z = μ + Sε`` and ``G(ε) = ∇_z \log p(μ + Sε)`` the per-sample ELBO gradient is
``(G, chain(G εᵀ) + ∇H)`` for the (mean, scale) blocks, the entropy term in closed form.

Controls (all zero mean under ``ε ~ N(0, I)``, same layout as the gradient blocks):

- ``taylor_controls(order=1)``: ``T¹G = G(μ) + H(μ) S ε`` (Miller et al. 2017), i.e. the
  gradient of the quadratic Taylor model of ``log p`` about ``μ`` (the Taylor instance of
  Geffner & Domke 2020's quadratic control). Mean block ``H S ε`` (mean 0); scale block
  ``chain(T¹G εᵀ) − chain(H S)``.
- ``taylor_controls(order=2)``: adds ``½ D³\log p(μ)[Sε, Sε, ·]``; its mean-block mean is
  ``½ Σ_m D³\log p(μ)[s_m, s_m, ·]`` (columns ``s_m`` of S; Isserlis), the scale-block term
  is odd in ε (mean 0).
- ``score_control``: the score part of the entropy's path derivative; the full gradient minus
  it is STL (Roeder et al. 2017).

Hessian-vector products and third directional derivatives come from ``torch.func.jvp`` of
``torch.func.grad`` (never a dense Hessian). Exact means cost ``d`` directional derivatives;
``expectation="probe"`` uses independent probes ``u`` (``E[uuᵀ] = I``), unbiased for any d.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp

from varred.errors import VarRedError, shape_str
from varred.vi.families import GaussianFamily

__all__ = ["elbo_grads", "log_p_grad", "score_control", "stl_grads", "taylor_controls"]

LogP = Callable[[torch.Tensor], torch.Tensor]
EXPECTATIONS = ("auto", "exact", "probe")
AUTO_EXACT_MAX_D = 64


def _checked(log_p: LogP, z: torch.Tensor) -> torch.Tensor:
    """``log_p(z)`` with its shape, dtype and finiteness checked (outside torch.func)."""
    out = log_p(z)
    if not isinstance(out, torch.Tensor):
        raise VarRedError(f"log_p: expected a tensor [n], got {type(out).__name__}")
    if out.shape != (z.shape[0],):
        raise VarRedError(
            f"log_p: expected shape [{z.shape[0]}] (one value per row of z {shape_str(z)}), "
            f"got {shape_str(out)}"
        )
    if out.dtype != z.dtype or out.device != z.device:
        raise VarRedError(
            f"log_p: expected dtype {z.dtype} on {z.device} (like z), got {out.dtype} on {out.device}"
        )
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise VarRedError(f"log_p: expected finite values, got {bad} NaN/Inf of {z.shape[0]}")
    return out


def _gradfn(log_p: LogP) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row-wise ``∇_z log p``: ``[n, d] -> [n, d]`` (rows independent)."""
    return grad(lambda z: log_p(z).sum())


def log_p_grad(log_p: LogP, z: torch.Tensor) -> torch.Tensor:
    """``∇_z log p(z)`` row-wise ``[n, d] -> [n, d]``, ``log_p`` checked first.

    Raises:
        VarRedError: ``log_p`` returns a non-tensor, a shape other than ``[n]``, another
            dtype/device, or NaN/Inf; or its gradient is not finite.
    """
    _checked(log_p, z)
    g = _gradfn(log_p)(z.detach())
    if not bool(torch.isfinite(g).all()):
        raise VarRedError(f"log_p: expected a finite gradient, got NaN/Inf at z {shape_str(z)}")
    return g.detach()


def elbo_grads(
    family: GaussianFamily, log_p: LogP, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-sample ELBO gradient (ascent direction) for the (mean, scale) blocks.

    Args:
        family: the variational family.
        log_p: batched unnormalised log density ``[n, d] -> [n]``.
        eps: base noise ``[n, d]``.

    Returns:
        ``(g_mean [n, d], g_scale [n, *raw_scale.shape])`` with the entropy gradient
        (closed form) added to every row of the scale block.
    """
    family.check_noise(eps)
    g = log_p_grad(log_p, family.transform_noise(eps))
    g_scale = family.scale_chain(family.outer(g, eps)) + family.entropy_grad()
    return g, g_scale


def score_control(family: GaussianFamily, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The score term of the entropy's path derivative, a zero-mean control ``[n, d], [n, *raw]``.

    With ``∇_z \log q = −S^{-T}ε``: mean block ``−S^{-T}ε``, scale block
    ``∇H − chain(S^{-T}ε εᵀ)``. ``elbo − score_control`` is STL (Roeder et al. 2017).
    """
    family.check_noise(eps)
    v = family.apply_inv_scale_t(eps)
    return -v, family.entropy_grad() - family.scale_chain(family.outer(v, eps))


def stl_grads(
    family: GaussianFamily, log_p: LogP, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sticking-the-landing gradient (Roeder et al. 2017): ``elbo_grads − score_control``."""
    gm, gs = elbo_grads(family, log_p, eps)
    cm, cs = score_control(family, eps)
    return gm - cm, gs - cs


def _directions(
    family: GaussianFamily, expectation: str, probes: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(u [m, d], S u [m, d], weight)`` with ``weight Σ u uᵀ = I`` (exact) or ``E = I`` (probes)."""
    d = family.d
    if expectation == "exact":
        u = torch.eye(d, dtype=family.loc.dtype, device=family.loc.device)
        return u, family.apply_scale(u), 1.0
    u = torch.randint(0, 2, (probes, d), generator=generator, device=family.loc.device)
    u = (2 * u - 1).to(family.loc.dtype)  # Rademacher
    return u, family.apply_scale(u), 1.0 / probes


def taylor_controls(
    family: GaussianFamily,
    log_p: LogP,
    eps: torch.Tensor,
    order: int = 1,
    *,
    expectation: str = "auto",
    probes: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Zero-mean Taylor controls of the ELBO gradient integrand about the mean.

    Args:
        family: the variational family.
        log_p: batched log density ``[n, d] -> [n]`` (rows independent, twice or thrice
            differentiable).
        eps: base noise ``[n, d]``, the same as for :func:`elbo_grads`.
        order: 1 (Miller et al. 2017) or 2 (adds the third-derivative term).
        expectation: ``"exact"`` (``d`` directional derivatives at μ), ``"probe"``
            (``probes`` Rademacher directions, an unbiased estimate independent of ``eps``)
            or ``"auto"`` (exact for ``d ≤ 64``).
        probes: number of probes for ``"probe"``.
        generator: randomness of the probes.

    Returns:
        ``(c_mean [n, d], c_scale [n, *raw_scale.shape])``, each of mean zero.

    Raises:
        VarRedError: bad ``order``/``expectation``/``probes``, bad noise or ``log_p``.
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise VarRedError(f"order: expected 1 or 2, got {order!r}")
    if expectation not in EXPECTATIONS:
        raise VarRedError(f"expectation: expected one of {EXPECTATIONS}, got {expectation!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise VarRedError(f"probes: expected a positive integer, got {probes!r}")
    family.check_noise(eps)
    if expectation == "auto":
        expectation = "exact" if family.d <= AUTO_EXACT_MAX_D else "probe"
    mu = family.loc.detach()
    n = eps.shape[0]
    _checked(log_p, mu.unsqueeze(0))
    basis, dirs, w = _directions(family, expectation, probes, generator)  # [m, d]
    v = torch.cat([family.apply_scale(eps), dirs])  # [n + m, d]: S ε rows, then S u rows
    # one (nested) jvp for the samples and the mean directions together
    allt = _taylor(_gradfn(log_p), mu.expand(v.shape[0], -1).clone(), v, order)
    terms, dterms = [t[:n] for t in allt], [t[n:] for t in allt]
    tg = terms[1] + (0.5 * terms[2] if order == 2 else 0.0)  # T G − g0
    g0 = terms[0]
    mean_m = 0.5 * w * dterms[2].sum(0) if order == 2 else torch.zeros_like(mu)
    c_mean = tg - mean_m
    # scale block: E[(g0 + H S ε) εᵀ] = H S; rows of dirs are S u, so H S ≈ w Σ (H S u) uᵀ
    mean_outer = w * family.outer(dterms[1], basis).sum(0)
    c_scale = family.scale_chain(family.outer(g0 + tg, eps) - mean_outer)
    if not (bool(torch.isfinite(c_mean).all()) and bool(torch.isfinite(c_scale).all())):
        raise VarRedError("log_p: expected finite derivatives at the mean, got NaN/Inf")
    return c_mean.detach(), c_scale.detach()


def _taylor(
    gfn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, v: torch.Tensor, order: int
) -> list[torch.Tensor]:
    """``[G(x0), D G(x0)[v]]`` (order 1) or also ``D² G(x0)[v, v]`` (order 2), nested jvps."""
    if order == 1:
        g0, hv = jvp(gfn, (x0,), (v,))[:2]
        return [g0.detach(), hv.detach()]

    def inner(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = jvp(gfn, (x,), (v,))
        return out[0], out[1]

    prim, tang = jvp(inner, (x0,), (v,))[:2]
    return [prim[0].detach(), prim[1].detach(), tang[1].detach()]
