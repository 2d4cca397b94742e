"""Taylor control variates ``C^k`` for denoising score matching.

Jeha, Grathwohl, Andersen, Ek, Frellsen (2024), "Variance reduction of diffusion
model's gradients with Taylor approximation-based control variate": replace the
score at the noisy point by its order-``k`` Taylor polynomial about the clean point
``αx`` and subtract the polynomial loss's mean over ``ε``:

.. math::
    T^k(ε) = Σ_{j≤k} \\frac{σ^j}{j!} D^j_x s_θ(αx)[ε^{⊗j}],\\qquad
    h(ε) = \\frac{λ}{σ^2}\\,\\lVert σ T^k(ε) + ε \\rVert^2,\\qquad
    C^k = h(ε) - E_ε h.

Write ``t_j = D^j s(αx)[(σε)^{⊗j}] / j!`` (so ``T = Σ t_j``), ``Q = ‖T‖² - ‖t_0‖²`` and
``R = (T - t_0)ᵀε``. Expanding the square,

.. math:: C^k = λ (Q - E Q) + \\frac{2λ}{σ}(t_0ᵀε + R - E R) + \\frac{λ}{σ^2}(‖ε‖^2 - d),

which is how it is computed: the ``‖ε‖² - d`` and ``t_0`` parts have known means and
are never formed from differences of large numbers (finite in float32 at σ = 1e-4).
``E Q`` and ``E R`` come from Gauss–Hermite cubature or a basis sum ("exact"), or are
estimated without bias from probes independent of ``ε`` ("probe", "hutchinson").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from varred.errors import VarRedError, check_finite, check_floating, check_order, shape_str
from varred.flat_grad import is_vmap_unsupported
from varred.taylor import taylor_terms
from varred_diffusion.broadcast import append_dims, dot, per_sample, repeat_rows
from varred_diffusion.losses import Weighting, loss_weights
from varred_diffusion.taylor_means import (
    AUTO_EXACT_MAX_EVALS,
    check_noise,
    even_sum,
    exact_directions,
    parts_by_degree,
    probe_directions,
    probe_means,
    resolve_expectation,
)

__all__ = [
    "AUTO_EXACT_MAX_EVALS",
    "dsm_taylor_cv",
    "k0_control",
    "resolve_expectation",
    "taylor_control",
]

ScoreFn = Callable[..., Tensor]


def _terms(
    score_fn: ScoreFn,
    x0: Tensor,
    sigma: Tensor,
    v: Tensor,
    order: int,
    kwargs: Mapping[str, Any],
    batch: int,
) -> list[Tensor]:
    """``t_j = D^j s(x0)[v^{⊗j}] / j!`` for ``j = 0..order``, each ``[N, ...]``.

    ``x0``, ``v``: ``[N, ...]``, ``sigma``: ``[N]``; ``N = reps · batch`` rows, ``reps``
    copies of the user's batch (``x0`` and ``sigma`` repeated, ``v`` the directions).
    For k = 1 the score is evaluated once on the ``batch`` rows and the ``reps`` tangents
    go through one ``jvp`` vmapped over tangents (the primal is not recomputed per
    direction); an op without a vmap batching rule falls back to the stacked rows.
    """
    reps = x0.shape[0] // batch
    dtype = torch.promote_types(x0.dtype, torch.float32)  # autocast: reduce in >= float32
    if order == 1 and reps > 1:
        x1, s1 = x0[:batch], sigma[:batch]

        def f1(y: Tensor) -> Tensor:
            return score_fn(y, s1, **kwargs)

        tangents = v.reshape(reps, batch, *x0.shape[1:])  # [reps*B, ...] -> [reps, B, ...]
        try:
            # the primal does not depend on the tangent: unbatched out of the vmap, computed once
            t0, t1 = vmap(lambda u: jvp(f1, (x1,), (u,)), out_dims=(None, 0))(tangents)
        except RuntimeError as exc:
            if not is_vmap_unsupported(exc):
                raise
        else:
            if t0.shape != x1.shape:
                raise VarRedError(
                    f"score_fn: expected an output of the input's shape {shape_str(x1)}, "
                    f"got {shape_str(t0)}"
                )
            t0 = t0.to(dtype).repeat(reps, *([1] * (t0.ndim - 1)))
            return [t0, t1.reshape(v.shape).to(dtype)]
    kw = repeat_rows(kwargs, batch, reps)

    def f(y: Tensor) -> Tensor:
        return score_fn(y, sigma, **kw)

    raw = taylor_terms(f, x0, v, order)
    if raw[0].shape != x0.shape:
        raise VarRedError(
            f"score_fn: expected an output of the input's shape {shape_str(x0)}, got {shape_str(raw[0])}"
        )
    return [r.to(dtype) / math.factorial(j) for j, r in enumerate(raw)]


def dsm_taylor_cv(
    score_fn: ScoreFn,
    x: Tensor,
    sigma: Tensor | float,
    noise: Tensor,
    order: int = 0,
    *,
    weighting: Weighting = None,
    alpha: Tensor | float | None = None,
    expectation: str = "auto",
    mean_method: str | None = None,
    probe_noise: Tensor | tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Tensor:
    """Per-sample zero-mean DSM Taylor control variate ``C^k`` (Jeha et al., 2024).

    .. math:: C^k = \\frac{λ}{σ^2}\\lVert σ T^k s + ε\\rVert^2
              - E_ε\\Big[\\frac{λ}{σ^2}\\lVert σ T^k s + ε\\rVert^2\\Big],
              \\quad T^k s = Σ_{j≤k} \\frac{σ^j}{j!} D^j_x s_θ(αx)[ε^{⊗j}].

    ``E_ε C^k = 0`` for every θ (exactly with ``expectation="exact"``; in expectation
    over the probes otherwise), so ``∇_θ C^k`` is a zero-mean control for the DSM
    gradient. k = 0 is ``λ(2εᵀs(αx)/σ + (‖ε‖² - d)/σ²)``: one score evaluation at the
    clean point, no derivatives, no probes.

    Args:
        score_fn: ``score_fn(x [N, ...], sigma [N], **score_kwargs) -> [N, ...]``;
            rows must be independent (no batch statistics).
        x: clean data ``[B, ...]``.
        sigma: noise levels: float, 0-d or ``[B]``, all > 0.
        noise: the ε of the DSM loss ``[B, ...]`` (same shape as ``x``).
        order: Taylor order ``k ≥ 0``.
        weighting: λ(σ): ``None`` (σ²), a float, a ``[B]`` tensor or a callable ``[B] -> [B]``.
        alpha: signal scale α (float, 0-d or ``[B]``; ``None`` = 1, VE).
        mean_method: the core's name of ``expectation`` (``varred.MeanMethod``); when given
            it is used, and an ``expectation`` other than the default must agree with it.
        expectation: how ``E_ε h`` is obtained: "exact" (cubature / basis sums; any k,
            cost ``d`` (k = 1) or ``(k+1)^d`` (k ≥ 2) evaluations per sample),
            "hutchinson" (Rademacher probes; k ≤ 2), "probe" (the polynomial's even
            part at an independent Gaussian; any k) or "auto" (see ``resolve_expectation``).
        probe_noise: optional probes ``[B, ...]`` (Gaussian for "probe", Rademacher for
            "hutchinson" k = 1, a pair (Rademacher, Gaussian) for "hutchinson" k = 2);
            must be independent of ``noise``.
        generator: draws the probes when ``probe_noise`` is not given.
        score_kwargs: extra keyword arguments to ``score_fn`` (tensors with first
            dimension ``B`` are tiled when evaluations are stacked).
        validate: check ``x`` finite and ``σ`` finite and > 0 (host syncs; turn off in
            hot loops).

    Returns:
        ``[B]`` control values, differentiable in the parameters of ``score_fn``.

    Raises:
        VarRedError: bad σ (shape, ≤ 0, non-finite), non-finite ``x``, ``noise`` or
            ``probe_noise`` of the wrong shape, an invalid ``order`` or one the chosen
            ``expectation`` cannot provide, a ``score_fn`` output of the wrong shape,
            probes needed but neither ``probe_noise`` nor ``generator`` given.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> score = lambda y, s: net(y)
        >>> x, eps = torch.randn(4, 2), torch.randn(4, 2)
        >>> dsm_taylor_cv(score, x, torch.full((4,), 0.1), eps, order=1).shape
        torch.Size([4])
    """
    order = check_order(order)
    check_floating("x", x)
    if x.ndim < 2:
        raise VarRedError(
            f"x: expected shape [B, ...] with at least 2 dimensions, got {shape_str(x)}"
        )
    if validate:
        check_finite("x", x)
    noise = check_noise("noise", noise, x)
    b = x.shape[0]
    d = x[0].numel()
    sig = per_sample("sigma", sigma, b, x, None)
    if validate:
        check_finite("sigma", sig)
    if validate and bool((sig <= 0).any()):
        raise VarRedError(f"sigma: expected values > 0, got min {float(sig.min()):.3g}")
    method = resolve_expectation(_mean_method(expectation, mean_method), order, d)
    x0 = append_dims(per_sample("alpha", alpha, b, x, 1.0), x.ndim) * x
    lam = loss_weights(weighting, sig)
    return taylor_control(
        score_fn, x0, sig, noise, lam, order, method,
        probe_noise=probe_noise, generator=generator, score_kwargs=score_kwargs,
    )  # fmt: skip


def _mean_method(expectation: str, mean_method: str | None) -> str:
    """``mean_method`` (the core's name) or ``expectation`` (0.1's), refusing a contradiction."""
    if mean_method is None:
        return expectation
    if expectation not in ("auto", mean_method):
        raise VarRedError(
            f"mean_method: {mean_method!r} contradicts expectation={expectation!r}; give one"
        )
    return mean_method


def k0_control(s0: Tensor, noise: Tensor, sigma: Tensor, lam: Tensor) -> Tensor:
    """``C^0 = λ (2 εᵀs(αx)/σ + (‖ε‖² − d)/σ²)`` ``[B]`` from the score at the clean point.

    The unchecked k = 0 core (``s0``, ``noise``: ``[B, ...]``; ``sigma``, ``lam``: ``[B]``),
    reduced in at least float32 whatever autocast computed ``s0`` in.
    """
    dtype = torch.promote_types(torch.promote_types(s0.dtype, torch.float32), noise.dtype)
    with torch.autocast(device_type=s0.device.type, enabled=False):
        nz, sig, lam = noise.to(dtype), sigma.to(dtype), lam.to(dtype)
        lin = dot(s0.to(dtype), nz)  # s_0ᵀε: [B]
        noise_part = nz.pow(2).flatten(1).sum(1) - nz[0].numel()  # ‖ε‖² - d: [B]
        return lam * (2 * lin / sig + noise_part / (sig * sig))


def taylor_control(
    score_fn: ScoreFn,
    x0: Tensor,
    sig: Tensor,
    noise: Tensor,
    lam: Tensor,
    order: int,
    method: str,
    *,
    probe_noise: Tensor | tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """``C^k`` ``[B]`` about the clean point ``x0 = αx`` ``[B, ...]``: the unchecked core.

    Takes resolved per-sample ``sig``/``lam`` ``[B]`` and a resolved mean ``method`` (see
    :func:`resolve_expectation`); :func:`dsm_taylor_cv` is the validated entry point.
    """
    b, d = x0.shape[0], x0[0].numel()
    kwargs: dict[str, Any] = dict(score_kwargs or {})
    if order == 0:
        kw = dict(kwargs)
        s0 = score_fn(x0, sig, **kw)
        if not isinstance(s0, Tensor) or s0.shape != x0.shape:
            raise VarRedError(
                f"score_fn: expected an output of the input's shape {shape_str(x0)}, "
                f"got {shape_str(s0)}"
            )
        return k0_control(s0, noise, sig, lam)

    # one stacked Taylor call: rows [ε ; probes or exact directions], B rows each
    if method == "exact":
        dirs, weights = exact_directions(x0, order)
        m = dirs.shape[0]
        extra = dirs.unsqueeze(1).expand(m, *x0.shape).reshape(m * b, *x0.shape[1:])
    else:
        probes = probe_directions(x0, order, method, probe_noise, generator)
        extra = torch.cat(probes)
    reps = 1 + extra.shape[0] // b
    v = torch.cat([noise, extra])  # [reps*B, ...]
    sig_r = sig.repeat(reps)
    t_all = _terms(
        score_fn,
        x0.repeat(reps, *([1] * (x0.ndim - 1))),
        sig_r,
        append_dims(sig_r, v.ndim) * v,
        order,
        kwargs,
        b,
    )
    t = [u[:b] for u in t_all]
    rest = [u[b:] for u in t_all]
    if method == "exact":
        q_m, r_m = parts_by_degree(rest, extra)
        zero = torch.zeros(extra.shape[0], dtype=rest[0].dtype, device=x0.device)
        w = weights.reshape(m, 1)
        eq = (w * even_sum(q_m, zero).reshape(m, b)).sum(0)
        er = (w * even_sum(r_m, zero).reshape(m, b)).sum(0)
    else:
        eq, er = probe_means(rest, probes, method)

    noise_part = (noise * noise).flatten(1).sum(1) - d  # ‖ε‖² - d: [B]
    lin = dot(t[0], noise)  # t_0ᵀε: [B]
    q_parts, r_parts = parts_by_degree(t, noise)
    q = sum(q_parts.values(), torch.zeros_like(lin))
    r = sum(r_parts.values(), torch.zeros_like(lin))
    return lam * (q - eq) + (2 * lam / sig) * (lin + r - er) + lam * noise_part / (sig * sig)
