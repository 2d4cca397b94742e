"""Gradient-level control variates: per-element/tensor/scalar coefficients for training, DDP-ready.

Given per-sample losses ``ℓ_i`` and zero-mean controls ``c_i`` (both differentiable in the
parameters θ), :class:`GradientControl` writes into every ``p.grad``

.. math:: g = \\frac1B \\sum_i \\nabla ℓ_i - \\sum_g β_g \\odot \\nabla \\frac1B \\sum_{i \\in g} c_i,

with β fitted from gradient statistics of *earlier* steps (or, in ``per_sample`` mode, of earlier
batches or other folds of this batch), never differentiated through. A fixed scalar β gives the
gradient of ``mean(ℓ - β c)`` (Jeha et al. 2024, Thm. 3.3/3.4). See ``docs/gradient.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from varred.errors import VarRedError, check_floating, shape_str

__all__ = ["GradientControl", "GradientControlConfig", "merge_moments", "pooled_ratio"]

Tensor = torch.Tensor
_STATS = ("mean_c", "mean_l", "cov_cc", "cov_cl", "cov_ll")


@dataclass(frozen=True)
class GradientControlConfig:
    """Validated options of :class:`GradientControl` (see its docstring for their meaning)."""

    granularity: str = "element"
    coefficient: str | float = "running"
    decay: float = 0.99
    num_groups: int = 1
    warmup_steps: int = 10
    per_sample_fit: str = "running"
    folds: int = 2
    nonfinite: str = "propagate"
    raise_on_nonfinite: bool = False
    validate: bool = True
    group_backward: str = "batched"

    def __post_init__(self) -> None:
        if self.granularity not in ("element", "tensor", "scalar"):
            raise VarRedError(
                f"granularity: expected 'element', 'tensor' or 'scalar', got {self.granularity!r}"
            )
        c = self.coefficient
        if isinstance(c, str):
            if c not in ("running", "per_sample"):
                raise VarRedError(
                    f"coefficient: expected 'running', 'per_sample' or a float, got {c!r}"
                )
        elif isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise VarRedError(
                f"coefficient: expected 'running', 'per_sample' or a finite float, got {c!r}"
            )
        if isinstance(self.decay, bool) or not isinstance(self.decay, numbers.Real):
            raise VarRedError(f"decay: expected a float in (0, 1], got {self.decay!r}")
        if not 0.0 < float(self.decay) <= 1.0:
            raise VarRedError(f"decay: expected a float in (0, 1], got {self.decay!r}")
        for name, low in (("num_groups", 1), ("warmup_steps", 0), ("folds", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise VarRedError(f"{name}: expected an integer >= {low}, got {v!r}")
        if self.per_sample_fit not in ("running", "crossfit"):
            raise VarRedError(
                f"per_sample_fit: expected 'running' or 'crossfit', got {self.per_sample_fit!r}"
            )
        if self.nonfinite not in ("propagate", "zero"):
            raise VarRedError(f"nonfinite: expected 'propagate' or 'zero', got {self.nonfinite!r}")
        if self.group_backward not in ("batched", "loop"):
            raise VarRedError(
                f"group_backward: expected 'batched' or 'loop', got {self.group_backward!r}"
            )


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > tiny``, else exactly 0 (never NaN)."""
    ok = den > torch.finfo(den.dtype).tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _lead(x: Tensor, n: int) -> Tensor:
    """View a ``[L]`` tensor as ``[L, 1, ..., 1]`` with ``n`` trailing singleton dims."""
    return x.reshape(x.shape + (1,) * n)


