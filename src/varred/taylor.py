"""Taylor polynomials along samples by nested forward-mode AD (being extended: TaylorCV)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp

__all__ = ["TaylorCV", "taylor_terms"]


def taylor_terms(
    f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, v: torch.Tensor, order: int
) -> list[torch.Tensor]:
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
            primals, tangents = jvp(inner, (x,), (v,))
            # primals = (D^0, ..., D^{j-1}); tangents = (D^1, ..., D^j)
            return (primals[0], *tangents)

        return g

    return list(nested(order)(x0))


def TaylorCV(*args, **kwargs):  # stub
    raise NotImplementedError("TaylorCV is not written yet")
