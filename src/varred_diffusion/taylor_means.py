"""The means of the DSM Taylor controls: exact (basis sums, cubature) or unbiased probes.

``C^k`` subtracts ``E_ε Q`` and ``E_ε R`` (``taylor_cv``'s notation): the even-degree parts of
the polynomial's pieces in ε. Exact means evaluate them at the ``d`` basis directions (k = 1)
or at Gauss–Hermite cubature nodes (k ≥ 2); probe means evaluate them at directions drawn
independently of ε (Rademacher for the Hutchinson traces, Gaussian for "probe"), which keeps
the control's mean zero in expectation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, shape_str
from varred.gaussian import gauss_hermite_cubature
from varred_diffusion.broadcast import dot

__all__ = [
    "AUTO_EXACT_MAX_EVALS",
    "check_noise",
    "draw_probe",
    "even_sum",
    "exact_directions",
    "parts_by_degree",
    "probe_directions",
    "probe_means",
    "resolve_expectation",
]

#: "auto" uses exact means while they cost at most this many extra score
#: evaluations (with derivatives) per sample: ``d`` for k = 1, ``(k+1)^d`` for k ≥ 2.
AUTO_EXACT_MAX_EVALS = 64
_EXPECTATIONS = ("auto", "exact", "probe", "hutchinson")


def parts_by_degree(t: list[Tensor], eps: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Homogeneous parts of ``Q = ‖T‖² - ‖t_0‖²`` and ``R = (T - t_0)ᵀε`` by degree in ε.

    Returns:
        ``(q, r)``: dicts degree -> ``[B]``; ``q[m] = Σ_{i+j=m, (i,j)≠(0,0)} t_iᵀt_j``,
        ``r[j+1] = t_jᵀε`` for ``j ≥ 1``.
    """
    q: dict[int, Tensor] = {}
    k = len(t) - 1
    for i in range(k + 1):
        for j in range(i, k + 1):
            if i == j == 0:
                continue
            term = dot(t[i], t[j]) * (1.0 if i == j else 2.0)
            q[i + j] = q[i + j] + term if i + j in q else term
    r = {j + 1: dot(t[j], eps) for j in range(1, k + 1)}
    return q, r


def even_sum(parts: dict[int, Tensor], like: Tensor) -> Tensor:
    """Sum of the even-degree parts (zeros like ``like`` ``[B]`` if none)."""
    out = torch.zeros_like(like)
    for deg, val in parts.items():
        if deg % 2 == 0:
            out = out + val
    return out


def resolve_expectation(expectation: str, order: int, dim: int) -> str:
    """The mean method ``"auto"`` picks (or the one given, validated) for ``order`` and ``dim``.

    ``"exact"`` for k = 0 always, and for k ≥ 1 while its cost (``d`` evaluations for
    k = 1, ``(k+1)^d`` cubature nodes for k ≥ 2) is at most ``AUTO_EXACT_MAX_EVALS``;
    otherwise ``"hutchinson"`` for k ≤ 2 (lower variance than "probe", measured in
    docs/diffusion.md) and ``"probe"`` beyond.
    """
    if expectation not in _EXPECTATIONS:
        raise VarRedError(f"expectation: expected one of {_EXPECTATIONS}, got {expectation!r}")
    if expectation == "hutchinson" and order > 2:
        raise VarRedError(
            f"expectation: 'hutchinson' provides the means for order <= 2, got order={order}; "
            "use 'probe' or 'exact'"
        )
    if expectation != "auto":
        return expectation
    if order == 0:
        return "exact"
    cost = dim if order == 1 else (order + 1) ** min(dim, 64)
    if cost <= AUTO_EXACT_MAX_EVALS:
        return "exact"
    return "hutchinson" if order <= 2 else "probe"


def check_noise(name: str, v: Any, x: Tensor) -> Tensor:
    check_floating(name, v)
    if v.shape != x.shape:
        raise VarRedError(f"{name}: expected the shape of x {shape_str(x)}, got {shape_str(v)}")
    return v.to(dtype=x.dtype)