def pooled_ratio(num: Sequence[Tensor], den: Sequence[Tensor], granularity: str) -> list[Tensor]:
    """Coefficients ``Σ num / Σ den`` pooled per element, per tensor or over all tensors.

    Args:
        num: per parameter, covariances ``Cov(g_c, g_ℓ)`` of shape ``[L, *p.shape]``.
        den: per parameter, variances ``Var(g_c)`` of the same shapes.
        granularity: ``"element"`` (no pooling), ``"tensor"`` (sum over each tensor's
            elements) or ``"scalar"`` (sum over all elements of all tensors).

    Returns:
        per parameter, β of shape ``[L, *p.shape]`` (element) or ``[L, 1, ..., 1]``; 0 where
        the pooled variance is 0.
    """
    if granularity == "element":
        return [_safe_div(n, d) for n, d in zip(num, den)]
    sn = [n.flatten(1).sum(1) for n in num]  # [L, *p] -> [L]
    sd = [d.flatten(1).sum(1) for d in den]
    if granularity == "scalar":
        total = _safe_div(torch.stack(sn).sum(0), torch.stack(sd).sum(0))
        return [_lead(total, n.dim() - 1) for n in num]
    return [_lead(_safe_div(a, b), n.dim() - 1) for a, b, n in zip(sn, sd, num)]


def merge_moments(
    state: dict[str, Tensor],
    weight: Tensor,
    batch: dict[str, Tensor],
    count: Tensor,
    decay: float,
) -> tuple[dict[str, Tensor], Tensor]:
    """Merge batch moments into exponentially weighted running moments (Chan et al. 1979).

    Running weights decay by ``decay`` and the batch enters with weight ``count``; with
    ``count = 1`` and zero batch covariance this is the weighted update of Finch (2009),
    ``C ← (1-α)(C + α δ_x δ_y)``. Means and covariances are normalised (population) ones.

    Args:
        state: ``mean_c, mean_l, cov_cc, cov_cl, cov_ll`` of one parameter, each ``[L, *p]``
            (``mean_l``/``cov_ll`` may have ``L = 1`` and broadcast).
        weight: ``[L]`` or ``[1]`` (shared) running total weight.
        batch: the same keys for the batch (its means and covariances).
        count: shaped like ``weight``, the batch weight (number of samples, or 1 per step).
        decay: forgetting factor in ``(0, 1]`` (1 = plain cumulative moments).

    Returns:
        the merged state and weight (new tensors).
    """
    n = state["mean_c"].dim() - 1
    w_old = weight * decay
    w_new = w_old + count
    f = _lead(_safe_div(count, w_new), n)  # fraction of the merged weight that is new
    dc = batch["mean_c"] - state["mean_c"]
    dl = batch["mean_l"] - state["mean_l"]
    g = f * (1 - f)
    out = {
        "mean_c": state["mean_c"] + f * dc,
        "mean_l": state["mean_l"] + f * dl,
        "cov_cc": (1 - f) * state["cov_cc"] + f * batch["cov_cc"] + g * dc * dc,
        "cov_cl": (1 - f) * state["cov_cl"] + f * batch["cov_cl"] + g * dc * dl,
    }
    out["cov_ll"] = (1 - f) * state["cov_ll"] + f * batch["cov_ll"] + g * dl * dl
    return out, w_new


