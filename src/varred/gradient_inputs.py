"""Inputs and outputs of one :class:`varred.GradientControl` step, checked once.

Pure helpers of the orchestrator: the layout from ``layout=`` or the old keywords, per-group
control chunks, the per-step input checks, the GradScaler's scale, the process group, one flat
all-reduce, and writing the flat ``[P]`` gradient into every ``p.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from varred.errors import VarRedError, check_floating, shape_str
from varred.layout import CoefficientLayout

__all__ = [
    "allreduce",
    "check_inputs",
    "resolve_layout",
    "resolve_process_group",
    "scale_of",
    "split_controls",
    "write_grads",
]

Tensor = torch.Tensor


def resolve_layout(
    layout: Any, granularity: str | None, num_groups: int | None, shrinkage: float | None
) -> CoefficientLayout:
    """``layout=`` or the separate ``granularity``/``num_groups``/``shrinkage`` keywords."""
    given = [
        k
        for k, v in (("granularity", granularity), ("num_groups", num_groups), ("shrinkage", shrinkage))
        if v is not None
    ]  # fmt: skip
    if layout is None:
        ng = num_groups
        if ng is not None and (isinstance(ng, bool) or not isinstance(ng, int) or ng < 1):
            raise VarRedError(f"num_groups: expected an integer >= 1, got {ng!r}")
        return CoefficientLayout(
            granularity if granularity is not None else "element",
            num_groups if num_groups is not None else 1,
            shrinkage,  # None: the layout's default (100 for per-element β with groups > 1)
        )
    if not isinstance(layout, CoefficientLayout):
        raise VarRedError(
            f"layout: expected a varred.layout.CoefficientLayout or None, got {type(layout).__name__}"
        )
    if given:
        raise VarRedError(
            f"layout: expected either layout= or the keywords {', '.join(sorted(given))} (they "
            f"conflict; put them in the CoefficientLayout), got both"
        )
    return layout


def split_controls(
    losses: Tensor, chunks: Any, groups: Tensor | None, num_groups: int
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Per-group controls → (chunks, ``[B]`` concatenation, ``[B]`` group index); no sync."""
    ng = num_groups
    try:
        parts = list(chunks)
    except TypeError:
        raise VarRedError(
            f"controls: expected a tensor [B] or a sequence of {ng} tensors (one per group), "
            f"got {type(chunks).__name__}"
        ) from None
    if len(parts) != ng:
        raise VarRedError(
            f"controls: expected {ng} per-group tensors (num_groups), got {len(parts)}"
        )
    if groups is not None:
        raise VarRedError(
            "groups: expected None when controls are split by group (the split defines "
            f"the groups), got {shape_str(groups)}"
        )
    for i, c in enumerate(parts):
        check_floating(f"controls[{i}]", c)
        if c.dim() != 1:
            raise VarRedError(f"controls[{i}]: expected a 1-D tensor [n_{i}], got {shape_str(c)}")
    sizes = [c.shape[0] for c in parts]
    if not isinstance(losses, Tensor) or losses.dim() != 1 or sum(sizes) != losses.shape[0]:
        raise VarRedError(
            f"controls: expected per-group sizes summing to the batch size of losses "
            f"{shape_str(losses)}, got sizes {sizes}"
        )
    dev = losses.device
    idx = torch.cat(
        [torch.full((n,), g, dtype=torch.long, device=dev) for g, n in enumerate(sizes)]
    )  # fill kernels, no host→device copy
    return parts, torch.cat(parts), idx  # cat promotes mixed dtypes


def check_inputs(
    losses: Tensor, controls: Tensor, groups: Tensor | None, num_groups: int, validate: bool
) -> int:
    """Check ``losses``/``controls`` ``[B]`` and ``groups`` ``[B]``; return ``B``.

    ``validate``: also check the group range (one host sync).
    """
    check_floating("losses", losses)
    check_floating("controls", controls)
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise VarRedError(f"losses: expected a non-empty 1-D tensor [B], got {shape_str(losses)}")
    if controls.shape != losses.shape:
        raise VarRedError(
            f"controls: expected shape {shape_str(losses)} (like losses), got {shape_str(controls)}"
        )
    if not losses.requires_grad:
        raise VarRedError(
            "losses: expected values that depend on params (requires_grad=True), "
            "got requires_grad=False"
        )
    b = losses.shape[0]
    if groups is not None:
        if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex():
            got = groups.dtype if isinstance(groups, Tensor) else type(groups).__name__
            raise VarRedError(f"groups: expected an integer tensor [B], got {got}")
        if groups.shape != (b,):
            raise VarRedError(f"groups: expected shape [{b}], got {shape_str(groups)}")
        if validate:
            lo, hi = int(groups.min()), int(groups.max())
            if lo < 0 or hi >= num_groups:
                raise VarRedError(
                    f"groups: expected values in [0, {num_groups}), got min {lo} and max {hi}"
                )
    return b


def scale_of(scaler: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scaler's current scale ``S`` as a ``[]`` tensor (no sync)."""
    fn = getattr(scaler, "scale", None)
    if not callable(fn):
        raise VarRedError(
            f"scaler: expected a torch.amp.GradScaler (or None), got {type(scaler).__name__}"
        )
    one = torch.ones((), dtype=torch.float32, device=device)
    return fn(one).to(dtype)


def resolve_process_group(pg: Any) -> tuple[bool, Any]:
    """``(active, group)`` for ``None``, ``"default"`` or a process group."""
    if pg is None:
        return False, None
    if isinstance(pg, str):
        if not (dist.is_available() and dist.is_initialized()):
            raise VarRedError(
                "process_group: expected an initialised torch.distributed for 'default', "
                "got an uninitialised one"
            )
        return True, None
    return True, pg


def allreduce(active: bool, pg: Any, xs: list[Tensor]) -> list[Tensor]:
    """Sum ``xs`` over the process group in one flat all-reduce (identity when inactive)."""
    if not active:
        return xs
    flat = torch.cat([x.reshape(-1) for x in xs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
    return [y.view_as(x) for y, x in zip(flat.split([x.numel() for x in xs]), xs)]


def write_grads(params: Sequence[Tensor], sizes: Sequence[int], out: Tensor) -> None:
    """Split the flat ``[P]`` gradient into every ``p.grad`` (overwriting; one fused copy)."""
    views = [o.view(p.shape) for o, p in zip(out.split(list(sizes)), params)]
    dst, src = [], []
    for p, v in zip(params, views):
        if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        dst.append(p.grad)
        src.append(v)
    torch._foreach_copy_(dst, src)
