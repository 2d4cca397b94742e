"""Flat parameter gradients: one ``[P]`` (or ``[R, P]``) buffer over every parameter entry.

The one place that turns ``torch.autograd.grad`` over a list of parameter tensors into a flat
buffer (parameters in order, each flattened; unused ones as zeros), and that runs ``R``
weighted backward passes either batched (``is_grads_batched``, a vmap over the cotangents) or
as a loop. The ``"auto"`` fallback to the loop happens only on the errors a missing vmap
batching rule raises, never on out-of-memory or other device errors (issue 15, defect 17).
Used by :class:`varred.GradientControl` and ``varred_diffusion.gradient_moments``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from varred.errors import VarRedError

__all__ = ["GRAD_MODES", "flat_grad", "flat_grad_rows", "is_vmap_unsupported"]

Tensor = torch.Tensor
GRAD_MODES = ("auto", "batched", "loop")

# What a missing batching rule raises: functorch's own messages, and the shape mismatches of
# ops whose backward ignores the batch dim of the cotangent (e.g. GroupNorm under jvp). A
# backward whose unbatched graph ran cannot hit a shape mismatch for any other reason.
_VMAP_SIGNS = (
    "vmap",
    "batching rule",
    "batched",
    "functorch",
    "data-dependent control flow",
    "must match the size of tensor",
    "shape mismatch",
)
_DEVICE_SIGNS = ("out of memory", "cuda error", "cublas", "cudnn", "device-side assert", "nccl")


def is_vmap_unsupported(err: BaseException) -> bool:
    """Whether ``err`` says "this graph has no vmap batching rule" (→ use a loop instead).

    False for out-of-memory (``torch.OutOfMemoryError``) and CUDA/cuBLAS/cuDNN/NCCL errors,
    which a loop would not cure and must reach the caller.
    """
    if isinstance(err, torch.OutOfMemoryError) or not isinstance(
        err, (RuntimeError, NotImplementedError)
    ):
        return False
    msg = str(err).lower()
    if any(s in msg for s in _DEVICE_SIGNS):
        return False
    return any(s in msg for s in _VMAP_SIGNS)


def flat_grad(
    outputs: Tensor,
    params: Sequence[Tensor],
    grad_outputs: Tensor | None = None,
    *,
    batched: bool = False,
    retain_graph: bool = False,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> Tensor:
    """``∇_θ Σ_i w_i · outputs_i`` as one flat buffer.

    Args:
        outputs: ``[B]`` (or ``[]``) differentiable values.
        params: ``P`` entries in all.
        grad_outputs: ``w``, shaped like ``outputs`` (default ones), or ``[R, B]`` rows with
            ``batched=True``.
        batched: one ``is_grads_batched`` backward over the rows of ``grad_outputs``.
        retain_graph: keep the graph for further backward passes.
        dtype: of the result (default: the parameters' promoted dtype).
        name: set → a graph that reaches none of ``params`` raises :class:`VarRedError`
            naming it; unset → all zeros.

    Returns:
        ``[P]``, or ``[R, P]`` when batched.
    """
    params = list(params)
    if grad_outputs is None:
        grad_outputs = torch.ones_like(outputs)
    gs = torch.autograd.grad(
        outputs, params, grad_outputs=grad_outputs, retain_graph=retain_graph,
        allow_unused=True, is_grads_batched=batched,
    )  # fmt: skip
    if name is not None and all(g is None for g in gs):
        raise VarRedError(
            f"{name}: expected values that depend on params, got a graph that reaches none "
            f"of the {len(params)} parameter tensors"
        )
    if dtype is None:
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
    lead = (grad_outputs.shape[0],) if batched else ()
    parts = [
        torch.zeros((*lead, p.numel()), dtype=dtype, device=p.device)
        if g is None else g.detach().reshape(*lead, p.numel()).to(dtype)
        for g, p in zip(gs, params)
    ]  # fmt: skip
    return torch.cat(parts, dim=-1)  # [*lead, P], one cat


def flat_grad_rows(
    outputs: Tensor,
    params: Sequence[Tensor],
    weights: Tensor,
    *,
    mode: str = "auto",
    retain_graph: bool = False,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> tuple[Tensor, bool]:
    """``R`` weighted gradients ``∇_θ Σ_i weights[r, i] · outputs_i`` as ``[R, P]``.

    Args:
        outputs: ``[B]`` differentiable values; weights: ``[R, B]`` (``torch.eye(B)`` gives
            per-sample gradients).
        mode: ``"batched"`` (one ``is_grads_batched`` backward), ``"loop"`` (``R`` backward
            passes) or ``"auto"`` (batched; the loop only if :func:`is_vmap_unsupported`).
        retain_graph, dtype, name: as in :func:`flat_grad`.

    Returns:
        ``([R, P] gradients, whether the batched pass was used)``.

    Raises:
        VarRedError: an unknown ``mode``.
    """
    if mode not in GRAD_MODES:
        raise VarRedError(f"mode: expected one of {GRAD_MODES}, got {mode!r}")
    w = weights.to(outputs.dtype)
    kw = {"dtype": dtype, "name": name}
    if mode != "loop":
        try:  # auto: keep the graph for a possible loop
            rows = flat_grad(
                outputs, params, w, batched=True, retain_graph=retain_graph or mode == "auto", **kw
            )
        except (RuntimeError, NotImplementedError) as err:
            if mode == "batched" or not is_vmap_unsupported(err):
                raise
        else:
            return rows, True
    last = w.shape[0] - 1
    rows = [
        flat_grad(outputs, params, r, retain_graph=retain_graph or j < last, **kw)
        for j, r in enumerate(w)
    ]
    return torch.stack(rows), False