def _check_params(params: Any) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    try:
        plist = list(params)
    except TypeError:
        raise VarRedError(
            f"params: expected an iterable of tensors, got {type(params).__name__}"
        ) from None
    out: list[Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(plist):
        check_floating(f"params[{i}]", p)
        if not p.requires_grad:
            raise VarRedError(
                f"params[{i}]: expected a tensor with requires_grad=True, got requires_grad=False "
                f"(shape {shape_str(p)})"
            )
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise VarRedError("params: expected at least one parameter tensor, got none")
    return out


class GradientControl:
    """Gradient-level control variate with per-element, per-tensor or scalar coefficients.

    ``backward(losses, controls, groups)`` overwrites (never accumulates) each ``p.grad`` with

    .. math:: g = \\overline{\\nabla ℓ} - \\sum_g β_g \\odot \\nabla \\tfrac1B \\textstyle\\sum_{i \\in g} c_i .

    Controls must have mean zero for every θ so that their θ-gradients do too (Jeha et al. 2024,
    Sec. 3). β is a detached tensor of shape ``[num_groups, *p.shape]`` (element) or
    ``[num_groups, 1, ..., 1]`` (tensor/scalar), fitted without using the current step's
    gradients, so the controlled gradient stays unbiased.

    Args:
        params: parameter tensors (``requires_grad=True``) whose ``.grad`` is written.
        granularity: ``"element"`` (one β per parameter entry), ``"tensor"`` (statistics pooled
            over each tensor) or ``"scalar"`` (pooled over all parameters); always × groups.
        coefficient: ``"running"`` (β from exponentially weighted statistics of earlier steps'
            batch gradients ``(g_c, g_ℓ)``; costs ``1 + 1`` backward passes, the control one
            batched over groups), ``"per_sample"`` (β from per-sample gradients, exact within the
            batch; ``B``-times the gradient memory, for small models) or a float (fixed β; equals
            ``mean(ℓ - β c).backward()``).
        decay: forgetting factor of the running statistics in ``(0, 1]`` (1 = cumulative).
        num_groups: number of sample groups (e.g. σ bins), each with its own β.
        process_group: ``None`` (no communication), ``"default"`` (the initialised default
            group) or a ``torch.distributed`` process group over which gradients (running) or
            per-sample sufficient statistics (per_sample) are summed before any statistic is
            updated, so all ranks hold the same state and apply the same β.
        warmup_steps: β = 0 until this many finite updates were folded in (default 10 for
            running/fixed, 1 for per_sample).
        per_sample_fit: ``"running"`` (β from earlier batches; default) or ``"crossfit"``
            (``folds`` folds of this batch by sample index, each using β from the other folds).
        folds: number of cross-fitting folds (``per_sample_fit="crossfit"`` only).
        nonfinite: on a step with NaN/Inf in losses, controls or gradients the statistics are
            left untouched; ``"propagate"`` writes the (non-finite) gradient so that AMP
            GradScaler-style checks skip the step, ``"zero"`` writes zeros.
        raise_on_nonfinite: raise :class:`VarRedError` instead (one host sync per step).
        validate: check that ``groups`` lies in ``[0, num_groups)`` (one host sync per step).
        group_backward: ``"batched"`` (one ``is_grads_batched`` pass over the G group masks)
            or ``"loop"`` (G passes; for graphs with ops that have no vmap batching rule).

    Raises:
        VarRedError: invalid options or ``params``.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> ctrl = GradientControl(net.parameters(), coefficient=0.5)
        >>> x, z = torch.randn(8, 3), torch.randn(8, 3)
        >>> d = ctrl.backward(net(x).squeeze(1) ** 2, (net(z).squeeze(1) - net.bias) * z[:, 0])
        >>> net.weight.grad.shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Tensor,
        *,
        granularity: str = "element",
        coefficient: str | float = "running",
        decay: float = 0.99,
        num_groups: int = 1,
        process_group: Any = None,
        warmup_steps: int | None = None,
        per_sample_fit: str = "running",
        folds: int = 2,
        nonfinite: str = "propagate",
        raise_on_nonfinite: bool = False,
        validate: bool = True,
        group_backward: str = "batched",
    ) -> None:
        if warmup_steps is None:
            warmup_steps = 1 if coefficient == "per_sample" else 10
        self.config = GradientControlConfig(
            granularity, coefficient, decay, num_groups, warmup_steps, per_sample_fit,
            folds, nonfinite, raise_on_nonfinite, validate, group_backward,
        )  # fmt: skip
        if isinstance(process_group, str) and process_group != "default":
            raise VarRedError(
                f"process_group: expected None, 'default' or a ProcessGroup, got {process_group!r}"
            )
        self.params = _check_params(params)
        self.process_group = process_group
        is64 = any(p.dtype == torch.float64 for p in self.params)
        self._dtype = torch.float64 if is64 else torch.float32
        self.reset()

    # ---------------------------------------------------------------- state
    @property
    def _per_sample(self) -> bool:
        return self.config.coefficient == "per_sample"

    @property
    def num_updates(self) -> Tensor:
        """``[]`` int64: number of finite steps folded into the statistics."""
        return self._num_updates

    def reset(self) -> None:
        """Forget all statistics (β returns to 0 until the warmup is over again)."""
        g = self.config.num_groups
        gl = g if self._per_sample else 1
        dev = self.params[0].device
        self._stats = {
            k: [
                torch.zeros((gl if k.endswith("_l") or k == "cov_ll" else g, *p.shape),
                            dtype=self._dtype, device=p.device)
                for p in self.params
            ]
            for k in _STATS
        }  # fmt: skip
        self._weight = torch.zeros(gl, dtype=self._dtype, device=dev)
        self._num_updates = torch.zeros((), dtype=torch.int64, device=dev)

    def state_dict(self) -> dict[str, Any]:
        """Statistics as tensors and ints only (loadable with ``torch.load(weights_only=True)``)."""
        sd: dict[str, Any] = {
            "num_groups": self.config.num_groups,
            "num_params": len(self.params),
            "weight": self._weight.clone(),
            "num_updates": self._num_updates.clone(),
        }
        for k in _STATS:
            for i, t in enumerate(self._stats[k]):
                sd[f"{k}.{i}"] = t.clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` (shapes must match)."""
        mine = self.state_dict()
        if set(state_dict) != set(mine):
            raise VarRedError(f"state_dict: expected keys {sorted(mine)}, got {sorted(state_dict)}")
        for key, ref in mine.items():
            got = state_dict[key]
            if isinstance(ref, Tensor):
                if not isinstance(got, Tensor) or got.shape != ref.shape:
                    raise VarRedError(
                        f"state_dict[{key!r}]: expected a tensor of shape {shape_str(ref)}, "
                        f"got {shape_str(got)}"
                    )
            elif got != ref:
                raise VarRedError(f"state_dict[{key!r}]: expected {ref!r}, got {got!r}")
        self._weight = state_dict["weight"].to(self._weight).clone()
        self._num_updates = state_dict["num_updates"].to(self._num_updates).clone()
        for k in _STATS:
            self._stats[k] = [
                state_dict[f"{k}.{i}"].to(t).clone() for i, t in enumerate(self._stats[k])
            ]

    def coefficients(self) -> list[Tensor]:
        """Current β per parameter (what the next step applies in running modes), detached.

        Returns:
            per parameter ``[num_groups, *p.shape]`` (element) or ``[num_groups, 1, ..., 1]``.
        """
        cfg = self.config
        if not isinstance(cfg.coefficient, str):
            return [
                torch.full((cfg.num_groups,) + (1,) * p.dim(), float(cfg.coefficient),
                           dtype=self._dtype, device=p.device)
                for p in self.params
            ]  # fmt: skip
        beta = pooled_ratio(self._stats["cov_cl"], self._stats["cov_cc"], cfg.granularity)
        ready = self._num_updates >= cfg.warmup_steps
        return [torch.where(ready, b, torch.zeros_like(b)) for b in beta]

    # ---------------------------------------------------------------- step
    def backward(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Write the controlled gradient into every ``p.grad`` (overwriting) and update β.

        Args:
            losses: ``[B]`` per-sample losses, differentiable in ``params``.
            controls: ``[B]`` per-sample zero-mean controls, differentiable in ``params``.
            groups: ``[B]`` integer group index in ``[0, num_groups)``; ``None`` = group 0.

        Returns:
            diagnostics, all detached tensors (no host sync): ``variance_ratio`` ``[]`` and
            ``variance_ratio_per_group`` ``[G]`` (estimated tr Var of the controlled over the
            plain gradient, from the statistics β came from), ``correlation`` ``[G]`` (pooled
            ρ), ``beta_mean``/``beta_min``/``beta_max`` ``[]``, ``grad_norm_loss``,
            ``grad_norm_control``, ``grad_norm`` ``[]``, ``finite`` ``[]`` bool,
            ``num_updates`` ``[]``.

        Raises:
            VarRedError: bad shapes/dtypes/groups, losses independent of ``params``, or
                non-finite values with ``raise_on_nonfinite=True``.
        """
        batch = self._check_inputs(losses, controls, groups)
        active, pg = self._group()
        if self._per_sample:
            g_l, g_c, beta, finite, upd = self._per_sample_step(
                losses, controls, groups, batch, active, pg
            )
        else:
            g_l, g_c, finite = self._batch_gradients(losses, controls, groups, batch, active, pg)
            beta = self.coefficients()
            upd = None
        if self.config.raise_on_nonfinite and not bool(finite):
            raise VarRedError(
                "losses/controls: expected finite losses, controls and gradients, got NaN/Inf "
                f"(losses {shape_str(losses)}, controls {shape_str(controls)})"
            )
        with torch.no_grad():
            out = [gl - (b * gc).sum(0) for gl, gc, b in zip(g_l, g_c, beta)]
            if self.config.nonfinite == "zero":
                out = [torch.where(finite, o, torch.zeros_like(o)) for o in out]
            for p, o in zip(self.params, out):
                o = o.to(p.dtype)
                if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                    p.grad = o
                else:
                    p.grad.copy_(o)
            diag = self._diagnostics(beta, g_l, g_c, out, finite)
            self._update(g_l, g_c, finite, upd)
        return diag

    def _check_inputs(self, losses: Tensor, controls: Tensor, groups: Tensor | None) -> int:
        check_floating("losses", losses)
        check_floating("controls", controls)
        if losses.dim() != 1 or losses.shape[0] == 0:
            raise VarRedError(
                f"losses: expected a non-empty 1-D tensor [B], got {shape_str(losses)}"
            )
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
            if self.config.validate:
                lo, hi = int(groups.min()), int(groups.max())
                if lo < 0 or hi >= self.config.num_groups:
                    raise VarRedError(
                        f"groups: expected values in [0, {self.config.num_groups}), "
                        f"got min {lo} and max {hi}"
                    )
        return b

    def _group(self) -> tuple[bool, Any]:
        pg = self.process_group
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

    def _grads(
        self, out: Tensor, w: Tensor, batched: bool, retain: bool, name: str | None = None
    ) -> list[Tensor]:
        """``autograd.grad`` of ``out`` weighted by ``w`` (``[B]``, or ``[R, B]`` batched rows),
        unused parameters as zeros, in the statistics dtype; ``name`` set: all unused is an error."""
        gs = torch.autograd.grad(
            out, self.params, grad_outputs=w, retain_graph=retain,
            allow_unused=True, is_grads_batched=batched,
        )  # fmt: skip
        if name is not None and all(g is None for g in gs):
            raise VarRedError(
                f"{name}: expected values that depend on params, got a graph that reaches none "
                f"of the {len(self.params)} parameter tensors"
            )
        lead = (w.shape[0],) if batched else ()
        return [
            torch.zeros(lead + p.shape, dtype=self._dtype, device=p.device)
            if g is None else g.detach().to(self._dtype)
            for g, p in zip(gs, self.params)
        ]  # fmt: skip

    def _batch_gradients(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, b: int, active: bool, pg: Any
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Batch gradients ``g_ℓ [*p]`` and per-group ``g_c [G, *p]`` (global means), finite."""
        ng = self.config.num_groups
        scale = 1.0 if active else 1.0 / b  # sums when reducing, means otherwise
        need_c = controls.requires_grad
        g_l = self._grads(losses, torch.full_like(losses, scale), False, need_c, name="losses")
        if not need_c:
            g_c = [
                torch.zeros((ng, *p.shape), dtype=self._dtype, device=p.device) for p in self.params
            ]
        elif groups is None or ng == 1:
            g_c = self._grads(controls, torch.full_like(controls, scale), False, False)
            g_c = [torch.cat([g[None], g.new_zeros((ng - 1, *g.shape))]) for g in g_c]
        else:
            onehot = groups[None, :] == torch.arange(ng, device=groups.device)[:, None]
            masks = onehot.to(controls.dtype) * scale  # [G, B]
            if self.config.group_backward == "batched":
                g_c = self._grads(controls, masks, True, False)  # [G, *p]
            else:
                rows = [self._grads(controls, m, False, j < ng - 1) for j, m in enumerate(masks)]
                g_c = [torch.stack(r) for r in zip(*rows)]
        bad = (~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()
        if active:  # sums and counts over ranks, then the global means
            cnt = torch.full((1,), float(b), dtype=self._dtype, device=bad.device)
            red = self._allreduce(active, pg, [bad.to(self._dtype).view(1), cnt, *g_l, *g_c])
            bad, total = red[0][0], red[1][0]
            g_l = [x / total for x in red[2 : 2 + len(g_l)]]
            g_c = [x / total for x in red[2 + len(g_l) :]]
        finite = (bad == 0) & torch.stack([torch.isfinite(g).all() for g in g_l + g_c]).all()
        return g_l, g_c, finite

    def _allreduce(self, active: bool, pg: Any, xs: list[Tensor]) -> list[Tensor]:
        """Sum ``xs`` over the process group in one flat all-reduce (identity when inactive)."""
        if not active:
            return xs
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
        return [y.view_as(x) for y, x in zip(flat.split([x.numel() for x in xs]), xs)]

    def _per_sample_step(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, b: int, active: bool, pg: Any
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor, Any]:
        """Per-sample gradients → per (fold, group) sufficient statistics → β and gradients.

        Returns ``g_l [*p]``, ``g_c [L, *p]`` (per fold×group sums over the global batch size),
        β ``[L, ...]``, ``finite`` and the batch moments to merge (``L = folds·G`` or ``G``).
        """
        cfg = self.config
        ng, npar = cfg.num_groups, len(self.params)
        k = cfg.folds if cfg.per_sample_fit == "crossfit" else 1
        dev = losses.device
        eye = torch.eye(b, dtype=losses.dtype, device=dev)
        need_c = controls.requires_grad
        gl = self._grads(losses, eye, True, need_c, name="losses")  # [B, *p]
        if need_c:
            gc = self._grads(controls, eye.to(controls.dtype), True, False)
        else:
            gc = [torch.zeros_like(x) for x in gl]
        gi = groups.long() if groups is not None else torch.zeros(b, dtype=torch.long, device=dev)
        member = gi[None, :] == torch.arange(ng, device=dev)[:, None]  # [G, B]
        rank = (member.cumsum(1) - 1).gather(0, gi[None, :])[0]  # [B]: index within own group
        idx = (rank % k) * ng + gi  # [B], fold-major cell index; folds alternate within groups
        oh = torch.nn.functional.one_hot(idx, k * ng).T.to(self._dtype)  # [L, B]

        def red(x: Tensor) -> Tensor:  # [B, *p] -> [L, *p], sums per cell
            return (oh @ x.flatten(1)).view(k * ng, *x.shape[1:])

        def gsum(x: Tensor) -> Tensor:  # [L, *p] -> [G, *p], sums over folds
            return x.view(k, ng, *x.shape[1:]).sum(0)

        bad = ((~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()).to(self._dtype)
        first = self._allreduce(
            active, pg, [oh.sum(1), bad.view(1)] + [red(x) for x in gc] + [red(x) for x in gl]
        )
        n, bad, sc, sl = first[0], first[1][0], first[2 : 2 + npar], first[2 + npar :]
        n_g = n.view(k, ng).sum(0)  # [G]
        total = n.sum()
        mc = [_safe_div(gsum(s), _lead(n_g, s.dim() - 1)) for s in sc]  # [G, *p] batch means
        ml = [_safe_div(gsum(s), _lead(n_g, s.dim() - 1)) for s in sl]
        dc = [x - m[gi] for x, m in zip(gc, mc)]  # [B, *p], centred at the global group mean
        dl = [x - m[gi] for x, m in zip(gl, ml)]
        second = self._allreduce(
            active, pg,
            [red(x) for x in dc] + [red(x) for x in dl] + [red(x * x) for x in dc]
            + [red(x * y) for x, y in zip(dc, dl)] + [red(y * y) for y in dl],
        )  # fmt: skip
        s1c, s1l, s2cc, s2cl, s2ll = (second[j * npar : (j + 1) * npar] for j in range(5))

        def m2(s2: Tensor, s1x: Tensor, s1y: Tensor, cnt: Tensor) -> Tensor:
            return s2 - _safe_div(s1x * s1y, _lead(cnt, s2.dim() - 1))

        batch = []
        for i in range(npar):
            a, c = gsum(s1c[i]), gsum(s1l[i])
            nl = _lead(n_g, a.dim() - 1)
            batch.append({
                "mean_c": mc[i] + _safe_div(a, nl),
                "mean_l": ml[i] + _safe_div(c, nl),
                "cov_cc": _safe_div(m2(gsum(s2cc[i]), a, a, n_g), nl),
                "cov_cl": _safe_div(m2(gsum(s2cl[i]), a, c, n_g), nl),
                "cov_ll": _safe_div(m2(gsum(s2ll[i]), c, c, n_g), nl),
            })  # fmt: skip
        g_l = [s.sum(0) / total for s in sl]
        if k == 1:
            beta, g_c = self.coefficients(), [gsum(s) / total for s in sc]
        else:  # fold j uses the statistics of the other folds of this batch
            n_o = (n_g[None] - n.view(k, ng)).reshape(-1)  # [L]

            def other(x: Tensor) -> Tensor:  # [L, *p] -> [L, *p], sums over the other folds
                return (gsum(x)[None] - x.view(k, ng, *x.shape[1:])).reshape(x.shape)

            cl = [m2(other(s2cl[i]), other(s1c[i]), other(s1l[i]), n_o) for i in range(npar)]
            cc = [m2(other(s2cc[i]), other(s1c[i]), other(s1c[i]), n_o) for i in range(npar)]
            beta, g_c = pooled_ratio(cl, cc, cfg.granularity), [s / total for s in sc]
        finite = (bad == 0) & torch.stack([torch.isfinite(x).all() for x in sc + sl]).all()
        return g_l, g_c, beta, finite, (batch, n_g)

    def _diagnostics(
        self, beta: list[Tensor], g_l: list[Tensor], g_c: list[Tensor], out: list[Tensor],
        finite: Tensor,
    ) -> dict[str, Tensor]:  # fmt: skip
        st, w = self._stats, self._weight
        vb = beta if beta[0].shape[0] == self.config.num_groups else self.coefficients()

        def tot(xs: Any) -> Tensor:  # per parameter [L, *p] -> [L], summed over parameters
            return torch.stack([x.flatten(1).sum(1) for x in xs]).sum(0)

        # [G]: trace of the variance removed by each group's control, 2βCov − β²Var
        red = tot([2 * b * cl - b * b * cc for b, cl, cc in zip(vb, st["cov_cl"], st["cov_cc"])])
        tll, scl, scc = tot(st["cov_ll"]), tot(st["cov_cl"]), tot(st["cov_cc"])  # tll [1] or [G]
        bflat = torch.cat([x.flatten() for x in beta])

        def norm(xs: list[Tensor]) -> Tensor:
            return torch.stack([(x * x).sum() for x in xs]).sum().sqrt()

        return {
            "variance_ratio": 1 - _safe_div((red * w).sum(), (tll * w).sum()),
            "variance_ratio_per_group": 1 - _safe_div(red, tll.expand_as(red)),
            "correlation": _safe_div(scl, torch.sqrt(scc * tll)),
            "beta_mean": bflat.mean(),
            "beta_min": bflat.min(),
            "beta_max": bflat.max(),
            "grad_norm_loss": norm(g_l),
            "grad_norm_control": norm([x.sum(0) for x in g_c]),
            "grad_norm": norm(out),
            "finite": finite,
            "num_updates": self._num_updates.clone(),
        }

    def _update(self, g_l: list[Tensor], g_c: list[Tensor], finite: Tensor, upd: Any) -> None:
        """Fold this step into the statistics, unless it was non-finite (masked, no sync)."""
        if upd is None:  # running: one observation (g_c, g_ℓ) per step, weight 1
            zero = torch.zeros((), dtype=self._dtype, device=self._weight.device)
            batches = [
                {"mean_c": c, "mean_l": gl[None], "cov_cc": zero, "cov_cl": zero, "cov_ll": zero}
                for gl, c in zip(g_l, g_c)
            ]  # fmt: skip
            count = torch.ones_like(self._weight)
        else:
            batches, count = upd
        new_w = self._weight
        for i, bt in enumerate(batches):
            state = {k: self._stats[k][i] for k in _STATS}
            new, new_w = merge_moments(state, self._weight, bt, count, float(self.config.decay))
            for k in _STATS:
                self._stats[k][i] = torch.where(finite, new[k], state[k])
        self._weight = torch.where(finite, new_w, self._weight)
        self._num_updates = self._num_updates + finite.long()
