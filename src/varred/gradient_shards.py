"""FSDP2-sharded parameters in :class:`varred.GradientControl`: gradients by ``.backward()``.

Under ``torch.distributed.fsdp.fully_shard`` (FSDP2) the registered parameters are ``DTensor``
shards and the forward runs on all-gathered copies, so ``torch.autograd.grad`` with respect to
the shards finds no path. Here every needed gradient (the loss mean, each group's control mean)
comes from one ``.backward()`` instead: FSDP's post-backward reduce-scatter leaves the local
shard of the rank-averaged gradient in ``p.grad``, which is read and cleared between passes.
All statistics then live on the flat local shards ``[P_local]``; per-element β needs no
communication (the shard gradients already are global means), pooled (tensor/scalar or
shrunk) β all-reduce their pooled sums. Zhao et al. 2023, "PyTorch FSDP" (VLDB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from varred.errors import VarRedError, shape_str
from varred.moments import all_finite

__all__ = ["GRADIENT_MODES", "ShardedGradients", "is_sharded", "sharded_gradients"]

Tensor = torch.Tensor

#: how GradientControl obtains gradients: autograd.grad, FSDP's backward, or chosen per params.
GRADIENT_MODES = ("auto", "autograd", "backward")


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor: nothing can be sharded
        return None, None
    return DTensor, Shard


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` with a ``Shard`` placement (an FSDP2 parameter)."""
    dtensor, shard = _dtensor_type()
    return (
        dtensor is not None
        and isinstance(p, dtensor)
        and any(isinstance(pl, shard) for pl in p.placements)
    )


def sharded_gradients(
    mode: str, params: Sequence[Tensor], process_group: Any, coefficient: Any
) -> ShardedGradients | None:
    """The backward-mode gradient source for ``params``, or ``None`` for the autograd path.

    ``mode``: ``"auto"`` (backward mode exactly when some parameter is sharded),
    ``"autograd"`` or ``"backward"``.

    Raises:
        VarRedError: an unknown mode; in backward mode, parameters that are not all FSDP2
            shards of one 1-D device mesh, a ``process_group`` (FSDP already reduces), or
            ``coefficient="per_sample"`` (per-sample gradients do not exist under FSDP).
    """
    if mode not in GRADIENT_MODES:
        raise VarRedError(f"gradient_mode: expected one of {GRADIENT_MODES}, got {mode!r}")
    sharded = [is_sharded(p) for p in params]
    if mode == "autograd" or (mode == "auto" and not any(sharded)):
        return None
    for i, (p, s) in enumerate(zip(params, sharded)):
        if not s or p.device_mesh.ndim != 1 or p.device_mesh != params[0].device_mesh:
            got = type(p).__name__ if not s else f"a DTensor on mesh {p.device_mesh}"
            raise VarRedError(
                f"params[{i}]: expected (gradient_mode={mode!r}) every parameter sharded by "
                f"fully_shard on one 1-D device mesh, got {got} (shape {shape_str(p)})"
            )
    if process_group is not None:
        raise VarRedError(
            f"process_group: expected None with FSDP-sharded parameters (FSDP's reduce-scatter "
            f"already averages the gradients over ranks), got {process_group!r}"
        )
    if coefficient == "per_sample":
        raise VarRedError(
            "coefficient: expected 'running' or a float with FSDP-sharded parameters (per-sample "
            "gradients would take one backward per sample), got 'per_sample'"
        )
    return ShardedGradients(list(params))


