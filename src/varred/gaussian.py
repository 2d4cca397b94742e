"""Gaussian moments: Isserlis pairings and exact Gauss–Hermite cubature under ``N(0, I_d)``.

The expectation of a polynomial of total degree ``≤ D`` under the standard
Gaussian is a finite sum: a tensor-product probabilists' Gauss–Hermite rule with
``q = D // 2 + 1`` points per axis integrates every monomial of degree ``≤ 2q − 1``
in each coordinate exactly, hence every polynomial of total degree ``≤ D``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from varred.errors import VarRedError, check_order, shape_str

__all__ = [
    "double_factorial",
    "gauss_hermite_cubature",
    "gaussian_polynomial_expectation",
    "isserlis_pairings",
]

DEFAULT_MAX_NODES = 100_000


def double_factorial(n: int) -> int:
    """``n!! = n (n − 2) (n − 4) ⋯``, with ``0!! = (−1)!! = 1``.

    ``(j − 1)!!`` is the number of pairings of ``j`` indices, i.e. ``E[z^j]`` for
    ``z ~ N(0, 1)`` and even ``j``.

    Args:
        n: an integer ``≥ −1``.

    Returns:
        The double factorial as a Python ``int`` (exact).

    Raises:
        VarRedError: ``n`` is not an integer ``≥ −1``.

    >>> double_factorial(5), double_factorial(6), double_factorial(-1)
    (15, 48, 1)
    """
    if n == -1 and not isinstance(n, bool):
        return 1
    n = check_order(n, name="n")
    return math.prod(range(n, 0, -2))


def isserlis_pairings(j: int) -> list[tuple[tuple[int, int], ...]]:
    """All perfect matchings of ``range(j)`` (Isserlis 1918 / Wick).

    ``E[z_{i_1} ⋯ z_{i_j}] = Σ_pairings Π_{(a, b)} δ_{i_a i_b}`` for ``z ~ N(0, I)``.

    Args:
        j: number of indices, ``≥ 0``.

    Returns:
        ``(j − 1)!!`` pairings for even ``j`` (one empty pairing for ``j = 0``),
        none for odd ``j``. Each pairing is a tuple of ``(a, b)`` with ``a < b``,
        sorted by ``a``.

    Raises:
        VarRedError: ``j`` is not a non-negative integer.

    >>> isserlis_pairings(4)
    [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    """
    j = check_order(j, name="j")
    if j % 2:
        return []

    def rec(rest: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
        if not rest:
            return [()]
        first, others = rest[0], rest[1:]
        out: list[tuple[tuple[int, int], ...]] = []
        for t, partner in enumerate(others):
            remaining = others[:t] + others[t + 1 :]
            out.extend(((first, partner), *sub) for sub in rec(remaining))
        return out

    return rec(tuple(range(j)))


def _check_dim(d: object) -> int:
    d_int = check_order(d, name="d")
    if d_int < 1:
        raise VarRedError(f"d: expected a positive integer dimension, got {d!r}")
    return d_int


def cubature_size(d: int, degree: int) -> int:
    """Number of nodes ``(degree // 2 + 1)^d`` of :func:`gauss_hermite_cubature`."""
    return (degree // 2 + 1) ** d


def gauss_hermite_cubature(
    d: int,
    degree: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss–Hermite rule, exact under ``N(0, I_d)`` up to total degree ``degree``.

    ``Σ_m w_m p(x_m) = E[p(ε)]`` for every polynomial ``p`` of total degree
    ``≤ degree``, ``ε ~ N(0, I_d)``. Uses ``q = degree // 2 + 1`` probabilists'
    Hermite nodes per axis (``numpy.polynomial.hermite_e.hermegauss``), weights
    normalised to sum to one; ``M = q^d`` nodes (Golub & Welsch 1969).

    Args:
        d: dimension, ``≥ 1``.
        degree: total polynomial degree to integrate exactly, ``≥ 0``.
        dtype: floating dtype of the outputs.
        device: device of the outputs.
        max_nodes: refuse to build more than this many nodes.

    Returns:
        ``(nodes [M, d], weights [M])``, weights positive and summing to one.

    Raises:
        VarRedError: bad ``d``/``degree``/``dtype``, or ``M > max_nodes``.

    >>> x, w = gauss_hermite_cubature(2, 3)
    >>> x.shape, float(w.sum()), float((w * x[:, 0] ** 2).sum())
    (torch.Size([4, 2]), 1.0, 1.0)
    """
    d = _check_dim(d)
    degree = check_order(degree, name="degree")
    if not dtype.is_floating_point:
        raise VarRedError(f"dtype: expected a floating dtype, got {dtype}")
    q = degree // 2 + 1
    m = q**d
    if m > max_nodes:
        raise VarRedError(
            f"d, degree: a tensor-product rule for d={d}, degree={degree} needs "
            f"{q}^{d} = {m} nodes, more than max_nodes={max_nodes}; raise max_nodes or "
            "use an unbiased Monte Carlo (probe) estimate instead"
        )
    x1, w1 = np.polynomial.hermite_e.hermegauss(q)  # [q], [q]; weights sum to sqrt(2π)
    w1 = w1 / w1.sum()
    idx = np.array(list(itertools.product(range(q), repeat=d)), dtype=np.int64)  # [M, d]
    nodes = x1[idx]  # [M, d]
    weights = np.prod(w1[idx], axis=1)  # [M]
    return (
        torch.as_tensor(nodes, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def gaussian_polynomial_expectation(
    fn: Callable[[torch.Tensor], torch.Tensor],
    d: int,
    degree: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> torch.Tensor:
    """Exact ``E[fn(ε)]``, ``ε ~ N(0, I_d)``, for a batched polynomial ``fn`` of degree ``≤ degree``.

    One call of ``fn`` on the ``M`` nodes of :func:`gauss_hermite_cubature`; the
    result stays differentiable with respect to anything ``fn`` closes over.

    Args:
        fn: batched polynomial ``[M, d] -> [M, *out]`` (rows independent).
        d: dimension.
        degree: total degree bound of ``fn``.
        dtype: dtype of the nodes passed to ``fn``.
        device: device of the nodes.
        max_nodes: see :func:`gauss_hermite_cubature`.

    Returns:
        ``E[fn(ε)]`` with shape ``[*out]``.

    Raises:
        VarRedError: ``fn`` returns a non-tensor or a tensor whose first dimension is not ``M``.

    >>> round(float(gaussian_polynomial_expectation(lambda e: e[:, 0] ** 4 + e[:, 1], 2, 4)), 12)
    3.0
    """
    nodes, weights = gauss_hermite_cubature(
        d, degree, dtype=dtype, device=device, max_nodes=max_nodes
    )
    values = fn(nodes)
    if not isinstance(values, torch.Tensor):
        raise VarRedError(f"fn: expected it to return a torch.Tensor, got {type(values).__name__}")
    if values.ndim == 0 or values.shape[0] != nodes.shape[0]:
        raise VarRedError(
            f"fn: expected an output of shape [{nodes.shape[0]}, ...] for nodes of shape "
            f"{shape_str(nodes)}, got {shape_str(values)}"
        )
    w = weights.to(values.dtype).reshape(-1, *([1] * (values.ndim - 1)))  # [M, 1, ...]
    return (w * values).sum(0)
