"""Per-sample broadcasting: the one module where σ, α, λ and keyword tensors meet the batch.

Every per-sample parameter is resolved to ``[B]`` by :func:`per_sample` at a public entry
point and meets the data's shape through :func:`append_dims`; a batch's per-sample keyword
tensors follow their rows through :func:`take_rows` and are tiled by :func:`repeat_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, shape_str

__all__ = ["append_dims", "dot", "per_sample", "repeat_rows", "take_rows"]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``x`` has ``ndim`` dims: ``[B] -> [B, 1, ..., 1]``.

    >>> append_dims(torch.ones(3), 4).shape
    torch.Size([3, 1, 1, 1])
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise VarRedError(f"ndim: expected ≥ x.ndim = {x.ndim}, got {ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def per_sample(
    name: str, v: float | Tensor | None, n: int, like: Tensor, default: float | None = None
) -> Tensor:
    """Broadcast a per-sample parameter (σ, α, λ) to ``[n]`` in ``like``'s dtype and device.

    A Python number becomes ``torch.full`` on the device (no host-to-device copy), a 0-d
    tensor is expanded, a ``[n]`` tensor is cast; ``None`` takes ``default`` (an error when
    there is none).

    Raises:
        VarRedError: ``None`` without a default, a non-numeric value, or a shape other than
            ``[]`` / ``[n]``.
    """
    if v is None:
        if default is None:
            raise VarRedError(f"{name}: expected a float or a tensor of shape [{n}], got None")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise VarRedError(
            f"{name}: expected a float or a tensor of shape [{n}], got {type(v).__name__}"
        )
    if not isinstance(v, Tensor):
        return torch.full((n,), float(v), dtype=like.dtype, device=like.device)
    t = v.to(dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise VarRedError(
            f"{name}: expected shape [{n}] (one per sample), a float or a 0-d tensor, "
            f"got {shape_str(t)}"
        )
    return t


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product ``[B, ...] x [B, ...] -> [B]``."""
    return (a * b).flatten(1).sum(1)


def take_rows(kwargs: Mapping[str, Any], rows: Tensor | slice, batch: int) -> dict[str, Any]:
    """Index the keyword tensors whose first dimension is the batch ``batch`` by ``rows``."""
    return {
        k: v[rows] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch else v
        for k, v in kwargs.items()
    }


def repeat_rows(kwargs: Mapping[str, Any], batch: int, reps: int) -> dict[str, Any]:
    """Tile the keyword tensors whose first dimension is ``batch`` to ``reps * batch`` rows."""
    out: dict[str, Any] = {}
    for key, val in kwargs.items():
        if reps > 1 and isinstance(val, Tensor) and val.ndim >= 1 and val.shape[0] == batch:
            val = val.repeat(reps, *([1] * (val.ndim - 1)))
        out[key] = val
    return out
