"""The one exception users see, and the checks that raise it."""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "VarRedError",
    "check_broadcastable",
    "check_finite",
    "check_floating",
    "check_order",
    "shape_str",
]


class VarRedError(ValueError):
    """A user-caused error: names the argument, what it got and what was expected."""


def shape_str(x: Any) -> str:
    """``[2, 3]``-style rendering of a tensor's shape (or ``repr`` of anything else)."""
    if isinstance(x, torch.Tensor):
        return "[" + ", ".join(str(s) for s in x.shape) + "]"
    return repr(x)


def check_floating(name: str, x: Any) -> torch.Tensor:
    """Require a floating-point tensor; return it."""
    if not isinstance(x, torch.Tensor):
        raise VarRedError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise VarRedError(
            f"{name}: expected a floating-point tensor, got dtype {x.dtype} with shape {shape_str(x)}"
        )
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Require no NaN/Inf (one host sync; call it outside hot loops or behind a flag)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise VarRedError(
            f"{name}: expected finite values, got {bad} NaN/Inf entries in a tensor of shape {shape_str(x)}"
        )
    return x


def check_order(order: Any, name: str = "order") -> int:
    """Require a non-negative Python/NumPy integer (not bool, not float)."""
    import numbers

    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise VarRedError(
            f"{name}: expected a non-negative integer, got {order!r} ({type(order).__name__})"
        )
    if order < 0:
        raise VarRedError(f"{name}: expected a non-negative integer, got {order}")
    return int(order)


def check_broadcastable(name: str, x: torch.Tensor, target: tuple[int, ...], what: str) -> None:
    """Require ``x`` to broadcast to exactly ``target`` (``what`` names the target in the message)."""
    try:
        ok = torch.broadcast_shapes(x.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise VarRedError(
            f"{name}: expected a shape broadcastable to {list(target)} ({what}), got {shape_str(x)}"
        )
