"""Directional derivatives by nested forward-mode AD, and iterated Laplacians from them.

``D^j f(x0)[v^{⊗j}]`` by ``j`` nested ``torch.func.jvp`` (Griewank & Walther 2008, ch. 13),
mixed derivatives along several directions, and ``Δ^m f`` as a weighted sum of mixed
derivatives over multisets of coordinate pairs. The machinery under :class:`varred.TaylorCV`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch.func import jvp

from varred.errors import check_order

__all__ = ["iterated_laplacian", "laplacian_rows", "mixed_derivative", "sum_scaled", "taylor_terms"]

Fn = Callable[[torch.Tensor], torch.Tensor]


def taylor_terms(f: Fn, x0: torch.Tensor, v: torch.Tensor, order: int) -> list[torch.Tensor]:
    """Directional derivatives ``D^j f(x0)[v, ..., v]`` for ``j = 0..order``.

    One nested ``torch.func.jvp`` of depth ``order``; every lower order comes out of
    the same call (the tangent of ``D^j`` is ``D^{j+1}``), so no order is recomputed.

    Args:
        f: batched function ``[n, d] -> [n, *out]`` whose rows are independent.
        x0: expansion points ``[n, d]``.
        v: directions ``[n, d]``.
        order: highest derivative order ``k >= 0``.

    Returns:
        ``k + 1`` tensors, each ``[n, *out]``; entry ``j`` is ``D^j f(x0)[v^j]``
        (not divided by ``j!``).
    """

    def nested(j: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        if j == 0:
            return lambda x: (f(x),)
        inner = nested(j - 1)

        def g(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            primals, tangents = jvp(inner, (x,), (v,))[:2]
            # primals = (D^0, ..., D^{j-1}); tangents = (D^1, ..., D^j)
            return (primals[0], *tangents)

        return g

    return list(nested(order)(x0))


def mixed_derivative(f: Fn, x0: torch.Tensor, directions: list[torch.Tensor]) -> torch.Tensor:
    """``D^r f(x0)[u_1, ..., u_r]`` by ``r`` nested jvps, a different direction per level.

    Args:
        f: batched function ``[n, d] -> [n, *out]``, rows independent.
        x0: points ``[n, d]``.
        directions: ``r`` tensors ``[n, d]`` (row ``i`` differentiates row ``i``).

    Returns:
        ``[n, *out]``.
    """
    g = f
    for u in directions:
        g = (lambda inner, u_: lambda x: jvp(inner, (x,), (u_,))[1])(g, u)
    return g(x0)


def _laplacian_combos(d: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multisets ``{i_1 ≤ … ≤ i_m}`` of ``range(d)`` ``[C, m]`` and multiplicities ``[C]``."""
    combos = list(itertools.combinations_with_replacement(range(d), m))
    mult = [
        math.factorial(m) // math.prod(math.factorial(c.count(i)) for i in set(c)) for c in combos
    ]
    return torch.tensor(combos, dtype=torch.long), torch.tensor(mult, dtype=torch.float64)


def laplacian_rows(d: int, max_m: int) -> int:
    """Rows of :func:`iterated_laplacian` for ``m = 1..max_m``: ``Σ_m C(d + m − 1, m)``."""
    return sum(math.comb(d + m - 1, m) for m in range(1, max_m + 1))


def iterated_laplacian(
    f: Fn,
    point: torch.Tensor,
    m: int,
    *,
    scale_tril: torch.Tensor | None = None,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """``Δ^m f̃(0)`` for ``f̃(ε) = f(point + L ε)``: ``Σ_{i_1..i_m} ∂²_{i_1} ⋯ ∂²_{i_m} f̃(0)``.

    Mixed partials are symmetric, so only the ``C(d + m − 1, m)`` multisets of
    indices are differentiated (nested jvp of depth ``2m`` along
    ``L e_{i_1}, L e_{i_1}, …, L e_{i_m}, L e_{i_m}``), weighted by their number of
    orderings; all combinations share one batch (in chunks of ``chunk_size`` rows).

    Args:
        f: batched function ``[n, d] -> [n, *out]``, rows independent.
        point: expansion point ``[d]``.
        m: power of the Laplacian, ``≥ 0``.
        scale_tril: ``L`` ``[d, d]`` (identity when ``None``).
        chunk_size: rows per call of ``f`` (``None``: all at once).

    Returns:
        ``[*out]``, differentiable w.r.t. anything ``f`` closes over.

    >>> lap = iterated_laplacian(lambda x: (x**4).sum(1), torch.zeros(3, dtype=torch.float64), 2)
    >>> float(lap)  # Δ² Σ x_i⁴ = 24 d
    72.0
    """
    m = check_order(m, name="m")
    d = point.shape[0]
    x_point = point.reshape(1, d)
    if m == 0:
        return f(x_point)[0]
    cols = (
        torch.eye(d, dtype=point.dtype, device=point.device) if scale_tril is None else scale_tril.T
    )
    combos, mult = _laplacian_combos(d, m)  # [C, m], [C]
    combos, mult = combos.to(point.device), mult.to(point.device, point.dtype)
    step = combos.shape[0] if chunk_size is None else chunk_size
    total: torch.Tensor | None = None
    for start in range(0, combos.shape[0], step):
        idx, w = combos[start : start + step], mult[start : start + step]
        dirs = [cols[idx[:, t // 2]] for t in range(2 * m)]  # 2m × [c, d]
        vals = mixed_derivative(f, x_point.expand(idx.shape[0], d).clone(), dirs)  # [c, *out]
        part = (w.reshape(-1, *([1] * (vals.ndim - 1))) * vals).sum(0)
        total = part if total is None else total + part
    assert total is not None
    return total


def sum_scaled(terms: list[torch.Tensor], start: int, step: int = 1) -> torch.Tensor:
    """``Σ_{j = start, start + step, …} terms[j] / j!`` (``terms[j] = D^j f[v^j]``)."""
    picked = [terms[j] / math.factorial(j) for j in range(start, len(terms), step)]
    if not picked:
        return torch.zeros_like(terms[0])
    total = picked[0]
    for t in picked[1:]:
        total = total + t
    return total