class ShardedGradients:
    """Flat local-shard gradients of FSDP2 parameters through ``.backward()`` passes.

    Every rank must run the same passes (FSDP's collectives): each step does ``1 + G``
    backward passes (``2`` without ``groups``, ``1`` when the controls do not depend on the
    parameters), whatever the local batch holds. Assumes data-parallel sharding (FSDP, not
    tensor parallelism), FSDP's default gradient averaging over the mesh (no
    ``set_gradient_divide_factor``) and gradient sync on.

    Args:
        params: FSDP2 ``DTensor`` parameters of one 1-D mesh.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        mesh = params[0].device_mesh
        self.group, self.world = mesh.get_group(), mesh.size()
        self.shapes = [p.to_local().shape for p in params]
        self.sizes = [p.to_local().numel() for p in params]
        is64 = any(p.dtype == torch.float64 for p in params)
        kw = {"dtype": torch.float64 if is64 else torch.float32}
        # [npar] entries per whole tensor (the shrinkage prior's per-tensor mean)
        self.totals = torch.tensor([p.numel() for p in params], device=params[0].device, **kw)

    def reduce(self, xs: list[Tensor]) -> list[Tensor]:
        """Sum ``xs`` over the mesh in one flat all-reduce (pooled β sums over shards)."""
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        return [y.view_as(x) for y, x in zip(flat.split([x.numel() for x in xs]), xs)]

    def agree(self, ok: Tensor) -> Tensor:
        """``[]`` bool true on every rank iff true on all (one tiny all-reduce)."""
        return self.reduce([(~ok).to(torch.float32).view(1)])[0][0] == 0

    def _clear(self) -> None:
        for p in self.params:
            p.grad = None

    def _grad(self, out: Tensor, w: Tensor, retain: bool, dtype: torch.dtype) -> Tensor:
        """``[B]`` values × ``[B]`` weights → local shard of the rank mean of ``∇ Σ w_i out_i``."""
        self._clear()
        out.backward(w.to(out.dtype), retain_graph=retain)
        parts = [
            torch.zeros(n, dtype=dtype, device=p.device)
            if p.grad is None else p.grad.to_local().detach().reshape(n).to(dtype)
            for p, n in zip(self.params, self.sizes)
        ]  # fmt: skip
        self._clear()
        return torch.cat(parts)  # [P_local]

    def batch_gradients(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, num_groups: int,
        chunks: list[Tensor] | None, scale: Tensor | None, dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Local shards of ``g_ℓ [P]`` and ``g_c [G, P]`` (global batch means), ``finite []``.

        Backward passes of the weighted sums (scaled by a GradScaler's ``scale``), then one
        all-reduce of the counts and non-finite flags turns FSDP's rank means into means
        over the global batch (unequal local batches included).
        """
        ng, need_c = num_groups, controls.requires_grad
        s = 1.0 if scale is None else scale.to(losses.dtype)
        g_l = self._grad(losses, torch.ones_like(losses) * s, need_c, dtype)
        rows = [g_l.new_zeros(g_l.shape[0])] * ng
        live = list(range(ng if groups is not None or chunks is not None else 1)) if need_c else []
        for j in live:  # the same passes on every rank, whatever the local groups hold
            last = j == live[-1]
            if chunks is not None and chunks[j].requires_grad:  # that group's graph only
                rows[j] = self._grad(chunks[j], torch.ones_like(chunks[j]) * s, not last, dtype)
            else:  # group j's rows of the (concatenated) controls; all rows without groups
                w = torch.ones_like(controls)
                if groups is not None:
                    w = (groups == j).to(controls.dtype)
                rows[j] = self._grad(controls, w * s, not last, dtype)
        g_c = torch.stack(rows)  # [G, P]
        if scale is not None:
            g_l, g_c = g_l / scale, g_c / scale
        bad = (~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()
        kw = {"dtype": dtype, "device": bad.device}
        size = torch.full((1,), float(losses.shape[0]), **kw)  # local batch size
        flags = [
            bad.to(**kw).view(1),
            size,
            (~(all_finite(g_l) & all_finite(g_c))).to(**kw).view(1),
        ]
        bad, total, nonfinite = (t[0] for t in self.reduce(flags))
        factor = self.world / total  # FSDP averaged the ranks' sums
        return g_l * factor, g_c * factor, (bad == 0) & (nonfinite == 0)

    def write(self, params: Sequence[Tensor], sizes: Sequence[int], out: Tensor) -> None:
        """The flat local ``[P]`` gradient into every ``p.grad`` (a ``DTensor`` shard); like
        :func:`varred.gradient_inputs.write_grads`."""
        dtensor, _ = _dtensor_type()
        for p, v, shape in zip(params, out.split(list(sizes)), self.shapes):
            local = v.reshape(shape).to(p.dtype).clone()
            p.grad = dtensor.from_local(
                local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