def draw_probe(
    kind: str, x: Tensor, given: Tensor | None, generator: torch.Generator | None, name: str
) -> Tensor:
    """A probe like ``x``: the given one (checked) or drawn from ``generator``."""
    if given is not None:
        return check_noise(name, given, x)
    if generator is None:
        raise VarRedError(
            f"generator: expected a torch.Generator (or {name}) for the probe-based mean, got None"
        )
    if kind == "rademacher":
        z = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return (2 * z - 1).to(x.dtype)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def exact_directions(x0: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """Exact-mean directions ``[M, ...]`` and weights ``[M]``: basis (k = 1) or cubature (k ≥ 2)."""
    d = x0[0].numel()
    if order == 1:
        # E‖t_1‖² = σ²‖J‖_F² = Σ_i ‖σ J e_i‖², E t_1ᵀε = σ tr J = Σ_i (σ J e_i)ᵀ e_i
        nodes = torch.eye(d, dtype=x0.dtype, device=x0.device)  # [d, d]
        weights = torch.ones(d, dtype=x0.dtype, device=x0.device)
    else:
        # Q has degree 2k and R degree k+1 <= 2k in ε: (k+1) points per axis
        nodes, weights = gauss_hermite_cubature(
            d, 2 * order, dtype=x0.dtype, device=x0.device
        )  # [M, d], [M]
    return nodes.reshape(-1, *x0.shape[1:]), weights.to(x0.dtype)


def probe_directions(
    x0: Tensor,
    order: int,
    method: str,
    probe_noise: Tensor | tuple[Tensor, Tensor] | None,
    generator: torch.Generator | None,
) -> list[Tensor]:
    """The probes ``[B, ...]`` each, independent of ε: ``[g]`` ("probe"), ``[z]`` or ``[z, g]``."""
    if method == "probe" or order == 1:
        if isinstance(probe_noise, tuple):
            raise VarRedError(
                f"probe_noise: expected one tensor for expectation={method!r} with order {order}, "
                "got a tuple"
            )
        kind = "gaussian" if method == "probe" else "rademacher"
        return [draw_probe(kind, x0, probe_noise, generator, "probe_noise")]
    if probe_noise is not None and not (isinstance(probe_noise, tuple) and len(probe_noise) == 2):
        raise VarRedError(
            "probe_noise: expected a pair (rademacher, gaussian) for hutchinson with order 2, "
            f"got {shape_str(probe_noise)}"
        )
    z0, g0 = (None, None) if probe_noise is None else probe_noise
    return [
        draw_probe("rademacher", x0, z0, generator, "probe_noise[0]"),
        draw_probe("gaussian", x0, g0, generator, "probe_noise[1]"),
    ]


def probe_means(t: list[Tensor], probes: list[Tensor], method: str) -> tuple[Tensor, Tensor]:
    """Unbiased ``(E Q, E R)`` ``[B]`` from the terms ``t`` at the stacked probes.

    "probe": the even parts of ``Q``, ``R`` at a Gaussian ``ε'`` (the symmetrisation
    ``(P(ε') + P(-ε'))/2`` keeps exactly the even degrees, since ``t_j(-ε') = (-1)^j t_j(ε')``).
    "hutchinson": the degree-2 parts at a Rademacher ``z`` (``E zᵀAz = tr A``); for k = 2
    the degree-4 part ``‖t_2‖²`` at a separate Gaussian ``g`` (Rademacher fourth moments differ).
    """
    b = probes[0].shape[0]
    if method == "probe":
        q, r = parts_by_degree(t, probes[0])
        zero = torch.zeros(b, dtype=t[0].dtype, device=t[0].device)
        return even_sum(q, zero), even_sum(r, zero)
    tz = [u[:b] for u in t]
    er = dot(tz[1], probes[0])
    if len(t) == 2:
        return dot(tz[1], tz[1]), er
    tg2 = t[2][b:]
    return 2 * dot(tz[0], tz[2]) + dot(tz[1], tz[1]) + dot(tg2, tg2), er
